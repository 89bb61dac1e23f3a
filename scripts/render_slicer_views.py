"""Render a segmentation result through 3D Slicer's own slice and 3D views, offscreen, to PNGs.

The bundled CT (``Resources/SampleData/example_ct.nii.gz``) is segmented with the bundled demo
weights (``mome segment ... --fast``, written as a Slicer ``.seg.nrrd``), or an existing result is
taken with ``--segmentation``. Both files are then read by Slicer's own storage nodes into a scene
of Slicer's MRML core (``slicer-core`` from PyPI, no Qt; see ``MoMESegmentation/MoMESlicer/slicer_core.py``)
and drawn by Slicer's slice logic and displayable managers (``MoMESegmentation/MoMESlicer/render.py``):

* ``slicer_axial.png``   -- the Red slice view, axial, through the level that cuts the most segments;
* ``slicer_coronal.png`` -- the Green slice view, coronal, chosen the same way;
* ``slicer_3d.png``      -- the 3D view, the segments' closed surfaces seen from the front;
* ``slicer_views.png``   -- the three side by side (a 256-colour PNG, to keep it small).

The CT is shown with an abdomen window (W 400 / L 40), the segments with Slicer's default 2D
display (filled at half opacity, with outlines), in the names and colours stored in the file.

Run from the repository root (under a minute on two CPU cores, most of it segmenting)::

    .venv/bin/python scripts/render_slicer_views.py
    .venv/bin/python scripts/render_slicer_views.py --segmentation result.seg.nrrd --output-dir /tmp/views

Needs ``slicer-core`` (Python 3.11, Linux) and a VTK that renders offscreen (EGL or OSMesa).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
for folder in (REPO_ROOT / "MoMESegmentation", REPO_ROOT):  # MoMESlicer, then the library
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from MoMESlicer import slicer_core  # noqa: E402

DEFAULT_CT = REPO_ROOT / "Resources" / "SampleData" / "example_ct.nii.gz"
DEFAULT_OUTPUT_DIR = REPO_ROOT / "docs" / "images"
DEFAULT_PROMPTS = "liver, spleen, left kidney, right kidney, stomach, aorta"
#: Largest PNG the script writes without complaint (the images are committed to the repository).
MAX_PNG_BYTES = 300_000


def segment(ct: Path, prompts: str, output: Path, model: str | None = None) -> Path:
    """Segment ``ct`` with the command line's ``segment`` (``--fast``, CPU) into a ``.seg.nrrd``."""
    from MoMESegmentationLib.cli import main

    argv = ["segment", str(ct), "--prompt", prompts, "--output", str(output), "--fast", "--quiet",
            "--device", "cpu"]
    if model:
        argv += ["--model", model]
    status = main(argv)
    if status != 0 or not output.is_file():
        raise SystemExit(f"segmentation failed (mome segment returned {status})")
    return output


def render_views(ct: Path, segmentation: Path, size: int = 512, window: float = 400.0,
                 level: float = 40.0, zoom_3d: float = 1.3) -> dict[str, np.ndarray]:
    """The axial, coronal and 3D views of ``segmentation`` over ``ct``, as RGB arrays by name."""
    from MoMESlicer import render

    core = slicer_core.start()
    core.clear()
    volume = render.load_volume(core, ct, name=ct.name.split(".")[0], window=window, level=level)
    segmentation_node = render.load_segmentation(core, segmentation, reference=volume, closed_surfaces=True)
    voxels = render.segment_voxels_ras(segmentation_node, volume)

    images: dict[str, np.ndarray] = {}
    for name, layout, orientation in (("axial", "Red", "Axial"), ("coronal", "Green", "Coronal")):
        view = render.SliceViewRenderer(core, layout, orientation, size=(size, size))
        try:
            view.show(volume)
            view.jump_to(render.best_slice_point(voxels, view.slice_normal()))
            images[name] = view.capture()
        finally:
            view.close()

    view = render.ThreeDViewRenderer(core, size=(size, size))
    try:
        import slicer

        node = view.view_node
        # The organs, not the box around the whole CT; a cube marker says which side faces us.
        node.SetBoxVisible(0)
        node.SetAxisLabelsVisible(0)
        node.SetOrientationMarkerType(slicer.vtkMRMLAbstractViewNode.OrientationMarkerTypeCube)
        node.SetOrientationMarkerSize(slicer.vtkMRMLAbstractViewNode.OrientationMarkerSizeSmall)
        view.reset_camera("Anterior", zoom=zoom_3d)
        images["3d"] = view.capture()
    finally:
        view.close()
    core.clear()
    return images


