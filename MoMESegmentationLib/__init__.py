"""MoMESegmentationLib: text-prompted Mixture-of-Experts CT segmentation (MoME).

The library never imports Slicer, Qt or CTK, and importing it is cheap: heavy
modules (torch, MONAI, SimpleITK, transformers) load when first used.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import CheckpointError, InputError, MoMEError, PromptError  # noqa: E402

__all__ = ["__version__", "MoMEError", "InputError", "PromptError", "CheckpointError"]
