"""Label review (``MoMESegmentationLib.review``): where the model and an existing label disagree.

The pure functions get synthetic labels and probabilities with blobs at known voxel positions on an
anisotropic, oblique grid; every expected volume and LPS position is computed from the grid's
definition, never from the code under test. The case and command paths run the real engine with the
fault-injection stub :class:`engine_fixtures.IntensityNetwork` (the liver is whatever exceeds 75 HU) on
phantoms whose organ box lands exactly on the grid, so the model's mask is known voxel for voxel; the
labels written to disk are that box, damaged by known amounts.
"""

from __future__ import annotations

import argparse
import csv
import json
import math

import numpy as np
import pytest

from engine_fixtures import (
    ORGAN_HU,
    TISSUE_HU,
    IntensityNetwork,
    centred_grid,
    grid_centres,
    in_box,
    make_phantom,
    make_tiny_checkpoint,
    step,
)
from MoMESegmentationLib.errors import InputError, MoMEError, PromptError
from MoMESegmentationLib.io.volume import Volume
from MoMESegmentationLib.review import (
    ADDS,
    KIND_COLOUR,
    LABEL_COLOUR,
    REMOVES,
    apply_region,
    case_name,
    disagreement_regions,
    pair_cases,
    register,
    review_case,
    run_review,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPACING = np.array([1.5, 2.0, 3.0])  # mm, anisotropic
VOXEL_ML = float(np.prod(SPACING)) / 1000.0  # 0.009 mL
ORIGIN = np.array([-120.0, 35.0, 410.0])
ANGLE = math.radians(30)
#: Oblique: the i and j axes are rotated 30 degrees about z and the k axis runs towards the feet.
DIRECTION = np.array([[math.cos(ANGLE), -math.sin(ANGLE), 0.0],
                      [math.sin(ANGLE), math.cos(ANGLE), 0.0],
                      [0.0, 0.0, -1.0]])
SHAPE = (40, 36, 24)


def grid() -> Volume:
    return Volume(np.zeros(SHAPE, np.int16), SPACING, ORIGIN, DIRECTION)


def blob(low, high) -> np.ndarray:
    mask = np.zeros(SHAPE, bool)
    mask[tuple(slice(a, b) for a, b in zip(low, high))] = True
    return mask


def lps(index) -> np.ndarray:
    """LPS mm of a continuous index, from the grid's definition: origin + D (spacing * index)."""
    return ORIGIN + DIRECTION @ (SPACING * np.asarray(index, float))


def centre_of(low, high) -> np.ndarray:
    return (np.asarray(low, float) + np.asarray(high, float) - 1) / 2


# --------------------------------------------------------------------------------- pure functions
ORGAN = ((5, 5, 4), (25, 25, 16))
MISSED = ((28, 6, 3), (34, 11, 7))  # 6 x 5 x 4 = 120 voxels = 1.08 mL, model p 0.8, not in the label
SPURIOUS = ((6, 28, 18), (10, 34, 22))  # 4 x 6 x 4 = 96 voxels = 0.864 mL, in the label, model p 0.1


def damaged_case():
    organ, missed, spurious = blob(*ORGAN), blob(*MISSED), blob(*SPURIOUS)
    label = organ | spurious
    probability = np.full(SHAPE, 0.02, np.float32)
    probability[organ] = 0.95
    probability[missed] = 0.8
    probability[spurious] = 0.1
    return label, probability


def test_missed_and_spurious_blobs_are_exactly_the_regions():
    label, probability = damaged_case()
    regions = disagreement_regions(label, probability, grid())
    assert [r.kind for r in regions] == [ADDS, REMOVES]
    adds, removes = regions
    assert adds.voxels == 120 and removes.voxels == 96
    assert adds.volume_ml == pytest.approx(120 * 1.5 * 2.0 * 3.0 / 1000)  # 1.08 mL
    assert removes.volume_ml == pytest.approx(96 * 0.009)
    assert adds.bbox == ((28, 6, 3), (33, 10, 6)) and removes.bbox == ((6, 28, 18), (9, 33, 21))
    np.testing.assert_allclose(adds.centroid_index, centre_of(*MISSED))
    np.testing.assert_allclose(removes.centroid_index, centre_of(*SPURIOUS))
    np.testing.assert_allclose(adds.centroid_lps, lps(centre_of(*MISSED)), atol=1e-9)
    np.testing.assert_allclose(removes.centroid_lps, lps(centre_of(*SPURIOUS)), atol=1e-9)
    # k runs to the feet: the spurious blob (larger k) is 42 mm below the missed one.
    assert adds.centroid_lps[2] - removes.centroid_lps[2] == pytest.approx((19.5 - 4.5) * 3.0)
    assert adds.mean_probability == pytest.approx(0.8) and adds.confidence == pytest.approx(0.8)
    assert removes.mean_probability == pytest.approx(0.1) and removes.confidence == pytest.approx(0.9)
    assert adds.score == pytest.approx(1.08 * 0.8) and removes.score == pytest.approx(0.864 * 0.9)
    assert [r.rank for r in regions] == [1, 2]
    assert adds.full_mask(SHAPE).sum() == 120 and (adds.full_mask(SHAPE) == blob(*MISSED)).all()
    json.dumps([r.to_json() for r in regions])  # serialisable


def test_plain_spacing_gives_volumes_but_no_lps():
    label, probability = damaged_case()
    regions = disagreement_regions(label, probability, (3.0, 1.0, 1.0), min_ml=0.0)
    assert [r.kind for r in regions] == [ADDS, REMOVES]
    assert [r.volume_ml for r in regions] == pytest.approx([120 * 0.003, 96 * 0.003])
    assert all(r.centroid_lps is None for r in regions)
    assert regions[0].to_json()["centroid_lps"] is None


def test_ranking_is_by_volume_times_confidence():
    """Neither the largest nor the most confident region comes first: the largest product does."""
    label = blob((2, 2, 2), (12, 12, 8))  # organ: agreed
    probability = np.zeros(SHAPE, np.float32)
    probability[label] = 0.99
    largest = blob((20, 2, 2), (30, 12, 6))  # 400 voxels = 3.6 mL at p 0.51: score 1.836
    surest = blob((20, 20, 2), (25, 25, 6))  # 100 voxels = 0.9 mL at p 0.99: score 0.891
    removal = blob((2, 20, 12), (10, 30, 16))  # 320 voxels = 2.88 mL labelled, p 0.2: score 2.304
    probability[largest] = 0.51
    probability[surest] = 0.99
    label = label | removal
    probability[removal] = 0.2
    regions = disagreement_regions(label, probability, SPACING)
    scores = [r.score for r in regions]
    assert [(r.kind, r.voxels) for r in regions] == [(REMOVES, 320), (ADDS, 400), (ADDS, 100)]
    assert scores == pytest.approx([2.88 * 0.8, 3.6 * 0.51, 0.9 * 0.99])
    assert [r.rank for r in regions] == [1, 2, 3]


def test_min_ml_drops_small_regions_and_diagonal_voxels_connect():
    label = np.zeros(SHAPE, bool)
    probability = np.zeros(SHAPE, np.float32)
    small = blob((2, 2, 2), (6, 6, 4))  # 32 voxels = 0.288 mL
    probability[small] = 0.9
    # Two cubes touching only at one corner: one region with 26-connectivity (the documented choice).
    probability[blob((20, 20, 10), (24, 24, 14))] = 0.9
    probability[blob((24, 24, 14), (28, 28, 18))] = 0.9
    default = disagreement_regions(label, probability, SPACING)
    assert [r.voxels for r in default] == [128]  # the small one is under the default 0.5 mL
    assert default[0].bbox == ((20, 20, 10), (27, 27, 17))
    kept = disagreement_regions(label, probability, SPACING, min_ml=0.28)
    assert sorted(r.voxels for r in kept) == [32, 128]
    assert disagreement_regions(label, probability, SPACING, min_ml=0.29)[0].voxels == 128
    assert disagreement_regions(label, probability, SPACING, min_ml=2.0) == []


def test_threshold_decides_what_the_model_says():
    label, probability = damaged_case()
    assert [r.kind for r in disagreement_regions(label, probability, SPACING, threshold=0.85)] == [REMOVES]
    # At 0.05 the spurious blob (p 0.1) is the model's too: only the missed blob remains.
    assert [r.kind for r in disagreement_regions(label, probability, SPACING, threshold=0.05)] == [ADDS]


def test_apply_region_round_trip():
    label, probability = damaged_case()
    before = label.copy()
    regions = disagreement_regions(label, probability, grid())
    fixed = label
    for region in regions:
        fixed = apply_region(fixed, region.full_mask(SHAPE), region.kind)
    np.testing.assert_array_equal(label, before)  # pure
    np.testing.assert_array_equal(fixed, probability >= 0.5)  # the model's version everywhere
    assert disagreement_regions(fixed, probability, grid()) == []
    # One region at a time, and undoing it.
    adds = regions[0]
    added = apply_region(label, adds)  # a Region carries its kind
    assert added.sum() == label.sum() + 120 and added[blob(*MISSED)].all()
    assert [r.kind for r in disagreement_regions(added, probability, grid())] == [REMOVES]
    np.testing.assert_array_equal(apply_region(added, adds.full_mask(SHAPE), REMOVES), label)
    with pytest.raises(ValueError):
        apply_region(label, adds.full_mask(SHAPE), "replace")


def test_tolerance_ignores_a_one_voxel_rim_but_not_a_blob():
    organ = blob((5, 5, 5), (25, 25, 15))
    probability = np.zeros(SHAPE, np.float32)
    probability[blob((4, 4, 4), (26, 26, 16))] = 0.9  # the model is one voxel larger all round
    probability[blob((30, 20, 2), (36, 30, 8))] = 0.9  # and finds a blob far away
    rim = disagreement_regions(organ, probability, SPACING)
    assert sorted(r.voxels for r in rim) == [360, 22 * 22 * 12 - 20 * 20 * 10]
    # The rim's corners are sqrt(1.5^2 + 2^2 + 3^2) = 3.9 mm from the label: 4 mm ignores all of it.
    assert [r.voxels for r in disagreement_regions(organ, probability, SPACING, tolerance_mm=4.0)] == [360]
    # 1.6 mm ignores only the two faces one i-step (1.5 mm) away; a j-step is 2 mm, a k-step 3 mm.
    faces = disagreement_regions(organ, probability, SPACING, tolerance_mm=1.6)
    assert sorted(r.voxels for r in faces) == [360, 22 * 22 * 12 - 20 * 20 * 10 - 2 * 20 * 10]


def test_bad_arrays_are_refused():
    label, probability = damaged_case()
    with pytest.raises(ValueError):
        disagreement_regions(label[:-1], probability, SPACING)
    with pytest.raises(ValueError):
        disagreement_regions(label, probability * 2, SPACING)
    with pytest.raises(ValueError):
        disagreement_regions(label, probability, (1.0, 0.0, 1.0))


def test_case_names_and_pairing(tmp_path):
    assert case_name("a/case1.seg.nrrd") == "case1" and case_name("case1.nii.gz") == "case1"
    assert case_name("case1_0000.nii.gz", strip_channel=True) == "case1"
    cts, labels = tmp_path / "ct", tmp_path / "labels"
    cts.mkdir(), labels.mkdir()
    for name in ("a.nii.gz", "b_0000.nii.gz", "c.nrrd", "notes.txt", ".hidden.nii.gz"):
        (cts / name).write_bytes(b"")
    for name in ("a.seg.nrrd", "b.nii.gz", "d.nii.gz"):
        (labels / name).write_bytes(b"")
    pairs, ct_only, seg_only = pair_cases(cts, labels)
    assert [(n, c.name, s.name) for n, c, s in pairs] == [("a", "a.nii.gz", "a.seg.nrrd"),
                                                          ("b", "b_0000.nii.gz", "b.nii.gz")]
    assert [n for n, _ in ct_only] == ["c"] and [n for n, _ in seg_only] == ["d"]
    (labels / "a.nii.gz").write_bytes(b"")
    with pytest.raises(InputError, match="two labels of case 'a'"):
        pair_cases(cts, labels)
    # One folder for both: the .seg.nrrd files are the labels.
    both = tmp_path / "both"
    both.mkdir()
    for name in ("x.nii.gz", "x.seg.nrrd"):
        (both / name).write_bytes(b"")
    pairs, ct_only, seg_only = pair_cases(both, both)
    assert [(n, c.name, s.name) for n, c, s in pairs] == [("x", "x.nii.gz", "x.seg.nrrd")]


# ------------------------------------------------------------------------ case path with the stub
MODEL_SPACING = 3.0  # the stub checkpoint's grid; the phantoms use the same, so the mask is exact
LEVEL = (TISSUE_HU + ORGAN_HU) / 2
CENTRE = np.array([-40.0, 25.0, 310.0])
#: Axis-aligned but permuted and flipped: i runs to the feet, j to the patient's right, k posterior.
P_DIRECTION = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]])
P_SHAPE = (30, 40, 36)  # 90 mm (z) x 120 mm (x) x 108 mm (y)
P_SPACING = (MODEL_SPACING,) * 3
P_ML = MODEL_SPACING ** 3 / 1000.0
ORGAN_BOX = (CENTRE + [-30, -24, -21], CENTRE + [24, 24, 24])  # box faces half way between voxel centres


