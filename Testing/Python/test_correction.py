"""Label correction's Qt-free layer (the "MoME" effect, confidence overlay, review) on real MRML.

Everything runs on Slicer's own classes from the ``slicer-core`` wheel: volumes, segmentations, the
``vtkSlicerSegmentEditorLogic`` with its editor node (masking, undo), slice nodes. The effect's
structures come from the real worker with the bundled demo weights on the bundled CT; the review
runs on a synthetic volume whose disagreements are known by construction. Expected results are
computed with numpy from the arrays built here and read back with ``slicer.util``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from MoMESlicer import slicer_core

REASON = slicer_core.available()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

REPO = Path(__file__).resolve().parents[2]
CT_PATH = REPO / "Resources" / "SampleData" / "example_ct.nii.gz"


@pytest.fixture
def scene(core):
    core.clear()
    yield core.scene
    core.clear()


def load_ct(scene, name="CT"):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(CT_PATH))
    assert storage.ReadData(node)
    scene.RemoveNode(storage)
    return node


def node_ids(scene) -> list[str]:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def segment_array(segmentation, segment_id, volume) -> np.ndarray:
    import slicer

    return slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume) != 0


def editor_for(scene, core, volume, names=("Target",)):
    from MoMESlicer.segment_editor import LogicEditorParts

    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Seg")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    ids = {name: segmentation.GetSegmentation().AddEmptySegment(name, name) for name in names}
    parts = LogicEditorParts.create(scene, segmentation, volume, app_logic=core.app_logic)
    return parts, segmentation, ids


def structure_job(scene, core, client, tmp_path, volume, prompt, **options):
    from MoMESegmentationLib.slicer_workflow import JobState, SegmentationOptions, SegmentationWorkflow
    from MoMESlicer.correction import start_structure_job
    from MoMESlicer.scene import SlicerScene

    workflow = SegmentationWorkflow(client, SlicerScene(scene), temp_root=tmp_path / "jobs")
    job = start_structure_job(workflow, volume, prompt,
                              SegmentationOptions(model="demo", device="cpu", threads=2, fast=True, **options))
    workflow.wait(timeout=600)
    assert job.state == JobState.DONE, job.error
    return job


# ----------------------------------------------------------------------------- the effect


@pytest.fixture(scope="module")
def liver_and_spleen(core, worker_client, tmp_path_factory):
    """Two structures computed one after the other on the bundled CT (the second reuses features)."""
    import slicer

    core.clear()
    scene = core.scene
    volume = load_ct(scene)
    before = node_ids(scene)
    tmp = tmp_path_factory.mktemp("effect")
    liver = structure_job(scene, core, worker_client, tmp, volume, "liver")
    spleen = structure_job(scene, core, worker_client, tmp, volume, "spleen")
    after = node_ids(scene)
    ct = slicer.util.arrayFromVolume(volume).copy()
    core.clear()
    return {"liver": liver, "spleen": spleen, "before": before, "after": after, "ct": ct}


def test_a_structure_job_leaves_the_scene_alone_and_reuses_the_volume_features(liver_and_spleen):
    from MoMESlicer.correction import StructureProbability

    liver, spleen = liver_and_spleen["liver"], liver_and_spleen["spleen"]
    assert liver_and_spleen["after"] == liver_and_spleen["before"], "computing a structure changed the scene"
    for job, name in ((liver, "liver"), (spleen, "spleen")):
        result = job.result_ref
        assert isinstance(result, StructureProbability)
        assert result.structure_id == name and result.found
        assert result.probability.shape == liver_and_spleen["ct"].shape
        assert result.probability.dtype == np.float32
        assert 0.0 <= result.probability.min() and result.probability.max() <= 1.0
        # the mask the effect writes at 0.5 is the structure the model reported
        assert abs(result.mask(0.5).sum() - job.summary["structures"][0]["voxels"]) <= \
            0.02 * job.summary["structures"][0]["voxels"]
    assert liver.result_ref.mask(0.5).sum() > 5 * spleen.result_ref.mask(0.5).sum() > 0
    windows = spleen.summary["feature_windows"]
    assert windows["encoded"] == 0 and windows["reused"] > 0, windows


def test_the_effect_refuses_more_than_one_prompt(scene, worker_client, tmp_path):
    from MoMESegmentationLib.errors import PromptError
    from MoMESegmentationLib.slicer_workflow import SegmentationWorkflow
    from MoMESlicer.correction import start_structure_job
    from MoMESlicer.scene import SlicerScene

    volume = load_ct(scene)
    workflow = SegmentationWorkflow(worker_client, SlicerScene(scene), temp_root=tmp_path)
    with pytest.raises(PromptError, match="one structure at a time"):
        start_structure_job(workflow, volume, "liver, spleen")
    assert not workflow.busy


def result_on(volume, result):
    """The module-scoped result, re-bound to a volume loaded again in this test's scene."""
    import dataclasses

    from MoMESlicer.correction import volume_key

    return dataclasses.replace(result, volume_key=volume_key(volume))


