"""The training loop: partial-label MoME training, single process or DDP (torchrun).

Run folder (``output.dir``)::

    config.json                  the resolved config
    log.jsonl                    one JSON object per logged step / validation
    curves.png                   loss and validation Dice curves
    checkpoints/step_0000200.safetensors (+ .json)   periodic checkpoints (library format)
    resume/state.safetensors + state.json            model, optimiser and step for --resume
    model.safetensors (+ .json)  the final weights

Reproducibility: model initialisation uses ``schedule.seed``; every training sample is keyed
by ``(step, rank, index)`` (see :mod:`.datasets`), and the torch generator is re-seeded from
``(seed, step, rank)`` before each step. The learning rate is a function of the step. A run
resumed from ``resume/`` therefore ends with the same weights as an uninterrupted run (bit for
bit on CPU); a resume state saved with another seed, world size or per-process batch size is
refused, since the run would then train on other samples from the resumed step on.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import MoMEError
from ..windows import pad_to_window, truncated_sides, valid_window_mask
from .config import TrainConfig, TransformConfig
from .datasets import (
    StepSampler,
    TrainingSamples,
    build_sources,
    build_validation_items,
    resolve_groups,
    sample_seed,
)
from .losses import PartialLabelLoss
from .prompts import PromptTable, load_or_compute_prompts

__all__ = [
    "Trainer",
    "TrainResult",
    "learning_rate",
    "load_backbone_weights",
    "discover_structures",
    "dry_run",
    "state_hash",
]

logger = logging.getLogger(__name__)

RESUME_DIR = "resume"
RESUME_TENSORS = "state.safetensors"
RESUME_JSON = "state.json"
LOG_FILE = "log.jsonl"
PLOT_FILE = "curves.png"
FINAL_CHECKPOINT = "model.safetensors"


def learning_rate(step: int, base_lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up over ``warmup_steps`` then cosine decay to ``base_lr * min_lr_ratio`` at ``max_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    floor = base_lr * min_lr_ratio
    return floor + 0.5 * (base_lr - floor) * (1.0 + math.cos(math.pi * progress))


def load_backbone_weights(model: torch.nn.Module, path: str | os.PathLike) -> Any:
    """Load MONAI SwinUNETR weights (e.g. self-supervised pre-training) into the backbone.

    Delegates to :func:`MoMESegmentationLib.importers.monai_swin.load_backbone_weights`, which
    maps MONAI checkpoint keys onto the backbone and returns a report of loaded/skipped keys.
    """
    try:
        from ..importers.monai_swin import load_backbone_weights as _load
    except ImportError as exc:
        raise MoMEError(f"{path}: loading MONAI SwinUNETR backbone weights is not supported yet ({exc})") from exc
    return _load(model, path)


def state_hash(model: torch.nn.Module) -> str:
    """SHA-256 over the model's state dict (names, dtypes and bytes); equal iff weights are equal."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def preprocessing_changes(trained: dict, transforms: TransformConfig) -> list[str]:
    """How a config's preprocessing differs from a checkpoint's, one sentence each.

    The global image feature that conditions every head is pooled over the whole window, so a
    model trained on 96^3 windows scores far lower on 64^3 windows (demo weights: held-out Dice
    0.77 -> 0.20 on a phantom); spacing and HU window change what each voxel means.
    """
    changes = []
    checks = (("patch size", trained.get("patch_size"), transforms.patch_size),
              ("spacing", trained.get("spacing"), transforms.spacing),
              ("HU window", (trained.get("intensity") or {}).get("window"), transforms.window))
    for what, old, new in checks:
        if old is not None and [float(v) for v in old] != [float(v) for v in new]:
            changes.append(f"trained with {what} {list(old)}, this config uses {list(new)}: expect lower Dice "
                           "(until fine-tuning re-adapts the model)")
    return changes


