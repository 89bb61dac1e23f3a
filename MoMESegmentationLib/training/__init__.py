"""Training MoME: partial-label multi-dataset training, dataset adapters, transforms, losses, DDP.

Entry point: ``mome train CONFIG`` (see :mod:`.cli`) or, in Python::

    from MoMESegmentationLib.training import Trainer, load_config

    result = Trainer(load_config("configs/test_tiny.yaml")).fit()

Submodules import torch and MONAI; importing this package does not load them until used.
"""

from __future__ import annotations

from .config import TrainConfig, config_from_dict, load_config

__all__ = ["TrainConfig", "load_config", "config_from_dict", "Trainer", "TrainResult", "dry_run"]


def __getattr__(name: str):
    if name in ("Trainer", "TrainResult", "dry_run"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