def test_apply_then_live_threshold_is_one_undo_step(scene, core, liver_and_spleen):
    from MoMESlicer.correction import ApplySettings, LiveThreshold

    volume = load_ct(scene)
    parts, segmentation, ids = editor_for(scene, core, volume)
    result = result_on(volume, liver_and_spleen["liver"].result_ref)
    live = LiveThreshold(parts, ids["Target"], result, volume, ApplySettings(mode="replace", threshold=0.5))
    live.apply()
    np.testing.assert_array_equal(segment_array(segmentation, ids["Target"], volume), result.probability >= 0.5)
    sizes = set()
    for threshold in (0.8, 0.3, 0.6):
        assert live.set_threshold(threshold), "the previous write should be replaced, not stacked"
        segment = segment_array(segmentation, ids["Target"], volume)
        np.testing.assert_array_equal(segment, result.probability >= threshold, err_msg=f"threshold {threshold}")
        sizes.add(int(segment.sum()))
    assert len(sizes) == 3, "the thresholds should cut different masks from these probabilities"
    assert parts.undo()
    assert not segment_array(segmentation, ids["Target"], volume).any(), "one Undo must return to before the effect"


def test_live_threshold_in_add_mode_recuts_instead_of_accumulating(scene, core, liver_and_spleen):
    import slicer

    from MoMESlicer.correction import ApplySettings, LiveThreshold

    volume = load_ct(scene)
    parts, segmentation, ids = editor_for(scene, core, volume)
    result = result_on(volume, liver_and_spleen["liver"].result_ref)
    old = np.zeros(result.probability.shape, dtype=bool)
    old[40:60, 30:50, 20:40] = True
    slicer.util.updateSegmentBinaryLabelmapFromArray(old.astype(np.uint8), segmentation, ids["Target"], volume)
    live = LiveThreshold(parts, ids["Target"], result, volume, ApplySettings(mode="add", threshold=0.2))
    live.apply()
    live.set_threshold(0.9)
    np.testing.assert_array_equal(segment_array(segmentation, ids["Target"], volume), old | (result.probability >= 0.9))


def test_live_threshold_after_a_user_edit_is_a_new_undo_step(scene, core, liver_and_spleen):
    import slicer

    from MoMESlicer.correction import ApplySettings, LiveThreshold

    volume = load_ct(scene)
    parts, segmentation, ids = editor_for(scene, core, volume, names=("Target", "Other"))
    result = result_on(volume, liver_and_spleen["liver"].result_ref)
    live = LiveThreshold(parts, ids["Target"], result, volume, ApplySettings(threshold=0.5))
    live.apply()
    other = np.zeros(result.probability.shape, dtype=np.uint8)
    other[5:10, 5:10, 5:10] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(other, segmentation, ids["Other"], volume)
    assert not live.can_replace_last
    assert not live.set_threshold(0.7)
    np.testing.assert_array_equal(segment_array(segmentation, ids["Target"], volume), result.probability >= 0.7)
    assert segment_array(segmentation, ids["Other"], volume).sum() == other.sum(), "the user's edit was undone"


def test_apply_limited_to_a_slab_and_an_roi_box(scene, core, liver_and_spleen):
    from MoMESlicer.correction import ApplySettings, LiveThreshold, slab_around

    volume = load_ct(scene)
    parts, segmentation, ids = editor_for(scene, core, volume)
    result = result_on(volume, liver_and_spleen["liver"].result_ref)
    mask = result.mask(0.5)
    k_centre = int(np.argmax(mask.sum(axis=(1, 2))))
    slab = slab_around(volume, k_centre, 3)
    box = (10, 90, 0, 100, 0, 111)  # (i0, i1, j0, j1, k0, k1)
    LiveThreshold(parts, ids["Target"], result, volume, ApplySettings(slab=slab, roi_box_ijk=box)).apply()
    expected = np.zeros_like(mask)
    expected[slab[0]:slab[1] + 1, :, 10:91] = mask[slab[0]:slab[1] + 1, :, 10:91]
    assert expected.any()
    np.testing.assert_array_equal(segment_array(segmentation, ids["Target"], volume), expected)


