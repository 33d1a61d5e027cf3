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
    """``method.options.scdl``. semiseg's defaults (docs/methods/scdl.md says which measurement
    chose each); ``preset: paper`` is the paper's literal form, ``preset: official_*`` the
    official code's per-host settings (:data:`PRESETS`); explicit keys override a preset."""

    preset: str = ""  # "", "paper", or one of the official presets (PRESETS)
    # -- components (SCDL Table 4) -------------------------------------------------------
    cdba: bool = True  # proxies, alignment losses and prior injection
    sac: bool = True  # semantic anchor constraint (needs cdba)
    # -- tokens ----------------------------------------------------------------------------
    # Where the tokens come from: "decoder" = the last decoder feature (the head's input),
    # average-pooled by token_stride (official: 96^3 -> 12^3, 16-d tokens); "bottleneck" = the
    # encoder's bottleneck voxels (the paper's reading; 2^3 tokens of a 32^3 crop).
    tokens: Literal["decoder", "bottleneck"] = "decoder"
    # Decoder tokens: one per token_stride^3 cell of the crop. 4, not the official 8: on a
    # trained phantom decoder 11 organs are some token's majority at 4 against 5 at 8, and a
    # nearest-class-mean classifier of the tokens is as accurate (docs/methods/scdl.md).
    token_stride: int = 4
    # Token projector before the proxy space: "none" (the features are the embeddings),
    # "linear" (one linear map to embedding_dim), "mlp" (official: Linear(x, 2z) ReLU Dropout
    # Linear(2z, 2z) ReLU Dropout Linear(2z, z)).
    projector: Literal["none", "linear", "mlp"] = "mlp"
    embedding_dim: int = 256  # z of the linear / mlp projector (official 256)
    mlp_dropout: float = 0.2
    # Subtract a running mean of the training tokens (momentum token_mean_momentum) before the
    # cosines: projected tokens share one large common direction (cosine 0.85 between any two
    # at the start), P2E then pushes every proxy but one away from all tokens, and SAC cannot
    # anchor them (docs/methods/scdl.md). Not in the paper or the official code.
    center_tokens: bool = True
    token_mean_momentum: float = 0.05
    # -- proxies and priors --------------------------------------------------------------
    proxy_samples: int = 50  # S of Eq. 5 (official 50; the paper gives no number)
    # Initial proxy standard deviation; None = random like the means (the official
    # xavier-uniform table, softplus(~0) = 0.69).
    proxy_init_sigma: float | None = None
    token_samples: int = 2  # token perturbations per token (official 2)
    init_noise_scale: float = 0.05  # initial token noise scale (official 0.05)
    noise_scale: Literal["softplus", "raw"] = "softplus"  # official "raw" (may turn negative)
    # Eq. 2 (E2P/P2E assignment; official prior token). The paper writes none (1); with 9 or
    # more classes P(c|z) can then never exceed 0.5 and Eq. 4 pushes every proxy away from
    # every token (docs/methods/scdl.md): the official code's 0.2 is the default.
    temperature: float = 0.2
    p2e_temperature: float | None = None  # official variant's tau_p2e; None = temperature
    # Eq. 7 ("paper": r_dist, r_center, z_sam), "official" (official prior token + z_sam, the
    # AMOS host's 2D channels) or "official_token" (the token alone, the Synapse head's D).
    prior: Literal["paper", "official", "official_token"] = "paper"
    # Decoder stages receiving the prior: "none" (SCDL acts through its losses only, as the
    # official CPS test networks), "head" (the head's input, official Synapse MagicNet),
    # "bottleneck" (official AMOS MagicNet in training), "all" (paper: every decoder stage).
    # Decoder tokens reach the head only ("none" or "head").
    injection: Literal["none", "head", "bottleneck", "all"] = "head"
    prior_bias: bool = False  # bias of the 1x1x1 prior projections (official: none)
    zero_init_projection: bool = False  # start as the exact host (prior projections = 0)
    stochastic_eval: bool = False  # sample proxies and token noise in eval mode too
    # The prior reads the proxy means without gradient, so that only Eq. 3, 4 and 8 move them
    # (sigma still learns through the sampled proxies). With gradient (paper, official), the
    # host's segmentation loss gives mu 20-130x the gradient of the SCDL terms on a trained
    # SCDL-GA-CPS and decides where the proxies go. Detached, the comparison protocol lost 7.5
    # Dice points at 5 seeds (docs/methods/scdl.md), so the default keeps the gradient.
    detach_prior_mean: bool = False
    # -- losses --------------------------------------------------------------------------
    loss: Literal["paper", "official"] = "paper"  # Eq. 3 + Eq. 4 / official proxy loss + KL
    e2p_reduction: Literal["mean", "sum"] = "mean"  # Eq. 3 over tokens (paper: sum)
    # P(c|z) of the labelled crops' tokens in Eq. 3-4: "soft" (paper: Eq. 2 for every token)
    # or "truth" (their cells' class proportions, as the official proxy loss weights labelled
    # tokens; unlabelled tokens keep Eq. 2).
    labelled_assignment: Literal["soft", "truth"] = "soft"
    # Which decodings give tokens: "batch" = the first decodings of whole crops that together
    # cover the step's batch once (labelled and unlabelled crops on every host), "first" = the
    # first decoding with gradients, "full_patch" = every decoding of whole crops, "all" =
    # every decoding with gradients.
    token_source: Literal["batch", "first", "full_patch", "all"] = "batch"
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
    # Where the class-aware embeddings of Eq. 8 come from: "masked_images" (paper: each class's
    # masked crop through the network) or "labelled_tokens" (the labelled crops' own tokens of
    # the step, weighted by how much of each token's cell the class covers; no extra passes).
    # Default labelled_tokens: the proxies of a proxy-only fit on trained tokens then match 88 %
    # of the foreground tokens' classes, and a step costs no extra forward passes
    # (docs/methods/scdl.md); "masked_images" is the paper's form (preset paper).
    sac_source: Literal["masked_images", "labelled_tokens"] = "labelled_tokens"
    sac_min_fraction: float = 0.0  # token in class c if its cell's c-fraction is above this
    sac_fill_value: float = 0.0  # background value of masked crops (0 after intensity)
    sac_include_background: bool = True  # anchor the background proxy too
    # At most this many classes get masked passes per step (0 = all), chosen by
    # sac_class_order: "rotate" = the classes present in the labelled crops, in id order,
    # starting one window further each step, so every class is anchored every few steps;
    # "rarest" = the rarest in the batch first. With decoder tokens a masked pass is a whole
    # forward pass: all 14 classes made SCDL-GA-CPS 3.6x as slow as GA-CPS, 4 per step 2.0x.
    sac_max_classes: int = 4
    sac_class_order: Literal["rotate", "rarest"] = "rotate"
    sac_max_batch: int = 4  # masked crops per encoder call
    sac_normalize_tokens: bool = False  # official: average L2-normalised embeddings
    # -- networks and optimiser ----------------------------------------------------------
    share_proxies: bool = False  # one CDBA module for all student networks (CPS)
    weight_decay: float = 1e-4  # of the SCDL parameters (paper 3.1)


