"""Corrections as training data: does fine-tuning on corrected labels beat fine-tuning on the bad ones?

Five phantom cases stand in for scans a radiologist reviewed. Their reference labels are damaged in
one structure the way a hurried annotation is (default: the liver's inferior half of its
cranio-caudal extent left unlabelled, as if tracing had stopped early); the "correction" restores the
true labels. Both versions go through the real pipeline: the CT is written as ``.nrrd``, the labels
as a Slicer ``.seg.nrrd`` whose segments carry the structures' display names, and
:func:`MoMESegmentationLib.corrections.add_correction_case` puts each case into a corrections folder
(one for the damaged labels, one for the corrected ones); the trainer reads them through its
manifest loader.

Then, from the same initial weights (the bundled demo weights), with the same recipe
(``configs/finetune_corrections.yaml``: corrections mixed with replayed phantoms), the same seed and
the same number of steps, two fine-tunes run: one on the damaged folder, one on the corrected folder.
The demo weights and both results are scored on held-out phantoms (seeds from 100000, never used for
training) with the trainer's own validation (whole volumes, sliding windows, Dice per structure),
per phantom, so that the paired differences show how noisy the comparison is.

    OMP_NUM_THREADS=1 python benchmarks/bench_corrections.py --threads 1 \\
        --out benchmarks/results/corrections_liver_cpu.json

On the 2-core CPU with one torch thread the defaults (40 steps of one 96^3 patch, 6 held-out
phantoms) took 53 minutes while the machine also ran other jobs (an estimated 35 on an idle one). Work files
go to ``--work`` (default ``runs/corrections_bench``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import monai
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from MoMESegmentationLib.corrections import add_correction_case  # noqa: E402
from MoMESegmentationLib.data.phantoms import make_phantom  # noqa: E402
from MoMESegmentationLib.io.readers import write_volume  # noqa: E402
from MoMESegmentationLib.io.segmentation import segmentation_from_labelmap, write_segmentation  # noqa: E402
from MoMESegmentationLib.training.config import load_config  # noqa: E402
from MoMESegmentationLib.training.datasets import build_validation_items, sample_seed  # noqa: E402
from MoMESegmentationLib.training.trainer import Trainer, discover_structures  # noqa: E402
from MoMESegmentationLib.vocabulary import Vocabulary  # noqa: E402

CONFIG = REPO / "configs" / "finetune_corrections.yaml"
DEMO = REPO / "Resources" / "Models" / "mome-demo" / "model.safetensors"
TRAIN_SEEDS = range(5000, 5005)  # never drawn by the demo recipe (0-95), the replay (0-23) or validation


def damage(labels: np.ndarray, value: int, image, fraction: float) -> tuple[np.ndarray, float]:
    """Unlabel the inferior ``fraction`` of the structure's cranio-caudal (LPS z) extent.

    Returns the damaged labels and the share of the structure's voxels removed.
    """
    mask = labels == value
    index = np.argwhere(mask)
    if not len(index):
        return labels.copy(), 0.0
    z = image.index_to_physical(index.astype(float))[:, 2]
    cut = z.min() + fraction * (z.max() - z.min())
    drop = index[z < cut]
    out = labels.copy()
    out[tuple(drop.T)] = 0
    return out, len(drop) / len(index)


def write_cases(work: Path, structure: str, fraction: float, spacing_range: list[float]) -> dict:
    """The damaged and the corrected corrections folders, written through add_correction_case."""
    vocabulary = Vocabulary.load()
    shutil.rmtree(work / "cases", ignore_errors=True)
    (work / "cases").mkdir(parents=True)
    report = {}
    for seed in TRAIN_SEEDS:
        rng = np.random.default_rng(sample_seed(seed, 0, 7))
        spacing = tuple(float(rng.uniform(*spacing_range)) for _ in range(3))
        phantom = make_phantom(seed, spacing=spacing)
        truth = np.asarray(phantom.labels.array)
        value = {n: v for v, n in phantom.label_table.items()}[structure]
        damaged, removed = damage(truth, value, phantom.image, fraction)
        ct = work / "cases" / f"phantom{seed}.nrrd"
        write_volume(phantom.image.with_array(np.round(phantom.image.array).astype(np.int16)), ct)
        table = {v: vocabulary[n].name for v, n in phantom.label_table.items()}  # display names, as in Slicer
        labels = {vocabulary[n].name: n for n in phantom.label_table.values()}
        for kind, array in (("damaged", damaged), ("corrected", truth)):
            seg = work / "cases" / f"phantom{seed}_{kind}.seg.nrrd"
            write_segmentation(segmentation_from_labelmap(array, phantom.labels, table), seg)
            add_correction_case(work / kind, ct, seg, labels, case_id=f"phantom{seed}", overwrite=True,
                                model="mome-demo", note=f"benchmark: {kind} {structure}")
        report[f"phantom{seed}"] = {"shape": list(truth.shape), "spacing": [round(s, 2) for s in spacing],
                                    f"{structure}_voxels": int((truth == value).sum()),
                                    "share_removed": round(removed, 3)}
    return report


def score(trainer: Trainer, model: torch.nn.Module, items: list[dict], prompts) -> dict[str, dict[str, float]]:
    """Dice per held-out case and structure, with the trainer's validation."""
    return {str(item["case_id"]): trainer.validate(model, [item], prompts)["val_dice"] for item in items}