def side_by_side(images: list[np.ndarray], gap: int = 6) -> np.ndarray:
    """Images of one height next to each other with white gaps."""
    height = images[0].shape[0]
    spacer = np.full((height, gap, 3), 255, np.uint8)
    parts: list[np.ndarray] = []
    for image in images:
        parts += [image, spacer]
    return np.concatenate(parts[:-1], axis=1)


def save_palette_png(pixels: np.ndarray, path: Path) -> Path:
    """An RGB array as a 256-colour PNG (Pillow), for the combined picture."""
    from PIL import Image

    Image.fromarray(pixels).quantize(256).save(path, optimize=True)
    return path


def check_image(name: str, pixels: np.ndarray) -> None:
    """Refuse a blank picture (one colour, or almost black)."""
    if pixels.std() < 5 or pixels.mean() < 10:
        raise SystemExit(f"{name}: the rendered view is blank "
                         f"(mean {pixels.mean():.1f}, std {pixels.std():.1f})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ct", type=Path, default=DEFAULT_CT,
                        help="CT volume (default: the bundled sample CT)")
    parser.add_argument("--segmentation", type=Path, default=None,
                        help="existing .seg.nrrd to render instead of segmenting the CT")
    parser.add_argument("--prompt", default=DEFAULT_PROMPTS,
                        help=f'structures to segment (default: "{DEFAULT_PROMPTS}")')
    parser.add_argument("--model", default=None,
                        help="model for segmenting (default: the bundled demo weights)")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR,
                        help="folder for the PNGs (default: docs/images)")
    parser.add_argument("--size", type=int, default=512,
                        help="width and height of each view in pixels (default 512)")
    parser.add_argument("--window", type=float, default=400.0, help="CT window width in HU (default 400)")
    parser.add_argument("--level", type=float, default=40.0, help="CT window level in HU (default 40)")
    parser.add_argument("--no-combined", action="store_true", help="do not write slicer_views.png")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    reason = slicer_core.available()
    if reason:
        print(f"render_slicer_views: {reason}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    from MoMESlicer import render

    with tempfile.TemporaryDirectory(prefix="mome-views-") as temp:
        segmentation = args.segmentation
        if segmentation is None:
            segmentation = segment(args.ct, args.prompt, Path(temp) / "result.seg.nrrd", args.model)
            print(f"segmented {args.ct.name} in {time.perf_counter() - start:.1f} s")
        rendered_at = time.perf_counter()
        images = render_views(args.ct, segmentation, size=args.size, window=args.window, level=args.level)

    outputs = {name: args.output_dir / f"slicer_{name}.png" for name in images}
    for name, pixels in images.items():
        check_image(name, pixels)
        render.save_png(pixels, outputs[name])
    if not args.no_combined:
        combined = side_by_side([images["axial"], images["coronal"], images["3d"]])
        outputs["combined"] = save_palette_png(combined, args.output_dir / "slicer_views.png")
    done = time.perf_counter()
    print(f"rendered in {done - rendered_at:.1f} s (total {done - start:.1f} s)")
    for path in outputs.values():
        size = path.stat().st_size
        note = f"  (over {MAX_PNG_BYTES // 1000} KB)" if size > MAX_PNG_BYTES else ""
        print(f"  {path}  {size / 1000:.0f} KB{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
