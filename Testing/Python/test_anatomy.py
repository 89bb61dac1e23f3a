"""Field-of-view estimation and the anatomical plausibility guard (MoMESegmentationLib.anatomy).

The real CT bundled with the project covers the lung bases, the abdomen and the pelvis down to the
femoral heads (TotalSegmentator's label map shows lower lobes from z=397 mm, hip bones and femoral
heads up to z=274 mm, no thighs); crops of it stand in for a chest-only and a pelvis-only scan. A
head and a pair of thighs are drawn here.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from MoMESegmentationLib.anatomy import (
    BODY_REGIONS,
    EMPTY,
    UNKNOWN,
    Coverage,
    GuardVerdict,
    check_structure,
    describe,
    estimate_coverage,
)
from MoMESegmentationLib.data.sample import load_sample_ct
from MoMESegmentationLib.io.volume import Volume
from MoMESegmentationLib.vocabulary import Structure, Vocabulary

LUNG_LABELS = ("lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right",
               "lung_middle_lobe_right", "lung_lower_lobe_right")


# --------------------------------------------------------------------------------------------
# Scans
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    return Vocabulary.load()


@pytest.fixture(scope="module")
def case():
    return load_sample_ct()


@pytest.fixture(scope="module")
def full(case) -> Coverage:
    return estimate_coverage(case.image)


def slice_z(volume: Volume) -> np.ndarray:
    """LPS z of the slices along the last array axis (the sample's superior-inferior axis)."""
    k = np.arange(volume.shape[2])
    return volume.index_to_physical(np.stack([np.zeros_like(k), np.zeros_like(k), k], axis=1))[:, 2]


def crop_slices(volume: Volume, keep: np.ndarray) -> Volume:
    """The slices ``keep`` (a contiguous run along the last axis) as a volume of their own."""
    k = np.flatnonzero(keep)
    k0, k1 = int(k[0]), int(k[-1]) + 1
    assert np.all(keep[k0:k1])
    return Volume(volume.array[:, :, k0:k1].copy(), volume.spacing, volume.index_to_physical([0, 0, k0]),
                  volume.direction, name=volume.name)


def label_mask(case, structure_id: str, labels: Volume | None = None) -> np.ndarray:
    value = {name: value for value, name in case.label_table.items()}[structure_id]
    return (labels if labels is not None else case.labels).array == value


def reference_area_cm2(case, names) -> np.ndarray:
    """Per slice, the cross-section of the reference labels ``names`` in cm2."""
    mask = np.isin(case.labels.array, [v for v, n in case.label_table.items() if n in names])
    return mask.sum(axis=(0, 1)) * case.labels.spacing[0] * case.labels.spacing[1] / 100.0


@pytest.fixture(scope="module")
def chest_crop(case):
    """The slices with at least 5 cm2 of reference lung: lung bases, liver dome, stomach, spleen."""
    keep = reference_area_cm2(case, LUNG_LABELS) >= 5.0
    return crop_slices(case.image, keep), crop_slices(case.labels, keep)


@pytest.fixture(scope="module")
def pelvis_crop(case):
    """The slices from 40 mm below the kidneys down: iliac wings, bladder, femoral heads."""
    z = slice_z(case.image)
    kidney_bottom = z[reference_area_cm2(case, ("kidney_left", "kidney_right")) > 0].min()
    keep = z <= kidney_bottom - 40.0
    return crop_slices(case.image, keep), crop_slices(case.labels, keep)


def synthetic_head(pixel_mm: float = 0.8, size: int = 256, slices: int = 40, slice_mm: float = 1.5) -> Volume:
    """Axial slices through an adult cranial vault: scalp, skull, CSF, brain, air, a head holder."""
    rng = np.random.default_rng(0)
    coords = (np.arange(size) - (size - 1) / 2) * pixel_mm
    x, y = np.meshgrid(coords, coords, indexing="ij")  # x: left-right, y: front-back (LPS)
    z = (np.arange(slices) - (slices - 1) / 2) * slice_mm + 40.0
    image = np.full((size, size, slices), -1000.0, dtype=np.float32)
    for k, zk in enumerate(z):
        scale = np.sqrt(1 - (zk / 110.0) ** 2)  # an ellipsoid head, 72 x 90 x 110 mm semi-axes
        depth = (1 - np.sqrt((x / (72 * scale)) ** 2 + (y / (90 * scale)) ** 2)) * np.sqrt(72 * 90) * scale
        plane = image[:, :, k]
        plane[depth >= 0] = 40.0  # scalp
        plane[(depth >= 5) & (depth < 12)] = 1200.0  # skull
        plane[depth >= 12] = 8.0  # CSF
        plane[depth >= 14] = 35.0  # brain
        plane[(np.abs(np.hypot(x, y) - 105) < 1.5) & (y > 60)] = 300.0  # curved holder behind the head
    image += rng.normal(0, 8, image.shape).astype(np.float32)
    origin = (coords[0], coords[0], z[0])
    return Volume(image, spacing=(pixel_mm, pixel_mm, slice_mm), origin=origin, name="head")


def synthetic_thighs(pixel_mm: float = 1.0, size: int = 384, slices: int = 30, slice_mm: float = 3.0):
    """Axial slices through two adult thighs: skin, fat, muscle, femoral shaft (cortex, marrow)."""
    rng = np.random.default_rng(1)
    coords = (np.arange(size) - (size - 1) / 2) * pixel_mm
    x, y = np.meshgrid(coords, coords, indexing="ij")
    plane = np.full((size, size), -1000.0, dtype=np.float32)
    for cx in (-95.0, 95.0):
        r = np.hypot(x - cx, y)
        plane[r < 80] = -100.0  # subcutaneous fat
        plane[r < 65] = 55.0  # muscle
        femur = np.hypot(x - cx * 0.9, y + 5)
        plane[femur < 14] = 1300.0  # cortex
        plane[femur < 9] = -40.0  # marrow
    image = np.repeat(plane[:, :, None], slices, axis=2)
    image += rng.normal(0, 10, image.shape).astype(np.float32)
    origin = (coords[0], coords[0], -900.0)
    return Volume(image, spacing=(pixel_mm, pixel_mm, slice_mm), origin=origin, name="thighs")


def blob(volume: Volume, fraction: float = 0.2) -> np.ndarray:
    """A box in the middle of the scan, ``fraction`` of each in-plane extent, over all slices."""
    mask = np.zeros(volume.shape, dtype=bool)
    (i0, i1), (j0, j1) = [
        (int(n * (0.5 - fraction / 2)), int(n * (0.5 + fraction / 2))) for n in volume.shape[:2]
    ]
    mask[i0:i1, j0:j1, :] = True
    return mask


# --------------------------------------------------------------------------------------------
# Coverage
# --------------------------------------------------------------------------------------------


def test_full_ct_covers_chest_abdomen_pelvis(case, full):
    assert full.regions == ("chest", "abdomen", "pelvis")
    assert full.possible == ("chest", "abdomen", "pelvis")
    z = slice_z(case.image)
    lungs = reference_area_cm2(case, LUNG_LABELS) > 0
    hips = reference_area_cm2(case, ("hip_left", "hip_right")) > 0
    chest_low, chest_high = full.extents["chest"]
    pelvis_low, pelvis_high = full.extents["pelvis"]
    assert abs(chest_high - z.max()) < 1 and abs(chest_low - z[lungs].min()) <= 6
    assert abs(pelvis_high - z[hips].max()) <= 10  # the iliac crests
    assert abs(pelvis_low - z.min()) < 1
    assert pelvis_high < full.extents["abdomen"][0] < full.extents["abdomen"][1] < chest_low
    assert any(line.startswith("aerated lungs") for line in full.evidence)
    assert any(line.startswith("bony pelvis") for line in full.evidence)
    # slices run from head to feet and carry a region, or are undetermined with the choices named
    assert np.all(np.diff(full.slice_z) < 0)
    assert len(full.slice_labels) == len(full.slice_possible) == len(full.slice_z)
    for label, possible in zip(full.slice_labels, full.slice_possible):
        assert (label == UNKNOWN and len(possible) > 1) or possible == {label}
    for low, high, could in full.undetermined_extents():
        assert low <= high and set(could) <= {"abdomen", "pelvis"}
    assert describe(full) == "field of view: chest, abdomen, pelvis"


def test_chest_crop(chest_crop, vocab, case):
    image, labels = chest_crop
    coverage = estimate_coverage(image)
    assert coverage.regions == coverage.possible == ("chest",)
    assert coverage.determined
    bladder = check_structure(vocab["urinary_bladder"], blob(image), image, coverage)
    assert bladder is not None and bladder.rule == "region"
    assert bladder.reason == "scan covers chest only; urinary bladder lies in the pelvis"
    for name in ("liver", "spleen", "stomach", "lung_lower_lobe_right"):
        assert check_structure(vocab[name], label_mask(case, name, labels), image, coverage) is None, name


def test_pelvis_crop(pelvis_crop, vocab, case):
    image, labels = pelvis_crop
    coverage = estimate_coverage(image)
    assert coverage.regions == coverage.possible == ("pelvis",)
    liver = check_structure(vocab["liver"], blob(image), image, coverage)
    reason = "scan covers pelvis only; liver lies in the chest and abdomen"
    assert liver == GuardVerdict("region", reason, "liver")
    for name in ("urinary_bladder", "hip_left", "femur_right", "sacrum", "gluteus_maximus_left"):
        assert check_structure(vocab[name], label_mask(case, name, labels), image, coverage) is None, name


def test_synthetic_head(vocab):
    head = synthetic_head()
    coverage = estimate_coverage(head)
    assert coverage.regions == coverage.possible == ("head",)
    assert any(line.startswith("skull") for line in coverage.evidence)
    verdict = check_structure(vocab["liver"], blob(head), head, coverage)
    assert verdict is not None and verdict.rule == "region" and "head" in verdict.reason
    assert verdict.reason == "scan covers head only; liver lies in the chest and abdomen"
    for name in ("brain", "skull"):
        assert check_structure(vocab[name], blob(head), head, coverage) is None


def test_synthetic_thighs(vocab):
    thighs = synthetic_thighs()
    coverage = estimate_coverage(thighs)
    assert coverage.regions == coverage.possible == ("legs",)
    assert check_structure(vocab["femur_left"], blob(thighs, 0.1), thighs, coverage) is None
    assert check_structure(vocab["liver"], blob(thighs), thighs, coverage).rule == "region"


def test_abdomen_without_landmarks_rules_out_the_head(case, vocab):
    """Between the lung bases and the iliac crests nothing is certain, but a 700 cm2 slice is no head."""
    z = slice_z(case.image)
    image = crop_slices(case.image, (z > 295) & (z < 390))
    coverage = estimate_coverage(image)
    assert coverage.regions == () and not coverage.determined
    assert "head" not in coverage.possible and "abdomen" in coverage.possible
    assert describe(coverage).startswith("field of view: undetermined")
    brain = check_structure(vocab["brain"], blob(image), image, coverage)
    assert brain.rule == "region"
    assert brain.reason == "scan covers neck, chest, abdomen, pelvis and legs at most; brain lies in the head"
    for name in ("liver", "urinary_bladder", "lung_left"):  # could all be there: never flagged
        assert check_structure(vocab[name], blob(image), image, coverage) is None


def shifted_down(mask: np.ndarray, volume: Volume, mm: float) -> np.ndarray:
    """``mask`` moved ``mm`` towards the feet (the sample's last axis runs to superior)."""
    shift = int(round(mm / volume.spacing[2]))
    moved = np.zeros_like(mask)
    moved[:, :, : mask.shape[2] - shift] = mask[:, :, shift:]
    return moved


@pytest.mark.parametrize(
    "what, value",
    [
        ("kidney_", 280.0),  # enhancing kidneys (arterial phase): large and lateral, but no cortical bone
        ("rib_", 1000.0),  # dense lower ribs, as at high resolution: cortical, but small parts
    ],
)
def test_abdominal_look_alikes_are_not_hip_bones(case, vocab, what, value):
    """In a slab of the upper abdomen without lungs, neither kidneys nor rib tips make a pelvis."""
    z = slice_z(case.image)
    painted = np.isin(case.labels.array, [v for v, n in case.label_table.items() if n.startswith(what)])
    image = crop_slices(case.image.with_array(np.where(painted, np.float32(value), case.image.array)),
                        (z > 295) & (z < 390))
    coverage = estimate_coverage(image)
    assert "no bony pelvis" in coverage.evidence and "pelvis" not in coverage.regions
    assert check_structure(vocab["liver"], blob(image), image, coverage) is None


@pytest.mark.parametrize("axcodes", ["LPS", "RAS", "RAI", "SAR", "IPL", "ALS", "PIR"])
def test_coverage_does_not_depend_on_voxel_order(case, full, vocab, axcodes):
    from MoMESegmentationLib.io.geometry import canonicalize

    image, record = canonicalize(case.image, axcodes)
    assert axcodes == "RAS" or not record.is_identity
    coverage = estimate_coverage(image)
    assert coverage.regions == full.regions and coverage.possible == full.possible
    for region, (low, high) in full.extents.items():
        assert coverage.extents[region] == pytest.approx((low, high), abs=1e-3)
    liver = label_mask(case, "liver")
    codes = liver.astype(np.uint8) + 2 * shifted_down(liver, case.image, 180.0).astype(np.uint8)
    both, _ = canonicalize(case.labels.with_array(codes), axcodes)
    assert check_structure(vocab["liver"], (both.array & 1) > 0, image, coverage) is None
    verdict = check_structure(vocab["liver"], (both.array & 2) > 0, image, coverage)
    assert verdict is not None and verdict.rule == "position" and "pelvis" in verdict.reason


def test_coverage_does_not_depend_on_resolution(case, full):
    """The same CT at 1.5 mm voxels (each voxel repeated) shows the same regions."""
    fine = np.repeat(np.repeat(np.repeat(case.image.array, 2, axis=0), 2, axis=1), 2, axis=2)
    affine = case.image.affine_lps.copy()
    affine[:3, :3] /= 2.0
    affine[:3, 3] -= case.image.direction @ (case.image.spacing / 4.0)  # same physical extent
    coverage = estimate_coverage(Volume.from_affine(fine, affine))
    assert coverage.regions == full.regions
    for region, (low, high) in full.extents.items():
        assert coverage.extents[region] == pytest.approx((low, high), abs=8.0)


def test_wrong_slice_direction_is_undetermined(case, vocab):
    """A header that puts the feet above the head: pelvis above the lungs cannot be, so nothing is decided."""
    direction = case.image.direction.copy()
    direction[:, 2] *= -1
    image = Volume(case.image.array, case.image.spacing, case.image.origin, direction)
    coverage = estimate_coverage(image)
    assert coverage.regions == () and coverage.possible == BODY_REGIONS
    assert any("out of order" in line for line in coverage.evidence)
    bladder = label_mask(case, "urinary_bladder")
    assert check_structure(vocab["urinary_bladder"], bladder, image, coverage) is None


@pytest.mark.parametrize("fill", [40.0, -1000.0])
def test_not_a_ct_is_undetermined(vocab, fill):
    """No air around a body (MR, a crop inside the body) or no body at all: the guard stays silent."""
    volume = Volume(np.full((60, 60, 20), fill, dtype=np.float32), spacing=(2.0, 2.0, 4.0))
    coverage = estimate_coverage(volume)
    assert coverage.regions == () and coverage.possible == BODY_REGIONS
    assert describe(coverage) == "field of view: undetermined"
    assert check_structure(vocab["liver"], blob(volume), volume, coverage) is None


def test_regions_between_landmarks():
    """Slices between landmarks get the regions anatomy's order and the regions' lengths allow."""
    from MoMESegmentationLib.anatomy import _assign

    runs = [("head", 10), ("", 40), ("chest", 20), ("", 30), ("pelvis", 25)]  # slices 4 mm apart
    landmark = np.array([name for name, count in runs for _ in range(count)], dtype=object)
    z = -4.0 * np.arange(len(landmark))
    labels, possible = _assign(landmark, z, np.ones(len(z), dtype=bool), np.full(len(z), 300.0))

    def at(i: int) -> tuple[str, set[str]]:
        return labels[i], set(possible[i])

    head_bottom, chest_top, chest_bottom, pelvis_top = 9, 50, 69, 100
    assert at(head_bottom + 5) == ("head", {"head"})  # 20 mm below the skull ring: skull base, face
    assert at(head_bottom + 15) == (UNKNOWN, {"head", "neck"})  # 60 mm: face or neck
    assert at(chest_top - 5) == ("neck", {"neck"})  # 20 mm above the lung apices
    assert at(chest_bottom + 5) == ("abdomen", {"abdomen"})
    assert at(pelvis_top - 3) == (UNKNOWN, {"abdomen", "pelvis"})  # 12 mm above the iliac crests
    assert labels[:10] == ("head",) * 10 and labels[-25:] == ("pelvis",) * 25
    # a big cross-section is no head
    _, possible = _assign(landmark, z, np.ones(len(z), dtype=bool), np.full(len(z), 600.0))
    assert set(possible[head_bottom + 15]) == {"neck"}


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def test_reference_masks_are_plausible(case, full, vocab):
    """Every structure of TotalSegmentator's label map of the full CT passes."""
    present = case.present_labels()
    assert len(present) > 50
    for value, name in present.items():
        assert check_structure(vocab[name], case.labels.array == value, case.image, full) is None, name


def test_brain_in_the_abdomen_ct(case, full, vocab):
    verdict = check_structure(vocab["brain"], blob(case.image), case.image, full)
    assert verdict.rule == "region"
    assert verdict.reason == "scan covers chest, abdomen and pelvis only; brain lies in the head"
    assert verdict.structure_id == "brain"


def test_volume_rule(case, full, vocab):
    liver = vocab["liver"]
    assert check_structure(liver, label_mask(case, "liver"), case.image, full) is None
    huge = np.zeros(case.image.shape, dtype=bool)
    huge[:, :, slice_z(case.image) >= 250] = True  # whole slices from the iliac crests up: ~20 L
    volume_l = huge.sum() * case.image.voxel_volume_ml / 1000
    assert 19 < volume_l < 21
    verdict = check_structure(liver, huge, case.image, full)
    assert verdict.rule == "volume"
    assert verdict.reason == (
        f"mask is {volume_l:.1f} L, more than 1.5 x the largest plausible adult liver "
        f"({liver.volume_ml[1] / 1000:.1f} L)"
    )
    # only too large is implausible: a sliver of liver at the edge of the field of view is fine
    sliver = label_mask(case, "liver") & (slice_z(case.image) > 420)
    assert 0 < sliver.sum() and check_structure(liver, sliver, case.image, full) is None


def test_position_rule(case, full, vocab):
    """The liver's mask shifted 180 mm down lies in the pelvis."""
    moved = shifted_down(label_mask(case, "liver"), case.image, 180.0)
    verdict = check_structure(vocab["liver"], moved, case.image, full)
    assert verdict.rule == "position"
    assert verdict.reason.startswith("only ")
    assert "% of the liver mask lies in the chest and abdomen" in verdict.reason
    assert "most of the rest is in the pelvis" in verdict.reason
    # a few centimetres over a border are within tolerance
    small_shift = int(round(15 / case.image.spacing[2]))
    bladder = label_mask(case, "urinary_bladder")
    up = np.zeros_like(bladder)
    up[:, :, small_shift:] = bladder[:, :, :-small_shift]
    assert check_structure(vocab["urinary_bladder"], up, case.image, full) is None


def test_position_tolerance_at_region_borders(case, full, vocab):
    """An abdominal structure reaching 15 mm into the pelvis passes; 30-60 mm into it does not."""
    z = slice_z(case.image)
    pelvis_top = full.extents["pelvis"][1]
    l3 = vocab["vertebrae_L3"]
    assert l3.regions == ("abdomen",)
    near = blob(case.image) & ((z > pelvis_top - 15) & (z <= pelvis_top))[None, None, :]
    assert near.any() and check_structure(l3, near, case.image, full) is None
    deep = blob(case.image) & ((z > pelvis_top - 60) & (z <= pelvis_top - 30))[None, None, :]
    verdict = check_structure(l3, deep, case.image, full)
    assert verdict.rule == "position" and verdict.reason.startswith("only 0% of the L3 vertebra mask")


def test_structures_without_priors_are_never_flagged(vocab):
    head = synthetic_head(size=128, pixel_mm=1.6, slices=12, slice_mm=5.0)
    coverage = estimate_coverage(head)
    liver = vocab["liver"]
    no_priors = Structure("liver", liver.name, liver.synonyms, liver.color, liver.terminology)
    assert no_priors.regions == () and no_priors.volume_ml is None
    assert check_structure(no_priors, blob(head), head, coverage) is None
    assert check_structure(None, blob(head), head, coverage) is None
    assert check_structure(liver, np.zeros(head.shape, dtype=bool), head, coverage) is None  # empty mask
    assert check_structure(liver, blob(head), head, coverage).rule == "region"
    with pytest.raises(ValueError, match="does not match"):
        check_structure(liver, np.ones((3, 3, 3), dtype=bool), head, coverage)


def test_describe_names_undetermined_parts(case):
    """Below the lung bases the abdomen is certain for 40 mm; further down the pelvis could begin."""
    z = slice_z(case.image)
    coverage = estimate_coverage(crop_slices(case.image, z >= 330))  # lung bases and upper abdomen
    assert coverage.regions == ("chest", "abdomen") and coverage.possible == ("chest", "abdomen", "pelvis")
    assert describe(coverage) == "field of view: chest, abdomen (part undetermined, possibly pelvis)"
    (low, high, could), = coverage.undetermined_extents()
    assert could == ("abdomen", "pelvis") and low == pytest.approx(z[z >= 330].min(), abs=2)
    assert high < coverage.extents["chest"][0] - 40
    assert EMPTY not in coverage.slice_labels
    coverage = estimate_coverage(crop_slices(case.image, z >= 200))  # down into the iliac wings
    assert describe(coverage) == "field of view: chest, abdomen, pelvis"


def test_module_imports_without_torch(repo_root):
    code = (
        "import sys; import MoMESegmentationLib.anatomy as a; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(repo_root))
