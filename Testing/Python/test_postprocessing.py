"""Post-processing with known probabilities: the rules on the masks change the answer where they should.

The tiny random-weight models find nothing, so every rule applied to their masks (minimum size and
confidence, overlaps, largest component, ROI clipping) would pass unnoticed when broken. Here the
network is replaced by a fault-injection stub (:class:`engine_fixtures.IntensityNetwork`) whose logits
are chosen functions of the Hounsfield units, and the phantoms hold boxes at known LPS positions.
Every expected answer is computed from the phantom's own definition (voxel centres in millimetres),
never from the engine's result or its input volume. The phantoms are not real anatomy, so the
anatomy guard is off except where it is the subject.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine_fixtures import (
    TISSUE_HU,
    ORGAN_HU,
    IntensityNetwork,
    centred_grid,
    grid_centres,
    in_box,
    make_phantom,
    make_tiny_checkpoint,
    never,
    random_rotation,
    step,
)
from MoMESegmentationLib.engine import Segmenter
from MoMESegmentationLib.errors import InputError

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

#: The stub model's grid (mm): finer than the random-weight tests' 6 mm so that 16 mm boxes survive.
MODEL_SPACING = 3.0
#: Half way between soft tissue and the organ boxes: the boundary the stub draws lies half way too.
LEVEL = (TISSUE_HU + ORGAN_HU) / 2
CENTRE = np.array([-40.0, 25.0, 310.0])  # LPS mm; the phantoms are centred here


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    return Segmenter(make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), spacing=MODEL_SPACING), device="cpu")


@pytest.fixture
def network(segmenter, monkeypatch):
    """``network(rules, ...)`` puts an :class:`IntensityNetwork` in place of the model for one test."""

    def install(rules: dict, **kwargs) -> IntensityNetwork:
        stub = IntensityNetwork(segmenter, rules, **kwargs)
        monkeypatch.setattr(segmenter, "model", stub)
        segmenter.clear_cache()
        return stub

    yield install
    segmenter.clear_cache()


def box(offset_low, offset_high):
    """An LPS box given relative to :data:`CENTRE`."""
    return CENTRE + np.asarray(offset_low, float), CENTRE + np.asarray(offset_high, float)


def margin(volume) -> float:
    """How far (mm) from a box face the stub's boundary may land after both resamplings."""
    return float(max(volume.spacing)) + MODEL_SPACING


def centres(result) -> np.ndarray:
    """Voxel centres (LPS mm) of the result's grid, from its own geometry fields."""
    ref = result.labelmap_volume()
    return grid_centres(ref.shape, ref.spacing, ref.origin, ref.direction)


def box_ml(low, high) -> float:
    return float(np.prod(np.asarray(high) - np.asarray(low))) / 1000.0


GEOMETRIES = {
    "identity": (np.eye(3), (4.0, 4.0, 4.0), (40, 36, 30)),
    "flipped": (np.diag([-1.0, 1.0, -1.0]), (3.0, 5.5, 7.0), (37, 41, 23)),  # anisotropic, odd sizes
    "permuted": (np.eye(3)[:, [2, 0, 1]], (5.0, 4.0, 6.0), (25, 40, 33)),
    "oblique": ("oblique", (4.2, 3.9, 6.1), (35, 38, 27)),
}


def geometry(name):
    direction, spacing, shape = GEOMETRIES[name]
    if isinstance(direction, str):
        direction = random_rotation(np.random.default_rng(3))
    return direction, spacing, shape


