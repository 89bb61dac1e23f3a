"""What ``explain`` costs: the same segmentation with and without the router's maps, side by side.

On the bundled CT (122 x 101 x 112 voxels at 3 mm, 8 sliding windows of 96^3) with the bundled demo
weights, one :class:`~MoMESegmentationLib.engine.Segmenter` segments the demo's 8 prompts from a
cleared feature cache, then a new prompt (``gallbladder``) on the cached features, without and with
``explain``, alternately within each round, so that the load of a shared machine falls on both alike
(the overhead is the ratio within a round). Each variant's peak memory is measured apart, in a child
process of its own (peak resident set size of one full run), and so is the time to write the maps.
The masks of both are compared voxel for voxel: explaining must not change one. What explain
holds in memory on top (the stitched gates, one prompt's gates on the input grid) is also computed
from the shapes, since the peak of a whole run may lie elsewhere (loading, the encoder).

    python benchmarks/bench_explain.py --threads 2 --rounds 3 --out benchmarks/results/explain_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from MoMESegmentationLib.cli import DEMO_PROMPTS  # noqa: E402
from MoMESegmentationLib.data.sample import load_sample_ct  # noqa: E402
from MoMESegmentationLib.engine import Segmenter  # noqa: E402

NEW_PROMPT = "gallbladder"


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def peak_rss_child(explain: bool, threads: int) -> float:
    """Peak resident memory (MiB) of a fresh process that runs one full segmentation."""
    code = (
        "import resource, sys; sys.path.insert(0, %r)\n"
        "from MoMESegmentationLib.cli import DEMO_PROMPTS\n"
        "from MoMESegmentationLib.data.sample import load_sample_ct\n"
        "from MoMESegmentationLib.engine import Segmenter\n"
        "s = Segmenter('demo', 'cpu', threads=%d)\n"
        "s.segment(load_sample_ct().image, DEMO_PROMPTS, explain=%r)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    ) % (str(Path(__file__).resolve().parents[1]), threads, explain)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)

    ct = load_sample_ct().image
    segmenter = Segmenter("demo", "cpu", threads=args.threads)
    rows = {"plain": {"full": [], "new_prompt": []}, "explain": {"full": [], "new_prompt": []}}
    ratios = {"full": [], "new_prompt": []}
    identical = True
    write_s = []
    for round_index in range(args.rounds):
        results = {}
        for variant in ("plain", "explain") if round_index % 2 == 0 else ("explain", "plain"):
            explain = variant == "explain"
            segmenter.clear_cache()
            full, seconds = timed(lambda: segmenter.segment(ct, DEMO_PROMPTS, explain=explain))
            rows[variant]["full"].append(seconds)
            _, seconds = timed(lambda: segmenter.segment(ct, NEW_PROMPT, explain=explain))
            rows[variant]["new_prompt"].append(seconds)
            results[variant] = full
        for kind in ratios:
            ratios[kind].append(rows["explain"][kind][-1] / rows["plain"][kind][-1])
        identical &= all(np.array_equal(a, b) for a, b in zip(results["plain"].masks, results["explain"].masks))
        with tempfile.TemporaryDirectory() as folder:
            from MoMESegmentationLib.outputs import write_result

            full = results["explain"]
            _, seconds = timed(lambda: write_result(full, Path(folder) / "seg.nii.gz", full.summary()))
            write_s.append(seconds)
        print(f"round {round_index + 1}: plain {rows['plain']['full'][-1]:.1f} s, explain "
              f"{rows['explain']['full'][-1]:.1f} s; new prompt {rows['plain']['new_prompt'][-1]:.2f} s vs "
              f"{rows['explain']['new_prompt'][-1]:.2f} s", flush=True)

    peak = {variant: peak_rss_child(variant == "explain", args.threads) for variant in ("plain", "explain")}
    # What explain holds on top, by construction: the stitched gates of every prompt on the model grid
    # (float32, on the stitching device: the GPU when it fits), then one prompt's gates on the input grid.
    prompts, experts = len(segmenter.plan_prompts(DEMO_PROMPTS)), segmenter.model.num_experts
    model_grid = int(np.prod(segmenter.preprocess(ct).image.shape[2:]))
    extra = {"stitched_gates_mib": round(prompts * experts * model_grid * 4 / 2**20, 1),
             "one_prompt_input_grid_gates_mib": round(experts * int(np.prod(ct.shape)) * 4 / 2**20, 1),
             "model_grid_voxels": model_grid}
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads": args.threads, "torch": torch.__version__, "precision": segmenter.precision,
                    "load_average": os.getloadavg()},
        "case": {"volume": "bundled CT", "shape": list(ct.shape), "prompts": DEMO_PROMPTS, "new_prompt": NEW_PROMPT,
                 "experts": segmenter.model.num_experts},
        "seconds": {v: {k: [round(x, 3) for x in xs] for k, xs in r.items()} for v, r in rows.items()},
        "median_s": {v: {k: round(statistics.median(xs), 3) for k, xs in r.items()} for v, r in rows.items()},
        "overhead_ratio_median": {k: round(statistics.median(xs), 3) for k, xs in ratios.items()},
        "write_maps_s_median": round(statistics.median(write_s), 3),
        "peak_rss_mib": {k: round(v, 1) for k, v in peak.items()},
        "explain_memory": extra,
        "masks_identical": bool(identical),
    }
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
