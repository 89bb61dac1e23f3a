"""The real CT (and MR) bundled in ``Resources/SampleData`` (see its README for provenance).

The CT is an abdomen-pelvis scan from TotalSegmentator's test references (Apache-2.0), 122 x 101 x 112
voxels at 3 mm. Its label map is TotalSegmentator's prediction, not a manual annotation; label values
follow TotalSegmentator's ``total`` class map, whose names are this project's structure ids.

Volumes are returned in the library's convention: ``array[i, j, k]``, LPS millimetres.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io.volume import Volume
from ..resources import resource_path

__all__ = [
    "SampleCase",
    "sample_ct_path",
    "sample_labels_path",
    "sample_mr_path",
    "sample_mr_labels_path",
    "sample_label_table",
    "sample_mr_label_table",
    "load_sample_ct",
    "load_sample_mr_labels",
]

SAMPLE_DIR = "SampleData"
CT_FILE = "example_ct.nii.gz"
LABELS_FILE = "example_seg_fast_force_split.nii.gz"
MR_FILE = "example_mr_sm.nii.gz"
MR_LABELS_FILE = "example_seg_mr.nii.gz"
CLASS_MAP_FILE = "class_map.json"


@dataclass
class SampleCase:
    """A bundled scan with its reference labels.

    Attributes:
        image: CT in Hounsfield units (float32), shape ``(I, J, K)``, LPS geometry.
        labels: label map (uint8) on the same grid as ``image``.
        label_table: label value -> structure id (TotalSegmentator 'total' names) for every class
            of the map, including classes absent from this particular scan.
    """

    image: Volume
    labels: Volume
    label_table: dict[int, str]

    def present_labels(self) -> dict[int, str]:
        """The entries of ``label_table`` that occur in ``labels``."""
        values = set(np.unique(self.labels.array).tolist())
        return {value: name for value, name in self.label_table.items() if value in values}


def sample_ct_path() -> Path:
    """Path of the bundled real CT (NIfTI)."""
    return resource_path(SAMPLE_DIR, CT_FILE)


def sample_labels_path() -> Path:
    """Path of the bundled CT's reference label map (NIfTI)."""
    return resource_path(SAMPLE_DIR, LABELS_FILE)


def sample_mr_path() -> Path:
    """Path of the bundled small real MR volume (NIfTI), an example of input that is not CT."""
    return resource_path(SAMPLE_DIR, MR_FILE)


def sample_mr_labels_path() -> Path:
    """Path of the bundled MR volume's label map (NIfTI; TotalSegmentator's 'total_mr' classes)."""
    return resource_path(SAMPLE_DIR, MR_LABELS_FILE)


@lru_cache(maxsize=2)
def _class_map(task: str = "total") -> tuple[tuple[int, str], ...]:
    path = resource_path(SAMPLE_DIR, CLASS_MAP_FILE)
    with open(path, encoding="utf-8") as handle:
        table = json.load(handle)[task]
    return tuple(sorted((int(value), str(name)) for value, name in table.items()))


def sample_label_table() -> dict[int, str]:
    """TotalSegmentator's 'total' class map: label value -> structure id."""
    return dict(_class_map("total"))


def sample_mr_label_table() -> dict[int, str]:
    """TotalSegmentator's 'total_mr' class map (50 classes): label value -> structure name.

    Most names are this project's structure ids; a few are coarser ('vertebrae', 'intervertebral_discs',
    'portal_vein_and_splenic_vein') and match no single structure.
    """
    return dict(_class_map("total_mr"))


def _read_nifti(path: Path, dtype: type) -> Volume:
    import nibabel as nib

    try:
        image = nib.load(str(path))
        array = np.asarray(image.dataobj).astype(dtype, copy=False)
    except Exception as exc:  # nibabel raises several types for damaged files
        raise InputError(f"{path}: cannot read the bundled sample ({exc})") from exc
    return Volume.from_affine(array, image.affine, convention="RAS", name=path.name)


def load_sample_ct() -> SampleCase:
    """Load the bundled CT and its reference label map.

    Returns:
        A :class:`SampleCase` whose ``image`` is float32 HU and ``labels`` uint8, both
        ``(122, 101, 112)`` at 3 mm on the same LPS grid.
    """
    image = _read_nifti(sample_ct_path(), np.float32)
    labels = _read_nifti(sample_labels_path(), np.uint8)
    if not image.same_grid(labels, atol=1e-3):
        raise InputError(f"{labels.name}: grid differs from {image.name}")
    return SampleCase(image=image, labels=labels, label_table=sample_label_table())


def load_sample_mr_labels() -> tuple[Volume, dict[int, str]]:
    """The bundled MR slab's label map (a second patient: upper abdomen, 20 slices at 3 mm) and its table.

    For training from label maps (:mod:`~MoMESegmentationLib.data.synthesis`): a label map is a label
    map, whatever the modality of the scan it was drawn on.
    """
    return _read_nifti(sample_mr_labels_path(), np.uint8), sample_mr_label_table()