def patient_right_slab(thickness_mm: float):
    """The organ's slab on the patient's right (low LPS x), ``thickness_mm`` thick."""
    low, high = ORGAN_BOX
    return low, np.array([low[0] + thickness_mm, high[1], high[2]])


SPURIOUS_BOX = (CENTRE + [30, -9, -9], CENTRE + [42, 9, 9])  # on the patient's left, in soft tissue


def phantom_points() -> np.ndarray:
    origin = centred_grid(P_SHAPE, P_SPACING, P_DIRECTION, CENTRE)
    return grid_centres(P_SHAPE, P_SPACING, origin, P_DIRECTION)


def write_case(folder, name, missing_mm: float = 0.0, spurious: bool = False, fmt: str = ".seg.nrrd",
               ct_name: str | None = None, segment_name: str = "Liver", crop: bool = False):
    """Write a phantom CT and its liver label with the patient-right slab left out and/or a spurious box.

    With ``crop`` the ``.seg.nrrd`` holds only the label's bounding box (as Slicer may write it).
    """
    from MoMESegmentationLib.io.readers import write_labelmap, write_volume
    from MoMESegmentationLib.io.segmentation import Segment, Segmentation, write_segmentation

    volume = make_phantom(P_SHAPE, P_SPACING, P_DIRECTION, CENTRE, [(*ORGAN_BOX, ORGAN_HU)], name=name)
    points = phantom_points()
    label = in_box(points, *ORGAN_BOX)
    if missing_mm:
        label &= ~in_box(points, *patient_right_slab(missing_mm))
    if spurious:
        label |= in_box(points, *SPURIOUS_BOX)
    ct_path = folder["ct"] / (ct_name or f"{name}.nii.gz")
    write_volume(volume, ct_path)
    seg_path = folder["seg"] / f"{name}{fmt}"
    if fmt == ".seg.nrrd":
        reference, box = volume, (slice(None),) * 3
        if crop:
            found = np.argwhere(label)
            low, high = found.min(axis=0) - 1, found.max(axis=0) + 2
            box = tuple(slice(int(a), int(b)) for a, b in zip(low, high))
            reference = Volume(volume.array[box], volume.spacing, volume.index_to_physical(low),
                               volume.direction)
        write_segmentation(Segmentation(reference, [
            Segment("Spleen", np.zeros(reference.shape, bool), (0.5, 0.5, 0.2), 1),
            Segment(segment_name, label[box], (0.8, 0.4, 0.3), 2)]), seg_path)
    else:
        write_labelmap(label.astype(np.uint8) * 3, volume, seg_path)
    return ct_path, seg_path


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    from MoMESegmentationLib.engine import Segmenter

    segmenter = Segmenter(make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), spacing=MODEL_SPACING),
                          device="cpu")
    segmenter.model = IntensityNetwork(segmenter, {"liver": step(LEVEL)})
    return segmenter