# ------------------------------------------------------------------------------------------ geometry
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_result_lands_on_the_known_physical_box(segmenter, network, name):
    """A 40 mm organ placed off-centre at known LPS coordinates comes back there, on the input grid."""
    direction, spacing, shape = geometry(name)
    low, high = box((-10, -25, -5), (30, 15, 35))
    volume = make_phantom(shape, spacing, direction, CENTRE, [(low, high, ORGAN_HU)])
    network({"liver": step(LEVEL)})
    result = segmenter.segment(volume, "liver", anatomy_guard=False)

    # The output grid is the one the phantom was defined on.
    labelled = result.labelmap_volume()
    assert result.labelmap.shape == result.masks[0].shape == tuple(shape)
    np.testing.assert_allclose(labelled.spacing, spacing)
    np.testing.assert_allclose(labelled.direction, direction)
    np.testing.assert_allclose(labelled.origin, centred_grid(shape, spacing, direction, CENTRE), atol=1e-9)
    # The organ is where the phantom put it: the box sampled on that grid.
    points = grid_centres(shape, spacing, centred_grid(shape, spacing, direction, CENTRE), direction)
    truth = in_box(points, low, high)
    mask = result.masks[0]
    m = margin(volume)
    assert mask[in_box(points, low, high, -m)].all(), "voxels well inside the box are missing"
    assert not mask[~in_box(points, low, high, m)].any(), "voxels well outside the box are labelled"
    np.testing.assert_array_equal(result.labelmap, mask.astype(np.uint8))
    # The volume and the centre of mass match the box's (a flip or a shifted origin moves them by cm).
    assert result.structures[0].found
    assert result.structures[0].voxels == pytest.approx(truth.sum(), rel=0.1)
    np.testing.assert_allclose(points[mask].mean(axis=0), points[truth].mean(axis=0), atol=1.0)
    np.testing.assert_allclose(points[truth].mean(axis=0), (low + high) / 2, atol=max(spacing) / 2)


# ------------------------------------------------------------------------------ size and confidence
@pytest.mark.parametrize("min_volume_ml, found", [(10.0, False), (1.0, True)])
def test_minimum_size_decides_found(segmenter, network, min_volume_ml, found):
    low, high = box((-8, -8, -8), (8, 8, 8))  # 4.1 mL
    volume = make_phantom((40, 36, 30), (4.0, 4.0, 4.0), boxes=[(low, high, ORGAN_HU)], centre=CENTRE)
    network({"liver": step(LEVEL)})
    result = segmenter.segment(volume, "liver", anatomy_guard=False, min_volume_ml=min_volume_ml,
                               min_confidence=0.0)
    structure = result.structures[0]
    assert structure.found is found
    if found:
        assert structure.rule == "" and structure.note == ""
        assert structure.volume_ml == pytest.approx(box_ml(low, high), rel=0.3)
        assert result.masks[0].sum() == structure.voxels > 0
        assert (result.labelmap == 1).sum() == structure.voxels
    else:
        assert structure.rule == "size"
        assert structure.note.startswith(f"smaller than {min_volume_ml:g} mL (")
        assert structure.voxels == 0 and structure.volume_ml == 0.0
        assert not result.masks[0].any() and not result.labelmap.any()


@pytest.mark.parametrize("min_confidence, found", [(None, False), (0.5, True)])
def test_minimum_confidence_decides_found(segmenter, network, min_confidence, found):
    """A large organ at probability sigmoid(0.3) = 0.57 is not found at the default 0.6, found at 0.5."""
    low, high = box((-20, -20, -20), (20, 20, 20))
    volume = make_phantom((40, 36, 30), (4.0, 4.0, 4.0), boxes=[(low, high, ORGAN_HU)], centre=CENTRE)
    network({"liver": step(LEVEL, inside=0.3)})
    options = {} if min_confidence is None else {"min_confidence": min_confidence}
    result = segmenter.segment(volume, "liver", anatomy_guard=False, **options)
    structure = result.structures[0]
    assert 0.5 <= structure.mean_probability <= 1 / (1 + math.exp(-0.3)) + 1e-6
    assert structure.found is found
    if found:
        assert structure.rule == "" and structure.volume_ml > 0.5 * box_ml(low, high)
        assert result.labelmap.any()
    else:
        assert structure.rule == "confidence"
        assert structure.note == f"mean probability {structure.mean_probability:.2f} below 0.6"
        assert not result.masks[0].any() and not result.labelmap.any()


