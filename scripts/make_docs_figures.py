"""Render the documentation figure of phantoms next to the bundled real CT.

Usage::

    python scripts/make_docs_figures.py [--output docs/images/phantoms_and_sample_ct.png] [--seeds 0 1 2]

Every volume is first reoriented so that its voxel axes point to patient left, posterior and
superior (the phantoms use random axis orders and flips), then shown as a mid axial and a mid
coronal slice with an abdominal window (-175..250 HU) and a coloured label overlay.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from MoMESegmentationLib.data.phantoms import make_phantom, phantom_label_names  # noqa: E402
from MoMESegmentationLib.data.sample import load_sample_ct  # noqa: E402
from MoMESegmentationLib.io.volume import Volume  # noqa: E402

WINDOW = (-175.0, 250.0)
DEFAULT_OUTPUT = REPO_ROOT / "docs" / "images" / "phantoms_and_sample_ct.png"


def to_lps_axes(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """Permute and flip axes so that ``i, j, k`` run along L, P, S (nearest axis for oblique grids).

    Returns the reordered array and the spacing along (x, y, z) in mm.
    """
    direction = volume.direction
    physical_axis = np.argmax(np.abs(direction), axis=0)  # physical axis of each voxel axis
    if sorted(physical_axis.tolist()) != [0, 1, 2]:
        raise ValueError(f"{volume.name}: direction too oblique to display")
    order = np.argsort(physical_axis)
    array = np.transpose(volume.array, order)
    for axis, voxel_axis in enumerate(order):
        if direction[axis, voxel_axis] < 0:
            array = np.flip(array, axis)
    return array, volume.spacing[order]


def overlay_colors(values: np.ndarray, names: dict[int, str]) -> dict[int, np.ndarray]:
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    palette = {name: cmap(i % 20)[:3] for i, name in enumerate(phantom_label_names())}
    out = {}
    for i, value in enumerate(values):
        name = names.get(int(value), "")
        out[int(value)] = np.array(palette.get(name, cmap((i * 7) % 20)[:3]))
    return out


def show(ax, image: np.ndarray, labels: np.ndarray, aspect: float, colors: dict[int, np.ndarray], title: str) -> None:
    """Show a 2D slice (rows = first axis) with a window and a label overlay."""
    lo, hi = WINDOW
    gray = np.clip((image - lo) / (hi - lo), 0, 1)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    for value, color in colors.items():
        mask = labels == value
        if mask.any():
            rgb[mask] = 0.55 * rgb[mask] + 0.45 * color
    ax.imshow(rgb, aspect=aspect, interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def mid_slices(image: np.ndarray, labels: np.ndarray, spacing: np.ndarray, z_index: int | None = None):
    """Axial (display rows = anterior to posterior, columns = patient right on the left) and coronal slices."""
    nz = image.shape[2]
    k = nz // 2 if z_index is None else z_index
    j = image.shape[1] // 2
    axial = (image[:, :, k].T, labels[:, :, k].T, spacing[1] / spacing[0])
    # coronal: rows superior to inferior, columns patient right on the left
    coronal = (np.flipud(image[:, j, :].T), np.flipud(labels[:, j, :].T), spacing[2] / spacing[0])
    return axial, coronal


def kidney_level(labels: np.ndarray, values: list[int]) -> int | None:
    for value in values:
        zs = np.nonzero(np.any(labels == value, axis=(0, 1)))[0]
        if zs.size:
            return int(zs.mean())
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = []
    for seed in args.seeds:
        phantom = make_phantom(seed, random_fov=False)
        image, spacing = to_lps_axes(phantom.image)
        labels, _ = to_lps_axes(phantom.labels)
        title = (f"phantom seed {seed} ({phantom.phase})\n"
                 f"{'x'.join(str(n) for n in phantom.image.shape)} @ "
                 f"{'/'.join(f'{s:.1f}' for s in phantom.image.spacing)} mm")
        columns.append((image, labels, spacing, phantom.label_table, title))
    case = load_sample_ct()
    image, spacing = to_lps_axes(case.image)
    labels, _ = to_lps_axes(case.labels)
    columns.append((image, labels, spacing, case.label_table,
                    "real CT (TotalSegmentator example)\nlabels: TotalSegmentator prediction"))

    fig, axes = plt.subplots(2, len(columns), figsize=(3.2 * len(columns), 6.6), dpi=130)
    for col, (image, labels, spacing, names, title) in enumerate(columns):
        values = [v for v in np.unique(labels).tolist() if v]
        colors = overlay_colors(np.array(values), names)
        level = kidney_level(labels, [3, 2])  # kidney_left, kidney_right
        axial, coronal = mid_slices(image, labels, spacing, level)
        show(axes[0, col], *axial, colors, title)
        show(axes[1, col], *coronal, colors, "coronal, mid slice")
    fig.suptitle("Procedural phantoms (left) and the bundled real CT (right); window -175..250 HU", fontsize=10)
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
