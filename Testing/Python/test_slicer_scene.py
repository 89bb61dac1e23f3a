"""The module's scene code on Slicer's own MRML classes (slicer-core from PyPI), with the real worker.

Everything here runs on real nodes: volumes read by Slicer's storage nodes, segmentations,
transforms, markups ROIs, sequence browsers, and segments read back with ``slicer.util``. Jobs run
through :class:`SegmentationWorkflow` and the real worker process (``mome worker``) with the bundled
demo weights on the bundled CT. The tests skip, naming the reason, where ``slicer-core`` has no wheel
(it is a cp311 build).

Fakes are used only to inject faults: a scene method that fails half way through an import.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from MoMESlicer import slicer_core

REASON = slicer_core.available()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

REPO = Path(__file__).resolve().parents[2]
CT_PATH = REPO / "Resources" / "SampleData" / "example_ct.nii.gz"
PROMPTS = "liver, spleen, left kidney"


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture
def scene(core):
    from MoMESlicer.scene import SlicerScene

    core.clear()
    yield SlicerScene(core.scene)
    core.clear()


def workflow_for(scene, client, tmp_path):
    from MoMESegmentationLib.slicer_workflow import SegmentationWorkflow

    return SegmentationWorkflow(client, scene, temp_root=tmp_path / "jobs")


def run(workflow, volume, prompts=PROMPTS, segmentation=None, **options):
    from MoMESegmentationLib.slicer_workflow import JobState, SegmentationOptions

    job = workflow.start(volume, prompts, segmentation,
                         SegmentationOptions(model="demo", device="cpu", threads=2, fast=True, **options))
    workflow.wait(timeout=600)
    assert job.state == JobState.DONE, job.error
    return job


def load_ct(scene, path: Path = CT_PATH, name: str = "CT"):
    node = scene.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = scene.scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    scene.scene.RemoveNode(storage)
    return node


def ijk_to_ras(node) -> np.ndarray:
    import slicer.util
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def set_ijk_to_ras(node, array: np.ndarray) -> None:
    import slicer.util

    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(array))


def rotation(axis, degrees) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    out = np.eye(4)
    out[:3, :3] = Rotation.from_rotvec(np.radians(degrees) * np.asarray(axis, float) / np.linalg.norm(axis)).as_matrix()
    return out


def linear_transform(scene, matrix: np.ndarray, name="T"):
    import slicer.util

    node = scene.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    return node


def segment_arrays(segmentation_node, volume_node) -> dict[str, np.ndarray]:
    import slicer

    segmentation = segmentation_node.GetSegmentation()
    out = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        name = segmentation.GetSegment(segment_id).GetName()
        out[name] = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segment_id, volume_node)
    return out


def cli_labelmap(volume_path: Path, output: Path, prompts=PROMPTS) -> tuple[np.ndarray, dict]:
    """The CLI's label map of a file, as a (k, j, i) array like slicer.util's arrays."""
    import SimpleITK as sitk

    from MoMESegmentationLib.cli import main

    assert main(["segment", str(volume_path), "--prompt", prompts, "--output", str(output), "--fast",
                 "--device", "cpu", "--threads", "2", "--quiet"]) == 0
    summary = json.loads(output.with_name(output.name.split(".")[0] + ".json").read_text())
    return sitk.GetArrayFromImage(sitk.ReadImage(str(output))), summary


# ---------------------------------------------------------------------------------- geometry


def test_slicer_core_reads_the_ct_on_its_own_grid(scene):
    import slicer

    volume = load_ct(scene)
    array = slicer.util.arrayFromVolume(volume)
    assert array.shape == (112, 101, 122)
    assert array.min() < -900 and array.max() > 1000  # Hounsfield units, not rescaled


@pytest.mark.parametrize("placement", ["identity", "oblique", "under-linear-transform"])
def test_segments_equal_the_cli_label_map_voxel_for_voxel(scene, worker_client, tmp_path, placement):
    """A job from the scene lands on the volume's own grid, equal to the CLI on the exported file."""
    import slicer

    volume = load_ct(scene)
    if placement == "oblique":
        set_ijk_to_ras(volume, rotation((1, 2, 3), 17) @ ijk_to_ras(volume))
    elif placement == "under-linear-transform":
        volume.SetAndObserveTransformNodeID(linear_transform(scene, rotation((0, 0, 1), 30) + np.diag([0, 0, 0, 0])
                                                             + np.array([[0, 0, 0, 12.5], [0, 0, 0, -7], [0, 0, 0, 3],
                                                                         [0, 0, 0, 0]])).GetID())
    exported = tmp_path / "exported.nrrd"
    scene.export_volume(volume, exported)

    job = run(workflow_for(scene, worker_client, tmp_path), volume)
    segmentation = job.result_ref
    assert segmentation.GetTransformNodeID() == volume.GetTransformNodeID()
    labels, summary = cli_labelmap(exported, tmp_path / "cli.nii.gz")
    found = [s for s in summary["structures"] if s["found"]]
    assert [s["name"] for s in found] == [s["name"] for s in job.summary["structures"] if s["found"]]
    assert len(found) >= 2, "the demo weights find liver and spleen in the bundled CT"

    arrays = {name: mask.astype(bool) for name, mask in segment_arrays(segmentation, volume).items()}
    assert sorted(arrays) == sorted(s["name"] for s in found)
    # Segments keep each structure's own mask; the label map gives a voxel that two structures
    # claim to the more probable one (README, "Outputs"). Outside such voxels they are equal.
    claims = np.sum(list(arrays.values()), axis=0)
    for structure in found:
        mask = arrays[structure["name"]]
        assert mask.shape == slicer.util.arrayFromVolume(volume).shape
        in_labels = labels == structure["label"]
        np.testing.assert_array_equal(mask[claims <= 1], in_labels[claims <= 1], err_msg=structure["name"])
        assert not (in_labels & ~mask).any(), f"{structure['name']}: label-map voxels missing from the segment"
    contested = claims >= 2
    winners = {s["label"]: arrays[s["name"]] for s in found}
    assert all(winners[label][index] for label, index in
               zip(labels[contested], zip(*np.nonzero(contested)))), "a contested voxel went to a structure that did not claim it"
    # the segmentation's own geometry is the volume's
    reference = segmentation.GetSegmentation().GetConversionParameter("Reference image geometry")
    assert reference, "the segmentation has no reference geometry"


