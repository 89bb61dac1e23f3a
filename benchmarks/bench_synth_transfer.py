"""How well checkpoints transfer to scans they never saw: the evaluation protocol for training from label maps.

For each checkpoint, side by side in one run:

* **the bundled real CT** (``Resources/SampleData/example_ct.nii.gz``): Dice per structure against its
  label map (TotalSegmentator's prediction). For weights trained from label maps only this image was
  never in training, so it measures synthetic-to-real transfer. (The bundled demo weights did see it:
  their figure there is in-sample and is marked so.)
* **held-out phantoms** (seeds from 100000, never used for training): Dice per structure.
* **absent anatomy**: held-out synthetic scans (label maps of phantoms with seeds from 200000,
  synthesised by ``data/synthesis.py``) cut to an upper-abdomen slab (no bladder) or a pelvic slab
  (no liver, spleen or kidneys); every structure the cut leaves out is prompted, and the rate at which
  it comes back as *found* is reported: by the network and the size / confidence rules alone
  (``anatomy_guard=False``), and with the anatomy guard.

    python benchmarks/bench_synth_transfer.py runs/phantoms_cpu/model.safetensors runs/synth_cpu/model.safetensors \\
        --out benchmarks/results/synth_transfer_cpu.json

Writes one JSON file (per checkpoint: the three measurements, the settings, the machine).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from MoMESegmentationLib.data.phantoms import make_phantom  # noqa: E402
from MoMESegmentationLib.data.sample import load_sample_ct  # noqa: E402
from MoMESegmentationLib.data.synthesis import synthesize_ct  # noqa: E402
from MoMESegmentationLib.engine import Segmenter  # noqa: E402
from MoMESegmentationLib.evaluation import dice_per_structure  # noqa: E402
from MoMESegmentationLib.io.volume import Volume  # noqa: E402
from MoMESegmentationLib.vocabulary import Vocabulary  # noqa: E402

DEMO_STRUCTURES = ("liver", "spleen", "kidney_left", "kidney_right", "stomach", "urinary_bladder", "aorta",
                   "inferior_vena_cava")
UPPER_ONLY = ("urinary_bladder",)  # absent from an upper-abdomen slab
PELVIS_ABSENT = ("liver", "spleen", "kidney_left", "kidney_right", "stomach")  # absent from a pelvic slab


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(float(np.mean(values)), 4) if values else None


def _slab(volume: Volume, labels: np.ndarray, fraction: tuple[float, float]) -> tuple[Volume, np.ndarray]:
    """The part of a scan between two fractions of its superior-inferior extent."""
    axis = int(np.argmax(np.abs(volume.direction[2])))
    n = volume.shape[axis]
    sign = np.sign(volume.direction[2, axis]) or 1.0
    lo, hi = (int(round(f * n)) for f in fraction)
    if sign < 0:  # index 0 is superior: measure the fractions from the other end
        lo, hi = n - hi, n - lo
    box = [slice(None)] * 3
    box[axis] = slice(lo, hi)
    start = np.zeros(3)
    start[axis] = lo
    cut = Volume(volume.array[tuple(box)], volume.spacing.copy(), volume.index_to_physical(start),
                 volume.direction.copy(), volume.name)
    return cut, labels[tuple(box)]


def real_ct(segmenter: Segmenter, names: dict[str, str]) -> dict:
    case = load_sample_ct()
    structures = [s for s in DEMO_STRUCTURES if s in names]
    result = segmenter.segment(case.image, [names[s] for s in structures], anatomy_guard=False)
    dice = dice_per_structure(result, np.asarray(case.labels.array), case.label_table)
    return {"dice": dice, "mean_dice": _mean(dice.values())}


def held_out_phantoms(segmenter: Segmenter, names: dict[str, str], count: int) -> dict:
    per: dict[str, list[float]] = {}
    for seed in range(100000, 100000 + count):
        phantom = make_phantom(seed, spacing_range=(2.5, 4.5))
        present = set(phantom.present_labels().values())
        structures = [s for s in DEMO_STRUCTURES if s in names and s in present]
        result = segmenter.segment(phantom.image, [names[s] for s in structures], anatomy_guard=False)
        for name, value in dice_per_structure(result, np.asarray(phantom.labels.array), phantom.label_table).items():
            per.setdefault(name, []).append(value)
    dice = {name: _mean(values) for name, values in sorted(per.items())}
    return {"phantoms": count, "dice": dice, "mean_dice": _mean(dice.values())}


def absent_anatomy(segmenter: Segmenter, names: dict[str, str], count: int) -> dict:
    counts = {"network": [0, 0], "guard": [0, 0]}  # [found, prompted]
    cases = []
    for index in range(count):
        phantom = make_phantom(200000 + index, spacing_range=(2.5, 4.5), random_fov=False)
        scan = synthesize_ct(phantom.labels, phantom.label_table, seed=200000 + index)
        upper = index % 2 == 0
        image, labels = _slab(scan.image, np.asarray(scan.labels.array), (0.55, 1.0) if upper else (0.0, 0.3))
        present = {phantom.label_table[v] for v in np.unique(labels).tolist() if v in phantom.label_table}
        absent = [s for s in (UPPER_ONLY if upper else PELVIS_ABSENT) if s in names and s not in present]
        if not absent:
            continue
        entry = {"seed": 200000 + index, "slab": "upper abdomen" if upper else "pelvis", "absent": absent}
        for mode, guard in (("network", False), ("guard", True)):
            result = segmenter.segment(image.with_array(image.array), [names[s] for s in absent], anatomy_guard=guard)
            found = [s.id for s in result.structures if s.found]
            counts[mode][0] += len(found)
            counts[mode][1] += len(absent)
            entry[f"found_{mode}"] = found
        cases.append(entry)
    rates = {mode: (round(f / p, 4) if p else None) for mode, (f, p) in counts.items()}
    return {"scans": len(cases), "prompts": counts["network"][1], "found_rate": rates["network"],
            "found_rate_with_anatomy_guard": rates["guard"], "cases": cases}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", help="checkpoints (.safetensors) or registry names")
    parser.add_argument("--phantoms", type=int, default=4, help="held-out phantoms (default 4)")
    parser.add_argument("--absent-scans", type=int, default=6, help="held-out synthetic slabs (default 6)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/synth_transfer_cpu.json"))
    args = parser.parse_args(argv)

    vocabulary = Vocabulary.load()
    report = {"command": " ".join(["python", "benchmarks/bench_synth_transfer.py", *(argv or sys.argv[1:])]),
              "machine": platform.platform(), "processor": platform.processor(), "results": []}
    for checkpoint in args.checkpoints:
        start = time.perf_counter()
        segmenter = Segmenter(checkpoint, device="cpu", threads=args.threads)
        names = {s: vocabulary[s].name for s in segmenter.structures if s in vocabulary}
        entry = {"checkpoint": str(checkpoint), "structures": sorted(names),
                 "real_ct": real_ct(segmenter, names),
                 "held_out_phantoms": held_out_phantoms(segmenter, names, args.phantoms),
                 "absent_anatomy": absent_anatomy(segmenter, names, args.absent_scans)}
        if checkpoint == "demo":
            entry["real_ct"]["note"] = "the bundled demo weights saw this image in training (in-sample)"
        entry["seconds"] = round(time.perf_counter() - start, 1)
        report["results"].append(entry)
        print(json.dumps({k: entry[k] for k in ("checkpoint", "real_ct", "held_out_phantoms")}, indent=1))
        print("absent anatomy found rate:", entry["absent_anatomy"]["found_rate"],
              "with guard:", entry["absent_anatomy"]["found_rate_with_anatomy_guard"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
