"""Training methods: one module per method, each registering itself
(:func:`semiseg.methods.registry.register_method`).

* :mod:`semiseg.methods.base`: the method interface (``Method``, ``Batch``, ``StepInfo``,
  ``MethodContext``, ``MethodNetworks``).
* :mod:`semiseg.methods.registry`: names -> methods, plug-ins, ``build_method``.
* The methods: ``supervised``, ``cps`` / ``ga_cps``, ``mean_teacher``, ``uamt``, ``magicnet`` /
  ``ga_magicnet``, ``tak``, ``dhc``, ``cld``, ``simis``, ``generic_ssl``.

Importing this package registers nothing; :mod:`semiseg.catalog` imports every built-in method
and plug-in (see docs/methods/README.md, "Adding a method").
"""
