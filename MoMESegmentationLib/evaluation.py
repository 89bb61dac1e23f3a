"""Agreement between label maps: Dice and normalized surface distance (MONAI metrics)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

from .errors import InputError

__all__ = ["dice", "structure_metrics", "dice_per_structure", "evaluate_files"]


def _one_hot_pair(prediction: np.ndarray, reference: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Two boolean masks -> MONAI's ``[B=1, C=1, I, J, K]`` float tensors."""
    return (torch.from_numpy(np.ascontiguousarray(prediction, dtype=np.float32))[None, None],
            torch.from_numpy(np.ascontiguousarray(reference, dtype=np.float32))[None, None])


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    from monai.metrics import compute_dice

    if not prediction.any() and not reference.any():
        return 1.0
    p, r = _one_hot_pair(prediction, reference)
    return float(compute_dice(p, r, include_background=True, ignore_empty=False)[0, 0])


def structure_metrics(prediction: np.ndarray, reference: np.ndarray, spacing, tolerance_mm: float = 2.0) -> dict:
    """Dice and normalized surface distance (NSD at ``tolerance_mm``) of two boolean masks."""
    from monai.metrics import compute_surface_dice

    result = {"dice": dice(prediction, reference)}
    if prediction.any() and reference.any():
        p, r = _one_hot_pair(prediction, reference)
        nsd = compute_surface_dice(p, r, class_thresholds=[tolerance_mm], include_background=True,
                                   spacing=[float(s) for s in spacing])
        result["nsd"] = float(nsd[0, 0])
    else:
        result["nsd"] = 1.0 if not prediction.any() and not reference.any() else 0.0
    return result


def dice_per_structure(result, reference_labels: np.ndarray, label_table: dict[int, str]) -> dict[str, float]:
    """Dice of each segmented structure against a reference label map named by ``label_table``.

    Structures the reference does not label are skipped; a group prompt is compared member by member.
    """
    by_id = {name: int(value) for value, name in label_table.items()}
    scores = {}
    for structure, mask in zip(result.structures, result.masks):
        if structure.id in by_id:
            scores[structure.id] = round(dice(mask, reference_labels == by_id[structure.id]), 4)
    return scores


def _read_table(path: Path) -> dict[int, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: cannot read label table ({error})") from None
    if isinstance(data, dict) and "structures" in data:  # our own summary JSON
        return {int(s["label"]): s.get("id") or s["name"] for s in data["structures"] if s.get("found", True)}
    return {int(k): str(v) for k, v in data.items()}


def evaluate_files(prediction: Path, reference: Path, output: Path, reference_table: Path | None = None,
                   tolerance_mm: float = 2.0) -> list[dict]:
    """Compare two label maps on the same grid; write ``metrics.csv`` and ``metrics.png`` into ``output``.

    Labels are matched by structure id when both sides name their labels (the prediction's JSON
    summary beside it, ``reference_table`` for the reference), else by label value.
    """
    from .io.readers import read_volume
    from .outputs import summary_path

    pred = read_volume(prediction)
    ref = read_volume(reference)
    if pred.shape != ref.shape or not pred.same_grid(ref, atol=1e-3):
        raise InputError(f"{prediction}: grid differs from {reference} (shape {pred.shape} vs {ref.shape})")
    try:
        pred_table = _read_table(summary_path(prediction))
    except InputError:
        pred_table = {int(v): f"label {int(v)}" for v in np.unique(pred.array) if v}
    ref_table = _read_table(reference_table) if reference_table else None
    rows = []
    for value, name in sorted(pred_table.items()):
        if ref_table is not None:
            matches = [v for v, n in ref_table.items() if n == name]
            if not matches:
                continue
            ref_mask = ref.array == matches[0]
        else:
            ref_mask = ref.array == value
        metrics = structure_metrics(pred.array == value, ref_mask, pred.spacing, tolerance_mm)
        rows.append({"structure": name, "label": value, **{k: round(v, 4) for k, v in metrics.items()}})
    if not rows:
        raise InputError(f"{prediction}: no structure in common with {reference}")
    output.mkdir(parents=True, exist_ok=True)
    with open(output / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["structure", "label", "dice", "nsd"])
        writer.writeheader()
        writer.writerows(rows)
    _bar_chart(rows, output / "metrics.png", tolerance_mm)
    return rows


def _bar_chart(rows: list[dict], path: Path, tolerance_mm: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["structure"] for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows) + 2), 4))
    ax.bar(x - 0.2, [r["dice"] for r in rows], 0.4, label="Dice")
    ax.bar(x + 0.2, [r["nsd"] for r in rows], 0.4, label=f"NSD ({tolerance_mm:g} mm)")
    ax.set_xticks(x, names, rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
