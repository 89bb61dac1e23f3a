"""The bundled real CT, its labels and the MR example (Resources/SampleData)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("nibabel")

from MoMESegmentationLib.data.sample import (  # noqa: E402
    load_sample_ct,
    sample_ct_path,
    sample_label_table,
    sample_mr_path,
)
from MoMESegmentationLib.resources import resource_path  # noqa: E402


@pytest.fixture(scope="module")
def case():
    return load_sample_ct()


def test_files_are_bundled_with_provenance():
    folder = resource_path("SampleData")
    for name in ("example_ct.nii.gz", "example_seg_fast_force_split.nii.gz", "example_mr_sm.nii.gz",
                 "class_map.json", "LICENSE", "README.md"):
        assert (folder / name).is_file(), name
    readme = (folder / "README.md").read_text(encoding="utf-8")
    assert "totalsegmentator==2.18.0" in readme and "Apache" in readme
    assert "Apache License" in (folder / "LICENSE").read_text(encoding="utf-8")
    assert sample_ct_path().name == "example_ct.nii.gz"
    assert sample_mr_path().name == "example_mr_sm.nii.gz"


def test_grid_and_geometry(case):
    image, labels = case.image, case.labels
    assert image.shape == (122, 101, 112)
    assert image.array.dtype == np.float32 and labels.array.dtype == np.uint8
    assert image.same_grid(labels)
    np.testing.assert_allclose(image.spacing, [3.0, 3.0, 3.0], atol=1e-4)
    # the file's RAS affine is diag(3, 3, 3): in LPS the i and j axes point right and anterior
    np.testing.assert_allclose(image.direction, np.diag([-1.0, -1.0, 1.0]), atol=1e-6)
    np.testing.assert_allclose(image.affine_ras[:3, :3], np.diag([3.0, 3.0, 3.0]), atol=1e-4)


def test_label_table_is_totalsegmentator_total(case):
    table = case.label_table
    assert table == sample_label_table()
    assert len(table) == 117
    assert table[1] == "spleen" and table[5] == "liver" and table[52] == "aorta"
    assert table[63] == "inferior_vena_cava" and table[21] == "urinary_bladder"
    raw = json.loads(resource_path("SampleData", "class_map.json").read_text(encoding="utf-8"))
    assert {int(k): v for k, v in raw["total"].items()} == table
    present = case.present_labels()
    assert set(np.unique(case.labels.array).tolist()) - {0} == set(present)
    for name in ("liver", "spleen", "kidney_left", "kidney_right", "stomach", "pancreas", "urinary_bladder"):
        assert name in present.values()


def test_anatomy_sits_where_lps_says(case):
    """Liver on the patient's right (smaller LPS x) of the spleen; kidneys either side."""
    inverse = {name: value for value, name in case.label_table.items()}

    def centroid(name):
        index = np.argwhere(case.labels.array == inverse[name]).mean(axis=0)
        return case.labels.index_to_physical(index)

    assert centroid("liver")[0] < centroid("spleen")[0]
    assert centroid("kidney_right")[0] < centroid("kidney_left")[0]
    assert centroid("lung_lower_lobe_left")[2] > centroid("urinary_bladder")[2]
    liver_hu = case.image.array[case.labels.array == inverse["liver"]]
    assert 30 < np.median(liver_hu) < 200
    assert case.image.array.min() < -900  # air around the patient


def test_mr_does_not_look_like_ct():
    import nibabel as nib

    mr = np.asarray(nib.load(str(sample_mr_path())).dataobj)
    assert mr.shape == (117, 91, 20)
    # MR intensities are not Hounsfield units: no air near -1000, background near 0
    assert np.percentile(mr, 1) > -200
    assert abs(float(np.median(mr[mr < np.percentile(mr, 20)]))) < 50