def test_rules_and_notes_of_structures_not_found(segmenter, network):
    """One run, one structure per rule; a structure that is not found takes no voxels of the label map,
    not even where its probability is the highest."""
    big_low, big_high = box((-25, -25, -20), (25, 25, 30))
    small_low, small_high = box((-10, -10, -10), (10, 10, 10))  # 8 mL inside the big box, brighter still
    volume = make_phantom((40, 36, 30), (4.0, 4.0, 4.0), centre=CENTRE,
                          boxes=[(big_low, big_high, ORGAN_HU), (small_low, small_high, 250.0)])
    network({
        "liver": step(LEVEL, inside=4.0),  # the big box, p = 0.982
        "spleen": never,
        "kidney_left": step(200.0, inside=12.0),  # the small box only, p ~ 1: wins wherever it is found
        "kidney_right": step(LEVEL, inside=0.3),  # the big box, p = 0.57
    })
    prompts = "liver, spleen, left kidney, right kidney"
    strict = segmenter.segment(volume, prompts, anatomy_guard=False, min_volume_ml=20.0)
    assert [s.rule for s in strict.structures] == ["", "empty", "size", "confidence"]
    assert [s.found for s in strict.structures] == [True, False, False, False]
    notes = [s.note for s in strict.structures]
    assert notes[0] == "" and notes[1] == "no voxels above threshold"
    assert notes[2].startswith("smaller than 20 mL") and notes[3].startswith("mean probability 0.5")
    for s, mask in zip(strict.structures[1:], strict.masks[1:]):
        assert not mask.any() and s.voxels == 0 and s.volume_ml == 0.0
    assert set(np.unique(strict.labelmap)) == {0, 1}
    points = centres(strict)
    assert (strict.labelmap[in_box(points, small_low, small_high)] == 1).all()
    summary = strict.summary()["structures"]
    assert [s["rule"] for s in summary] == ["", "empty", "size", "confidence"]
    assert summary[2]["note"] == notes[2] and summary[2]["found"] is False

    lenient = segmenter.segment(volume, prompts, anatomy_guard=False, min_volume_ml=1.0, min_confidence=0.5)
    assert [s.rule for s in lenient.structures] == ["", "empty", "", ""]
    inside_small = in_box(points, small_low, small_high, -margin(volume))
    assert inside_small.any() and (lenient.labelmap[inside_small] == 3).all()
    assert (lenient.labelmap[in_box(points, big_low, big_high, -margin(volume)) & ~in_box(
        points, small_low, small_high, margin(volume))] == 1).all()  # 0.982 beats 0.57


# --------------------------------------------------------------- confidence: mean p and uncertain volume
#: The ramp phantom: from x = CENTRE + RAMP_START on, the organ fills the scan (it reaches past every
#: other face of the volume), its HU rising by RAMP_HU_PER_MM along x. The stub turns HU into a logit
#: that is linear in x, so both linear resamplings reproduce it exactly and the probability at every
#: voxel centre is known: sigmoid((x - RAMP_HALF_P) * RAMP_LOGIT_PER_MM), 0.5 at RAMP_HALF_P, and
#: between 0.3 and 0.7 for |x - RAMP_HALF_P| < RAMP_BAND_MM. The only face inside the scan, at
#: RAMP_START, lies where the probability is far below 0.3 on both sides, so it adds no uncertain rim.
RAMP_START, RAMP_HALF_P, RAMP_BAND_MM, RAMP_HU_PER_MM = -40.0, 1.0, 13.5, 1.5
RAMP_LOGIT_PER_MM = math.log(0.7 / 0.3) / RAMP_BAND_MM
RAMP_HU_AT_HALF = 125.0


def ramp_phantom(name):
    direction, spacing, shape = geometry(name)
    low, high = box((RAMP_START, -1000, -1000), (1000, 1000, 1000))

    def hu(points):
        return RAMP_HU_AT_HALF + RAMP_HU_PER_MM * (points[:, 0] - CENTRE[0] - RAMP_HALF_P)

    return make_phantom(shape, spacing, direction, CENTRE, [(low, high, hu)])


def ramp_logit(hu: torch.Tensor) -> torch.Tensor:
    """The stub's rule on the ramp phantom: linear in x inside the organ (HU 63..241), -60 outside."""
    inside = (hu - RAMP_HU_AT_HALF) * (RAMP_LOGIT_PER_MM / RAMP_HU_PER_MM)
    return torch.where(hu > 25, inside, torch.full_like(hu, -60.0))


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def known_ramp_logit(points) -> np.ndarray:
    """The logit the ramp phantom's definition gives at LPS ``points`` (the organ starts at RAMP_START)."""
    x = points[..., 0] - CENTRE[0]
    return np.where(x >= RAMP_START, (x - RAMP_HALF_P) * RAMP_LOGIT_PER_MM, -60.0)