def discover_structures(config: TrainConfig) -> list[str]:
    """The prompted structures: ``data.structures``, or every structure the datasets annotate."""
    if config.data.structures:
        return list(dict.fromkeys(config.data.structures))
    from .adapters import load_table
    from .datasets import manifest_records

    found: dict[str, None] = {}
    for spec in config.data.datasets:
        if spec.kind == "phantoms":
            from ..data.phantoms import make_phantom

            names = make_phantom(spec.seed).label_table.values()
        elif spec.kind == "sample_ct":
            from ..data.sample import sample_label_table

            names = sample_label_table().values()
        elif spec.kind == "synth":
            from .datasets import synth_label_names

            names = sorted(synth_label_names(spec))
        elif spec.kind == "adapter":
            names = load_table(spec.adapter or "", spec.version).labels.structures()
        else:
            names = [n for record, _ in manifest_records(spec) for n in record.table.structures()]
        found.update(dict.fromkeys(str(n) for n in names))
    return list(found)


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns."""

    output_dir: Path
    steps: int
    checkpoint: Path | None
    val_dice: dict[str, float] = field(default_factory=dict)
    val_mean_dice: float | None = None
    history: list[dict] = field(default_factory=list)


def _distributed_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` as set by torchrun (1 process when unset)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


class Trainer:
    """Train (or fine-tune) a MoME network from a :class:`TrainConfig`.

    Args:
        config: the training config.
        output_dir: run folder (default ``config.output.dir``).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (under torchrun each process
            uses ``cuda:LOCAL_RANK``).
        stop_step: stop after this many steps (the schedule still follows ``schedule.max_steps``).
        resume: continue from ``output_dir/resume`` when present.
        init_backbone: MONAI SwinUNETR weights for the backbone (overrides ``init.backbone``).
    """

    def __init__(self, config: TrainConfig, output_dir: str | os.PathLike | None = None, device: str = "auto",
                 stop_step: int | None = None, resume: bool = False, init_backbone: str | None = None) -> None:
        if stop_step is not None and stop_step < 0:
            raise ValueError(f"stop_step must be >= 0, got {stop_step}")
        self.config = config
        self.output_dir = Path(output_dir or config.output.dir)
        self.stop_step = min(stop_step, config.schedule.max_steps) if stop_step is not None else config.schedule.max_steps
        self.resume = resume
        self.init_backbone = init_backbone or config.init.backbone
        self.rank, self.world_size, self.local_rank = _distributed_env()
        self.device = self._pick_device(device)
        if config.schedule.deterministic and self.device.type == "cpu":
            # Multi-threaded CPU index_put (Swin relative-position bias gradients) accumulates in a
            # varying order; the deterministic kernels make resumed runs bit-identical.
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.distributed = self.world_size > 1
        if self.distributed and not torch.distributed.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend=backend, init_method="env://")
        self.is_main = self.rank == 0

    # -------------------------------------------------------------------- setup
    def _pick_device(self, device: str) -> torch.device:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and self.world_size > 1:
            device = f"cuda:{self.local_rank}"
        dev = torch.device(device)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise MoMEError(f"device {device}: CUDA is not available on this machine")
            if dev.index is None:
                dev = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(dev)
        return dev

    def _build_model(self, structures: list[str]) -> tuple[torch.nn.Module, dict]:
        from ..model import create_model

        cfg = self.config
        torch.manual_seed(cfg.schedule.seed)
        info: dict[str, Any] = {}
        if cfg.init.checkpoint:
            from ..checkpoint import load_checkpoint

            loaded = load_checkpoint(cfg.init.checkpoint, device="cpu")
            model = loaded.model
            model.config.use_checkpoint = bool(cfg.optim.activation_checkpointing or model.config.use_checkpoint)
            old = list(loaded.meta.get("structures", []))
            info = {"init_checkpoint": str(cfg.init.checkpoint), "previous_structures": old,
                    "new_structures": [s for s in structures if s not in old]}
            dropped = [s for s in old if s not in structures]
            if dropped:
                logger.warning("fine-tuning without replaying %s: these structures may be forgotten", dropped)
            for warning in preprocessing_changes(loaded.meta.get("preprocessing") or {}, cfg.transforms):
                logger.warning("%s: %s", cfg.init.checkpoint, warning)
        else:
            overrides = dict(cfg.model.overrides)
            overrides.setdefault("patch_size", tuple(cfg.transforms.patch_size))
            if cfg.optim.activation_checkpointing:
                overrides["use_checkpoint"] = True
            try:
                model = create_model(cfg.model.variant, **overrides)
            except ValueError as exc:
                raise MoMEError(f"{cfg.source or 'config'}: model: {exc}") from exc
        if self.init_backbone:
            info["backbone_init"] = str(load_backbone_weights(model, self.init_backbone))
        return model.to(self.device), info

    def _optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        cfg = self.config.optim
        decay, no_decay = [], []
        for _, param in model.named_parameters():
            if param.requires_grad:
                (no_decay if param.ndim <= 1 else decay).append(param)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))

    # -------------------------------------------------------------------- resume state
    def _save_resume(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, extra: dict) -> None:
        from safetensors.torch import save_file

        folder = self.output_dir / RESUME_DIR
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        state = optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for index, values in state["state"].items():
            for name, value in values.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.{index}.{name}"] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(index), {})[name] = value
        meta = {"step": step, "param_groups": state["param_groups"], "optim_scalars": scalars,
                "world_size": self.world_size, "batch_size": self.config.schedule.batch_size,
                "seed": self.config.schedule.seed, **extra}
        tmp = folder / (RESUME_TENSORS + ".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(folder / RESUME_TENSORS)
        (folder / (RESUME_JSON + ".tmp")).write_text(json.dumps(meta, indent=1, default=str))
        (folder / (RESUME_JSON + ".tmp")).replace(folder / RESUME_JSON)

    def _check_resume(self) -> None:
        """Refuse a resume state that this run would not continue but silently fork.

        Every sample is keyed by ``(seed, step, rank)`` and each step draws ``world_size x batch_size``
        of them, so another seed, world size or per-process batch trains on other data (and another
        global batch) from the resumed step on. States written before these fields were saved are
        not checked.
        """
        path = self.output_dir / RESUME_DIR / RESUME_JSON
        if not path.is_file():
            return
        meta = json.loads(path.read_text())
        seed = self.config.schedule.seed
        if "seed" in meta and int(meta["seed"]) != seed:
            raise MoMEError(
                f"{path}: saved by a run with schedule.seed {meta['seed']}, this config has schedule.seed {seed}; "
                f"resuming would continue that run on another seed's data. Resume with schedule.seed {meta['seed']}, "
                "or train into a new output folder"
            )
        saved = (int(meta.get("world_size", 1)), int(meta.get("batch_size", self.config.schedule.batch_size)))
        now = (self.world_size, self.config.schedule.batch_size)
        if saved != now:
            raise MoMEError(
                f"{path}: saved by a run with world size {saved[0]} x batch {saved[1]} per process, this run has "
                f"world size {now[0]} x batch {now[1]}; the global batch and the samples of every further step "
                f"would change. Resume with {saved[0]} process(es) (torchrun --nproc_per_node {saved[0]}) and "
                f"schedule.batch_size {saved[1]}, or start a new run from its weights with init.checkpoint"
            )

    def _load_resume(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
        from safetensors.torch import load_file

        folder = self.output_dir / RESUME_DIR
        if not (folder / RESUME_JSON).is_file():
            return None
        meta = json.loads((folder / RESUME_JSON).read_text())
        tensors = load_file(str(folder / RESUME_TENSORS))
        model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        model.load_state_dict(model_state, strict=True)
        optim_state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                optim_state.setdefault(int(index), {})[name] = value
        for index, values in meta.get("optim_scalars", {}).items():
            optim_state.setdefault(int(index), {}).update(values)
        optimizer.load_state_dict({"state": optim_state, "param_groups": meta["param_groups"]})
        return meta

    # -------------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, path: Path, model: torch.nn.Module, prompts: PromptTable, structures: list[str],
                         step: int, metrics: dict, info: dict, half: bool = False) -> Path:
        from ..checkpoint import save_checkpoint

        cfg = self.config
        text_encoder = None
        if prompts.encoder:
            text_encoder = {"name": prompts.encoder, "pooling": prompts.pooling, "template": prompts.template,
                            "dim": int(prompts.embeddings.shape[1])}
        preprocessing = {
            "orientation": "RAS",
            "spacing": [float(s) for s in cfg.transforms.spacing],
            "intensity": {"window": [float(w) for w in cfg.transforms.window], "range": [0.0, 1.0], "clip": True},
            "patch_size": [int(s) for s in cfg.transforms.patch_size],
            # How windows were padded in training; the engine pads short scans the same way.
            "padding": {"mode": cfg.transforms.pad_mode, "mask_valid": True},
        }
        provenance = {
            "trained_with": "mome train",
            "config": cfg.source,
            "recipe": cfg.to_dict(),
            "datasets": [{"name": d.name, "kind": d.kind, "adapter": d.adapter} for d in cfg.data.datasets],
            "steps": step,
            "world_size": self.world_size,
            **info,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(path, model, text_encoder=text_encoder, structures=structures,
                        structure_embeddings=prompts.canonical(structures), preprocessing=preprocessing,
                        provenance=provenance, metrics=metrics, half=half)
        return path

    def _prune_checkpoints(self) -> None:
        keep = max(0, self.config.output.keep_checkpoints)
        files = sorted((self.output_dir / "checkpoints").glob("step_*.safetensors"))
        for old in files[: max(0, len(files) - keep)]:
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)

    # -------------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self, model: torch.nn.Module, items: list[dict], prompts: PromptTable) -> dict[str, Any]:
        """Per-structure Dice on whole held-out volumes (MONAI sliding-window inference + DiceMetric)."""
        from monai.inferers import sliding_window_inference
        from monai.metrics import DiceMetric

        cfg = self.config
        was_training = model.training
        model.eval()
        scores: dict[str, list[float]] = {}
        metric = DiceMetric(include_background=True, reduction="none", ignore_empty=True)
        amp = cfg.optim.amp and self.device.type == "cuda"
        for item in items:
            names = [n for n in item["structure_values"] if n in self._rows]
            if not names:
                continue
            embeddings = prompts.canonical(names).to(self.device)
            # A case smaller than a patch is padded as the engine pads a short scan, with the same valid mask.
            array = np.asarray(item["image"])[0]
            patch = tuple(cfg.transforms.patch_size)
            padded, padding = pad_to_window(array, patch, truncated_sides(array > 0), cfg.transforms.pad_mode)
            inside = tuple(slice(b, n - a) for (b, a), n in zip(padding, padded.shape))
            image = torch.as_tensor(np.ascontiguousarray(padded), dtype=torch.float32)[None, None].to(self.device)
            label = np.asarray(item["label"])[0]

            def predictor(x, coords, embeddings=embeddings, inside=inside):
                return model(x, embeddings, valid=valid_window_mask(coords, inside, x.device))

            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
                logits = sliding_window_inference(
                    image, roi_size=patch, sw_batch_size=cfg.data.validation.sw_batch_size,
                    predictor=predictor, overlap=cfg.data.validation.overlap, mode="gaussian", with_coord=True,
                )[(slice(None), slice(None), *inside)]
            pred = (logits.float() > 0).cpu()
            target = torch.from_numpy(np.stack([np.isin(label, item["structure_values"][n]) for n in names]))[None]
            dice = metric(pred, target)[0]
            for name, value in zip(names, dice.tolist()):
                if not math.isnan(value):
                    scores.setdefault(name, []).append(value)
        model.train(was_training)
        per_structure = {name: float(np.mean(v)) for name, v in sorted(scores.items())}
        mean = float(np.mean(list(per_structure.values()))) if per_structure else None
        return {"val_dice": per_structure, "val_mean_dice": mean}

    # -------------------------------------------------------------------- logging
    def _log(self, record: dict) -> None:
        if not self.is_main:
            return
        with open(self.output_dir / LOG_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def _plot(self, history: list[dict]) -> None:
        if not (self.is_main and self.config.logging.plot):
            return
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            logger.info("matplotlib missing: no training-curve plot")
            return
        train = [r for r in history if "loss" in r]
        val = [r for r in history if r.get("val_mean_dice") is not None]
        fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 4))
        if train:
            ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="loss")
            ax_loss.plot([r["step"] for r in train], [r["dice"] for r in train], label="dice loss", alpha=0.7)
            ax_loss.plot([r["step"] for r in train], [r["bce"] for r in train], label="bce", alpha=0.7)
        ax_loss.set_xlabel("step")
        ax_loss.set_title("training loss")
        if train:
            ax_loss.legend()
        if val:
            steps = [r["step"] for r in val]
            ax_dice.plot(steps, [r["val_mean_dice"] for r in val], "k-o", label="mean")
            for name in sorted({n for r in val for n in r["val_dice"]}):
                ax_dice.plot(steps, [r["val_dice"].get(name, np.nan) for r in val], ".-", alpha=0.6, label=name)
            ax_dice.legend(fontsize=6, ncol=2)
        ax_dice.set_ylim(0, 1)
        ax_dice.set_xlabel("step")
        ax_dice.set_title("validation Dice")
        fig.tight_layout()
        fig.savefig(self.output_dir / PLOT_FILE, dpi=100)
        plt.close(fig)

    def _read_history(self, upto_step: int) -> list[dict]:
        path = self.output_dir / LOG_FILE
        if not path.is_file():
            return []
        history = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        history = [r for r in history if r.get("step", 0) <= upto_step]
        if self.is_main:
            path.write_text("".join(json.dumps(r) + "\n" for r in history), encoding="utf-8")
        return history

    # -------------------------------------------------------------------- loop
    def fit(self) -> TrainResult:
        """Train until ``stop_step``; return the final checkpoint and validation Dice."""
        cfg = self.config
        if self.resume:
            self._check_resume()  # before anything in the run folder changes
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1, default=str))
        structures = discover_structures(cfg)
        prompts = self._prompts(structures)
        self._rows = prompts.rows_for(structures)
        model, info = self._build_model(structures)
        if model.config.text_dim != prompts.embeddings.shape[1]:
            raise MoMEError(
                f"{cfg.text.embeddings_cache}: embeddings are {prompts.embeddings.shape[1]}-d, "
                f"the model expects {model.config.text_dim}"
            )
        optimizer = self._optimizer(model)
        start = 0
        history: list[dict] = []
        best: float | None = None
        if self.resume:
            meta = self._load_resume(model, optimizer)
            if meta is None:
                logger.warning("%s: nothing to resume; starting from step 0", self.output_dir / RESUME_DIR)
            else:
                start = int(meta["step"])
                best = meta.get("best_val")
                history = self._read_history(start)
        elif self.is_main and (self.output_dir / LOG_FILE).exists():
            (self.output_dir / LOG_FILE).unlink()

        source_set = build_sources(cfg, structures)
        val_items = build_validation_items(cfg, structures, source_set.held_out) if self.is_main else []
        samples = TrainingSamples(source_set.sources, self._rows, cfg.transforms, cfg.data.prompts_per_sample,
                                  cfg.data.positive_fraction, cfg.schedule.seed)
        loader = torch.utils.data.DataLoader(
            samples, batch_size=cfg.schedule.batch_size,
            sampler=StepSampler(start, self.stop_step, cfg.schedule.batch_size, self.rank, self.world_size),
            num_workers=cfg.data.num_workers, pin_memory=self.device.type == "cuda",
            persistent_workers=False, prefetch_factor=4 if cfg.data.num_workers > 0 else None,
        )
        train_model: torch.nn.Module = model
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            train_model = DistributedDataParallel(model, device_ids=ids)
        criterion = PartialLabelLoss(cfg.optim.bce_weight, cfg.optim.dice_weight, cfg.optim.balance_weight)
        table = prompts.embeddings.to(self.device)
        amp = cfg.optim.amp and self.device.type == "cuda"

        progress = None
        if self.is_main and cfg.logging.progress and self.stop_step > start:
            from tqdm.auto import tqdm

            progress = tqdm(total=self.stop_step - start, initial=0, desc="mome train", unit="step", dynamic_ncols=True)
        model.train()
        last_val: dict[str, Any] = {}
        step = start
        tic = time.perf_counter()
        running: list[dict[str, float]] = []
        for batch in loader:
            lr = learning_rate(step, cfg.optim.lr, cfg.schedule.warmup_steps, cfg.schedule.max_steps,
                               cfg.schedule.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            torch.manual_seed(sample_seed(cfg.schedule.seed, step, 3 + self.rank))
            image = batch["image"].to(self.device, non_blocking=True)
            target = batch["target"].to(self.device, non_blocking=True)
            weight = batch["prompt_weight"].to(self.device, non_blocking=True)
            embeddings = table[batch["prompt_rows"].to(self.device)]  # [B, K, T]
            valid = batch["valid"].to(self.device, non_blocking=True)  # [B, 1, D, H, W], false in padding
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
                logits, aux = train_model(image, embeddings, return_aux=True, valid=valid)
            terms = criterion(logits, target, weight, aux.balance_loss)
            optimizer.zero_grad(set_to_none=True)
            terms.total.backward()
            if cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            step += 1
            running.append(terms.as_floats())
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{running[-1]['loss']:.3f}", lr=f"{lr:.2e}")
            if step % max(1, cfg.logging.log_every) == 0 or step == self.stop_step:
                means = {k: float(np.mean([r[k] for r in running])) for k in running[0]}
                elapsed = time.perf_counter() - tic
                record = {"step": step, **means, "lr": lr, "seconds": round(elapsed, 3)}
                history.append(record)
                self._log(record)
                running = []
            validate_now = (cfg.schedule.val_every > 0 and step % cfg.schedule.val_every == 0) or step == self.stop_step
            if validate_now:
                if self.is_main and val_items:
                    last_val = self.validate(model, val_items, prompts)
                    record = {"step": step, **last_val}
                    history.append(record)
                    self._log(record)
                    if last_val["val_mean_dice"] is not None:
                        best = max(best or 0.0, last_val["val_mean_dice"])
                    self._plot(history)
                self._barrier()
            if (cfg.schedule.checkpoint_every > 0 and step % cfg.schedule.checkpoint_every == 0) or step == self.stop_step:
                if self.is_main:
                    self._save_checkpoint(self.output_dir / "checkpoints" / f"step_{step:07d}.safetensors", model,
                                          prompts, structures, step, last_val, info)
                    self._prune_checkpoints()
                    self._save_resume(model, optimizer, step, {"best_val": best, "structures": structures})
                self._barrier()
        if progress is not None:
            progress.close()

        final = None
        if self.is_main:
            if not last_val and val_items:
                last_val = self.validate(model, val_items, prompts)
                history.append({"step": step, **last_val})
                self._log(history[-1])
            final = self._save_checkpoint(self.output_dir / FINAL_CHECKPOINT, model, prompts, structures, step,
                                          last_val, info, half=cfg.output.half)
            if step > start and not (self.output_dir / RESUME_DIR / RESUME_JSON).exists():
                self._save_resume(model, optimizer, step, {"best_val": best, "structures": structures})
            self._plot(history)
        self._barrier()
        self.model = model
        return TrainResult(self.output_dir, step, final, last_val.get("val_dice", {}), last_val.get("val_mean_dice"),
                           history)

    def evaluate(self, checkpoint: str | os.PathLike) -> dict[str, Any]:
        """Score a checkpoint on this config's held-out data, exactly as validation during training does.

        Structures are the config's ones that the checkpoint knows. Writes ``validation.json`` in the
        run folder and returns ``{"checkpoint", "structures", "val_dice", "val_mean_dice", ...}``.
        """
        from ..checkpoint import load_checkpoint

        cfg = self.config
        loaded = load_checkpoint(checkpoint, device="cpu")
        known = set(loaded.meta.get("structures") or [])
        structures = [s for s in discover_structures(cfg) if s in known]
        if not structures:
            raise MoMEError(f"{checkpoint}: knows none of the structures of {cfg.source or 'the config'}")
        for warning in preprocessing_changes(loaded.meta.get("preprocessing") or {}, cfg.transforms):
            logger.warning("%s: %s", checkpoint, warning)
        prompts = self._prompts(structures)
        self._rows = prompts.rows_for(structures)
        model = loaded.model.float().to(self.device)
        source_set = build_sources(cfg, structures, load=False)
        items = build_validation_items(cfg, structures, source_set.held_out)
        if not items:
            raise MoMEError(f"{cfg.source or 'config'}: no held-out data (data.validation)")
        result = {"checkpoint": str(checkpoint), "config": cfg.source, "structures": structures,
                  "held_out_cases": [str(item.get("case_id", "")) for item in items],
                  **self.validate(model, items, prompts)}
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "validation.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        return result

    def _prompts(self, structures: list[str]) -> PromptTable:
        # Only rank 0 may write the cache; the others wait and read it.
        if self.is_main:
            table = load_or_compute_prompts(self.config.text, structures)
        self._barrier()
        if not self.is_main:
            table = load_or_compute_prompts(self.config.text, structures, write=False)
        return table

    def _barrier(self) -> None:
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def close(self) -> None:
        """Tear down the process group this trainer started."""
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def dry_run(config: TrainConfig) -> str:
    """Check dataset folders and return a table: scans per dataset and the structures each labels."""
    structures = discover_structures(config)
    source_set = build_sources(config, structures, load=False)
    groups = resolve_groups(config, structures)
    rows = [("dataset", "kind", "train", "held out", "structures labelled")]
    for spec in config.data.datasets:
        if spec.kind == "phantoms":
            from ..data.phantoms import make_phantom

            names = set(make_phantom(spec.seed).label_table.values())
            labelled = [s for s in structures if s in names or
                        (s in groups and all(m in names for m in groups[s]))]
            rows.append((spec.name, "phantoms", str(spec.n), str(config.data.validation.phantoms), ", ".join(labelled)))
        elif spec.kind == "sample_ct":
            from ..data.sample import sample_label_table

            names = set(sample_label_table().values())
            labelled = [s for s in structures if s in names or
                        (s in groups and all(m in names for m in groups[s]))]
            rows.append((spec.name, "sample_ct", "1", "0", ", ".join(labelled)))
        elif spec.kind == "synth":
            from .datasets import synth_label_names

            names = synth_label_names(spec)
            labelled = [s for s in structures if s in names or
                        (s in groups and all(m in names for m in groups[s]))]
            rows.append((spec.name, "synth (" + "+".join(spec.label_maps or []) + ")", str(spec.n), "0",
                         ", ".join(labelled)))
        else:
            report = source_set.reports.get(spec.name, {})
            from .datasets import dataset_records

            train, _, _ = dataset_records(spec, config.data.validation.fraction)
            known = set().union(*(set(r.table.structures()) for r in train)) if train else set()
            labelled = [s for s in structures if s in known or
                        (s in groups and all(m in known for m in groups[s]))]
            extra = ""
            if report.get("images_without_labels"):
                extra = f" ({report['images_without_labels']} images without labels skipped)"
            rows.append((spec.name, spec.kind, str(report.get("train", len(train))) + extra,
                         str(report.get("val", 0)), ", ".join(labelled) or "(none of the trained structures)"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4] for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 20)
    try:
        prompts = load_or_compute_prompts(config.text, structures)
        lines.append(f"\nprompt embeddings: {config.text.embeddings_cache} ({len(prompts.ids)} rows, "
                     f"{len(structures)} structures)")
    except MoMEError as exc:
        lines.append(f"\nprompt embeddings: {exc}")
    lines.append(f"structures ({len(structures)}): {', '.join(structures)}")
    return "\n".join(lines)