def test_probabilities_of_another_volume_are_refused(scene, core, liver_and_spleen):
    from MoMESegmentationLib.errors import InputError
    from MoMESlicer.correction import LiveThreshold

    volume = load_ct(scene)
    parts, _, ids = editor_for(scene, core, volume)
    with pytest.raises(InputError, match="another volume"):
        LiveThreshold(parts, ids["Target"], liver_and_spleen["liver"].result_ref, volume).apply()


def test_probability_overlay_on_the_volume_grid(scene, liver_and_spleen):
    import slicer
    import vtk

    from MoMESlicer.correction import show_probability
    from MoMESlicer.scene import PROBABILITY_COLOR_NODE_ID

    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    volume = load_ct(scene)
    result = result_on(volume, liver_and_spleen["liver"].result_ref)
    overlay = show_probability(result, volume)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(overlay), result.probability)
    a, b = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(a)
    overlay.GetIJKToRASMatrix(b)
    assert all(a.GetElement(r, c) == b.GetElement(r, c) for r in range(4) for c in range(4))
    assert overlay.GetDisplayNode().GetColorNodeID() == PROBABILITY_COLOR_NODE_ID
    assert composite.GetForegroundVolumeID() == overlay.GetID()
    assert composite.GetBackgroundVolumeID() == volume.GetID()
    count = scene.GetNumberOfNodes()
    assert show_probability(result_on(volume, liver_and_spleen["spleen"].result_ref), volume, overlay) is overlay
    assert scene.GetNumberOfNodes() == count, "updating the overlay must not add nodes"


# ----------------------------------------------------------------------------- review

SHAPE = (20, 24, 28)  # (k, j, i)


def synthetic_case(scene, core, ijk_to_ras=None):
    """A volume, a label with a missing part and a spurious blob, and the model's probability."""
    import slicer

    from MoMESlicer.correction import StructureProbability, volume_key

    k, j, i = np.indices(SHAPE)
    truth = ((k - 10) ** 2 / 36 + (j - 12) ** 2 / 49 + (i - 13) ** 2 / 64) <= 1.0
    label = truth.copy()
    label[10:, 12:, :] = False  # a quarter of the organ was never drawn
    blob = np.zeros(SHAPE, bool)
    blob[1:6, 17:23, 20:26] = True  # a spurious island (1 mL)
    label |= blob
    probability = np.where(truth, 0.9, 0.05).astype(np.float32)
    volume = slicer.util.addVolumeFromArray(((i + j + k) % 40).astype(np.int16), name="CT")
    volume.SetSpacing(1.5, 1.5, 2.5)
    if ijk_to_ras is not None:
        volume.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras))
    parts, segmentation, ids = editor_for(scene, core, volume)
    slicer.util.updateSegmentBinaryLabelmapFromArray(label.astype(np.uint8), segmentation, ids["Target"], volume)
    result = StructureProbability("liver", "liver", "liver", probability, volume_key(volume), {"found": True})
    missing = truth & ~label
    return volume, parts, segmentation, ids, result, label, missing, blob


def test_review_finds_the_missing_part_and_the_spurious_island(scene, core):
    from MoMESlicer.correction import SegmentReview

    volume, parts, segmentation, ids, result, label, missing, blob = synthetic_case(scene, core)
    review = SegmentReview(parts, ids["Target"], result, volume)
    kinds = [item.kind for item in review.items]
    assert kinds == ["adds", "removes"], kinds  # the missing quarter outweighs the island
    adds, removes = review.items
    np.testing.assert_array_equal(adds.region.full_mask(SHAPE[::-1]).T, missing)
    np.testing.assert_array_equal(removes.region.full_mask(SHAPE[::-1]).T, blob)
    assert adds.region.volume_ml == pytest.approx(missing.sum() * 1.5 * 1.5 * 2.5 / 1000)
    assert adds.region.mean_probability == pytest.approx(0.9) and removes.region.mean_probability == pytest.approx(0.05)
    rows = review.rows()
    assert rows[0][:4] == ("1", "model adds", f"{adds.region.volume_ml:.1f}", "0.90")