# Named settings (applied first; explicit keys override them).
PRESETS: dict[str, dict[str, Any]] = {
    # The paper read literally: bottleneck tokens as embeddings, no temperature, Eq. 3 as a
    # sum over tokens, Eq. 5-7 prior added at every decoder stage, the first decoding's tokens.
    "paper": {"tokens": "bottleneck", "projector": "none", "temperature": 1.0,
              "center_tokens": False,
              "e2p_reduction": "sum", "prior": "paper", "injection": "all",
              "token_source": "first", "sac_source": "masked_images"},
    # The official inference networks (Zyh55555/SCDL): Synapse MagicNet adds the official
    # prior token of 12^3 pooled decoder tokens (MLP 16 -> 512 -> 512 -> 256) at the head.
    "official_synapse_magicnet": {
        "tokens": "decoder", "token_stride": 8, "projector": "mlp", "embedding_dim": 256,
        "temperature": 0.2, "p2e_temperature": 0.2, "prior": "official_token",
        "injection": "head", "loss": "official", "noise_scale": "raw",
        "sac_normalize_tokens": True, "center_tokens": False, "sac_source": "masked_images"},
    # AMOS MagicNet trains with the prior token and the token samples (512 channels) added at
    # the bottleneck and tests without it; the CPS hosts test plain VNets.
    "official_amos_magicnet": {
        "tokens": "bottleneck", "projector": "mlp", "embedding_dim": 256, "temperature": 0.2,
        "p2e_temperature": 0.2, "prior": "official", "injection": "bottleneck",
        "loss": "official", "noise_scale": "raw", "sac_normalize_tokens": True,
        "center_tokens": False, "sac_source": "masked_images"},
    "official_cps": {
        "tokens": "decoder", "token_stride": 8, "projector": "mlp", "embedding_dim": 256,
        "temperature": 0.2, "p2e_temperature": 0.2, "prior": "official_token",
        "injection": "none", "loss": "official", "noise_scale": "raw",
        "sac_normalize_tokens": True, "center_tokens": False, "sac_source": "masked_images"},
}


def apply_preset(options: Mapping[str, Any], where: str = "method.options.scdl"
                 ) -> dict[str, Any]:
    """``options`` with its ``preset`` expanded underneath (explicit keys win)."""
    name = options.get("preset") or ""
    if not name:
        return dict(options)
    if name not in PRESETS:
        raise ConfigError(f"{where}.preset: {name!r} is not one of "
                          f"{', '.join(sorted(PRESETS))}")
    return {**PRESETS[name], **options}


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
    if not 0.0 < options.token_mean_momentum <= 1.0:
        raise ConfigError(f"{where}.token_mean_momentum: must be in (0, 1], got "
                          f"{options.token_mean_momentum}")
    if options.token_stride < 1:
        raise ConfigError(f"{where}.token_stride: must be at least 1, got {options.token_stride}")
    if options.tokens == "decoder" and options.injection not in ("none", "head"):
        raise ConfigError(f"{where}.injection: decoder tokens come from the head's input, so "
                          f"their prior can only go to the head (none or head), got "
                          f"{options.injection!r}")
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
    parsed = validate_options(SCDLOptions, apply_preset(scdl_options), "method.options.scdl")
    check_options(parsed)
    return validate_options(host_cls.Options, host_options, "method.options.host"), parsed
