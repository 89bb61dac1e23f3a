"""The pre-MONAI-1.5 Swin patch merging, for the importers: it lives in the network package.

Everything here is :mod:`MoMESegmentationLib.model.legacy_merging`, re-exported so that importer
code and older scripts keep their import path. The dependency runs one way: importers use the
model package, the model package never imports the importers.
"""

from __future__ import annotations

from ..model.legacy_merging import (
    LEGACY_MERGING,
    LEGACY_MERGING_OFFSETS,
    LegacyPatchMerging,
    apply_checkpoint_patch_merging,
    legacy_config_supported,
    patch_merging_mode,
    use_legacy_patch_merging,
)

__all__ = [
    "LEGACY_MERGING",
    "LEGACY_MERGING_OFFSETS",
    "LegacyPatchMerging",
    "legacy_config_supported",
    "use_legacy_patch_merging",
    "patch_merging_mode",
    "apply_checkpoint_patch_merging",
]
