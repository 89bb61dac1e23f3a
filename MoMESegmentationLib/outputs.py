"""Writing segmentation results: label maps, Slicer segmentations, summaries and montages.

Naming rules (also in the README):

* ``OUT`` ending in ``.nii.gz``, ``.nii`` or ``.nrrd`` gets a single label map; ``.seg.nrrd`` gets a
  Slicer segmentation (one layer per group of non-overlapping segments, names, colours, terminology).
* The JSON summary goes beside it with the image extension replaced by ``.json``:
  ``seg.nii.gz`` -> ``seg.json``, ``liver.seg.nrrd`` -> ``liver.json``.
* Probability maps (``--probabilities``) go into ``<stem>_probabilities/<label>_<id>.nii.gz``.
* The router's maps (``--explain``, :mod:`.explain`) go into ``<stem>_experts/``: per structure
  ``<label>_<id>_dominant.nii.gz`` (the dominant expert, a label map) and ``<label>_<id>_entropy.nii.gz``
  (the router's normalised entropy), plus ``experts.ctbl``, the label map's colour table for Slicer.
  The summary's ``explain.maps`` names them by label value; a single-expert model writes none.
* Every file is first written under a temporary name in the same folder and renamed into place only
  when all of a case's files are complete, so a failure never leaves half-written output.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .errors import InputError

__all__ = ["OUTPUT_SUFFIXES", "split_suffix", "summary_path", "check_output", "write_result",
           "render_montage", "atomic_outputs"]

OUTPUT_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd")


def split_suffix(path: Path) -> tuple[str, str]:
    """``Path("a/seg.nii.gz")`` -> ``("seg", ".nii.gz")``; raises for unsupported extensions."""
    name = Path(path).name
    for suffix in OUTPUT_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], suffix
    raise InputError(f"{path}: output must end in {', '.join(OUTPUT_SUFFIXES)}")


def summary_path(path: Path) -> Path:
    stem, _ = split_suffix(path)
    return Path(path).with_name(stem + ".json")


def probabilities_dir(path: Path) -> Path:
    stem, _ = split_suffix(path)
    return Path(path).with_name(stem + "_probabilities")


def experts_dir(path: Path) -> Path:
    stem, _ = split_suffix(path)
    return Path(path).with_name(stem + "_experts")


def check_output(path: Path, overwrite: bool) -> None:
    """Fail early, before any work, when ``path`` cannot or must not be written."""
    path = Path(path)
    split_suffix(path)
    if not path.parent.is_dir():
        raise InputError(f"{path}: output folder {path.parent} does not exist")
    if not overwrite:
        for existing in (path, summary_path(path)):
            if existing.exists():
                raise InputError(f"{existing}: already exists (use --overwrite to replace it)")


@contextmanager
def atomic_outputs(folder: Path):
    """Yield a temporary folder inside ``folder``; its files are moved into ``folder`` on success only."""
    folder = Path(folder)
    staging = Path(tempfile.mkdtemp(prefix=".mome-tmp-", dir=folder))
    try:
        yield staging
        for item in sorted(staging.iterdir()):
            target = folder / item.name
            if target.is_dir() and item.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "structure"


def write_result(result, path: Path, summary: dict, probabilities: bool = False) -> list[Path]:
    """Write the label map or ``.seg.nrrd``, the JSON summary and optional probability maps atomically.

    With the router's maps (``result.explanation``) ``summary["explain"]["maps"]`` is set to their
    files, in the written summary and in ``summary`` itself.
    """
    from .io.readers import write_labelmap, write_volume
    from .io.segmentation import write_segmentation

    path = Path(path)
    stem, suffix = split_suffix(path)
    written = []
    with atomic_outputs(path.parent) as staging:
        staged = staging / path.name
        if suffix == ".seg.nrrd":
            write_segmentation(result.to_segmentation(), staged)
        else:
            write_labelmap(result.labelmap, result.reference, staged)
        written.append(path)
        explanation = getattr(result, "explanation", None)
        if explanation is not None and explanation.has_maps:  # the caller's summary names the maps too
            summary["explain"] = dict(summary.get("explain") or explanation.to_json(),
                                      maps=_write_expert_maps(result, explanation, staging / experts_dir(path).name))
            written.append(experts_dir(path))
        (staging / summary_path(path).name).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        written.append(summary_path(path))
        if probabilities and result.probabilities is not None:
            folder = staging / probabilities_dir(path).name
            folder.mkdir()
            for structure, prob in zip(result.structures, result.probabilities):
                name = f"{structure.label:02d}_{_safe(structure.id or structure.name)}.nii.gz"
                write_volume(result.reference.with_array(prob.astype(np.float32)), folder / name)
            written.append(probabilities_dir(path))
    return written


def _write_expert_maps(result, explanation, folder: Path) -> dict:
    """Each structure's dominant-expert and entropy maps, and the colour table; their names by label."""
    from .io.readers import write_labelmap, write_volume

    folder.mkdir()
    (folder / "experts.ctbl").write_text(explanation.color_table(), encoding="utf-8")
    maps = {}
    for structure, dominant, entropy in zip(result.structures, explanation.dominant, explanation.entropy):
        stem = f"{structure.label:02d}_{_safe(structure.id or structure.name)}"
        write_labelmap(dominant, result.reference, folder / f"{stem}_dominant.nii.gz")
        write_volume(result.reference.with_array(entropy.astype(np.float32)), folder / f"{stem}_entropy.nii.gz")
        maps[str(structure.label)] = {"dominant": f"{folder.name}/{stem}_dominant.nii.gz",
                                      "entropy": f"{folder.name}/{stem}_entropy.nii.gz"}
    return {"folder": folder.name, "color_table": f"{folder.name}/experts.ctbl", "structures": maps}


