"""Plug-ins: modules that wrap any registered host method without editing it.

A plug-in registers a builder with :func:`semiseg.methods.registry.register_plugin`; method
``<prefix>_<host>`` is then the plug-in attached to ``host`` (for example ``scdl_ga_cps``). A
plug-in attaches to the networks a host names (:meth:`semiseg.methods.base.Method.networks`).
:mod:`semiseg.catalog` imports the built-in plug-ins.

* :mod:`semiseg.plugins.scdl`: SCDL (Semantic Class Distribution Learning), prefix ``scdl``.
"""
