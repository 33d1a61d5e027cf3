"""Networks and their registry: ``create_model(name, num_classes, **options)``."""

from semiseg.models import diff_vnet as _diff_vnet  # noqa: F401  (registers "diff_vnet")
from semiseg.models import magicnet as _magicnet  # noqa: F401  (registers "magicnet")
from semiseg.models import tak as _tak  # noqa: F401  (registers "tak")
from semiseg.models import vnet as _vnet  # noqa: F401  (registers "vnet")
from semiseg.models.registry import count_parameters, create_model, list_models, register_model

__all__ = ["count_parameters", "create_model", "list_models", "register_model"]