def test_accept_writes_through_the_editor_and_undoes(scene, core):
    from MoMESlicer.correction import SegmentReview

    volume, parts, segmentation, ids, result, label, missing, blob = synthetic_case(scene, core)
    review = SegmentReview(parts, ids["Target"], result, volume)
    adds, removes = review.items
    review.accept(adds)
    np.testing.assert_array_equal(segment_array(segmentation, ids["Target"], volume), label | missing)
    review.reject(removes)
    np.testing.assert_array_equal(segment_array(segmentation, ids["Target"], volume), label | missing)
    review.accept(removes)
    np.testing.assert_array_equal(segment_array(segmentation, ids["Target"], volume), (label | missing) & ~blob)
    assert [item.decision for item in review.items] == ["accepted", "accepted"]
    assert parts.undo() and parts.undo()
    np.testing.assert_array_equal(segment_array(segmentation, ids["Target"], volume), label)


def test_accept_respects_the_editable_intensity_range(scene, core):
    import slicer

    from MoMESlicer.correction import SegmentReview

    volume, parts, segmentation, ids, result, label, missing, blob = synthetic_case(scene, core)
    intensity = slicer.util.arrayFromVolume(volume)
    parts.editor_node.SetSourceVolumeIntensityMask(True)
    parts.editor_node.SetSourceVolumeIntensityMaskRange(0, 19)
    review = SegmentReview(parts, ids["Target"], result, volume)
    review.accept(review.items[0])
    editable = (intensity >= 0) & (intensity <= 19)
    np.testing.assert_array_equal(segment_array(segmentation, ids["Target"], volume), label | (missing & editable))


