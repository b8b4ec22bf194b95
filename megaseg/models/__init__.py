"""Networks: the CrossBlock U-Net and its registry."""

from megaseg.models import universeg  # noqa: F401  (registers the builders)
from megaseg.models.registry import create_model, list_models, register_model
from megaseg.models.universeg import UniverSeg

__all__ = ["UniverSeg", "create_model", "list_models", "register_model"]
