"""Parameter count and forward time of MoME per patch, for several SwinUNETR feature sizes.

Times ``encode`` (prompt-free, once per sliding window), ``decode`` with ``K`` prompts, and the
whole forward pass, each as the mean of ``--repeats`` runs after ``--warmup`` runs, under
``torch.inference_mode``. Results are printed and written as JSON.

Examples::

    python benchmarks/bench_model.py --sizes 12 --repeats 1                 # quick CPU check
    python benchmarks/bench_model.py --device cuda --amp bf16 --prompts 40  # GPU, bfloat16 autocast
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from MoMESegmentationLib.model import create_model  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, warmup: int, repeats: int) -> tuple[float, float]:
    """Mean and standard deviation of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - start)
    return statistics.fmean(samples), (statistics.stdev(samples) if len(samples) > 1 else 0.0)


def _train_step(model, image: torch.Tensor, embeddings: torch.Tensor, autocast) -> None:
    model.zero_grad(set_to_none=True)
    with autocast:
        logits, aux = model(image, embeddings, return_aux=True)
        target = torch.zeros_like(logits)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), target) + aux.balance_loss
    loss.backward()


def bench_size(
    feature_size: int,
    patch: int,
    prompts: int,
    device: torch.device,
    amp: str | None,
    warmup: int,
    repeats: int,
    train: bool = False,
) -> dict:
    torch.manual_seed(0)
    model = create_model(f"mome-{feature_size}", patch_size=(patch,) * 3).to(device).eval()
    image = torch.rand(1, 1, patch, patch, patch, device=device)
    embeddings = torch.randn(prompts, model.config.text_dim, device=device)

    def autocast():
        if amp == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode(), autocast():
        features = model.encode(image)
        encode = _time(lambda: model.encode(image), device, warmup, repeats)
        decode = _time(lambda: model.decode(features, embeddings), device, warmup, repeats)
        total = _time(lambda: model(image, embeddings), device, warmup, repeats)
    peak_inference = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    result = {
        "model": f"mome-{feature_size}",
        "feature_size": feature_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "feature_cache_bytes_per_window": features.nbytes,
        "encode_s": encode[0],
        "encode_std_s": encode[1],
        "decode_s": decode[0],
        "decode_std_s": decode[1],
        "total_s": total[0],
        "total_std_s": total[1],
    }
    if peak_inference is not None:
        result["peak_inference_memory_bytes"] = peak_inference
    if train:
        model.train()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step = _time(lambda: _train_step(model, image, embeddings, autocast()), device, warmup, repeats)
        result["train_step_s"], result["train_step_std_s"] = step
        if device.type == "cuda":
            result["peak_train_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[12, 24, 48], help="SwinUNETR feature sizes")
    parser.add_argument("--patch", type=int, default=96, help="cubic patch edge (multiple of 32)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts K decoded per patch")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--amp", choices=["none", "bf16"], default="none", help="autocast precision")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (mean reported)")
    parser.add_argument("--train", action="store_true", help="also time a training step (forward + backward)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON output (default results/model_<device>.json)"
    )
    args = parser.parse_args(argv)

    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if args.device == "auto"
        else args.device
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    amp = None if args.amp == "none" else args.amp
    out = args.out or RESULTS_DIR / f"model_{device.type}.json"

    results = []
    print(
        f"device={device} amp={args.amp} patch={args.patch}^3 prompts={args.prompts} "
        f"warmup={args.warmup} repeats={args.repeats}"
    )
    print(
        f"{'model':>8} {'params':>12} {'encode s':>10} {'decode s':>10} {'total s':>10} {'cache MB':>9}"
        + (f" {'train s':>10}" if args.train else "")
    )
    for size in args.sizes:
        r = bench_size(size, args.patch, args.prompts, device, amp, args.warmup, args.repeats, args.train)
        results.append(r)
        print(
            f"{r['model']:>8} {r['parameters']:>12,} {r['encode_s']:>10.3f} {r['decode_s']:>10.3f} "
            f"{r['total_s']:>10.3f} {r['feature_cache_bytes_per_window'] / 2**20:>9.1f}"
            + (f" {r['train_step_s']:>10.3f}" if args.train else ""),
            flush=True,
        )

    report = {
        "benchmark": "model_forward",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "amp": args.amp,
        "patch": [args.patch] * 3,
        "prompts": args.prompts,
        "batch": 1,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "train": args.train,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