def spleen_on_ramp(logit):
    """A second structure on the same ramp, flatter and lower: never 0.5 anywhere in these scans (not
    found), yet between 0.3 and 0.7 over the far end of the organ."""
    return 0.25 * logit - 1.5


@pytest.mark.parametrize("name", ["identity", "flipped", "permuted"])
def test_uncertain_volume_and_mean_probability_of_a_known_ramp(segmenter, network, name):
    """``uncertain_ml`` is the volume (input grid, input spacing) where 0.3 < p < 0.7, for a found and
    a not-found structure; ``mean_probability`` is the mean of the known probabilities over the mask
    (0 when no voxel reaches 0.5)."""
    volume = ramp_phantom(name)
    network({"liver": ramp_logit, "spleen": lambda hu: spleen_on_ramp(ramp_logit(hu))})
    result = segmenter.segment(volume, "liver, spleen", anatomy_guard=False, probabilities=True)
    liver, spleen = result.structures
    points = centres(result)
    voxel_ml = float(np.prod(volume.spacing)) / 1000  # the input's own spacing, not the model's 3 mm
    logit = known_ramp_logit(points)
    known = {"liver": sigmoid(logit), "spleen": sigmoid(spleen_on_ramp(logit))}
    # The question is well posed: no voxel centre lies within 0.25 mm of a band edge or of p = 0.5.
    x = points[..., 0] - CENTRE[0] - RAMP_HALF_P
    spleen_edge = (1.5 - math.log(0.7 / 0.3)) / 0.25 / RAMP_LOGIT_PER_MM  # spleen_on_ramp = logit(0.3) here
    for edge in (-RAMP_BAND_MM, 0.0, RAMP_BAND_MM, spleen_edge):
        assert np.abs(x - edge).min() > 0.25

    # Liver: found, the band |x - RAMP_HALF_P| < RAMP_BAND_MM across the whole scan.
    assert liver.found
    band = (known["liver"] > 0.3) & (known["liver"] < 0.7)
    np.testing.assert_array_equal(band, np.abs(x) < RAMP_BAND_MM)
    assert liver.uncertain_ml == pytest.approx(band.sum() * voxel_ml, abs=1e-6)
    # The same region in physical terms: the slab 2 * RAMP_BAND_MM thick times the scan's cross-section
    # (voxel faces included); the grid holds it to within one layer of voxels.
    along_x = int(np.argmax(np.abs(volume.direction[0])))
    extent = np.asarray(volume.shape) * np.asarray(volume.spacing)
    cross_section = float(np.prod(np.delete(extent, along_x)))
    layer_ml = volume.spacing[along_x] * cross_section / 1000
    assert liver.uncertain_ml == pytest.approx(2 * RAMP_BAND_MM * cross_section / 1000, abs=layer_ml)
    # Mean probability: over the mask (x > RAMP_HALF_P), of the probabilities known from the phantom.
    mask = result.masks[0]
    np.testing.assert_array_equal(mask, x > 0)
    assert liver.mean_probability == pytest.approx(known["liver"][mask].mean(), abs=1e-3)
    assert liver.mean_probability == pytest.approx(float(result.probabilities[0][mask].mean()), abs=1e-6)

    # Spleen: not found (nothing reaches 0.5), yet uncertain over the organ's far end.
    assert not spleen.found and spleen.rule == "empty" and not result.masks[1].any()
    assert spleen.mean_probability == 0.0 and spleen.volume_ml == 0.0
    band = (known["spleen"] > 0.3) & (known["spleen"] < 0.7)
    np.testing.assert_array_equal(band, x > spleen_edge)
    assert band.sum() > 100
    assert spleen.uncertain_ml == pytest.approx(band.sum() * voxel_ml, abs=1e-6)

    # The summary carries both, rounded; the probability maps written agree with the figures.
    summary = result.summary()["structures"]
    assert [s["uncertain_ml"] for s in summary] == [round(s.uncertain_ml, 3) for s in result.structures]
    assert [s["mean_probability"] for s in summary] == [round(liver.mean_probability, 4), 0.0]
    for structure, probability in zip(result.structures, result.probabilities):
        uncertain = int(((probability > 0.3) & (probability < 0.7)).sum())
        assert structure.uncertain_ml == pytest.approx(uncertain * voxel_ml, abs=1e-6)


