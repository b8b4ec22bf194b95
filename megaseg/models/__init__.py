"""Networks: the CrossBlock U-Net, its registry and the factory that builds (and loads) one."""

from megaseg.models import universeg  # noqa: F401  (registers the builders)
from megaseg.models.factory import create_model
from megaseg.models.registry import list_models, register_model
from megaseg.models.universeg import UniverSeg

__all__ = ["UniverSeg", "create_model", "list_models", "register_model"]
