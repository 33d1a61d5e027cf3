"""TAK's textual anatomical knowledge (Gu et al., sections 3.2-3.3).

* :mod:`semiseg.knowledge.texts`: knowledge files (a position and a shape description per
  class; packaged for Synapse and AMOS in ``descriptions/``), prompts and their hash.
* :mod:`semiseg.knowledge.generator`: the two-agent LLM generator (``semiseg knowledge
  generate``).
* :mod:`semiseg.knowledge.encoders`: text encoders (offline MiniLM default; BiomedCLIP, CLIP,
  PMC-CLIP, UniMed-CLIP through open_clip or transformers).
* :mod:`semiseg.knowledge.embeddings`: embedding files, the cache, the authors' file
  (``semiseg knowledge encode``).
* :mod:`semiseg.knowledge.cli`: the ``semiseg knowledge`` subcommand (:func:`add_cli`).

Nothing heavy is imported here: encoders load their libraries only when used.
"""
