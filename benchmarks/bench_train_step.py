"""Training throughput of MoME (optimizer steps per second) on one device, for cost estimates.

One step: forward of a batch of 96^3 patches with K prompts, BCE + Dice on random targets plus the
router's balancing loss, backward, gradient clipping and an AdamW update, in bf16 autocast on GPU.
Data loading is not included (the recipe's loaders run in parallel worker processes).

    python benchmarks/bench_train_step.py --feature-size 48 --batch 2 --prompts 8 --out benchmarks/results/train_step_gpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--feature-size", type=int, default=48)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--patch", type=int, default=96)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train_step.json"))
    args = parser.parse_args()

    from monai.losses import DiceLoss

    from MoMESegmentationLib.model import create_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = f"mome-{args.feature_size}" if args.feature_size in (12, 24, 48) else "mome-12"
    model = create_model(name, feature_size=args.feature_size, patch_size=(args.patch,) * 3,
                         use_checkpoint=args.checkpointing).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-5)
    dice = DiceLoss(sigmoid=True)
    bce = torch.nn.BCEWithLogitsLoss()
    image = torch.rand(args.batch, 1, *(args.patch,) * 3, device=device)
    target = (torch.rand(args.batch, args.prompts, *(args.patch,) * 3, device=device) > 0.9).float()
    prompts = torch.nn.functional.normalize(torch.randn(args.prompts, model.config.text_dim, device=device), dim=-1)
    dtype = torch.bfloat16

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            logits, aux = model(image, prompts, return_aux=True)
        logits = logits.float()
        loss = bce(logits, target) + dice(logits, target) + 0.01 * aux.balance_loss.float()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return float(loss.detach())

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "settings": vars(args) | {"out": str(args.out)},
        "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "seconds_per_step": round(seconds, 4), "steps_per_second": round(1 / seconds, 3),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if device.type == "cuda" else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
