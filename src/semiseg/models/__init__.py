"""Networks and their registry: ``create_model(name, num_classes, **options)``; official
checkpoints of every kind convert with ``convert_official_state_dict(state_dict, kind)`` or
``read_official_checkpoint(path, kind)`` (:mod:`semiseg.models.convert`)."""

from semiseg.models import diff_vnet as _diff_vnet  # noqa: F401  (registers "diff_vnet")
from semiseg.models import magicnet as _magicnet  # noqa: F401  (registers "magicnet")
from semiseg.models import tak as _tak  # noqa: F401  (registers "tak")
from semiseg.models import vnet as _vnet  # noqa: F401  (registers "vnet")
from semiseg.models.convert import (
    convert_official_state_dict,
    load_official_state_dict,
    read_official_checkpoint,
)
from semiseg.models.registry import count_parameters, create_model, list_models, register_model

__all__ = [
    "convert_official_state_dict",
    "count_parameters",
    "create_model",
    "list_models",
    "load_official_state_dict",
    "read_official_checkpoint",
    "register_model",
]
