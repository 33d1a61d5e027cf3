"""``method.options`` of ``scdl_<host>``: the host's options under ``host``, SCDL's
(:class:`SCDLOptions`, paper defaults, the official code's values in comments) under ``scdl``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from semiseg.config import validate_options
from semiseg.errors import ConfigError
from semiseg.methods.registry import MethodClass


@dataclass
class SCDLOptions:
    """``method.options.scdl``. Paper defaults; the official code's values in comments."""

    # -- components (SCDL Table 4) -------------------------------------------------------
    cdba: bool = True  # proxies, alignment losses and prior injection
    sac: bool = True  # semantic anchor constraint (needs cdba)
    # -- embedding space -----------------------------------------------------------------
    # Token projector before the proxy space: "none" (paper: the bottleneck features are the
    # embeddings, D = 16 n_filters), "linear" (one 1x1 linear map to embedding_dim), "mlp"
    # (official: Linear(x, 2z) ReLU Dropout Linear(2z, 2z) ReLU Dropout Linear(2z, z)).
    projector: Literal["none", "linear", "mlp"] = "none"
    embedding_dim: int = 256  # z of the linear / mlp projector (official 256)
    mlp_dropout: float = 0.2
    # -- proxies and priors --------------------------------------------------------------
    proxy_samples: int = 50  # S of Eq. 5 (official 50; the paper gives no number)
    # Initial proxy standard deviation; None = random like the means (the official
    # xavier-uniform table, softplus(~0) = 0.69).
    proxy_init_sigma: float | None = None
    token_samples: int = 2  # token perturbations per token (official 2)
    init_noise_scale: float = 0.05  # initial token noise scale (official 0.05)
    noise_scale: Literal["softplus", "raw"] = "softplus"  # official "raw" (may turn negative)
    temperature: float = 1.0  # Eq. 2 (paper 1; official 0.2)
    p2e_temperature: float | None = None  # official variant's tau_p2e; None = temperature
    prior: Literal["paper", "official"] = "paper"  # Eq. 7 / official prior token + samples
    injection: Literal["all", "bottleneck"] = "all"  # paper: every decoder stage
    prior_bias: bool = False  # bias of the 1x1x1 prior projections (official: none)
    zero_init_projection: bool = False  # start as the exact host (prior projections = 0)
    stochastic_eval: bool = False  # sample proxies and token noise in eval mode too
    # -- losses --------------------------------------------------------------------------
    loss: Literal["paper", "official"] = "paper"  # Eq. 3 + Eq. 4 / official proxy loss + KL
    token_source: Literal["first", "full_patch", "all"] = "first"
    e2p_weight: float = 0.1
    p2e_weight: float = 0.1
    sac_weight: float = 0.1
    proxy_weight: float = 0.1  # official proxy loss ("scdl_proxy")
    kl_weight: float = 0.1  # official symmetric KL ("scdl_kl")
    official_dist_weight: float = 0.1  # the 0.1 x distribution loss inside the proxy loss
    # Official variant: ground-truth class proportions as the token weights of the labeled
    # crops in the first full-batch decoding (the official module's y_dist_flat path);
    # False = detached bidirectional assignment for every token.
    official_label_weights: bool = False
    # -- SAC -----------------------------------------------------------------------------
    sac_min_fraction: float = 0.0  # token in class c if its cell's c-fraction is above this
    sac_fill_value: float = 0.0  # background value of masked crops (0 after intensity)
    sac_include_background: bool = True  # anchor the background proxy too
    sac_max_classes: int = 0  # at most this many classes per step, rarest first; 0 = all
    sac_max_batch: int = 4  # masked crops per encoder call
    sac_normalize_tokens: bool = False  # official: average L2-normalised embeddings
    # -- networks and optimiser ----------------------------------------------------------
    share_proxies: bool = False  # one CDBA module for all student networks (CPS)
    weight_decay: float = 1e-4  # of the SCDL parameters (paper 3.1)


def check_options(options: SCDLOptions, where: str = "method.options.scdl") -> None:
    """Reject values the equations cannot use, naming the key."""
    positive_int = {"embedding_dim": options.embedding_dim, "proxy_samples": options.proxy_samples,
                    "token_samples": options.token_samples,
                    "sac_max_batch": options.sac_max_batch}
    for key, value in positive_int.items():
        if value < 1:
            raise ConfigError(f"{where}.{key}: must be at least 1, got {value}")
    temperatures = {"temperature": options.temperature, "p2e_temperature": options.p2e_temperature}
    for key, value in temperatures.items():
        if value is not None and not value > 0:
            raise ConfigError(f"{where}.{key}: must be positive, got {value}")
    weights = ("e2p_weight", "p2e_weight", "sac_weight", "proxy_weight", "kl_weight",
               "official_dist_weight", "weight_decay")
    for key in weights:
        value = getattr(options, key)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{where}.{key}: must be a finite number >= 0, got {value}")
    if not 0.0 <= options.mlp_dropout < 1.0:
        raise ConfigError(f"{where}.mlp_dropout: must be in [0, 1), got {options.mlp_dropout}")
    if not 0.0 <= options.sac_min_fraction < 1.0:
        raise ConfigError(f"{where}.sac_min_fraction: must be in [0, 1) (0 = any voxel, "
                          f"0.5 = majority), got {options.sac_min_fraction}")
    if options.sac_max_classes < 0:
        raise ConfigError(f"{where}.sac_max_classes: must be >= 0 (0 = all), got "
                          f"{options.sac_max_classes}")
    if options.proxy_init_sigma is not None and not options.proxy_init_sigma > 0:
        raise ConfigError(f"{where}.proxy_init_sigma: must be positive, got "
                          f"{options.proxy_init_sigma}")
    if options.noise_scale == "softplus" and not options.init_noise_scale > 0:
        raise ConfigError(f"{where}.init_noise_scale: must be positive with a softplus noise "
                          f"scale, got {options.init_noise_scale}")
    if options.sac and not options.cdba:
        raise ConfigError(f"{where}: sac needs cdba (SAC anchors the CDBA proxies); set "
                          "sac: false as well, or use the plain host method")


def split_options(options: Mapping[str, Any], method: str) -> tuple[dict, dict]:
    """``method.options`` -> (host options, SCDL options); only ``host`` and ``scdl`` keys."""
    unknown = sorted(str(k) for k in options if k not in ("host", "scdl"))
    if unknown:
        raise ConfigError(
            f"method.options: unknown key(s) {unknown} for {method!r}; an SCDL method takes "
            "its host's options under method.options.host and SCDL's under method.options.scdl")
    parts = []
    for key in ("host", "scdl"):
        value = options.get(key)
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"method.options.{key}: expected a mapping, got {value!r}")
        parts.append(dict(value))
    return parts[0], parts[1]


def parse_options(host_cls: MethodClass, options: dict[str, Any], method: str
                  ) -> tuple[Any, SCDLOptions]:
    """``method.options`` of ``method`` (``scdl_<host>``) -> (the host's parsed options, the
    checked :class:`SCDLOptions`); every error names its key."""
    host_options, scdl_options = split_options(options, method)
    parsed = validate_options(SCDLOptions, scdl_options, "method.options.scdl")
    check_options(parsed)
    return validate_options(host_cls.Options, host_options, "method.options.host"), parsed