def test_names_colours_and_terminology_come_from_the_vocabulary(scene, worker_client, tmp_path):
    import slicer

    from MoMESegmentationLib.vocabulary import Vocabulary

    volume = load_ct(scene)
    job = run(workflow_for(scene, worker_client, tmp_path), volume)
    segmentation = job.result_ref.GetSegmentation()
    vocabulary = Vocabulary.load()
    terminology_logic = slicer.modules.terminologies.logic()
    for structure in [s for s in job.summary["structures"] if s["found"]]:
        segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(structure["name"]))
        assert segment is not None, structure["name"]
        assert np.allclose(segment.GetColor(), np.array(structure["color"]) / 255.0, atol=1e-6)
        serialized = segment.GetTerminology()
        entry = slicer.vtkSlicerTerminologyEntry()
        assert terminology_logic.DeserializeTerminologyEntry(serialized, entry), serialized
        code = vocabulary[structure["id"]].terminology["type"]["code"]
        assert entry.GetTypeObject().GetCodeValue() == code, (structure["id"], serialized)
        assert entry.GetTypeObject().GetCodingSchemeDesignator() == "SCT"


# ---------------------------------------------------------------------------------- refusals


def test_what_cannot_be_segmented_is_refused_by_name_and_the_scene_is_unchanged(scene, core, tmp_path):
    import vtk

    from MoMESegmentationLib.errors import InputError

    volume = load_ct(scene)
    labelmap = scene.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "Labels")
    labelmap.SetAndObserveImageData(volume.GetImageData())
    vector = scene.scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "Colour photo")
    rgb = vtk.vtkImageData()
    rgb.SetDimensions(8, 8, 8)
    rgb.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    vector.SetAndObserveImageData(rgb)
    four_d = load_ct(scene, name="Frame")
    sequence = scene.scene.AddNewNodeByClass("vtkMRMLSequenceNode", "Perfusion")
    sequence.SetDataNodeAtValue(four_d, "0")
    browser = scene.scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "Perfusion browser")
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    browser.AddProxyNode(four_d, sequence, False)
    warped = load_ct(scene, name="Warped")
    grid = scene.scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "Warp")
    warped.SetAndObserveTransformNodeID(grid.GetID())
    empty = scene.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Empty")

    before = scene.state()
    expected = {labelmap: "Labels is a labelmap volume", vector: "Colour photo is a vtkMRMLVectorVolumeNode",
                four_d: "Frame is one frame of the 4D sequence Perfusion browser",
                warped: "Warped is under the non-linear transform Warp", empty: "Empty has no image data"}
    for node, message in expected.items():
        with pytest.raises(InputError, match=message) as raised:
            scene.export_volume(node, tmp_path / "input.nrrd")
        assert "\n" not in str(raised.value)
    assert not (tmp_path / "input.nrrd").exists()
    assert scene.state() == before
    scene.check_input_volume(volume)  # the CT itself is accepted


