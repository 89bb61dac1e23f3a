"""Render the label-correction workflow through 3D Slicer's own slice view, offscreen, to one PNG.

What the "MoME" Segment Editor effect does, on the bundled CT, with the code the effect runs
(``MoMESegmentation/MoMESlicer/correction.py``) on Slicer's MRML core from PyPI (``slicer-core``):

1. the liver's probability is computed by the real worker with the bundled demo weights;
2. a flawed "manual" liver label is made from it on purpose: a band of slices through the liver's
   lateral part is missing, and a spurious blob is painted next to it (the picture says so);
3. the review finds the regions where label and model disagree (3 mm boundary tolerance), and the
   views are centred on the largest, as selecting its row in the effect's table does;
4. its "Accept" writes the model's version of that region into the label through the segment editor
   logic (masking and Undo apply).

Three panels of the Red slice view, side by side: the label with the review's regions outlined
(yellow: the model adds; cyan: the model removes), the model's probability as a heat overlay, and
the label after one Accept. Written to ``docs/images/slicer_correction.png`` (a 256-colour PNG).

    .venv/bin/python scripts/render_correction_views.py [--output docs/images/slicer_correction.png]

About a minute on two CPU cores (most of it computing the liver). Needs ``slicer-core`` (Python
3.11, Linux) and a VTK that renders offscreen.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
for folder in (REPO_ROOT / "MoMESegmentation", REPO_ROOT, REPO_ROOT / "scripts"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from MoMESlicer import slicer_core  # noqa: E402

DEFAULT_CT = REPO_ROOT / "Resources" / "SampleData" / "example_ct.nii.gz"
DEFAULT_OUTPUT = REPO_ROOT / "docs" / "images" / "slicer_correction.png"
REGION_COLOURS = {"adds": (1.0, 0.85, 0.0), "removes": (0.0, 0.85, 1.0)}


def liver_probability(core, volume, temp: Path):
    """The liver's probability on the volume's grid, from the real worker (the effect's job)."""
    from MoMESegmentationLib.slicer_workflow import JobState, SegmentationOptions, SegmentationWorkflow
    from MoMESegmentationLib.worker_client import WorkerClient
    from MoMESlicer.correction import start_structure_job
    from MoMESlicer.scene import SlicerScene

    client = WorkerClient([sys.executable, "-m", "MoMESegmentationLib.cli", "worker"], cwd=str(REPO_ROOT),
                          startup_timeout=300)
    try:
        workflow = SegmentationWorkflow(client, SlicerScene(core.scene), temp_root=temp)
        job = start_structure_job(workflow, volume, "liver",
                                  SegmentationOptions(model="demo", device="cpu", fast=True))
        workflow.wait(timeout=900)
        if job.state != JobState.DONE:
            raise SystemExit(f"computing the liver failed: {job.error}")
        return job.result_ref
    finally:
        client.stop()


def flawed_label(mask_kji: np.ndarray) -> np.ndarray:
    """The model's liver with a band of slices missing laterally and a spurious blob beside it."""
    label = mask_kji.copy()
    k_present = np.flatnonzero(mask_kji.any(axis=(1, 2)))
    k_mid = int(k_present[len(k_present) // 2])
    i_present = np.flatnonzero(mask_kji[k_mid].any(axis=0))
    i_cut = int(np.percentile(i_present, 60))
    band = slice(k_mid - 4, k_mid + 5)
    label[band, :, i_cut:] = False
    j_present = np.flatnonzero(mask_kji[k_mid].any(axis=1))
    j_centre = int(j_present.mean())
    blob_i = max(0, int(i_present.min()) - 6)
    label[k_mid - 3:k_mid + 4, j_centre - 4:j_centre + 4, max(0, blob_i - 8):blob_i] = True
    return label


def render(ct: Path, output: Path, size: int = 420) -> Path:
    import slicer

    from MoMESlicer import render as slicer_render
    from MoMESlicer.correction import SegmentReview, show_probability
    from MoMESlicer.segment_editor import LogicEditorParts
    from render_slicer_views import check_image, save_palette_png, side_by_side

    core = slicer_core.start()
    core.clear()
    volume = slicer_render.load_volume(core, ct, name="CT", window=400.0, level=40.0)
    with tempfile.TemporaryDirectory() as temp:
        result = liver_probability(core, volume, Path(temp))

    segmentation = core.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Labels")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    liver_id = segmentation.GetSegmentation().AddEmptySegment("liver", "Liver (flawed label)", [0.86, 0.5, 0.4])
    label = flawed_label(result.mask(0.5))
    slicer.util.updateSegmentBinaryLabelmapFromArray(label.astype(np.uint8), segmentation, liver_id, volume)
    parts = LogicEditorParts.create(core.scene, segmentation, volume, app_logic=core.app_logic)

    review = SegmentReview(parts, liver_id, result, volume, tolerance_mm=3.0)
    if not review.items:
        raise SystemExit("the review found no disagreement")
    top = review.items[0]
    for item in review.items[:3]:
        region_id = segmentation.GetSegmentation().AddEmptySegment(
            "", f"Review {item.region.rank}", list(REGION_COLOURS[item.kind]))
        mask = item.region.full_mask(result.probability.shape[::-1]).T
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), segmentation, region_id, volume)
        display = segmentation.GetDisplayNode()
        display.SetSegmentOpacity2DFill(region_id, 0.0)
        display.SetSegmentOpacity2DOutline(region_id, 1.0)
    segmentation.GetDisplayNode().SetSliceIntersectionThickness(2)

    panels = []
    view = slicer_render.SliceViewRenderer(core, "Red", "Axial", size=(size, size))
    try:
        view.show(volume)
        view.slice_node.SetFieldOfView(220.0, 220.0, view.slice_node.GetFieldOfView()[2])
        view.jump_to(review.centre_ras(top), centred=True)
        panels.append(view.capture())
        overlay = show_probability(result, volume)
        view.composite_node.SetForegroundVolumeID(overlay.GetID())
        view.composite_node.SetForegroundOpacity(0.5)
        segmentation.GetDisplayNode().SetVisibility(False)
        panels.append(view.capture())
        view.composite_node.SetForegroundVolumeID(None)
        segmentation.GetDisplayNode().SetVisibility(True)
        review.accept(top)
        for item in review.items[:3]:
            segment_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName(f"Review {item.region.rank}")
            segmentation.GetDisplayNode().SetSegmentVisibility(segment_id, item is not top)
        panels.append(view.capture())
    finally:
        view.close()
    for index, pixels in enumerate(panels):
        check_image(f"panel {index + 1}", pixels)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_palette_png(side_by_side(panels), output)
    print(f"{output}: {len(review.items)} regions; accepted region 1 ({top.kind}, {top.region.volume_ml:.1f} mL, "
          f"mean p {top.region.mean_probability:.2f})")
    core.clear()
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ct", type=Path, default=DEFAULT_CT, help="CT volume (default: the bundled sample CT)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="PNG to write")
    parser.add_argument("--size", type=int, default=420, help="width and height of each panel in pixels")
    args = parser.parse_args(argv)
    reason = slicer_core.available()
    if reason:
        print(reason, file=sys.stderr)
        return 1
    render(args.ct, args.output, args.size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