def test_uncertain_volume_counts_only_the_roi(segmenter, network):
    """Outside an ROI nothing is segmented, so nothing there is uncertain either."""
    volume = ramp_phantom("identity")
    network({"liver": ramp_logit})
    low, high = box((-30.0, -21.0, -17.0), (30.0, 23.0, 25.0))  # cuts the band
    result = segmenter.segment(volume, "liver", roi=[low, high], anatomy_guard=False)
    points = centres(result)
    half = 0.5 * np.asarray(volume.spacing)
    touching = np.all((points + half > low) & (points - half < high), axis=-1)
    p = sigmoid(known_ramp_logit(points))
    band = (p > 0.3) & (p < 0.7)
    assert 0 < (band & touching).sum() < 0.5 * band.sum()
    assert result.structures[0].uncertain_ml == pytest.approx(
        (band & touching).sum() * volume.voxel_volume_ml, abs=1e-6)


@pytest.mark.parametrize("largest", [False, True])
def test_mean_probability_is_over_the_final_mask(segmenter, network, largest):
    """A big blob at p = sigmoid(1) and a small one at sigmoid(4): the small one raises the mean only
    while it is part of the mask."""
    big_low, big_high = box((-40, -20, -20), (0, 20, 20))
    small_low, small_high = box((20, -12, -12), (44, 12, 12))
    volume = make_phantom((40, 36, 30), (4.0, 4.0, 4.0), centre=CENTRE,
                          boxes=[(big_low, big_high, ORGAN_HU), (small_low, small_high, 250.0)])
    network({"liver": lambda hu: torch.where(hu > 200, 4.0, torch.where(hu > LEVEL, 1.0, -60.0))})
    result = segmenter.segment(volume, "liver", anatomy_guard=False, largest_component=largest,
                               probabilities=True)
    structure, mask, p = result.structures[0], result.masks[0], result.probabilities[0]
    assert structure.found
    assert structure.mean_probability == pytest.approx(float(p[mask].mean()), abs=1e-6)
    points, m = centres(result), margin(volume)
    big, small = in_box(points, big_low, big_high, -m), in_box(points, small_low, small_high, -m)
    assert mask[big].all() and mask[small].all() != largest
    np.testing.assert_allclose(p[big], sigmoid(1.0), atol=1e-5)
    np.testing.assert_allclose(p[small], sigmoid(4.0), atol=1e-5)
    if largest:  # the big blob alone: its faces (a voxel of lower probability) pull the mean a little
        assert sigmoid(1.0) - 0.03 < structure.mean_probability <= sigmoid(1.0) + 1e-6
    else:
        assert structure.mean_probability > sigmoid(1.0) + 0.03


# ----------------------------------------------------------------------------------------- overlaps
def test_overlaps_go_to_the_more_probable_structure_per_voxel(segmenter, network):
    """Two structures cover the same box; which is more probable changes along x. The label map follows
    the probability voxel by voxel, and each structure keeps its whole mask."""
    low, high = box((-30, -20, -20), (30, 20, 20))
    ramp = lambda p: 50.0 + 150.0 * (p[:, 0] - low[0]) / (high[0] - low[0])  # noqa: E731  50..200 HU along x
    volume = make_phantom((40, 36, 30), (4.0, 4.0, 4.0), centre=CENTRE, boxes=[(low, high, ramp)])
    middle = 125.0
    network({
        "liver": lambda hu: torch.where(hu > 25, 4 + (hu - middle) / 25, torch.full_like(hu, -8.0)),
        "spleen": lambda hu: torch.where(hu > 25, 4 - (hu - middle) / 25, torch.full_like(hu, -8.0)),
    })
    result = segmenter.segment(volume, "liver, spleen", anatomy_guard=False, probabilities=True)
    assert [s.found for s in result.structures] == [True, True]
    liver, spleen = result.masks
    p_liver, p_spleen = result.probabilities

    # The label map is the more probable found structure in every voxel.
    expected = np.zeros(volume.shape, np.uint8)
    expected[liver] = 1
    expected[spleen & (p_spleen > np.where(liver, p_liver, 0.0))] = 2
    np.testing.assert_array_equal(result.labelmap, expected)

    # Independently of the engine's probabilities: x beyond the middle is liver's, before it spleen's.
    points = centres(result)
    interior = in_box(points, low, high, -margin(volume))
    x_middle = (low[0] + high[0]) / 2
    liver_side = interior & (points[..., 0] > x_middle + margin(volume))
    spleen_side = interior & (points[..., 0] < x_middle - margin(volume))
    assert liver_side.sum() > 0.2 * interior.sum() and spleen_side.sum() > 0.2 * interior.sum()
    assert (result.labelmap[liver_side] == 1).all()
    assert (result.labelmap[spleen_side] == 2).all()
    # Each structure keeps its own full mask, also where the other one wins the label map.
    assert liver[interior].all() and spleen[interior].all()