def test_a_refused_volume_starts_no_job_and_leaves_no_files(scene, tmp_path):
    from MoMESegmentationLib.errors import InputError
    from MoMESegmentationLib.worker_client import WorkerClient

    labelmap = scene.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "Labels")
    labelmap.SetAndObserveImageData(load_ct(scene).GetImageData())
    client = WorkerClient([sys.executable, "-c", "raise SystemExit('must not start')"])
    workflow = workflow_for(scene, client, tmp_path)
    with pytest.raises(InputError, match="Labels is a labelmap volume"):
        workflow.start(labelmap, "liver")
    assert not client.is_running() and workflow.job is None
    assert list((tmp_path / "jobs").iterdir()) == []


def test_roi_under_its_own_transform_becomes_the_box_of_its_corners_on_the_volume_grid(scene):
    """A rotated ROI under one transform and a volume under another: the box is checked by hand."""
    volume = load_ct(scene)
    volume_to_world = rotation((0, 0, 1), 20)
    volume_to_world[:3, 3] = [5.0, -3.0, 2.0]
    volume.SetAndObserveTransformNodeID(linear_transform(scene, volume_to_world, "Volume pose").GetID())
    roi = scene.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "ROI")
    roi.SetCenter(10.0, 20.0, -30.0)
    roi.SetSize(40.0, 30.0, 20.0)
    roi_axes = rotation((1, 0, 0), 35)
    import vtk

    object_to_node = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            object_to_node.SetElement(r, c, roi_axes[r, c])
    for r in range(3):
        object_to_node.SetElement(r, 3, (10.0, 20.0, -30.0)[r])
    roi.GetObjectToNodeMatrix().DeepCopy(object_to_node)
    roi.Modified()
    roi_to_world = rotation((0, 1, 0), -15)
    roi_to_world[:3, 3] = [-4.0, 8.0, 1.0]
    roi.SetAndObserveTransformNodeID(linear_transform(scene, roi_to_world, "ROI pose").GetID())

    half = np.array([40.0, 30.0, 20.0]) / 2
    corners = np.array([[x, y, z, 1.0] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]) * np.r_[half, 1]
    object_to_node_np = np.eye(4)
    object_to_node_np[:3, :3] = roi_axes[:3, :3]
    object_to_node_np[:3, 3] = [10.0, 20.0, -30.0]
    in_volume_ras = (np.linalg.inv(volume_to_world) @ roi_to_world @ object_to_node_np @ corners.T).T[:, :3]
    in_volume_lps = in_volume_ras * [-1, -1, 1]
    expected = [in_volume_lps.min(axis=0).tolist(), in_volume_lps.max(axis=0).tolist()]
    np.testing.assert_allclose(scene.roi_box(roi, volume), expected, atol=1e-6)


def test_an_empty_roi_is_refused(scene):
    from MoMESegmentationLib.errors import InputError

    roi = scene.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Unplaced")
    with pytest.raises(InputError, match="region of interest Unplaced is empty"):
        scene.roi_box(roi, load_ct(scene))


# ---------------------------------------------------------------------------------- runs into the scene