def mean_per_structure(per_case: dict[str, dict[str, float]]) -> dict[str, float]:
    names = sorted({n for scores in per_case.values() for n in scores})
    return {n: round(float(np.mean([s[n] for s in per_case.values() if n in s])), 4) for n in names}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structure", default="liver", help="the structure whose labels are damaged")
    parser.add_argument("--fraction", type=float, default=0.5, help="inferior share of its extent unlabelled")
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: the config's)")
    parser.add_argument("--val-phantoms", type=int, default=6, help="held-out phantoms (seeds 100000...)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "corrections_bench")
    parser.add_argument("--out", type=Path, default=None, help="JSON results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    base = load_config(CONFIG)
    phantom_spec = next(s for s in base.data.datasets if s.kind == "phantoms")
    cases = write_cases(args.work, args.structure, args.fraction, phantom_spec.spacing_range or [2.5, 4.5])
    print(f"cases written in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)

    def config_for(kind: str):
        cfg = load_config(CONFIG)
        for spec in cfg.data.datasets:
            if spec.kind == "manifest":
                spec.manifest = str(args.work / kind / "manifest.json")
        cfg.data.num_workers = 0  # one process, one thread: leave the other core free
        cfg.data.cache_workers = 1
        cfg.data.validation.phantoms = 0  # scored below, per case, once for all three models
        cfg.text.embeddings_cache = str(args.work / "text_embeddings.safetensors")
        cfg.output.dir = str(args.work / f"run_{kind}")
        cfg.logging.plot = False
        cfg.logging.progress = False
        if args.steps is not None:
            cfg.schedule.max_steps = args.steps
        return cfg

    # Held-out phantoms, drawn once and scored for all three models.
    scoring = config_for("corrected")
    scoring.data.validation.phantoms = args.val_phantoms
    structures = discover_structures(scoring)
    judge = Trainer(scoring, output_dir=args.work / "scoring", device="cpu")
    prompts = judge._prompts(structures)
    judge._rows = prompts.rows_for(structures)
    items = build_validation_items(scoring, structures, [])
    from MoMESegmentationLib.checkpoint import load_checkpoint

    before = score(judge, load_checkpoint(DEMO, device="cpu").model.float(), items, prompts)
    print(f"demo weights scored at {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)

    runs: dict[str, dict] = {}
    for kind in ("damaged", "corrected"):
        cfg = config_for(kind)
        tic = time.perf_counter()
        trainer = Trainer(cfg, device="cpu")
        result = trainer.fit()
        train_s = time.perf_counter() - tic
        runs[kind] = {"per_case": score(judge, trainer.model, items, prompts), "steps": result.steps,
                      "train_seconds": round(train_s, 1), "checkpoint": str(result.checkpoint)}
        print(f"{kind}: {result.steps} steps in {train_s:.0f} s, scored at {time.perf_counter() - started:.0f} s",
              file=sys.stderr, flush=True)

    target = args.structure
    means = {"before": mean_per_structure(before)}
    means.update({k: mean_per_structure(v["per_case"]) for k, v in runs.items()})
    others = [n for n in means["before"] if n != target]
    change = {k: {n: round(means[k][n] - means["before"][n], 4) for n in means["before"]} for k in runs}
    paired = {case: round(runs["corrected"]["per_case"][case][target] - runs["damaged"]["per_case"][case][target], 4)
              for case in before if target in before[case]}
    cfg = config_for("corrected")
    report = {
        "what": f"Fine-tuning the demo weights on 5 phantom cases whose {target} labels were damaged (inferior "
                f"{args.fraction:.0%} of its extent unlabelled) vs the same cases corrected; Dice on "
                f"{len(items)} held-out phantoms",
        "command": "OMP_NUM_THREADS=1 python benchmarks/bench_corrections.py "
                   + " ".join(sys.argv[1:] if argv is None else argv),
        "config": str(CONFIG.relative_to(REPO)),
        "machine": f"{os.cpu_count()}-core {platform.machine()} CPU, {torch.get_num_threads()} torch thread(s), "
                   f"torch {torch.__version__}, MONAI {monai.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "steps": cfg.schedule.max_steps,
        "batch_size": cfg.schedule.batch_size,
        "patch_size": cfg.transforms.patch_size,
        "seconds_per_step": round(np.mean([r["train_seconds"] for r in runs.values()]) / cfg.schedule.max_steps, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "damaged_structure": target,
        "training_cases": cases,
        "held_out_cases": [str(item["case_id"]) for item in items],
        "dice_before": means["before"],
        "dice_damaged": means["damaged"],
        "dice_corrected": means["corrected"],
        "change_damaged": change["damaged"],
        "change_corrected": change["corrected"],
        "target": {
            "before": means["before"].get(target),
            "damaged": means["damaged"].get(target),
            "corrected": means["corrected"].get(target),
            "corrected_minus_damaged_per_case": paired,
            "corrected_minus_damaged_mean": round(float(np.mean(list(paired.values()))), 4) if paired else None,
            "corrected_minus_damaged_std": round(float(np.std(list(paired.values()), ddof=1)), 4)
            if len(paired) > 1 else None,
        },
        "others_mean": {k: round(float(np.mean([means[k][n] for n in others])), 4) for k in means},
        "per_case": {"before": before, **{k: v["per_case"] for k, v in runs.items()}},
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print("| structure | before | damaged | corrected | corrected - damaged |\n| --- | --- | --- | --- | --- |")
    for n in means["before"]:
        print(f"| {n} | {means['before'][n]:.3f} | {means['damaged'][n]:.3f} | {means['corrected'][n]:.3f} | "
              f"{means['corrected'][n] - means['damaged'][n]:+.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
