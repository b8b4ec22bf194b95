"""The model factory: ``create_model("universeg_v1", pretrained=False)`` builds a registered
model and, when asked, loads its weights (megaseg's shipped weights through
:mod:`megaseg.checkpoint`, the official UniverSeg release through :mod:`megaseg.hub`).

The registry (``registry.py``) only looks builders up; the checkpoint loader builds the model
a card names through it, so neither imports this module.
"""

from __future__ import annotations

from torch import nn

from megaseg.models.registry import model_builder, pretrained_path


def create_model(
    name: str, pretrained: bool | str = False, *, accept_license: bool = False, **kwargs
) -> nn.Module:
    """Build a registered model, optionally with weights.

    ``pretrained``: False (random init), True or a tag (weights megaseg ships, see
    :func:`pretrained_path`), or ``"official"`` for ``universeg_v1``: the weights released by
    the UniverSeg authors, downloaded once to a cache (:mod:`megaseg.hub`); their licence is
    research-only, so they load only with ``accept_license=True``.

    Raises:
        ValueError: unknown model or tag; megaseg.checkpoint.CheckpointError (a ValueError)
            for weights that do not fit or hold NaN/inf.
    """
    if pretrained == "official":
        from megaseg.hub import load_official

        return load_official(name, accept_license=accept_license, **kwargs)
    if accept_license:
        raise ValueError("accept_license: only used with pretrained='official'")
    if not pretrained:
        return model_builder(name)(**kwargs)
    from megaseg.checkpoint import load_checkpoint

    model, _ = load_checkpoint(pretrained_path(name, pretrained), model_builder(name)(**kwargs))
    return model
