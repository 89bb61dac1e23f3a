"""Thin slabs: does a scan shorter than one window segment like the same anatomy in a full scan?

Crops slabs of 16, 24, 32 and 48 slices of the bundled CT (3 mm, TotalSegmentator example) around
the liver dome, the kidneys and the pelvis, segments each slab on its own, and reports per structure
the Dice against

* ``full``: the same model's result on the whole scan, cropped to the slab (what the slab should give),
* ``reference``: the bundled reference labels (TotalSegmentator predictions) inside the slab,

for several ways of handling the padding side by side: the pad mode of
:func:`MoMESegmentationLib.windows.pad_to_window`, with or without normalisation over the valid
voxels only (``+mask``; :mod:`MoMESegmentationLib.model.masked_norm`). ``constant`` (air padding,
statistics over the whole window) is the behaviour before slabs were handled. Structures with fewer than ``--min-voxels`` reference
voxels in a slab are left out. Writes JSON (``--out``) and prints a Markdown table.

    python benchmarks/bench_slabs.py --out benchmarks/results/slabs_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from MoMESegmentationLib.data.sample import load_sample_ct  # noqa: E402
from MoMESegmentationLib.engine import Segmenter, _crop  # noqa: E402
from MoMESegmentationLib.evaluation import dice  # noqa: E402
from MoMESegmentationLib.windows import PAD_MODES  # noqa: E402

SLICES = (16, 24, 32, 48)
FOCUS = ("liver", "spleen", "kidney_left", "kidney_right")


def slab_centres(labels: np.ndarray, table: dict[int, str]) -> dict[str, int]:
    """Slice index (k, superior is higher) of the liver dome, the kidneys and the pelvis."""
    value = {name: v for v, name in table.items()}

    def extent(name: str) -> np.ndarray:
        return np.flatnonzero((labels == value[name]).any(axis=(0, 1)))

    liver = extent("liver")
    kidneys = np.concatenate([extent("kidney_left"), extent("kidney_right")])
    bladder = extent("urinary_bladder")
    return {
        "liver dome": int(liver.max() - 0.25 * (liver.max() - liver.min())),
        "kidneys": int(round(kidneys.mean())),
        "pelvis": int(round(bladder.mean())),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--slices", type=int, nargs="+", default=list(SLICES))
    parser.add_argument("--modes", nargs="+", default=["constant", "constant+mask", "mirror", "mirror+mask"],
                        help="pad mode, optionally with '+mask'")
    parser.add_argument("--min-voxels", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    case = load_sample_ct()
    segmenter = Segmenter(args.model, device="auto", threads=args.threads)
    prompts = [s for s in segmenter.structures if s in case.label_table.values()]
    value = {name: v for v, name in case.label_table.items()}
    centres = slab_centres(case.labels.array, case.label_table)
    depth = case.image.shape[2]
    rows: list[dict] = []
    started = time.perf_counter()
    for mode in args.modes:
        segmenter.pad_mode, _, masked = mode.partition("+")
        if segmenter.pad_mode not in PAD_MODES or masked not in ("", "mask"):
            parser.error(f"unknown mode {mode!r}")
        segmenter.mask_padding = bool(masked)
        segmenter.clear_cache()
        full = segmenter.segment(case.image, prompts)
        full_masks = dict(zip(prompts, full.masks))
        for region, centre in centres.items():
            for n in args.slices:
                start = int(np.clip(centre - n // 2, 0, depth - n))
                box = (slice(None), slice(None), slice(start, start + n))
                slab = _crop(case.image, (slice(0, case.image.shape[0]), slice(0, case.image.shape[1]),
                                          slice(start, start + n)))
                segmenter.clear_cache()
                t0 = time.perf_counter()
                result = segmenter.segment(slab, prompts)
                seconds = time.perf_counter() - t0
                for name, mask in zip(prompts, result.masks):
                    reference = case.labels.array[box] == value[name]
                    if reference.sum() < args.min_voxels:
                        continue
                    rows.append({
                        "mode": mode, "region": region, "slices": n, "start": start, "structure": name,
                        "dice_full": round(dice(mask, full_masks[name][box]), 4),
                        "dice_reference": round(dice(mask, reference), 4),
                        "full_dice_reference": round(dice(full_masks[name][box], reference), 4),
                        "seconds": round(seconds, 2),
                    })
                print(f"{mode:8s} {region:10s} {n:3d} slices: {seconds:.1f} s", file=sys.stderr, flush=True)
    report = {
        "benchmark": "slabs",
        "model": segmenter.model_info(),
        "device": str(segmenter.device),
        "torch": torch.__version__,
        "machine": platform.platform(),
        "threads": torch.get_num_threads(),
        "centres": centres,
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(markdown_table(rows, args.modes))
    return 0


def markdown_table(rows: list[dict], modes: list[str]) -> str:
    """Per region, slab size and structure: Dice vs full scan and vs reference, one column pair per mode."""
    keyed = {(r["mode"], r["region"], r["slices"], r["structure"]): r for r in rows}
    header = "| region | slices | structure | " + " | ".join(
        f"{m}: vs full | {m}: vs ref" for m in modes) + " | full scan vs ref |"
    lines = [header, "|" + " --- |" * (4 + 2 * len(modes))]
    seen = []
    for r in rows:
        key = (r["region"], r["slices"], r["structure"])
        if key not in seen:
            seen.append(key)
    for region, n, name in seen:
        cells = []
        full_ref = ""
        for m in modes:
            r = keyed.get((m, region, n, name))
            cells += [f"{r['dice_full']:.2f}", f"{r['dice_reference']:.2f}"] if r else ["", ""]
            full_ref = f"{r['full_dice_reference']:.2f}" if r else full_ref
        lines.append(f"| {region} | {n} | {name} | " + " | ".join(cells) + f" | {full_ref} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
