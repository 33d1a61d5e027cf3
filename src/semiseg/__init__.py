"""semiseg: class-imbalanced semi-supervised 3D multi-organ CT segmentation.

Implements SCDL (semantic class distribution learning) and TAK (textual anatomical
knowledge), the semi-supervised hosts they attach to, the baselines they are compared
against, and the data pipelines and evaluation behind the papers' tables.
"""

__version__ = "0.1.0"