def test_second_run_keeps_or_replaces_segments(scene, worker_client, tmp_path):
    volume = load_ct(scene)
    workflow = workflow_for(scene, worker_client, tmp_path)
    segmentation = run(workflow, volume, "liver, spleen").result_ref
    first = segment_arrays(segmentation, volume)
    ids_before = dict(scene.state().segment_ids)[segmentation.GetID()]
    liver_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName("Liver")

    run(workflow, volume, "liver", segmentation, replace=False)
    names = sorted(segment_arrays(segmentation, volume))
    assert names == ["Liver", "Liver (2)", "Spleen"]
    assert scene.state().segment_ids[segmentation.GetID()][:2] == ids_before  # the old ones are untouched

    run(workflow, volume, "liver", segmentation, replace=True)
    arrays = segment_arrays(segmentation, volume)
    assert sorted(arrays) == ["Liver", "Liver (2)", "Spleen"]
    assert segmentation.GetSegmentation().GetSegmentIdBySegmentName("Liver") != liver_id  # replaced
    np.testing.assert_array_equal(arrays["Liver"], first["Liver"])
    np.testing.assert_array_equal(arrays["Spleen"], first["Spleen"])
    # imported segments share labelmap layers instead of one full-size layer each
    from MoMESlicer.scene import segmentation_layers

    assert segmentation_layers(segmentation)[0] <= 2  # liver twice cannot share one layer


def start_a_long_job(scene, worker_client, tmp_path, prompts):
    """A segmentation into an earlier result, on a new (tilted) volume, caught while the worker runs.

    The worker has no cached features for the new volume, so the job lasts a while. Returns the
    workflow, the job and the scene's state before the job.
    """
    from MoMESegmentationLib.slicer_workflow import SegmentationOptions

    workflow = workflow_for(scene, worker_client, tmp_path)
    target = run(workflow, load_ct(scene), "spleen").result_ref
    other = load_ct(scene, name="CT copy")
    set_ijk_to_ras(other, rotation((0, 1, 0), 5) @ ijk_to_ras(other))
    before = scene.state()
    job = workflow.start(other, prompts, target, SegmentationOptions(model="demo", device="cpu", threads=2))
    deadline = time.monotonic() + 120
    while job.stage in ("", "queued") and time.monotonic() < deadline:
        workflow.process_events()
        time.sleep(0.05)
    assert job.stage not in ("", "queued"), "the worker never started the job"
    return workflow, job, before


def test_cancel_leaves_node_and_segment_ids_exactly_as_before(scene, worker_client, tmp_path):
    from MoMESegmentationLib.slicer_workflow import JobState

    workflow, job, before = start_a_long_job(scene, worker_client, tmp_path, "liver, stomach")
    workflow.cancel()  # True when the worker stopped by itself, False when it had to be killed
    assert job.state == JobState.CANCELLED
    assert scene.state() == before
    assert not job.temp_dir.exists()


def test_a_worker_that_crashes_leaves_the_scene_exactly_as_before(scene, worker_client, tmp_path):
    from MoMESegmentationLib.slicer_workflow import JobState

    workflow, job, before = start_a_long_job(scene, worker_client, tmp_path, "liver")
    os.kill(worker_client.pid, signal.SIGKILL)  # as if the system killed it for memory
    workflow.wait(timeout=60)
    assert job.state == JobState.FAILED and job.error
    assert scene.state() == before


def test_a_failure_half_way_through_an_import_is_rolled_back(scene, worker_client, tmp_path, monkeypatch):
    """Fault injected after the segments were copied: none of them may stay."""
    from MoMESlicer.scene import SlicerScene
    from MoMESegmentationLib.slicer_workflow import JobState, SegmentationOptions

    volume = load_ct(scene)
    workflow = workflow_for(scene, worker_client, tmp_path)
    target = run(workflow, volume, "spleen").result_ref
    before = scene.state()

    def fail(*args, **kwargs):
        raise OSError("disk full while reading the probability maps")

    monkeypatch.setattr(SlicerScene, "_load_probability_maps", fail)
    for segmentation in (target, None):
        job = workflow.start(volume, "liver, spleen", segmentation,
                             SegmentationOptions(model="demo", device="cpu", threads=2, fast=True))
        workflow.wait(timeout=600)
        assert job.state == JobState.FAILED and "disk full" in job.error
        assert scene.state() == before