# ------------------------------------------------------------------------------- largest component
@pytest.mark.parametrize("largest", [False, True])
def test_largest_component_keeps_the_bigger_blob(segmenter, network, largest):
    big_low, big_high = box((-40, -20, -20), (0, 20, 20))  # 64 mL
    small_low, small_high = box((20, -12, -12), (44, 12, 12))  # 13.8 mL, 20 mm away
    volume = make_phantom((40, 36, 30), (4.0, 4.0, 4.0), centre=CENTRE,
                          boxes=[(big_low, big_high, ORGAN_HU), (small_low, small_high, ORGAN_HU)])
    network({"liver": step(LEVEL)})
    result = segmenter.segment(volume, "liver", anatomy_guard=False, largest_component=largest)
    points, m = centres(result), margin(volume)
    mask = result.masks[0]
    assert mask[in_box(points, big_low, big_high, -m)].all()
    small = in_box(points, small_low, small_high, -m)
    assert small.any()
    if largest:
        assert not mask[in_box(points, small_low, small_high, m)].any()
        assert result.structures[0].volume_ml == pytest.approx(box_ml(big_low, big_high), rel=0.1)
    else:
        assert mask[small].all()
        assert result.structures[0].volume_ml == pytest.approx(
            box_ml(big_low, big_high) + box_ml(small_low, small_high), rel=0.1)
    np.testing.assert_array_equal(result.labelmap, mask.astype(np.uint8))


# ------------------------------------------------------------------------------------------------ ROI
@pytest.mark.parametrize("name", ["identity", "flipped", "oblique"])
def test_roi_keeps_exactly_the_voxels_it_touches(segmenter, network, name):
    """The stub finds the whole body; with an ROI, the voxels that touch the LPS box are labelled and
    nothing else, whatever the volume's orientation."""
    direction, spacing, shape = geometry(name)
    volume = make_phantom(shape, spacing, direction, CENTRE)
    low, high = box((-21.3, -32.6, -9.1), (24.2, 11.7, 28.4))  # well inside the body
    network({"liver": step(-500.0)})
    result = segmenter.segment(volume, "liver", roi=[low, high], anatomy_guard=False, probabilities=True)
    points = centres(result)
    labelled = result.masks[0]
    # A voxel touches the box when its extent, an LPS-aligned box of these half sizes, overlaps it.
    half = 0.5 * np.abs(volume.direction) @ volume.spacing
    touching = np.all((points + half > low) & (points - half < high), axis=-1)
    if name == "oblique":
        assert labelled[in_box(points, low, high)].all()
        assert not labelled[~touching].any(), "voxels outside the ROI are labelled"
        assert result.probabilities[0][~touching].max() == 0.0
    else:
        np.testing.assert_array_equal(labelled, touching)
        assert result.probabilities[0][~touching].max() == 0.0
    np.testing.assert_array_equal(result.labelmap, labelled.astype(np.uint8))


def test_roi_outside_the_volume_is_refused(segmenter, network):
    volume = make_phantom((40, 36, 30), (4.0, 4.0, 4.0), centre=CENTRE)
    network({"liver": step(-500.0)})
    far = CENTRE + 500.0
    with pytest.raises(InputError, match="does not overlap"):
        segmenter.segment(volume, "liver", roi=[far, far + 50.0], anatomy_guard=False)
    # Partly outside: clipped to the volume, not refused.
    low, high = CENTRE - 10.0, CENTRE + 500.0
    result = segmenter.segment(volume, "liver", roi=[low, high], anatomy_guard=False)
    points = centres(result)
    assert result.masks[0].any() and not result.masks[0][~in_box(points, low, high, 2.0)].any()


