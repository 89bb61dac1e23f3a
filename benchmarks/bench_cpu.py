"""CPU inference paths side by side: `mome demo` on the bundled CT, and one new prompt on cached features.

Every variant is a :class:`~MoMESegmentationLib.engine.Segmenter` on the bundled demo weights and the
bundled real CT (122 x 101 x 112 voxels at 3 mm, 8 sliding windows of 96^3), segmenting the demo's
8 prompts with the feature cache cleared, then one new prompt (``gallbladder``) on the cached
features. Variants run in the same process, one after the other within each round, so that the
load of a shared machine falls on all of them alike; the ratio to the baseline is taken per round.

Variants (``--variants``; the first is the baseline every other one is compared with), each
optionally with ``@N`` for N torch threads instead of ``--threads`` (``sdpa-bf16@1``):

* ``monai-fp32``: MONAI's window attention, float32 (the CPU engine before this benchmark existed);
* ``sdpa-fp32``: window attention through ``scaled_dot_product_attention`` (the default now), float32;
* ``sdpa-bf16``: the same under CPU bfloat16 autocast (``Segmenter(precision="bf16")``; the
  default on CPUs with native bfloat16);
* ``sdpa-int8``: float32 with the Swin transformer's ``nn.Linear`` layers dynamically quantised to
  int8 (``torch.ao.quantization.quantize_dynamic``): an experiment, not in the engine;
* ``sdpa-coarse``: float32, router, fusion and heads at the router's resolution (half the window),
  each prompt's logits upsampled once per window: an experiment without retraining, not in the engine.

Accuracy: per-structure Dice of each variant's masks against the baseline's, for every structure
that either found; a path is acceptable when every such Dice is >= 0.99.

``--omp-compare`` instead runs the one-window timing (``sdpa-fp32`` on 2 threads and on 1) in child
processes with OpenMP's default and with passive waiting (``OMP_WAIT_POLICY=PASSIVE``, which the
Slicer worker now gets), alternately, optionally beside a busy neighbour process
(``--busy-neighbour``: one Python loop, to stand for the application or another job on the cores).

``--breakdown`` also times, for the default engine, where the sliding window spends its time:
``model.encode`` (backbone and expert projections), ``model.decode`` (router and heads) and the rest
(MONAI's window cutting and Gaussian blending).

    python benchmarks/bench_cpu.py --threads 2 --rounds 3 --breakdown --out benchmarks/results/cpu_demo.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from MoMESegmentationLib.cli import DEMO_PROMPTS  # noqa: E402
from MoMESegmentationLib.data.sample import load_sample_ct  # noqa: E402
from MoMESegmentationLib.engine import Segmenter, cpu_has_native_bf16  # noqa: E402
from MoMESegmentationLib.evaluation import dice  # noqa: E402
from MoMESegmentationLib.model.swin_attention import use_sdpa_attention  # noqa: E402

NEW_PROMPT = "gallbladder"
VARIANTS = ("monai-fp32", "sdpa-fp32", "sdpa-bf16", "sdpa-int8", "sdpa-coarse")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def coarse_decode(model):
    """``model.decode`` with the router, fusion and heads at the routing resolution, logits upsampled."""
    from MoMESegmentationLib.model.router import resize

    def decode(features, prompt_embeddings, return_aux=False):
        cfg = model.config
        text = model._prompt_batch(prompt_embeddings, features.batch_size)
        dtype = model.text_to_vision.weight.dtype
        features = features.to(dtype=dtype) if features.dtype != dtype else features
        b, k = text.shape[:2]
        size = features.spatial_size
        route = tuple(s // 2**cfg.router_scale for s in size)
        text = torch.relu(model.text_to_vision(text.to(dtype)))
        condition = torch.cat([features.global_feature.unsqueeze(1).expand(b, k, -1), text], dim=-1)
        params = model.head.parameters_for(condition)
        descriptors = model.router.descriptors(features.experts, route)
        head_inputs = [resize(model.head_projection(x), route) for x in features.experts]
        gates, _, _ = model.router(descriptors, text, route)
        logits = model.head(model._fuse(gates, head_inputs), params)  # [B, K, *route]
        return resize(logits.reshape(b * k, 1, *route), size).reshape(b, k, *size)

    return decode


def parse_variant(name: str, threads: int) -> tuple[str, int]:
    base, _, count = name.partition("@")
    if base not in VARIANTS:
        raise SystemExit(f"unknown variant {base!r}; choose from {', '.join(VARIANTS)} (optionally @threads)")
    return base, int(count) if count else threads


def make_segmenter(variant: str) -> Segmenter:
    attention, _, precision = variant.partition("-")
    segmenter = Segmenter("demo", device="cpu", precision="bf16" if precision == "bf16" else "fp32")
    use_sdpa_attention(segmenter.model, attention == "sdpa")
    if precision == "int8":
        torch.ao.quantization.quantize_dynamic(segmenter.model.backbone.swinViT, {torch.nn.Linear},
                                               dtype=torch.qint8, inplace=True)
    elif precision == "coarse":
        segmenter.model.decode = coarse_decode(segmenter.model)
    return segmenter


class StageTimer:
    """Wrap ``model.encode`` / ``model.decode`` of a segmenter to add up their time."""

    def __init__(self, model) -> None:
        self.seconds = {"encode": 0.0, "decode": 0.0}
        self.calls = {"encode": 0, "decode": 0}
        for name in self.seconds:
            setattr(model, name, self._wrap(name, getattr(model, name)))

    def _wrap(self, name, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1
        return timed

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)
        self.calls = dict.fromkeys(self.calls, 0)


def run_once(segmenter: Segmenter, volume, timer: StageTimer | None = None) -> dict:
    segmenter.clear_cache()
    if timer:
        timer.reset()
    start = time.perf_counter()
    result = segmenter.segment(volume, DEMO_PROMPTS)
    full = time.perf_counter() - start
    record = {"full_s": full, "timings": {k: round(v, 3) for k, v in result.timings.items()},
              "masks": {s.id: m for s, m in zip(result.structures, result.masks)},
              "found": {s.id: bool(s.found) for s in result.structures}}
    if timer:
        record["stages"] = {"encode_s": round(timer.seconds["encode"], 3), "decode_s": round(timer.seconds["decode"], 3),
                            "windows": timer.calls["encode"],
                            "blending_and_rest_s": round(result.timings["inference"] - sum(timer.seconds.values()), 3)}
    start = time.perf_counter()
    extra = segmenter.segment(volume, NEW_PROMPT)
    record["new_prompt_s"] = time.perf_counter() - start
    record["new_prompt_reused_windows"] = extra.feature_windows.get("reused")
    record["new_prompt_timings"] = {k: round(v, 3) for k, v in extra.timings.items()}
    record["new_prompt_mask"] = extra.masks[0]
    record["feature_cache_mib"] = round(segmenter.feature_cache.nbytes / 2**20, 1)
    return record


def window_times(segmenters: dict, plans: dict, volume, reps: int) -> dict:
    """Encode, decode (8 prompts) and decode (1 prompt) of the first 96^3 window of the scan, variants
    interleaved, ``reps`` times.

    Minimum and median seconds per variant: on a shared machine the minimum is the least disturbed.
    """
    first = next(iter(segmenters.values()))
    prep = first.preprocess(volume)
    window = prep.image[..., :96, :96, :96].contiguous()
    embeddings = torch.stack([p.embedding for p in first.plan_prompts(DEMO_PROMPTS)])
    samples = {v: {"encode": [], "decode": [], "decode_1_prompt": []} for v in segmenters}
    with torch.inference_mode():
        for _ in range(reps + 1):  # the first pass warms up and is not kept
            for variant, segmenter in segmenters.items():
                torch.set_num_threads(plans[variant][1])
                model = segmenter.model
                with segmenter._autocast():
                    start = time.perf_counter()
                    features = model.encode(window)
                    middle = time.perf_counter()
                    model.decode(features, embeddings)
                    end = time.perf_counter()
                    model.decode(features, embeddings[:1])
                    one = time.perf_counter() - end
                samples[variant]["encode"].append(middle - start)
                samples[variant]["decode"].append(end - middle)
                samples[variant]["decode_1_prompt"].append(one)
    out = {}
    for variant, times in samples.items():
        out[variant] = {f"{stage}_{stat}_s": round(fn(values[1:]), 3) for stage, values in times.items()
                        for stat, fn in (("min", min), ("median", statistics.median))}
    return out


def omp_compare(args) -> dict:
    """Child processes with and without OMP_WAIT_POLICY=PASSIVE, alternately (see the module docstring)."""
    import subprocess
    import tempfile

    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy_neighbour else None
    runs = []
    try:
        with tempfile.TemporaryDirectory() as folder:
            for index in range(max(args.rounds, 1)):
                for policy in ("default", "PASSIVE"):
                    env = dict(os.environ)
                    env.pop("OMP_WAIT_POLICY", None)
                    if policy == "PASSIVE":
                        env["OMP_WAIT_POLICY"] = "PASSIVE"
                    out = Path(folder) / f"{index}-{policy}.json"
                    subprocess.run([sys.executable, __file__, "--rounds", "0", "--window-reps", str(args.window_reps or 3),
                                    "--variants", "sdpa-fp32", "sdpa-fp32@1", "--out", str(out)],
                                   env=env, check=True, capture_output=True)
                    window = json.loads(out.read_text())["one_window"]
                    runs.append({"policy": policy, "load_average": round(os.getloadavg()[0], 2), **{
                        v: {"encode_min_s": t["encode_min_s"], "decode_min_s": t["decode_min_s"]}
                        for v, t in window.items()}})
                    print(json.dumps(runs[-1]), flush=True)
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
    return {"busy_neighbour": bool(args.busy_neighbour), "runs": runs}


def agreement(record: dict, reference: dict) -> dict:
    out = {}
    for sid, mask in record["masks"].items():
        ref = reference["masks"][sid]
        if record["found"][sid] or reference["found"][sid]:
            out[sid] = round(dice(mask, ref), 4)
    if reference["new_prompt_mask"].any() or record["new_prompt_mask"].any():
        out[f"{NEW_PROMPT} (new prompt)"] = round(dice(record["new_prompt_mask"], reference["new_prompt_mask"]), 4)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for every variant")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds of all variants (0: only --window-reps); medians and minima are reported")
    parser.add_argument("--breakdown", action="store_true", help="also time encode / decode / blending")
    parser.add_argument("--min-dice", type=float, default=0.99)
    parser.add_argument("--omp-compare", action="store_true",
                        help="OpenMP default vs passive waiting, in child processes (one-window timing)")
    parser.add_argument("--busy-neighbour", action="store_true", help="with --omp-compare: one busy process beside")
    parser.add_argument("--window-reps", type=int, default=0,
                        help="also time encode/decode of one window this many times per variant, interleaved")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu_demo.json"))
    args = parser.parse_args()

    import monai

    case = load_sample_ct()
    results: dict = {
        "benchmark": "cpu inference paths on the bundled CT",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": cpu_name(), "cpu_count": os.cpu_count(), "threads": args.threads,
        "cpu_native_bf16": cpu_has_native_bf16(),
        "torch": torch.__version__, "monai": monai.__version__, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "load_average_before": [round(v, 2) for v in os.getloadavg()],
        "volume": {"name": case.image.name, "shape": list(case.image.shape),
                   "spacing_mm": [float(s) for s in case.image.spacing]},
        "prompts": DEMO_PROMPTS, "new_prompt": NEW_PROMPT, "min_dice": args.min_dice,
    }
    plans = {v: parse_variant(v, args.threads) for v in args.variants}
    if args.omp_compare:
        results["omp_wait_policy"] = omp_compare(args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        return 0
    segmenters = {v: make_segmenter(base) for v, (base, _) in plans.items()}
    results["variant_threads"] = {v: n for v, (_, n) in plans.items()}
    timers = {v: StageTimer(s.model) for v, s in segmenters.items()} if args.breakdown else {}
    baseline = args.variants[0]
    if args.window_reps:
        results["one_window"] = window_times(segmenters, plans, case.image, args.window_reps)
        print(json.dumps(results["one_window"], indent=1), flush=True)
    rounds: list[dict] = []
    for index in range(args.rounds):
        this = {}
        for variant, segmenter in segmenters.items():
            torch.set_num_threads(plans[variant][1])
            this[variant] = run_once(segmenter, case.image, timers.get(variant))
            print(f"round {index + 1} {variant}: segment {this[variant]['full_s']:.1f} s, "
                  f"new prompt {this[variant]['new_prompt_s']:.2f} s", flush=True)
        rounds.append(this)
    results["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    summary = {}
    for variant in args.variants if rounds else ():
        runs = [r[variant] for r in rounds]
        entry = {
            "segment_s": [round(r["full_s"], 2) for r in runs],
            "segment_median_s": round(statistics.median(r["full_s"] for r in runs), 2),
            "segment_min_s": round(min(r["full_s"] for r in runs), 2),
            "new_prompt_s": [round(r["new_prompt_s"], 3) for r in runs],
            "new_prompt_median_s": round(statistics.median(r["new_prompt_s"] for r in runs), 3),
            "new_prompt_min_s": round(min(r["new_prompt_s"] for r in runs), 3),
            "new_prompt_reused_windows": runs[-1]["new_prompt_reused_windows"],
            "feature_cache_mib": runs[-1]["feature_cache_mib"],
            "timings_last_round": runs[-1]["timings"],
            "new_prompt_timings_last_round": runs[-1]["new_prompt_timings"],
        }
        if "stages" in runs[-1]:
            entry["stages_last_round"] = runs[-1]["stages"]
        if variant != baseline:
            entry["speedup_segment"] = round(statistics.median(
                r[baseline]["full_s"] / r[variant]["full_s"] for r in rounds), 3)
            entry["speedup_new_prompt"] = round(statistics.median(
                r[baseline]["new_prompt_s"] / r[variant]["new_prompt_s"] for r in rounds), 3)
            entry["dice_vs_baseline"] = agreement(runs[-1], rounds[-1][baseline])
            worst = min(entry["dice_vs_baseline"].values(), default=1.0)
            entry["min_dice_vs_baseline"] = worst
            entry["accurate"] = bool(worst >= args.min_dice)
        summary[variant] = entry
    results["baseline"] = baseline
    results["variants"] = summary
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