def test_probability_maps_are_loaded_as_volumes_on_the_input_grid(scene, worker_client, tmp_path):
    import slicer

    from MoMESlicer.scene import PROBABILITY_COLOR_NODE_ID

    volume = load_ct(scene)
    job = run(workflow_for(scene, worker_client, tmp_path), volume, "liver, spleen", probabilities=True)
    segments = segment_arrays(job.result_ref, volume)
    maps = {node.GetAttribute("MoME.ProbabilityOf"): node
            for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
            if node.GetAttribute("MoME.ProbabilityOf")}
    assert sorted(maps) == ["Liver", "Spleen"]
    for name, node in maps.items():
        assert node.GetName() == f"{name} probability"
        np.testing.assert_allclose(ijk_to_ras(node), ijk_to_ras(volume), atol=1e-4)
        probability = slicer.util.arrayFromVolume(node)
        assert probability.min() >= 0.0 and probability.max() <= 1.0
        assert node.GetDisplayNode().GetColorNodeID() == PROBABILITY_COLOR_NODE_ID
        # every voxel of a found segment was above the 0.5 threshold
        assert probability[segments[name].astype(bool)].min() >= 0.5
        assert (probability >= 0.5).sum() >= segments[name].sum()


def test_scene_saved_as_mrb_and_loaded_again_keeps_segments(scene, core, worker_client, tmp_path):
    import slicer

    volume = load_ct(scene)
    job = run(workflow_for(scene, worker_client, tmp_path), volume, "liver, spleen")
    segmentation = job.result_ref
    saved = {name: mask.copy() for name, mask in segment_arrays(segmentation, volume).items()}
    colours = {name: segmentation.GetSegmentation().GetSegment(
        segmentation.GetSegmentation().GetSegmentIdBySegmentName(name)).GetColor() for name in saved}
    terms = {name: segmentation.GetSegmentation().GetSegment(
        segmentation.GetSegmentation().GetSegmentIdBySegmentName(name)).GetTerminology() for name in saved}

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    assert core.app_logic.SaveSceneToSlicerDataBundleDirectory(str(bundle), None)
    mrb = tmp_path / "scene.mrb"
    assert core.app_logic.Zip(str(mrb), str(bundle))
    core.clear()
    assert not slicer.util.getNodesByClass("vtkMRMLSegmentationNode")

    extract = tmp_path / "extract"
    extract.mkdir()
    assert core.app_logic.OpenSlicerDataBundle(str(mrb), str(extract))
    [loaded] = slicer.util.getNodesByClass("vtkMRMLSegmentationNode")
    [loaded_volume] = [n for n in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode") if n.GetName() == "CT"]
    arrays = segment_arrays(loaded, loaded_volume)
    assert sorted(arrays) == sorted(saved)
    for name, mask in saved.items():
        np.testing.assert_array_equal(arrays[name], mask)
        segment = loaded.GetSegmentation().GetSegment(loaded.GetSegmentation().GetSegmentIdBySegmentName(name))
        assert np.allclose(segment.GetColor(), colours[name])
        assert segment.GetTerminology() == terms[name]


def test_many_structures_share_one_labelmap_layer(scene, tmp_path):
    """32 non-overlapping structures: one shared layer, not 32 full-size ones (see bench_slicer_import.py)."""
    from MoMESegmentationLib.data.sample import load_sample_ct
    from MoMESegmentationLib.io.segmentation import Segment, Segmentation, write_segmentation
    from MoMESlicer.scene import segmentation_layers

    case = load_sample_ct()
    values = [int(v) for v in np.unique(case.labels.array) if v > 0][:32]
    assert len(values) == 32
    path = tmp_path / "many.seg.nrrd"
    write_segmentation(Segmentation(case.labels, [Segment(name=case.label_table[v], mask=case.labels.array == v,
                                                          color=(0.5, 0.5, 0.5), label_value=i + 1)
                                                  for i, v in enumerate(values)]), path)
    volume = load_ct(scene)
    node = scene.import_result(path, {}, None, False, volume)
    assert node.GetSegmentation().GetNumberOfSegments() == 32
    assert segmentation_layers(node)[0] == 1
    arrays = segment_arrays(node, volume)
    # slicer.util arrays are (k, j, i); the library's are (i, j, k)
    for value in values[:5]:
        np.testing.assert_array_equal(arrays[case.label_table[value]].astype(bool),
                                      (case.labels.array == value).transpose(2, 1, 0))