@pytest.fixture
def folders(tmp_path):
    out = {"ct": tmp_path / "ct", "seg": tmp_path / "labels", "root": tmp_path}
    out["ct"].mkdir(), out["seg"].mkdir()
    return out


def test_review_case_finds_the_damage_at_its_lps_position(segmenter, folders):
    ct, seg = write_case(folders, "case1", missing_mm=12.0, spurious=True)
    review = review_case(ct, seg, "liver", segmenter, anatomy_guard=False)
    points = phantom_points()
    organ = in_box(points, *ORGAN_BOX)
    slab = in_box(points, *patient_right_slab(12.0))
    spurious = in_box(points, *SPURIOUS_BOX)
    assert slab.sum() == 4 * 16 * 15 and spurious.sum() == 4 * 6 * 6  # from the box sizes in mm
    assert review.segment == "Liver" and review.structure_id == "liver"
    assert [r.kind for r in review.regions] == [ADDS, REMOVES]
    adds, removes = review.regions
    assert adds.voxels == slab.sum() and removes.voxels == spurious.sum()
    assert adds.volume_ml == pytest.approx(12 * 48 * 45 / 1000)  # the slab's size in mm
    assert removes.volume_ml == pytest.approx(12 * 18 * 18 / 1000)
    np.testing.assert_allclose(adds.centroid_lps, points[slab].mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(adds.centroid_lps, np.mean(patient_right_slab(12.0), axis=0), atol=1e-6)
    np.testing.assert_allclose(removes.centroid_lps, (SPURIOUS_BOX[0] + SPURIOUS_BOX[1]) / 2, atol=1e-6)
    assert adds.mean_probability > 0.999 and removes.mean_probability < 0.001
    totals = review.totals
    label = (organ & ~slab) | spurious
    assert totals["dice"] == pytest.approx(2 * (organ & label).sum() / (organ.sum() + label.sum()), abs=1e-4)
    assert totals["label_ml"] == pytest.approx(label.sum() * P_ML)
    assert totals["model_ml"] == pytest.approx(organ.sum() * P_ML)
    assert totals["adds_ml"] == pytest.approx(slab.sum() * P_ML) and totals["regions"] == 2
    assert totals["disagreement_ml"] == pytest.approx((slab.sum() + spurious.sum()) * P_ML)
    assert totals["score_sum"] == pytest.approx(adds.score + removes.score, abs=1e-3)


def test_a_label_on_a_cropped_grid_is_put_on_the_ct_grid(segmenter, folders):
    from MoMESegmentationLib.io.segmentation import read_segmentation

    ct, seg = write_case(folders, "cropped", missing_mm=12.0, spurious=True, crop=True)
    assert read_segmentation(seg).reference.shape != P_SHAPE
    review = review_case(ct, seg, "liver", segmenter, anatomy_guard=False)
    assert review.label.shape == P_SHAPE and any("grid differs" in w for w in review.warnings)
    assert [(r.kind, r.voxels) for r in review.regions] == [(ADDS, 960), (REMOVES, 144)]
    np.testing.assert_allclose(review.regions[1].centroid_lps, np.mean(SPURIOUS_BOX, axis=0), atol=1e-6)


def test_label_map_segment_choice_and_errors(segmenter, folders):
    ct, seg = write_case(folders, "lm", missing_mm=6.0, fmt=".nii.gz")  # one label value (3): used as is
    review = review_case(ct, seg, "liver", segmenter, anatomy_guard=False)
    assert review.segment == "Label 3" and [r.kind for r in review.regions] == [ADDS]
    assert review.regions[0].voxels == 2 * 16 * 15
    # Two labels: named by the JSON summary that mome segment writes beside a label map, else an error.
    from MoMESegmentationLib.io.readers import read_volume, write_labelmap

    two = folders["seg"] / "two.nii.gz"
    labels = (read_volume(seg).array > 0).astype(np.uint8)
    labels[in_box(phantom_points(), *SPURIOUS_BOX)] = 2
    write_labelmap(labels, read_volume(ct), two)
    with pytest.raises(InputError, match="no segment is 'liver' .segments: Label 1, Label 2"):
        review_case(ct, two, "liver", segmenter, anatomy_guard=False)
    (folders["seg"] / "two.json").write_text(json.dumps({"structures": [
        {"label": 1, "name": "Liver", "id": "liver"}, {"label": 2, "name": "Spleen", "id": "spleen"}]}))
    named = review_case(ct, two, "liver", segmenter, anatomy_guard=False)
    assert named.segment == "Liver" and [(r.kind, r.voxels) for r in named.regions] == [(ADDS, 480)]
    # A .seg.nrrd whose segments are not the liver: a one-line error naming the file and the segments.
    ct2, seg2 = write_case(folders, "other", segment_name="Pancreas")
    with pytest.raises(InputError) as error:
        review_case(ct2, seg2, "liver", segmenter, anatomy_guard=False)
    message = str(error.value)
    assert "\n" not in message and str(seg2) in message and "Spleen, Pancreas" in message
    chosen = review_case(ct2, seg2, "liver", segmenter, anatomy_guard=False, segment="2")
    assert chosen.segment == "Pancreas" and chosen.regions == []
    with pytest.raises(PromptError, match="kidneys"):
        review_case(ct, seg, "kidneys", segmenter)
    with pytest.raises(InputError, match="missing.seg.nrrd"):
        review_case(ct, folders["seg"] / "missing.seg.nrrd", "liver", segmenter)


def colour_pixels(image: np.ndarray, rgb, tolerance: float = 0.1) -> np.ndarray:
    return np.argwhere(np.all(np.abs(image - np.asarray(rgb)[None, None, :]) <= tolerance, axis=-1))


def test_review_command_writes_report_and_pictures(segmenter, folders, monkeypatch):
    """``mome review CT SEG -o report`` through its parser: JSON, CSV, a PNG per region, radiological view."""
    import matplotlib.image

    import MoMESegmentationLib.engine as engine

    ct, seg = write_case(folders, "case1", missing_mm=12.0, spurious=True)
    monkeypatch.setattr(engine, "Segmenter", lambda *args, **kwargs: segmenter)
    parser = argparse.ArgumentParser(prog="mome")
    register(parser.add_subparsers(dest="command"))
    report = folders["root"] / "report"
    args = parser.parse_args(["review", str(ct), str(seg), "--prompt", "liver", "-o", str(report),
                              "--model", "stub", "--device", "cpu", "--no-anatomy-guard", "--quiet"])
    assert args.handler(args) == 0
    document = json.loads((report / "regions.json").read_text())
    assert [r["kind"] for r in document["regions"]] == [ADDS, REMOVES]
    assert document["regions"][0]["png"] == "images/region_01.png"
    with open(report / "regions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["rank"], r["kind"]) for r in rows] == [("1", ADDS), ("2", REMOVES)]
    centre = (SPURIOUS_BOX[0] + SPURIOUS_BOX[1]) / 2
    assert [float(rows[1][f"centroid_{a}_lps"]) for a in "xyz"] == pytest.approx(centre, abs=0.01)
    assert float(rows[0]["volume_ml"]) == pytest.approx(25.92) and float(rows[0]["mean_probability"]) > 0.999
    assert sorted(p.name for p in (report / "images").iterdir()) == ["region_01.png", "region_02.png"]
    assert not [p for p in report.iterdir() if p.name.startswith(".")]  # no staging left

    for rank, kind, other, side in ((1, ADDS, REMOVES, "left"), (2, REMOVES, ADDS, "right")):
        image = matplotlib.image.imread(str(report / "images" / f"region_{rank:02d}.png"))[..., :3]
        height, width = image.shape[:2]
        assert colour_pixels(image, KIND_COLOUR[kind]).shape[0] > 100, f"no {kind} highlight in region {rank}"
        assert colour_pixels(image, KIND_COLOUR[other]).shape[0] == 0, f"{other} colour in a {kind} picture"
        assert colour_pixels(image, LABEL_COLOUR).shape[0] > 100, "no label outline"
        # The whole axial slice (top-left panel): the patient's right is on the screen's left.
        panel = colour_pixels(image[: height // 2, : width // 2], KIND_COLOUR[kind])
        middle = width / 4
        assert (panel[:, 1].mean() < middle) if side == "left" else (panel[:, 1].mean() > middle), side


def test_writing_is_atomic_and_errors_are_one_line(segmenter, folders, monkeypatch):
    import MoMESegmentationLib.review as review_module

    ct, seg = write_case(folders, "case1", missing_mm=12.0)
    report = folders["root"] / "report"

    def broken(*args, **kwargs):
        raise MoMEError("disk full")

    monkeypatch.setattr(review_module, "render_region", broken)
    with pytest.raises(MoMEError, match="disk full"):
        run_review(ct, seg, report, "liver", segmenter, anatomy_guard=False, quiet=True)
    assert not report.exists()  # the folder it created is gone, nothing half-written
    report.mkdir()
    (report / "keep.txt").write_text("mine")
    with pytest.raises(MoMEError):
        run_review(ct, seg, report, "liver", segmenter, anatomy_guard=False, quiet=True)
    assert sorted(p.name for p in report.iterdir()) == ["keep.txt"]
    monkeypatch.undo()
    with pytest.raises(PromptError) as error:
        run_review(ct, seg, report, "not an organ at all", segmenter, quiet=True)
    assert "not an organ at all" in str(error.value) and "\n" not in str(error.value)
    assert run_review(ct, seg, report, "liver", segmenter, anatomy_guard=False, quiet=True, top=0) == 0
    assert (report / "regions.csv").is_file() and not (report / "images").exists()
    with pytest.raises(InputError, match="already exists"):
        run_review(ct, seg, report, "liver", segmenter, anatomy_guard=False, quiet=True)


def test_folder_of_cases_is_ranked_by_disagreement(segmenter, folders):
    """Three cases damaged by different amounts (names not in that order) and one CT without a label."""
    write_case(folders, "alpha", missing_mm=6.0)  # 12.96 mL
    write_case(folders, "beta")  # intact
    write_case(folders, "gamma", missing_mm=18.0, spurious=True, fmt=".nii.gz",  # 38.88 + 3.89 mL
               ct_name="gamma_0000.nii.gz")
    write_case(folders, "delta", missing_mm=6.0)
    (folders["seg"] / "delta.seg.nrrd").unlink()
    report = folders["root"] / "report"
    assert run_review(folders["ct"], folders["seg"], report, "liver", segmenter, anatomy_guard=False,
                      quiet=True, top=1) == 0
    with open(report / "cases.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["rank"], r["case"], r["status"]) for r in rows] == [
        ("1", "gamma", "reviewed"), ("2", "alpha", "reviewed"), ("3", "beta", "reviewed"),
        ("", "delta", "no label")]
    assert [float(r["disagreement_ml"]) for r in rows[:3]] == pytest.approx(
        [(6 * 16 * 15 + 144) * P_ML, 2 * 16 * 15 * P_ML, 0.0], abs=1e-3)
    assert float(rows[2]["dice"]) == 1.0 and float(rows[0]["dice"]) < float(rows[1]["dice"]) < 1.0
    for name, regions in (("gamma", 2), ("alpha", 1), ("beta", 0)):
        document = json.loads((report / name / "regions.json").read_text())
        assert len(document["regions"]) == regions and document["case"] == name
        assert len(list((report / name).glob("images/*.png"))) == min(1, regions)
    assert json.loads((report / "cases.json").read_text())["cases"][0]["case"] == "gamma"