def render_montage(result, path: Path, title: str = "", reference_labels: np.ndarray | None = None) -> Path:
    """PNG with axial and coronal slices of the CT, structure outlines/overlays and a legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from .io.geometry import canonicalize

    volume = result.reference
    canonical, record = canonicalize(volume.with_array(np.asarray(volume.array, dtype=np.float32)), "RAS")
    labels, _ = canonicalize(volume.with_array(result.labelmap), "RAS")
    ct, lab = canonical.array, labels.array
    found = [s for s in result.structures if s.found]
    colors = np.zeros((max([s.label for s in result.structures] + [0]) + 1, 4))
    for s in result.structures:
        colors[s.label] = (*[c / 255 for c in s.color], 0.55)
    cmap = ListedColormap(colors)
    # Two axial slices, at least a tenth of the volume apart: the one that shows the most distinct
    # structures, then the one that adds the most structures not shown yet.
    shown_in = np.array([(lab == s.label).any(axis=(0, 1)) for s in found]) if found else None  # [structure, z]
    if shown_in is None or not shown_in.any():
        picks = [ct.shape[2] // 2]
    else:
        order = np.lexsort((-(lab > 0).sum(axis=(0, 1)), -shown_in.sum(axis=0)))
        picks = [int(order[0])]
        gap = max(3, ct.shape[2] // 10)
        others = [int(z) for z in order[1:] if abs(int(z) - picks[0]) >= gap]
        if others:
            added = [int((shown_in[:, z] & ~shown_in[:, picks[0]]).sum()) for z in others]
            picks.append(others[int(np.argmax(added))])  # the first in `order` among the best
        picks.sort()
    coronal = int(np.argmax((lab > 0).sum(axis=(0, 2)))) if lab.any() else ct.shape[1] // 2
    aspect_axial = canonical.spacing[1] / canonical.spacing[0]
    aspect_coronal = canonical.spacing[2] / canonical.spacing[0]
    panels = [("axial", z) for z in picks] + [("coronal", coronal)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5.6), facecolor="black")
    for ax, (view, index) in zip(np.atleast_1d(axes), panels):
        if view == "axial":
            image, overlay, aspect = ct[:, :, index].T, lab[:, :, index].T, aspect_axial
            origin = "lower"
            # RAS canonical: i runs to the patient's right... show radiological convention (patient right on the left)
            image, overlay = image[::-1, ::-1], overlay[::-1, ::-1]
        else:
            image, overlay, aspect = ct[:, index, :].T, lab[:, index, :].T, aspect_coronal
            origin = "lower"
            image, overlay = image[:, ::-1], overlay[:, ::-1]
        ax.imshow(image, cmap="gray", vmin=-175, vmax=250, origin=origin if view == "coronal" else "upper",
                  aspect=aspect, interpolation="nearest")
        ax.imshow(np.ma.masked_equal(overlay, 0), cmap=cmap, vmin=0, vmax=len(colors) - 1,
                  origin=origin if view == "coronal" else "upper", aspect=aspect, interpolation="nearest")
        ax.set_title(f"{view} slice {index}", color="white", fontsize=10)
        ax.axis("off")
    handles = [Patch(color=[c / 255 for c in s.color], label=f"{s.name} ({s.volume_ml:.0f} mL)") for s in found]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(5, len(handles)), frameon=False,
                   labelcolor="white", fontsize=9)
    fig.suptitle(title or "MoME segmentation", color="white")
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    path = Path(path)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".png", delete=False) as handle:
        temp = Path(handle.name)
    try:
        fig.savefig(temp, dpi=90, facecolor="black")
        os.replace(temp, path)
    finally:
        plt.close(fig)
        temp.unlink(missing_ok=True)
    return path