# ------------------------------------------------------------------------------------ anatomy guard
def test_size_rule_comes_before_the_anatomy_guard(segmenter, network):
    """With the guard on, a mask too small for the size rule is reported by the size rule."""
    low, high = box((-8, -8, -8), (8, 8, 8))
    volume = make_phantom((40, 36, 30), (4.0, 4.0, 4.0), boxes=[(low, high, ORGAN_HU)], centre=CENTRE)
    network({"liver": step(LEVEL), "spleen": never})
    result = segmenter.segment(volume, "liver, spleen", min_volume_ml=10.0)
    assert result.coverage is not None
    assert [s.rule for s in result.structures] == ["size", "empty"]


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@requires_cuda
def test_gpu_gives_the_cpu_answer(segmenter, network):
    """Known probabilities through the GPU path (half-precision autocast, stitching and every rule on
    GPU tensors): the same masks, label map and summary as on the CPU, on an oblique volume with an
    ROI, overlapping structures and the largest component."""
    direction, spacing, shape = geometry("oblique")
    low, high = box((-30, -20, -20), (30, 20, 20))
    ramp = lambda p: 50.0 + 150.0 * (p[:, 0] - low[0]) / (high[0] - low[0])  # noqa: E731
    volume = make_phantom(shape, spacing, direction, CENTRE, [(low, high, ramp)])
    rules = {
        "liver": lambda hu: torch.where(hu > 25, 4 + (hu - 125) / 25, torch.full_like(hu, -8.0)),
        "spleen": lambda hu: torch.where(hu > 25, 4 - (hu - 125) / 25, torch.full_like(hu, -8.0)),
    }
    roi = box((-45, -40, -30), (20, 30, 35))
    options = dict(roi=roi, probabilities=True, largest_component=True, anatomy_guard=False)
    network(rules)
    on_cpu = segmenter.segment(volume, "liver, spleen", **options)
    gpu = Segmenter(segmenter.checkpoint_path, device="cuda")
    gpu.model = IntensityNetwork(gpu, rules)
    on_gpu = gpu.segment(volume, "liver, spleen", **options)
    assert all(s.found for s in on_cpu.structures)
    for a, b in zip(on_gpu.probabilities, on_cpu.probabilities):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    sure = np.all([np.abs(p - 0.5) > 1e-4 for p in on_cpu.probabilities], axis=0)
    for a, b in zip(on_gpu.masks, on_cpu.masks):
        np.testing.assert_array_equal(a[sure], b[sure])
    np.testing.assert_array_equal(on_gpu.labelmap[sure], on_cpu.labelmap[sure])
    for a, b in zip(on_gpu.structures, on_cpu.structures):
        assert a.voxels == pytest.approx(b.voxels, abs=3)


# ------------------------------------------------------------------------------ written files
def test_written_result_names_files_and_segments_by_structure(segmenter, network, tmp_path):
    """write_result returns what it wrote; segments and probability maps carry the structure ids."""
    from MoMESegmentationLib.io.segmentation import read_segmentation
    from MoMESegmentationLib.outputs import write_result

    low, high = box((-20, -20, -20), (20, 20, 20))
    volume = make_phantom((30, 30, 30), (4.0, 4.0, 4.0), centre=CENTRE, boxes=[(low, high, ORGAN_HU)])
    network({"liver": step(LEVEL), "kidney_left": step(LEVEL, inside=1.0), "spleen": never})
    result = segmenter.segment(volume, "liver, left kidney, spleen", anatomy_guard=False, probabilities=True)
    assert [s.found for s in result.structures] == [True, True, False]
    assert [s.id for s in result.to_segmentation().segments] == ["liver", "kidney_left"]

    path = tmp_path / "result.seg.nrrd"
    written = write_result(result, path, result.summary(), probabilities=True)
    assert written == [path, tmp_path / "result.json", tmp_path / "result_probabilities"]
    assert all(p.exists() for p in written)
    read = read_segmentation(path)
    assert [(s.id, s.name) for s in read.segments] == [("liver", "Liver"), ("kidney_left", "Left kidney")]
    np.testing.assert_array_equal(read.segments[0].mask, result.masks[0])
    maps = sorted(p.name for p in (tmp_path / "result_probabilities").iterdir())
    assert maps == ["01_liver.nii.gz", "02_kidney_left.nii.gz", "03_spleen.nii.gz"]
