"""Plug-ins: modules that wrap any registered host method without editing it.

A plug-in registers a builder with :func:`semiseg.methods.base.register_plugin`; method
``<prefix>_<host>`` is then the plug-in attached to ``host`` (for example ``scdl_ga_cps``).
Importing :mod:`semiseg.methods` imports the built-in plug-ins.

* :mod:`semiseg.plugins.scdl`: SCDL (Semantic Class Distribution Learning), prefix ``scdl``.
"""
