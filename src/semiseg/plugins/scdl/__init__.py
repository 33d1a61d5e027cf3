"""SCDL as a plug-in: ``scdl_<host>`` for every registered host method.

SCDL (Su et al., "Semantic Class Distribution Learning for Debiasing Semi-Supervised Medical
Image Segmentation") adds to a host segmentation method

* **CDBA** (paper 2.1): learnable class proxy distributions ``N(mu_c, diag(sigma_c^2))``, an
  embedding-to-proxy (Eq. 3) and a proxy-to-embedding (Eq. 4) alignment loss on the
  bottleneck tokens, and a prior (Eq. 5-7) computed from the tokens and the proxies, projected
  and added to the decoder features;
* **SAC** (paper 2.2): each class present in a labeled crop is cut out (every other voxel set
  to the background value), passed through the same encoder, and the mean embedding of the
  class's tokens (Eq. 8, detached) pulls the class proxy mean towards it (Eq. 9).

Equations live in :mod:`semiseg.losses.scdl`. This package: :mod:`~.options` (the options,
:class:`SCDLOptions`), :mod:`~.cdba` (the learnable parts, :class:`CDBA`, and the per-network
decoder hook, :class:`CDBAInjector`), :mod:`~.method` (SAC, the wrapper method
:class:`SCDLMethod` and its builder, registered as plug-in ``scdl``), :mod:`~.official` (the
networks that converted official SCDL checkpoints load into, :func:`official_scdl_network`).

Options layout (``method.options``)::

    method:
      name: scdl_ga_cps
      options:
        host: {consistency: 0.1}     # the host's own options, validated by the host
        scdl: {temperature: 1.0}     # SCDLOptions (options.py), validated here

No other top-level key is accepted, so a host option can never be mistaken for an SCDL one.

How it attaches. Every network the host names (:meth:`Method.networks
<semiseg.methods.base.Method.networks>`) that has the VNet seam (``attach_injector``: CPS's two
networks, the mean-teacher / MagicNet student and EMA teacher) gets a :class:`CDBAInjector`,
called on the feature entering every decoder stage of *every* decoding of that network,
whoever runs it (the host's forward, MagicNet's mixed batch and cube branches, validation,
inference). Stage 0 (the bottleneck ``x5``) flattens the ``x5`` grid into
tokens (``L = (X/16)(Y/16)(Z/16)``, 216 for a 96^3 crop), computes the prior and caches it for
stages 1..4 of the same decoding. Because the injector is a submodule of the network it is in
the network's state dict and checkpoints, and inference runs with the prior.

Design decisions (paper silent; see ``docs/methods/scdl.md``):

* **Token sources.** While the host computes its step, each injector records the tokens of the
  decodings that carry gradients (``token_source``): ``first`` (default) takes the first such
  decoding of each network per step, which for every current host is its plain forward on the
  whole batch (CPS: each network's batch pass; mean teacher: the student's; MagicNet: the
  student's full-batch pass, not the cross-image mixed batch nor the cube-by-cube decodings);
  ``full_patch`` takes every decoding of whole crops, i.e. on the crop's token grid, whatever
  its batch size (MagicNet: also the mixed batch; a host that decodes its labeled and
  unlabeled crops separately: both); ``all`` takes every decoding with gradients (also
  MagicNet's cubes).
  No-gradient decodings (EMA teachers, MagicNet's pseudo-label cubes) never contribute.
* **Several networks** (CPS): one CDBA module per network by default (``share_proxies: false``);
  the SCDL terms are sums over networks, each network's tokens against its own proxies (with
  ``share_proxies: true`` both networks use one module, still one loss per network).
* **EMA teachers** (mean teacher, MagicNet): the teacher network gets its own injector, a copy
  of the student's, frozen (``requires_grad = False``). The injector is part of the network, so
  the host's own EMA update (which pairs the teacher's and the student's named parameters)
  averages the proxies, the projector and the prior projections with the rest: the teacher is
  always the EMA of the whole student, SCDL included.
* **SAC region rule.** A token belongs to class c when the fraction of its 16^3 cell labelled c
  is above ``sac_min_fraction`` (0 = any voxel, the default, so that adrenal glands smaller
  than a cell still get an anchor; 0.5 = majority). The masked passes run without gradients
  (the anchors are detached anyway, Eq. 8) in the network's current mode; batch-norm running
  statistics are restored afterwards so that the mostly-empty masked crops never enter them.
* **Determinism.** In eval mode the prior uses the proxy means (no proxy sampling, Eq. 5 then
  equals Eq. 6) and no token noise, so sliding-window inference is deterministic
  (``stochastic_eval: true`` keeps sampling).
* **Ablations** (SCDL Table 4): row 1 is the plain host (its own config); row 2
  ``sac: false`` (no SAC term, no masked passes); row 3 the default. ``cdba: false`` attaches
  nothing and returns exactly the host's terms.

Paper defaults vs the official code (``Zyh55555/SCDL``), every one an option: temperature 1
(official 0.2); no projector (official ``mlp``: 2z -> 2z -> z = 256 with dropout 0.2); the
Eq. 3/4 losses (official ``loss: official``: exp(pos - neg) over 50 proxy samples plus 0.1 x the
distribution loss, and a symmetric KL between E2P and P2E assignments); the Eq. 7 prior
concat(r_dist, r_center, z_sam) (official ``prior: official``: the temperature-sharpened mixture
of normalised proxy means concatenated with the token samples); softplus-positive token noise
scale (official raw); injection at every decoder stage (official AMOS host: ``injection:
bottleneck``). The official Synapse host adds its prior at the prediction head (the head
stage, preset ``official_synapse_magicnet``; its checkpoints convert, :mod:`~.official`).
"""

from semiseg.plugins.scdl.cdba import CDBA, CDBAInjector, TokenRecord
from semiseg.plugins.scdl.method import TERM_PREFIX, SCDLMethod, build_scdl, wrapper_class
from semiseg.plugins.scdl.options import SCDLOptions, check_options, split_options

__all__ = [
    "CDBA",
    "TERM_PREFIX",
    "CDBAInjector",
    "SCDLMethod",
    "SCDLOptions",
    "TokenRecord",
    "build_scdl",
    "check_options",
    "split_options",
    "wrapper_class",
]
