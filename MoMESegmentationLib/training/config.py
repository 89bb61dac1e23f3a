"""Training configuration: dataclasses read from a YAML or JSON file.

A config file has one section per dataclass below::

    model: {variant: mome-12, overrides: {feature_size: 12}}
    data: {structures: [liver, spleen], datasets: [{kind: phantoms, n: 64}], validation: {...}}
    transforms: {spacing: [3, 3, 3], patch_size: [64, 64, 64], ...}
    text: {embeddings_cache: text_embeddings.safetensors, synonyms: 2}
    optim: {lr: 3.0e-4, ...}
    schedule: {max_steps: 2000, warmup_steps: 100, batch_size: 2, ...}
    logging: {log_every: 10, plot: true}
    output: {dir: runs/demo}
    init: {checkpoint: null, backbone: null}

Relative paths inside the file are resolved against the folder that holds the file.
Unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MoMEError
from ..windows import PAD_MODES

__all__ = [
    "ModelSection",
    "DatasetSpec",
    "ValidationSpec",
    "DataConfig",
    "TransformConfig",
    "TextConfig",
    "OptimConfig",
    "ScheduleConfig",
    "LoggingConfig",
    "OutputConfig",
    "InitConfig",
    "TrainConfig",
    "load_config",
    "config_from_dict",
    "DATASET_KINDS",
    "SYNTH_LABEL_MAPS",
]

#: Kinds of dataset entries: generated phantoms, the bundled real CT, a manifest of
#: (image, label) pairs, a public dataset folder read through a table-driven adapter, CTs
#: synthesised from label maps (MoMESegmentationLib.data.synthesis).
DATASET_KINDS = ("phantoms", "sample_ct", "manifest", "adapter", "synth")

#: Label maps a ``synth`` dataset draws from: the bundled CT's (its image is never used), the
#: bundled MR slab's (a second patient), and phantoms' (seeds from ``seed + 500000``, disjoint from
#: the validation phantoms').
SYNTH_LABEL_MAPS = ("sample_ct", "sample_mr", "phantoms")


@dataclass
class ModelSection:
    variant: str = "mome-12"  # a registered name ("mome-12", "mome-24", "mome-48")
    overrides: dict[str, Any] = field(default_factory=dict)  # MoMEConfig fields to change


@dataclass
class DatasetSpec:
    kind: str = "phantoms"  # one of DATASET_KINDS
    name: str = ""  # label used in logs and the dry-run table (defaults to kind / adapter name)
    weight: float = 1.0  # relative sampling frequency of this dataset in the training mix
    # phantoms: seeds seed .. seed + n - 1 are drawn; size/spacing ranges are sampled per phantom
    n: int = 32
    seed: int = 0
    size_range: list[int] | None = None  # [min, max] voxels per axis, None = generator default
    spacing_range: list[float] | None = None  # [min, max] mm, None = generator default
    random_orientation: bool = True
    # manifest: JSON list / CSV file, or inline entries [{image, label, labels?}]
    manifest: str | None = None
    entries: list[dict[str, Any]] | None = None
    labels: dict[str, Any] | None = None  # label value (or segment name) -> structure id(s)
    # adapter: public dataset folder read with Resources/datasets/<adapter>.json
    adapter: str | None = None
    root: str | None = None
    version: str | None = None
    max_cases: int | None = None  # use only the first N cases (sorted by case id)
    cache_rate: float = 1.0  # fraction of preprocessed cases MONAI's CacheDataset keeps in memory
    # synth: n scans from seeds seed .. seed + n - 1, cycling through these label maps (SYNTH_LABEL_MAPS)
    label_maps: list[str] | None = None


@dataclass
class ValidationSpec:
    phantoms: int = 2  # held-out phantoms (seeds never used for training)
    phantom_seed: int = 100000
    phantom_size: list[int] | None = None  # fixed size for held-out phantoms; None = default
    fraction: float = 0.0  # fraction of manifest/adapter cases held out (deterministic by case id)
    max_cases: int = 8
    sw_batch_size: int = 2
    overlap: float = 0.25


@dataclass
class DataConfig:
    structures: list[str] = field(default_factory=list)  # prompted structure ids; empty = all annotated
    groups: dict[str, list[str]] = field(default_factory=dict)  # group id -> member ids (union target)
    datasets: list[DatasetSpec] = field(default_factory=list)
    validation: ValidationSpec = field(default_factory=ValidationSpec)
    prompts_per_sample: int = 4  # K: prompts scored per training patch
    positive_fraction: float = 0.5  # share of the K prompts drawn from structures present in the patch
    num_workers: int = 0  # DataLoader worker processes
    cache_workers: int = 0  # threads that fill the case cache


@dataclass
class TransformConfig:
    spacing: list[float] = field(default_factory=lambda: [1.5, 1.5, 1.5])  # mm, RAS axis order
    window: list[float] = field(default_factory=lambda: [-175.0, 250.0])  # HU mapped to [0, 1]
    patch_size: list[int] = field(default_factory=lambda: [96, 96, 96])
    crop_foreground: bool = True
    sampling: str = "pos_neg"  # "pos_neg" (RandCropByPosNegLabeld) or "class_balanced"
    pos: float = 2.0
    neg: float = 1.0
    augment: bool = True
    rotate_deg: list[float] = field(default_factory=lambda: [10.0, 10.0, 5.0])  # about x (L-R), y (P-A), z (I-S)
    scale_range: float = 0.2  # relative zoom (spacing jitter); covers the engine's fast mode (1.2x)
    prob_affine: float = 0.5
    prob_intensity: float = 0.5  # intensity shift/scale and contrast-phase-like histogram shift
    prob_noise: float = 0.2
    prob_smooth: float = 0.2
    prob_fov: float = 0.1  # truncated circular field of view
    prob_slab: float = 0.0  # thin slab along the superior axis (RandSlabd), padded like a short scan
    slab_slices: list[int] = field(default_factory=lambda: [10, 40])  # slab thickness range, voxels of the grid
    pad_mode: str = "mirror"  # padding of cases smaller than a patch (MoMESegmentationLib.windows.PAD_MODES)
    prob_lr_flip: float = 0.0  # laterality-aware flip (swaps *_left / *_right); 0 = never flip L-R


@dataclass
class TextConfig:
    embeddings_cache: str = "text_embeddings.safetensors"  # computed with the text encoder when absent
    model: str | None = None  # text-encoder name; None = the library default
    pooling: str = "mean"
    synonyms: int = 0  # extra paraphrase rows per structure (0 = canonical prompt only)
    prompts: dict[str, str] = field(default_factory=dict)  # structure id -> prompt text override


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    bce_weight: float = 1.0
    dice_weight: float = 1.0
    balance_weight: float = 0.01  # router load-balancing loss
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    activation_checkpointing: bool = False


@dataclass
class ScheduleConfig:
    max_steps: int = 1000
    warmup_steps: int = 50
    min_lr_ratio: float = 0.01  # cosine decays to lr * min_lr_ratio
    batch_size: int = 2  # per process
    seed: int = 0
    val_every: int = 200  # 0 = validate only at the end
    checkpoint_every: int = 200  # 0 = only at the end
    deterministic: bool = True  # on CPU: deterministic kernels, so resumed runs match bit for bit


@dataclass
class LoggingConfig:
    log_every: int = 10
    plot: bool = True
    progress: bool = True


@dataclass
class OutputConfig:
    dir: str = "runs/mome"
    half: bool = False  # store the final checkpoint in float16
    keep_checkpoints: int = 2  # periodic checkpoints kept on disk (the final one is always kept)


@dataclass
class InitConfig:
    checkpoint: str | None = None  # fine-tune from a MoME checkpoint (.safetensors)
    backbone: str | None = None  # MONAI SwinUNETR weights for the backbone


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    transforms: TransformConfig = field(default_factory=TransformConfig)
    text: TextConfig = field(default_factory=TextConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    init: InitConfig = field(default_factory=InitConfig)
    source: str = ""  # the file this config came from

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able copy (stored in checkpoints and the run folder)."""
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Raise :class:`MoMEError` naming the first bad setting."""
        where = self.source or "config"
        if not self.data.datasets:
            raise MoMEError(f"{where}: data.datasets is empty; list at least one dataset")
        for spec in self.data.datasets:
            if spec.kind not in DATASET_KINDS:
                raise MoMEError(f"{where}: dataset kind {spec.kind!r} unknown; expected one of {DATASET_KINDS}")
            if spec.kind == "adapter" and not (spec.adapter and spec.root):
                raise MoMEError(f"{where}: dataset of kind 'adapter' needs 'adapter' and 'root'")
            if spec.kind == "manifest" and not (spec.manifest or spec.entries):
                raise MoMEError(f"{where}: dataset of kind 'manifest' needs 'manifest' or 'entries'")
            if spec.kind == "synth":
                unknown = [m for m in spec.label_maps or [] if m not in SYNTH_LABEL_MAPS]
                if not spec.label_maps or unknown:
                    raise MoMEError(f"{where}: dataset of kind 'synth' needs 'label_maps' from {SYNTH_LABEL_MAPS}"
                                    + (f", not {unknown}" if unknown else ""))
            if spec.weight <= 0:
                raise MoMEError(f"{where}: dataset {spec.name or spec.kind} weight must be positive")
        if len(self.transforms.spacing) != 3 or min(self.transforms.spacing) <= 0:
            raise MoMEError(f"{where}: transforms.spacing must be three positive numbers")
        if len(self.transforms.patch_size) != 3 or min(self.transforms.patch_size) < 16:
            raise MoMEError(f"{where}: transforms.patch_size must be three sizes >= 16")
        if len(self.transforms.window) != 2 or self.transforms.window[0] >= self.transforms.window[1]:
            raise MoMEError(f"{where}: transforms.window must be [low, high] HU with low < high")
        if self.transforms.sampling not in ("pos_neg", "class_balanced"):
            raise MoMEError(f"{where}: transforms.sampling must be 'pos_neg' or 'class_balanced'")
        if self.transforms.pad_mode not in PAD_MODES:
            raise MoMEError(f"{where}: transforms.pad_mode must be one of {', '.join(PAD_MODES)}")
        slab = self.transforms.slab_slices
        if len(slab) != 2 or not 1 <= slab[0] <= slab[1]:
            raise MoMEError(f"{where}: transforms.slab_slices must be [low, high] with 1 <= low <= high")
        if self.data.prompts_per_sample < 1:
            raise MoMEError(f"{where}: data.prompts_per_sample must be >= 1")
        if self.schedule.max_steps < 1 or self.schedule.batch_size < 1:
            raise MoMEError(f"{where}: schedule.max_steps and schedule.batch_size must be >= 1")
        if self.optim.lr <= 0:
            raise MoMEError(f"{where}: optim.lr must be positive")


_SECTIONS = {
    "model": ModelSection,
    "data": DataConfig,
    "transforms": TransformConfig,
    "text": TextConfig,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "logging": LoggingConfig,
    "output": OutputConfig,
    "init": InitConfig,
}


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    if not isinstance(values, dict):
        raise MoMEError(f"{where}: expected a mapping, got {type(values).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise MoMEError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if cls is DataConfig and key == "datasets":
            value = [_build(DatasetSpec, item, f"{where}.datasets[{i}]") for i, item in enumerate(value or [])]
        elif cls is DataConfig and key == "validation":
            value = _build(ValidationSpec, value or {}, f"{where}.validation")
        kwargs[key] = value
    return cls(**kwargs)


def _resolve(path: str | None, base: Path) -> str | None:
    if path is None or path == "":
        return path
    candidate = Path(path).expanduser()
    return str(candidate if candidate.is_absolute() else (base / candidate))


def config_from_dict(raw: dict[str, Any], source: str = "", base_dir: Path | None = None) -> TrainConfig:
    """Build a :class:`TrainConfig` from a parsed mapping; resolve relative paths against ``base_dir``."""
    where = source or "config"
    if not isinstance(raw, dict):
        raise MoMEError(f"{where}: top level must be a mapping of sections")
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise MoMEError(f"{where}: unknown section(s) {', '.join(unknown)}; known: {', '.join(_SECTIONS)}")
    sections = {name: _build(cls, raw.get(name) or {}, f"{where}: {name}") for name, cls in _SECTIONS.items()}
    config = TrainConfig(**sections, source=source)
    if base_dir is not None:
        for spec in config.data.datasets:
            spec.manifest = _resolve(spec.manifest, base_dir)
            spec.root = _resolve(spec.root, base_dir)
        config.text.embeddings_cache = _resolve(config.text.embeddings_cache, base_dir) or ""
        config.output.dir = _resolve(config.output.dir, base_dir) or ""
        config.init.checkpoint = _resolve(config.init.checkpoint, base_dir)
        config.init.backbone = _resolve(config.init.backbone, base_dir)
    for i, spec in enumerate(config.data.datasets):
        if not spec.name:
            spec.name = spec.adapter if spec.kind == "adapter" and spec.adapter else f"{spec.kind}{i}"
    config.validate()
    return config


def load_config(path: str | Path) -> TrainConfig:
    """Read a training config from YAML (``.yaml``/``.yml``) or JSON.

    Relative paths in the file (dataset roots, manifests, caches, output folder) are taken
    relative to the current working directory, as a user typing them on the command line
    expects; absolute paths are used as they are.
    """
    path = Path(path)
    if not path.is_file():
        raise MoMEError(f"{path}: training config not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except Exception as exc:  # yaml and json raise several types
        raise MoMEError(f"{path}: cannot parse config ({str(exc).splitlines()[0]})") from exc
    return config_from_dict(raw or {}, source=str(path), base_dir=Path.cwd())
