"""*Show experts* on Slicer's own MRML classes (slicer-core from PyPI), with the real worker.

The bundled CT, under a transform, is segmented through :class:`SegmentationWorkflow` and the real
worker with the demo weights and ``explain``; the expert maps of the structure selected in the
results table are then loaded as a labelmap (colour table named after the experts, colour legend)
and an entropy volume. Fakes: none.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_slicer_scene import ijk_to_ras, linear_transform, load_ct, rotation, run, workflow_for

from MoMESlicer import slicer_core

REASON = slicer_core.available()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


@pytest.fixture
def scene(core):
    from MoMESlicer.scene import SlicerScene

    core.clear()
    yield SlicerScene(core.scene)
    core.clear()


def ijk_to_world(node) -> np.ndarray:
    import slicer.util
    import vtk

    matrix = ijk_to_ras(node)
    transform = node.GetParentTransformNode()
    if transform is not None:
        world = vtk.vtkMatrix4x4()
        transform.GetMatrixTransformToWorld(world)
        matrix = slicer.util.arrayFromVTKMatrix(world) @ matrix
    return matrix


@pytest.fixture
def explained(scene, worker_client, tmp_path):
    """The CT under a rotation, segmented with explain: (scene, volume node, job)."""
    volume = load_ct(scene)
    volume.SetAndObserveTransformNodeID(linear_transform(scene, rotation((0, 0, 1), 20.0)).GetID())
    job = run(workflow_for(scene, worker_client, tmp_path), volume, "liver, aorta", explain=True)
    return scene, volume, job


def test_the_maps_outlive_the_job_and_show_on_the_volume_grid(explained):
    import slicer

    from MoMESegmentationLib.io.readers import read_volume
    from MoMESlicer.experts import EXPERTS_ATTRIBUTE, shown_expert_nodes

    scene, volume, job = explained
    segmentation = job.result_ref
    assert not job.temp_dir.exists(), "the job's folder is gone; the maps were moved out of it"
    latest = scene.experts.latest(segmentation)
    assert sorted(latest) == [1, 2] and latest[1] == "Liver"
    routing = {e["name"]: e.get("routing") for e in job.summary["structures"]}
    assert routing["Liver"]["dominant"] == scene.experts.dominant_scale(segmentation, "Liver")

    labels, entropy = scene.experts.show(segmentation, "Liver", volume)
    assert labels.IsA("vtkMRMLLabelMapVolumeNode") and labels.GetName().startswith("Liver experts")
    # On exactly the CT's grid, under the CT's transform.
    for node in (labels, entropy):
        assert node.GetTransformNodeID() == volume.GetTransformNodeID()
        np.testing.assert_allclose(ijk_to_world(node), ijk_to_world(volume), atol=1e-4)
        assert node.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
    # The voxels are the worker's map (read by the library, i j k order; Slicer's arrays are k j i).
    kept = scene.experts._kept[segmentation.GetID()]["Liver"]
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(labels), read_volume(kept.dominant).array.T)
    values = slicer.util.arrayFromVolume(entropy)
    assert 0.0 <= values.min() and values.max() <= 1.0 + 1e-6 and values.max() > 0.0
    # The colour table names the experts; the legend shows it.
    colors = labels.GetDisplayNode().GetColorNode()
    experts = job.summary["explain"]["experts"]
    assert [colors.GetColorName(e["label"]) for e in experts] == [e["name"] for e in experts]
    assert colors.GetColorName(len(experts)) == "1/16 scale (deepest)"
    legend = slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(labels)
    assert legend is not None and "dominant expert" in legend.GetTitleText()
    dominant = slicer.util.arrayFromVolume(labels)
    liver = slicer.util.arrayFromSegmentBinaryLabelmap(
        segmentation, segmentation.GetSegmentation().GetSegmentIdBySegmentName("Liver"), volume)
    assert (dominant[liver > 0] > 0).all(), "every liver voxel has a dominant expert"

    # Another structure replaces the shown maps; the colour table is reused.
    labels2, entropy2 = scene.experts.show(segmentation, "Aorta", volume)
    shown = shown_expert_nodes(scene.scene)
    assert {n.GetAttribute(EXPERTS_ATTRIBUTE) for n in shown} == {"dominant", "entropy", "colors"}
    assert len(shown) == 3 and labels2 in shown and entropy2 in shown and not scene.scene.IsNodePresent(labels)
    assert labels2.GetDisplayNode().GetColorNode() is colors

    root = scene.experts.root
    scene.experts.forget()
    assert not Path(root).exists()


def test_a_missing_map_is_refused_and_the_shown_maps_stay(explained):
    from MoMESegmentationLib.errors import MoMEError

    scene, volume, job = explained
    segmentation = job.result_ref
    labels, _ = scene.experts.show(segmentation, "Liver", volume)
    before = scene.state()
    scene.experts._kept[segmentation.GetID()]["Aorta"].entropy.unlink()
    with pytest.raises(MoMEError, match="could not read the expert map"):
        scene.experts.show(segmentation, "Aorta", volume)
    assert scene.state() == before
    assert scene.scene.IsNodePresent(labels)
    with pytest.raises(MoMEError, match="no expert maps"):
        scene.experts.show(segmentation, "Spleen", volume)


def test_a_run_without_explain_keeps_nothing(scene, worker_client, tmp_path):
    volume = load_ct(scene)
    job = run(workflow_for(scene, worker_client, tmp_path), volume, "liver")
    assert scene.experts.latest(job.result_ref) == {}
    assert "explain" not in job.summary
    assert all("routing" not in s for s in job.summary["structures"])
