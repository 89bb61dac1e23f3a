"""End-to-end segmentation latency and memory, against a plain MONAI SwinUNETR sliding window.

Measures, on whatever device is present (a CUDA GPU if there is one):

* ``segment``: the full :class:`~MoMESegmentationLib.engine.Segmenter` path on an in-memory
  abdominal-CT-sized volume (default 267 x 267 x 417 voxels at 1.5 mm, a procedural phantom),
  K prompts, after warm-up: preprocessing, sliding windows (encode + decode), back to the input grid;
* ``new_prompt``: one new prompt on the same volume, served from the cached image features;
* ``baseline``: MONAI's ``SwinUNETR`` (same feature size, patch, overlap and Gaussian blending) in a
  plain ``sliding_window_inference`` with half-precision autocast: the reference the ratio is taken to;
* peak GPU memory (``torch.cuda.max_memory_allocated``) of each and the process's peak RSS.

Weights are random (speed does not depend on them). Writes JSON (``--out``) and prints it.

    python benchmarks/bench_segment.py --feature-size 48 --prompts 32 --out benchmarks/results/segment_gpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from MoMESegmentationLib.io.volume import Volume  # noqa: E402


def synthetic_ct(shape: tuple[int, int, int], spacing: float, seed: int = 0, phantom: bool = False) -> Volume:
    """An abdominal-CT-sized volume: a procedural phantom, or (default, instant) an elliptic body in air."""
    if phantom:
        from MoMESegmentationLib.data.phantoms import make_phantom

        return make_phantom(seed, shape=shape, spacing=(spacing,) * 3, random_orientation=False,
                            max_voxels=int(np.prod(shape))).image
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij"))
    body = (grid[0] ** 2 + grid[1] ** 2) < 0.8
    array = np.where(body, 40.0, -1000.0) + np.random.default_rng(seed).normal(0, 20, shape)
    return Volume(array.astype(np.float32), spacing=(spacing,) * 3)


def timed(fn, device: torch.device, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 3) if device.type == "cuda" else None


def make_checkpoint(folder: Path, feature_size: int, patch: int, structures: list[str], spacing: float,
                    overlap: float, compile_model: bool) -> Path:
    from MoMESegmentationLib.checkpoint import save_checkpoint
    from MoMESegmentationLib.model import create_model

    model = create_model(f"mome-{feature_size}" if feature_size in (12, 24, 48) else "mome-12",
                         feature_size=feature_size, patch_size=(patch,) * 3)
    embeddings = torch.nn.functional.normalize(torch.randn(len(structures), model.config.text_dim), dim=-1)
    path = folder / "bench.safetensors"
    save_checkpoint(path, model, text_encoder={}, structures=structures, structure_embeddings=embeddings,
                    preprocessing={"orientation": "RAS", "spacing": [spacing] * 3, "intensity": {"window": [-175.0, 250.0], "range": [0.0, 1.0]},
                                   "patch_size": [patch] * 3, "overlap": overlap},
                    provenance={"purpose": "benchmark, random weights"}, metrics={})
    return path


def bench_baseline(volume: Volume, feature_size: int, patch: int, overlap: float, batch: int,
                   device: torch.device, repeats: int) -> dict:
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import SwinUNETR

    net = SwinUNETR(in_channels=1, out_channels=32, feature_size=feature_size, spatial_dims=3).to(device).eval()
    low, high = -175.0, 250.0
    image = torch.from_numpy(np.clip((volume.array - low) / (high - low), 0, 1).astype(np.float32))[None, None]
    image = image.to(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    @torch.inference_mode()
    def run():
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            return sliding_window_inference(image, (patch,) * 3, batch, net, overlap=overlap, mode="gaussian")

    run()
    reset_peak(device)
    times = timed(run, device, repeats)
    return {"seconds": times, "median_s": float(np.median(times)), "peak_gpu_gib": peak_gib(device),
            "sw_batch_size": batch}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--feature-size", type=int, default=48)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--shape", type=int, nargs=3, default=(267, 267, 417))
    parser.add_argument("--spacing", type=float, default=1.5)
    parser.add_argument("--patch", type=int, default=96)
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-batch", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--phantom", action="store_true", help="procedural phantom instead of an elliptic body")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/segment.json"))
    args = parser.parse_args()

    from MoMESegmentationLib.engine import Segmenter, resolve_device
    from MoMESegmentationLib.vocabulary import Vocabulary

    device = resolve_device(args.device)
    structures = [s for s in Vocabulary.load().ids][: max(args.prompts, 1) + 1]
    prompts, extra = structures[: args.prompts], structures[args.prompts]
    volume = synthetic_ct(tuple(args.shape), args.spacing, phantom=args.phantom)
    results: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "settings": {"feature_size": args.feature_size, "prompts": args.prompts, "shape": list(args.shape),
                     "spacing_mm": args.spacing, "patch": args.patch, "overlap": args.overlap,
                     "repeats": args.repeats, "weights": "random"},
    }
    try:
        import monai

        results["monai"] = monai.__version__
    except ImportError:
        pass
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = make_checkpoint(Path(folder), args.feature_size, args.patch, structures, args.spacing,
                                     args.overlap, False)
        segmenter = Segmenter(checkpoint, device=device)
        results["sw_batch_size"] = segmenter._choose_batch()
        segmenter.segment(volume, prompts)  # warm-up (cuDNN autotuning, allocator)

        stages: dict = {}

        def full():
            segmenter.clear_cache()
            stages.update(segmenter.segment(volume, prompts).timings)

        reset_peak(device)
        times = timed(full, device, args.repeats)
        results["segment"] = {"seconds": times, "median_s": float(np.median(times)), "peak_gpu_gib": peak_gib(device),
                              "stages_s_last_run": {k: round(v, 3) for k, v in stages.items()}}

        reset_peak(device)
        times = timed(lambda: segmenter.segment(volume, [extra]), device, args.repeats)
        results["new_prompt"] = {"seconds": times, "median_s": float(np.median(times)),
                                 "peak_gpu_gib": peak_gib(device),
                                 "feature_cache_gib": round(segmenter.feature_cache.nbytes / 2 ** 30, 3)}
        del segmenter
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not args.no_baseline:
        results["baseline_monai_swinunetr"] = bench_baseline(volume, args.feature_size, args.patch, args.overlap,
                                                             args.baseline_batch, device, args.repeats)
        results["ratio_segment_to_baseline"] = round(
            results["segment"]["median_s"] / results["baseline_monai_swinunetr"]["median_s"], 3)
    results["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