def test_selecting_a_region_centres_the_views_on_it(scene, core):
    import slicer

    from MoMESlicer.correction import SegmentReview

    rotation = np.eye(4)
    angle = np.radians(25)
    rotation[:3, :3] = [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    ijk_to_ras = rotation @ np.diag([1.5, -1.5, 2.5, 1.0])
    ijk_to_ras[:3, 3] = [10.0, -20.0, 35.0]
    volume, parts, segmentation, ids, result, label, missing, blob = synthetic_case(scene, core, ijk_to_ras)
    shift = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = shift.GetMatrixTransformToParent()
    matrix.SetElement(0, 3, 7.0)
    shift.SetMatrixTransformToParent(matrix)
    volume.SetAndObserveTransformNodeID(shift.GetID())
    segmentation.SetAndObserveTransformNodeID(shift.GetID())
    # A view node of its own (no layout name: a named slice node is a singleton that would outlive
    # the scene's Clear and hand its position to the next test's "Red" view).
    red = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    red.SetOrientationToAxial()
    review = SegmentReview(parts, ids["Target"], result, volume)
    removes = next(item for item in review.items if item.kind == "removes")
    expected = (ijk_to_ras @ [*np.argwhere(blob).mean(axis=0)[::-1], 1.0])[:3] + [7.0, 0, 0]
    point = review.centre_views(removes)
    np.testing.assert_allclose(point, expected, atol=1e-6)
    slice_to_ras = red.GetSliceToRAS()
    np.testing.assert_allclose([slice_to_ras.GetElement(r, 3) for r in range(3)], expected, atol=1e-6)
    assert slicer.util.arrayFromVolume(volume).shape == SHAPE


def test_review_of_a_missing_segment_is_one_line(scene, core):
    from MoMESegmentationLib.errors import InputError
    from MoMESlicer.correction import SegmentReview

    volume, parts, segmentation, ids, result, *_ = synthetic_case(scene, core)
    with pytest.raises(InputError, match="no segment"):
        SegmentReview(parts, "nope", result, volume)


def test_slab_follows_the_red_view_through_the_volume_transform(scene, core):
    import vtk

    from MoMESegmentationLib.errors import InputError
    from MoMESlicer.correction import slab_at_slice

    ijk_to_ras = np.diag([1.5, 1.5, -2.5, 1.0])
    ijk_to_ras[:3, 3] = [0.0, 0.0, 40.0]
    volume, *_ = synthetic_case(scene, core, ijk_to_ras)
    shift = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(2, 3, -10.0)  # the volume sits 10 mm lower in the world
    shift.SetMatrixTransformToParent(matrix)
    volume.SetAndObserveTransformNodeID(shift.GetID())
    red = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    red.SetOrientationToAxial()
    red.JumpSliceByCentering(5.0, 5.0, 40.0 - 10.0 - 2.5 * 7)  # the centre of slice k = 7
    assert slab_at_slice(volume, red, 3) == (4, 10)
    assert slab_at_slice(volume, red, 100) == (0, SHAPE[0] - 1)
    red.JumpSliceByCentering(5.0, 5.0, 500.0)
    with pytest.raises(InputError, match="outside"):
        slab_at_slice(volume, red, 3)


def test_training_labels_map_segments_that_name_one_structure(scene, core):
    from MoMESlicer.correction import training_labels

    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    for name in ("Liver", "left kidney", "Blob", "kidneys"):
        segmentation.GetSegmentation().AddEmptySegment(name, name)
    assert training_labels(segmentation) == {"Liver": "liver", "left kidney": "kidney_left"}


def test_export_for_training_round_trips_through_the_trainers_loader(scene, core, tmp_path):
    """The exported case, read back by the trainer's own manifest loader, is the segment on the CT's grid."""
    import slicer

    from MoMESegmentationLib.errors import InputError
    from MoMESegmentationLib.training.config import DatasetSpec
    from MoMESegmentationLib.training.datasets import load_case, manifest_records
    from MoMESlicer.correction import export_for_training, training_labels

    rotation = np.eye(4)
    angle = np.radians(30)
    rotation[:3, :3] = [[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]]
    ijk_to_ras = rotation @ np.diag([-1.5, 1.5, 2.5, 1.0])
    ijk_to_ras[:3, 3] = [30.0, -12.0, 5.0]
    volume, parts, segmentation, ids, result, label, missing, blob = synthetic_case(scene, core, ijk_to_ras)
    volume.SetName("Abdomen CT 3")
    segmentation.GetSegmentation().GetSegment(ids["Target"]).SetName("Liver")
    other = segmentation.GetSegmentation().AddEmptySegment("", "Left kidney")
    kidney = np.zeros(SHAPE, np.uint8)
    kidney[3:8, 2:6, 2:9] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(kidney, segmentation, other, volume)
    nodes = node_ids(scene)

    labels = training_labels(segmentation)
    assert labels == {"Liver": "liver", "Left kidney": "kidney_left"}
    case_dir = export_for_training(volume, segmentation, tmp_path / "corrections", labels, model="demo")
    assert case_dir.name == "Abdomen_CT_3"
    assert node_ids(scene) == nodes, "exporting changed the scene"
    assert segmentation.GetStorageNode() is None or not segmentation.GetStorageNode().GetFileName()

    records = manifest_records(DatasetSpec(kind="manifest", name="corrections",
                                           manifest=str(tmp_path / "corrections" / "manifest.json")))
    assert len(records) == 1
    image, labelmap, values = load_case(records[0][0])
    assert image.shape == SHAPE[::-1]
    np.testing.assert_array_equal(image.array, slicer.util.arrayFromVolume(volume).T)
    by_id = {ids_[0]: value for value, ids_ in values.items()}
    np.testing.assert_array_equal(labelmap == by_id["liver"], label.T)
    np.testing.assert_array_equal(labelmap == by_id["kidney_left"], kidney.T.astype(bool))

    with pytest.raises(InputError):
        export_for_training(volume, segmentation, tmp_path / "corrections", labels)  # exists, no overwrite
    with pytest.raises(InputError, match="no segment named"):
        export_for_training(volume, segmentation, tmp_path / "other", {"Spleen": "spleen"})
    assert not (tmp_path / "other").exists()


def test_roi_box_on_the_volume_grid_through_both_transforms(scene, core):
    import vtk

    from MoMESegmentationLib.errors import InputError
    from MoMESlicer.correction import roi_box_ijk

    ijk_to_ras = np.diag([-1.5, 1.5, 2.5, 1.0])
    ijk_to_ras[:3, 3] = [20.0, -10.0, 0.0]
    volume, *_ = synthetic_case(scene, core, ijk_to_ras)
    up = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(2, 3, 5.0)
    up.SetMatrixTransformToParent(matrix)
    volume.SetAndObserveTransformNodeID(up.GetID())
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    # voxel (i, j, k) sits at world (20 - 1.5 i, -10 + 1.5 j, 2.5 k + 5): i 4..8, j 2..6, k 3..5
    roi.SetXYZ(20 - 1.5 * 6, -10 + 1.5 * 4, 2.5 * 4 + 5)
    roi.SetRadiusXYZ(1.5 * 2.2, 1.5 * 2.2, 2.5 * 1.2)
    assert roi_box_ijk(roi, volume) == (4, 8, 2, 6, 3, 5)
    roi.SetXYZ(500.0, 0.0, 0.0)
    with pytest.raises(InputError, match="does not overlap"):
        roi_box_ijk(roi, volume)
