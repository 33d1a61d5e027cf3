"""The composition root: importing this module registers every built-in method and plug-in.

Methods (:mod:`semiseg.methods`) do not know their plug-ins and plug-ins
(:mod:`semiseg.plugins`) only know the method interface; this is the one place that imports
both. Its layer sits above the plug-ins and below the engine (docs/architecture.md), so the
engine, the command line, the tests and the benchmarks look method names up here.
"""

from semiseg.methods import (  # noqa: F401  (each module registers its methods)
    cld,
    cps,
    dhc,
    generic_ssl,
    magicnet,
    mean_teacher,
    simis,
    supervised,
    tak,
    uamt,
)
from semiseg.methods.registry import (
    build_method,
    is_semi_supervised,
    list_methods,
    parse_method_options,
    resolve_method,
)
from semiseg.plugins import scdl  # noqa: F401  (registers the "scdl" plug-in)

__all__ = [
    "build_method",
    "is_semi_supervised",
    "list_methods",
    "parse_method_options",
    "resolve_method",
]
