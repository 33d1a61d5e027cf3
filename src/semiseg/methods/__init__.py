"""Training methods. Importing this package registers every built-in method and plug-in."""

from semiseg.methods import cld as _cld  # noqa: F401  (registers "cld")
from semiseg.methods import cps as _cps  # noqa: F401
from semiseg.methods import dhc as _dhc  # noqa: F401
from semiseg.methods import generic_ssl as _generic_ssl  # noqa: F401
from semiseg.methods import magicnet, mean_teacher  # noqa: F401  (register methods)
from semiseg.methods import simis as _simis  # noqa: F401  (registers "simis")
from semiseg.methods import supervised as _supervised  # noqa: F401
from semiseg.methods import tak as _tak  # noqa: F401  (registers "tak")
from semiseg.methods import uamt as _uamt  # noqa: F401  (registers "uamt")
from semiseg.methods.base import (
    Batch,
    Method,
    MethodContext,
    StepInfo,
    build_method,
    list_methods,
    register_method,
    register_plugin,
)
from semiseg.plugins import scdl as _scdl  # noqa: F401  (registers the "scdl" plug-in)

__all__ = [
    "Batch",
    "Method",
    "MethodContext",
    "StepInfo",
    "build_method",
    "list_methods",
    "register_method",
    "register_plugin",
]
