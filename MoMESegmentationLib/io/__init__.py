"""Volume and segmentation I/O with exact geometry (see :mod:`.volume` for the convention).

``readers`` and ``segmentation`` import SimpleITK, nibabel, pydicom and pynrrd only when called;
``geometry`` needs numpy and torch and is imported on first use of its names.
"""

from __future__ import annotations

from typing import Any

from .readers import read_volume, write_labelmap, write_volume
from .segmentation import (
    Segment,
    Segmentation,
    align_segmentation,
    read_segmentation,
    segmentation_from_labelmap,
    terminology_from_string,
    terminology_to_string,
    write_segmentation,
)
from .volume import LPS_TO_RAS, Volume

_GEOMETRY_NAMES = (
    "CanonicalRecord",
    "ResampleRecord",
    "canonicalize",
    "restore_from_canonical",
    "resample_to_spacing",
    "resample_back",
    "resample_to_grid",
    "orientation_codes",
)

__all__ = [
    "LPS_TO_RAS",
    "CanonicalRecord",
    "ResampleRecord",
    "Segment",
    "Segmentation",
    "Volume",
    "align_segmentation",
    "canonicalize",
    "orientation_codes",
    "read_segmentation",
    "read_volume",
    "resample_back",
    "resample_to_grid",
    "resample_to_spacing",
    "restore_from_canonical",
    "segmentation_from_labelmap",
    "terminology_from_string",
    "terminology_to_string",
    "write_labelmap",
    "write_segmentation",
    "write_volume",
]


def __getattr__(name: str) -> Any:
    # torch is only needed for the grid transforms: load it when one of them is asked for.
    if name in _GEOMETRY_NAMES:
        from . import geometry

        return getattr(geometry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
