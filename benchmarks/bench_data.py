"""Training-data throughput of a recipe: set-up time and samples per second of its DataLoader.

Builds the config's sources exactly as ``mome train`` does (phantoms drawn and preprocessed, real
cases read and cached), then draws ``--samples`` training samples (random patch, augmentation,
prompt selection) through a DataLoader with ``--workers`` worker processes. No model runs: this
is the rate the loader can feed a GPU, the bound of a data-limited run.

    python benchmarks/bench_data.py configs/demo.yaml --workers 14 --samples 400 --out benchmarks/results/data_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the config's)")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the config's)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/data.json"))
    args = parser.parse_args()

    from MoMESegmentationLib.training.config import load_config
    from MoMESegmentationLib.training.datasets import StepSampler, TrainingSamples, build_sources
    from MoMESegmentationLib.training.prompts import load_or_compute_prompts
    from MoMESegmentationLib.training.trainer import discover_structures

    config = load_config(args.config)
    workers = config.data.num_workers if args.workers is None else args.workers
    batch = args.batch or config.schedule.batch_size
    structures = discover_structures(config)
    rows = load_or_compute_prompts(config.text, structures).rows_for(structures)

    tic = time.perf_counter()
    sources = build_sources(config, structures).sources
    setup = time.perf_counter() - tic
    samples = TrainingSamples(sources, rows, config.transforms, config.data.prompts_per_sample,
                              config.data.positive_fraction, config.schedule.seed)
    steps = max(1, args.samples // batch)
    loader = torch.utils.data.DataLoader(samples, batch_size=batch, sampler=StepSampler(0, steps, batch),
                                         num_workers=workers, prefetch_factor=4 if workers else None)
    tic = time.perf_counter()
    first = None
    for i, _ in enumerate(loader):
        if i == 0:
            first = time.perf_counter() - tic
    seconds = time.perf_counter() - tic
    result = {
        "config": str(args.config), "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "workers": workers, "batch": batch, "samples": steps * batch,
        "setup_s": round(setup, 2), "first_batch_s": round(first or 0.0, 2),
        "samples_per_s": round(steps * batch / seconds, 2), "steps_per_s": round(steps / seconds, 3),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
