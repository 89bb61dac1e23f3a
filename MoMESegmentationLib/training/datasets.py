"""Training data: case loading, partial-label bookkeeping and the step-keyed sample dataset.

Partial labels. Every dataset annotates its own set of structures. A case carries
``structure_values = {structure_id: [label values]}`` for exactly the structures its dataset
annotates (present in the scan or not). A structure that is not in that table is *unknown* in this
case, not background: the sampler never prompts it, so the loss never sees it.

Determinism. A training sample is identified by an integer key,
``key = (step * world_size + rank) * batch_size + index``; everything random about it (which
dataset, which case or phantom, the patch, the augmentation, the prompts and their paraphrases)
comes from a generator seeded with ``(seed, key)``. A run therefore sees the same data whether it
was interrupted and resumed or not, whatever the number of DataLoader workers.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..errors import InputError, MoMEError
from ..io.volume import Volume
from .adapters import CaseRecord, DatasetAdapter, LabelTable, load_table
from .config import DatasetSpec, TrainConfig, TransformConfig
from .transforms import augment_transforms, preprocess_transforms

__all__ = [
    "CaseSource",
    "PhantomSource",
    "CaseListSource",
    "TrainingSamples",
    "StepSampler",
    "load_case",
    "split_laterality",
    "make_item",
    "build_sources",
    "build_validation_items",
    "manifest_records",
    "sample_seed",
    "resolve_groups",
    "select_prompts",
]

logger = logging.getLogger(__name__)


def resolve_groups(config: TrainConfig, structures: Sequence[str]) -> dict[str, list[str]]:
    """Group id -> member ids for the trained structures: ``data.groups`` plus the vocabulary's
    groups (``kidneys``, ``lumbar_vertebrae``) and composite structures (``lung_left`` = its lobes).

    A dataset that does not annotate a group directly but annotates all its members gets the
    union of the members as the group's target.
    """
    groups = {k: list(v) for k, v in config.data.groups.items()}
    try:
        from ..vocabulary import Vocabulary

        vocab = Vocabulary.load()
        known = vocab.groups
    except (ImportError, MoMEError):
        return groups
    for name in structures:
        if name in groups:
            continue
        if name in known:
            groups[name] = list(known[name].members)
        elif name in vocab and vocab[name].parts:
            groups[name] = list(vocab[name].parts)
    return groups


def sample_seed(seed: int, key: int, salt: int = 0) -> int:
    """A 32-bit seed derived from ``(seed, key, salt)`` (independent streams per key)."""
    return int(np.random.SeedSequence([int(seed), int(key), int(salt)]).generate_state(1)[0])


# --------------------------------------------------------------------------------------------
# Reading cases
# --------------------------------------------------------------------------------------------


def _read_image(path: str) -> Volume:
    """Read an image in the library's convention; NIfTI through nibabel, the rest through ``io``."""
    lower = path.lower()
    if lower.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        try:
            image = nib.load(path)
            array = np.asarray(image.dataobj)
        except Exception as exc:  # nibabel raises several types for damaged files
            raise InputError(f"{path}: cannot read NIfTI ({exc})") from exc
        return Volume.from_affine(array, image.affine, convention="RAS", name=Path(path).name)
    from ..io.readers import read_volume

    return read_volume(path)


def _resample_nearest(labels: np.ndarray, source: Volume, target: Volume) -> np.ndarray:
    """Labels on ``source``'s grid moved onto ``target``'s grid (nearest neighbour, physical space)."""
    if source.same_grid(target, atol=1e-3):
        return labels
    from scipy.ndimage import map_coordinates

    index = np.stack(np.meshgrid(*[np.arange(n) for n in target.shape], indexing="ij"), axis=-1).reshape(-1, 3)
    coords = source.physical_to_index(target.index_to_physical(index)).T
    out = map_coordinates(labels, coords, order=0, mode="constant", cval=0)
    return out.reshape(target.shape)


def _read_dicom_png(image_dir: str, label_dir: str) -> tuple[Volume, np.ndarray]:
    """A DICOM slice folder and one PNG mask per DICOM file, paired in file-name order (CHAOS CT)."""
    import pydicom
    from PIL import Image

    files = sorted(p for p in Path(image_dir).iterdir() if p.is_file() and not p.name.startswith("."))
    masks = sorted(p for p in Path(label_dir).iterdir() if p.suffix.lower() == ".png")
    if not files or len(files) != len(masks):
        raise InputError(f"{image_dir}: {len(files)} DICOM files but {len(masks)} PNG masks in {label_dir}")
    slices = [pydicom.dcmread(str(p)) for p in files]
    first = slices[0]
    row, col = (np.asarray(first.ImageOrientationPatient[:3], float), np.asarray(first.ImageOrientationPatient[3:], float))
    positions = np.array([np.asarray(s.ImagePositionPatient, float) for s in slices])
    if len(slices) > 1:
        step = positions[1] - positions[0]
        slice_spacing = float(np.linalg.norm(step))
        normal = step / slice_spacing
    else:
        normal, slice_spacing = np.cross(row, col), float(getattr(first, "SliceThickness", 1.0))
    pixel_spacing = [float(v) for v in first.PixelSpacing]  # [between rows, between columns]
    pixels = [s.pixel_array.astype(np.float32) * float(getattr(s, "RescaleSlope", 1)) + float(getattr(s, "RescaleIntercept", 0))
              for s in slices]
    image = np.stack([p.T for p in pixels], axis=-1)  # DICOM rows are j, columns i
    labels = np.stack([np.asarray(Image.open(m)).astype(np.int32).reshape(pixels[0].shape).T for m in masks], axis=-1)
    volume = Volume(image, spacing=[pixel_spacing[1], pixel_spacing[0], slice_spacing], origin=positions[0],
                    direction=np.stack([row, col, normal], axis=1), name=Path(image_dir).parent.name)
    return volume, labels


def _seg_nrrd_labels(path: str, image: Volume, segment_map: dict[str, list[str]]
                     ) -> tuple[np.ndarray, dict[int, tuple[str, ...]]]:
    """A Slicer ``.seg.nrrd`` turned into a label map on ``image``'s grid plus its value table.

    Segment names map to structure ids through ``segment_map`` (exact, then case-insensitive);
    a segment without an entry is taken to be named by its id (``"kidney_left"``, or
    ``"Kidney left"`` written with spaces); an entry with no ids (``[]``) leaves the segment out.

    Segments may overlap (a liver and a tumour inside it): segment ``n`` gets value ``n`` and every
    combination of overlapping segments a further value standing for the ids of all of them, so no
    structure loses the voxels it shares with another.
    """
    from ..io.segmentation import align_segmentation, read_segmentation

    seg = align_segmentation(read_segmentation(path), image)
    lowered = {k.lower(): v for k, v in segment_map.items()}
    labels = np.zeros(image.shape, dtype=np.int32)
    values: dict[int, tuple[str, ...]] = {}
    members: dict[int, frozenset[int]] = {0: frozenset()}  # value -> the segments it stands for
    for index, segment in enumerate(seg.segments, start=1):
        key = segment.name.strip()
        ids = segment_map.get(key)
        if ids is None:
            ids = lowered.get(key.lower())
        if ids is None:
            ids = [key.lower().replace(" ", "_").replace("-", "_")]
        if ids:
            values[index] = tuple(ids)
            members[index] = frozenset([index])
    value_of = {combo: value for value, combo in members.items()}
    next_value = len(seg.segments) + 1
    for index, segment in enumerate(seg.segments, start=1):
        if index not in values or not segment.mask.any():
            continue
        present, inverse = np.unique(labels[segment.mask], return_inverse=True)
        new = []
        for old in present.tolist():
            combo = members[old] | {index}
            if combo not in value_of:
                value, next_value = next_value, next_value + 1
                members[value], value_of[combo] = combo, value
                values[value] = tuple(dict.fromkeys(i for s in sorted(combo) for i in values[s]))
            new.append(value_of[combo])
        labels[segment.mask] = np.asarray(new, dtype=np.int32)[inverse.ravel()]
    return labels, values


def split_laterality(labels: np.ndarray, values: dict[int, tuple[str, ...]], split: dict[str, tuple[str, str]],
                     image: Volume) -> tuple[np.ndarray, dict[int, tuple[str, ...]]]:
    """Split structures labelled with one value for both sides into right and left.

    Connected components of each ``source`` structure are assigned to the patient's left when
    their centroid lies at larger LPS ``x`` than the midline (midway between the two largest
    components, or the body centre when there is only one).

    Returns:
        ``(labels, values)`` with new values for the left-side voxels; the ``source`` id stays.
    """
    if not split:
        return labels, values
    from scipy import ndimage

    labels = labels.astype(np.int32, copy=True)
    values = dict(values)
    next_value = max([0, *values, int(labels.max())]) + 1
    for source, (right_id, left_id) in split.items():
        source_values = [v for v, ids in values.items() if source in ids]
        if not source_values:
            continue
        mask = np.isin(labels, source_values)
        left = np.zeros_like(mask)
        if mask.any():
            components, count = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
            sizes = ndimage.sum(mask, components, index=np.arange(1, count + 1))
            centroids = ndimage.center_of_mass(mask, components, index=np.arange(1, count + 1))
            x = image.index_to_physical(np.asarray(centroids, dtype=float))[:, 0]  # LPS x: + = patient left
            order = np.argsort(sizes)[::-1]
            if count >= 2:
                midline = 0.5 * (x[order[0]] + x[order[1]])
            else:
                body = np.argwhere(image.array > -500)
                midline = float(image.index_to_physical(body.mean(axis=0))[0]) if len(body) else float(x[0])
            for c in range(count):
                if x[c] > midline:
                    left |= components == c + 1
        for value in source_values:
            ids = values[value]
            values[value] = tuple(dict.fromkeys(ids + (right_id,)))
            values[next_value] = tuple(dict.fromkeys(ids + (left_id,)))
            labels[(labels == value) & left] = next_value
            next_value += 1
    return labels, values


def load_case(record: CaseRecord) -> tuple[Volume, np.ndarray, dict[int, tuple[str, ...]]]:
    """Read a case: image (HU, LPS) and a label map on the image grid with its value table.

    The returned value table has the dataset's laterality splits applied.
    """
    if record.label_kind == "dicom_png":
        image, labels = _read_dicom_png(record.image, record.label or "")
        values = dict(record.table.values)
    else:
        image = _read_image(record.image)
        if record.label_kind == "structure_files":
            labels = np.zeros(image.shape, dtype=np.int32)
            values: dict[int, tuple[str, ...]] = {}
            for value, (name, path) in enumerate(sorted(record.structure_files.items()), start=1):
                mask_volume = _read_image(path)
                mask = _resample_nearest(np.asarray(mask_volume.array) > 0, mask_volume, image)
                labels[mask] = value
                values[value] = (name,)
        elif record.label_kind == "seg_nrrd":
            labels, values = _seg_nrrd_labels(record.label or "", image, record.segment_map)
        else:
            label_volume = _read_image(record.label or "")
            labels = _resample_nearest(np.rint(np.asarray(label_volume.array)).astype(np.int32), label_volume, image)
            values = dict(record.table.values)
    if labels.shape != image.shape:
        raise InputError(f"{record.label}: label grid {labels.shape} differs from image {image.shape}")
    labels, values = split_laterality(labels, values, record.table.split_laterality, image)
    return image, labels, values


def make_item(image: Volume, labels: np.ndarray, values: dict[int, tuple[str, ...]], structures: Sequence[str],
              groups: dict[str, list[str]], case_id: str = "", dataset: str = "") -> dict[str, Any]:
    """Build the MONAI dictionary of a case, keeping only the values the trained structures need.

    Returns:
        ``{"image": MetaTensor [1, I, J, K] (HU, RAS affine), "label": MetaTensor [1, I, J, K]
        (compact values 0..n), "structure_values": {id: [values]}, "case_id", "dataset"}``.
        ``structure_values`` lists every trained structure (or group whose members are all
        annotated) that the case's table annotates.
    """
    from monai.data import MetaTensor

    wanted = set(structures)
    for members in groups.values():
        wanted.update(members)
    kept = sorted(v for v, ids in values.items() if wanted.intersection(ids))
    lut_size = max([int(labels.max()) if labels.size else 0, *kept]) + 1
    lut = np.zeros(lut_size, dtype=np.int32)
    for new, old in enumerate(kept, start=1):
        lut[old] = new
    dtype = np.uint8 if len(kept) < 256 else np.int16
    compact = lut[np.clip(labels, 0, lut_size - 1)].astype(dtype)
    by_id: dict[str, list[int]] = {}
    for new, old in enumerate(kept, start=1):
        for name in values[old]:
            by_id.setdefault(name, []).append(new)
    table: dict[str, list[int]] = {}
    for name in structures:
        if name in by_id:  # annotated directly
            table[name] = by_id[name]
        elif name in groups and all(m in by_id for m in groups[name]):  # union of annotated members
            table[name] = sorted({v for m in groups[name] for v in by_id[m]})
    affine = torch.as_tensor(image.affine_ras, dtype=torch.float64)
    return {
        "image": MetaTensor(torch.as_tensor(np.asarray(image.array, dtype=np.float32))[None], affine=affine),
        "label": MetaTensor(torch.as_tensor(compact)[None], affine=affine.clone()),
        "structure_values": table,
        "case_id": case_id,
        "dataset": dataset,
    }


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


class CaseSource:
    """Something that yields preprocessed cases: ``len(source)``, ``source.case(index, seed)``."""

    name: str = ""
    weight: float = 1.0

    def __len__(self) -> int:
        raise NotImplementedError

    def case(self, index: int) -> dict[str, Any]:
        raise NotImplementedError

    def annotated(self) -> list[str]:
        """Trained structures this source annotates (for the dry-run table)."""
        raise NotImplementedError


class _DrawnSource(CaseSource):
    """``spec.n`` cases drawn by ``_draw(key)`` from deterministic keys, preprocessed and cached.

    Drawing is deterministic, so MONAI's ``CacheDataset`` builds the cached share
    (``spec.cache_rate``) once, in threads, before any DataLoader worker starts: the workers inherit
    it instead of each drawing every case again. Uncached cases are drawn when used.
    """

    def __init__(self, spec: DatasetSpec, structures: Sequence[str], groups: dict[str, list[str]],
                 transforms: TransformConfig, cache_workers: int = 0) -> None:
        from monai.data import CacheDataset
        from monai.transforms import Compose, Lambda

        self.spec = spec
        self.name = spec.name
        self.weight = spec.weight
        self.structures = list(structures)
        self.groups = groups
        self.dataset = CacheDataset(
            data=self._keys(),
            transform=Compose([Lambda(func=self._draw), preprocess_transforms(transforms)]).flatten(),
            cache_rate=spec.cache_rate,
            num_workers=cache_workers or None,
            progress=False,
        )

    def _keys(self) -> list[int]:
        """What ``_draw`` receives for each of the ``spec.n`` cases."""
        raise NotImplementedError

    def _draw(self, key: int) -> dict[str, Any]:
        raise NotImplementedError

    def __len__(self) -> int:
        return int(self.spec.n)

    def case(self, index: int) -> dict[str, Any]:
        """Preprocessed case ``index`` (modulo ``len(self)``)."""
        return self.dataset[int(index) % len(self)]


class PhantomSource(_DrawnSource):
    """Phantoms drawn from seeds ``spec.seed .. spec.seed + spec.n - 1`` and preprocessed (cached as
    :class:`_DrawnSource` says)."""

    def _keys(self) -> list[int]:
        return [int(self.spec.seed) + i for i in range(int(self.spec.n))]

    def _draw(self, seed: int) -> dict[str, Any]:
        from ..data.phantoms import make_phantom

        rng = np.random.default_rng(sample_seed(seed, 0, 7))
        shape = spacing = None
        if self.spec.size_range:
            low, high = self.spec.size_range
            shape = tuple(int(rng.integers(low, high + 1)) for _ in range(3))
        if self.spec.spacing_range:
            low, high = self.spec.spacing_range
            spacing = tuple(float(rng.uniform(low, high)) for _ in range(3))
        phantom = make_phantom(seed, shape=shape, spacing=spacing, random_orientation=self.spec.random_orientation)
        values = {int(v): (str(n),) for v, n in phantom.label_table.items()}
        labels = np.asarray(phantom.labels.array).astype(np.int32)
        return make_item(phantom.image, labels, values, self.structures, self.groups,
                         case_id=f"phantom{seed}", dataset=self.name)

    def annotated(self) -> list[str]:
        return list(self.case(0)["structure_values"])


class SynthSource(_DrawnSource):
    """CTs synthesised from label maps (:mod:`~MoMESegmentationLib.data.synthesis`), preprocessed and cached.

    Scan ``n`` of the dataset (seed ``spec.seed + n``) is drawn from label map ``n`` modulo the
    list ``spec.label_maps`` (``SYNTH_LABEL_MAPS``): the bundled CT's label map (never its image),
    the bundled MR slab's, or a phantom's (a new phantom per scan, seeds from ``seed + 500000``).
    Every structure of a label map's table counts as annotated, so a structure the table names but
    the scan does not hold is a true negative: prompts for it must give an empty mask.
    """

    PHANTOM_SEED_OFFSET = 500_000

    def _keys(self) -> list[int]:
        return list(range(int(self.spec.n)))

    def label_map(self, index: int) -> tuple[Volume, dict[int, str]]:
        """The label map (and its table) that scan ``index`` is drawn from."""
        from ..data.sample import load_sample_ct, load_sample_mr_labels

        maps = list(self.spec.label_maps or [])
        kind = maps[int(index) % len(maps)]
        if kind == "sample_ct":
            case = load_sample_ct()
            return case.labels, case.label_table
        if kind == "sample_mr":
            return load_sample_mr_labels()
        from ..data.phantoms import make_phantom

        # The label map's grid: the dataset's spacing range (default 2.5 to 4.5 mm), not the
        # generator's sub-millimetre default: the scan is resampled to the training spacing anyway.
        low, high = self.spec.spacing_range or (2.5, 4.5)
        phantom = make_phantom(int(self.spec.seed) + self.PHANTOM_SEED_OFFSET + int(index),
                               random_orientation=self.spec.random_orientation, spacing_range=(low, high),
                               noise=False)
        return phantom.labels, phantom.label_table

    def _draw(self, index: int) -> dict[str, Any]:
        from ..data.synthesis import synthesize_ct

        labels, table = self.label_map(index)
        seed = int(self.spec.seed) + int(index)
        scan = synthesize_ct(labels, table, seed=sample_seed(seed, 0, 11))
        values = {int(v): (str(n),) for v, n in table.items()}
        return make_item(scan.image, np.asarray(scan.labels.array).astype(np.int32), values, self.structures,
                         self.groups, case_id=f"synth{seed}", dataset=self.name)

    def annotated(self) -> list[str]:
        return sorted({s for i in range(min(len(self), len(self.spec.label_maps or [])))
                       for s in self.case(i)["structure_values"]})


def synth_label_names(spec: DatasetSpec) -> set[str]:
    """Every name the label maps of a ``synth`` dataset label (without drawing a scan)."""
    from ..data.phantoms import phantom_label_table
    from ..data.sample import sample_label_table, sample_mr_label_table

    tables = {"sample_ct": sample_label_table, "sample_mr": sample_mr_label_table, "phantoms": phantom_label_table}
    return {str(n) for kind in spec.label_maps or [] for n in tables[kind]().values()}


class CaseListSource(CaseSource):
    """Cases read from files (manifest, adapter or the bundled CT), preprocessed once and cached.

    Args:
        records: the cases (or ready-made items for in-memory cases such as the bundled CT).
        cache_rate: fraction kept by MONAI's ``CacheDataset``; the rest is re-read when drawn.
    """

    def __init__(self, name: str, weight: float, records: Sequence[CaseRecord | Callable[[], dict[str, Any]]],
                 structures: Sequence[str], groups: dict[str, list[str]], transforms: TransformConfig,
                 cache_rate: float = 1.0, cache_workers: int = 0) -> None:
        from monai.data import CacheDataset
        from monai.transforms import Compose, Lambda

        if not records:
            raise MoMEError(f"dataset {name}: no cases")
        self.name = name
        self.weight = weight
        self.records = list(records)
        self.structures = list(structures)
        self.groups = groups
        loader = Lambda(func=self._load)
        self.dataset = CacheDataset(
            data=list(range(len(self.records))),
            transform=Compose([loader, preprocess_transforms(transforms)]).flatten(),
            cache_rate=cache_rate,
            num_workers=cache_workers or None,
            progress=False,
        )

    def _load(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        if callable(record) and not isinstance(record, CaseRecord):
            return record()
        image, labels, values = load_case(record)
        return make_item(image, labels, values, self.structures, self.groups, record.case_id, record.dataset)

    def __len__(self) -> int:
        return len(self.records)

    def case(self, index: int) -> dict[str, Any]:
        return self.dataset[int(index) % len(self)]

    def annotated(self) -> list[str]:
        record = self.records[0]
        if isinstance(record, CaseRecord):
            known = set(record.table.structures())
            if record.label_kind in ("structure_files", "seg_nrrd"):
                known = set().union(*(set(r.table.structures()) for r in self.records if isinstance(r, CaseRecord)))
            out = [s for s in self.structures if s in known]
            out += [g for g, members in self.groups.items() if g in self.structures and g not in out
                    and all(m in known for m in members)]
            return out
        return list(self.case(0)["structure_values"])


def _sample_ct_item(structures: Sequence[str], groups: dict[str, list[str]]) -> dict[str, Any]:
    from ..data.sample import load_sample_ct

    case = load_sample_ct()
    values = {int(v): (str(n),) for v, n in case.label_table.items()}
    return make_item(case.image, np.asarray(case.labels.array).astype(np.int32), values, structures, groups,
                     case_id="sample_ct", dataset="sample_ct")


def manifest_records(spec: DatasetSpec) -> list[tuple[CaseRecord, str]]:
    """Cases listed by a manifest (JSON list / CSV with ``image,label[,case_id,split]``) or inline.

    An entry whose label ends with ``.seg.nrrd`` is a Slicer segmentation (fine-tuning on
    corrected segmentations): its segments are matched to structure ids by ``labels``
    (segment name -> id) or by name. Returns ``(record, split)`` pairs; split is
    ``"train"`` (default) or ``"val"``.
    """
    entries: list[dict[str, Any]] = list(spec.entries or [])
    base = Path(".")
    if spec.manifest:
        path = Path(spec.manifest)
        base = path.parent
        if not path.is_file():
            raise MoMEError(f"{path}: manifest not found")
        if path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8") as handle:
                entries += [dict(row) for row in csv.DictReader(handle)]
        else:
            loaded = json.loads(path.read_text(encoding="utf-8"))
            entries += loaded["cases"] if isinstance(loaded, dict) else loaded
    out = []
    for i, entry in enumerate(entries):
        if "image" not in entry or "label" not in entry:
            raise MoMEError(f"{spec.manifest or spec.name}: entry {i} needs 'image' and 'label'")
        image = Path(entry["image"])
        label = Path(entry["label"])
        image = image if image.is_absolute() else base / image
        label = label if label.is_absolute() else base / label
        labels = entry.get("labels") or spec.labels or {}
        if isinstance(labels, str):
            labels = json.loads(Path(labels if Path(labels).is_absolute() else base / labels).read_text())
        kind = entry.get("kind") or ("seg_nrrd" if str(label).lower().endswith(".seg.nrrd") else "labelmap")
        case_id = str(entry.get("case_id") or image.name.split(".")[0])
        if kind == "seg_nrrd":
            segment_map = {str(k): ([v] if isinstance(v, str) else list(v)) for k, v in labels.items()}
            table = LabelTable(values={i + 1: tuple(v) for i, v in enumerate(segment_map.values())})
            record = CaseRecord(case_id, spec.name, str(image), str(label), table, kind, segment_map=segment_map)
        else:
            table = LabelTable.from_json(labels, entry.get("include"), entry.get("split_laterality"))
            record = CaseRecord(case_id, spec.name, str(image), str(label), table, kind)
        out.append((record, str(entry.get("split") or "train")))
    return out


def _held_out(case_id: str, fraction: float) -> bool:
    """Deterministic split by case id (stable when cases are added)."""
    if fraction <= 0:
        return False
    import hashlib

    digest = hashlib.sha256(case_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def dataset_records(spec: DatasetSpec, fraction: float) -> tuple[list[CaseRecord], list[CaseRecord], dict]:
    """Training and held-out records of a manifest or adapter dataset, plus a scan report."""
    report: dict[str, Any] = {}
    if spec.kind == "adapter":
        table = load_table(spec.adapter or "", spec.version)
        scan = DatasetAdapter(table, spec.root or "").scan()
        pairs = [(r, "train") for r in scan.cases]
        report = {"images_without_labels": len(scan.images_without_labels),
                  "labels_without_images": len(scan.labels_without_images), "table": table.name}
    else:
        pairs = manifest_records(spec)
    for record, _ in pairs:
        record.dataset = spec.name
    if spec.max_cases:
        pairs = pairs[: spec.max_cases]
    train = [r for r, split in pairs if split != "val" and not _held_out(r.case_id, fraction)]
    val = [r for r, split in pairs if split == "val" or (split != "val" and _held_out(r.case_id, fraction))]
    if not train:
        train = [r for r, _ in pairs]
    return train, val, report


@dataclass
class SourceSet:
    """Training sources and the held-out records found while building them."""

    sources: list[CaseSource]
    held_out: list[CaseRecord] = field(default_factory=list)
    reports: dict[str, dict] = field(default_factory=dict)


def build_sources(config: TrainConfig, structures: Sequence[str], load: bool = True) -> SourceSet:
    """One :class:`CaseSource` per dataset entry of the config.

    With ``load=False`` only file-based datasets are scanned (for ``--dry-run``); nothing is read.
    """
    groups = resolve_groups(config, structures)
    sources: list[CaseSource] = []
    held_out: list[CaseRecord] = []
    reports: dict[str, dict] = {}
    fraction = config.data.validation.fraction
    for spec in config.data.datasets:
        if spec.kind in ("phantoms", "sample_ct", "synth") and not load:
            continue
        if spec.kind == "phantoms":
            sources.append(PhantomSource(spec, structures, groups, config.transforms, config.data.cache_workers))
            continue
        if spec.kind == "synth":
            sources.append(SynthSource(spec, structures, groups, config.transforms, config.data.cache_workers))
            continue
        if spec.kind == "sample_ct":
            sources.append(CaseListSource(spec.name, spec.weight, [lambda: _sample_ct_item(structures, groups)],
                                          structures, groups, config.transforms, 1.0))
            continue
        train, val, report = dataset_records(spec, fraction)
        report["train"], report["val"] = len(train), len(val)
        reports[spec.name] = report
        held_out += val
        if load:
            sources.append(CaseListSource(spec.name, spec.weight, train, structures, groups, config.transforms,
                                          spec.cache_rate, config.data.cache_workers))
    return SourceSet(sources, held_out, reports)


def build_validation_items(config: TrainConfig, structures: Sequence[str], held_out: Sequence[CaseRecord]) -> list[dict]:
    """Preprocessed whole volumes for validation: held-out phantoms plus held-out real cases."""
    from monai.transforms import Compose

    groups = resolve_groups(config, structures)
    spec = config.data.validation
    items: list[dict] = []
    phantom_specs = [s for s in config.data.datasets if s.kind == "phantoms"]
    if spec.phantoms > 0 and phantom_specs:
        base = phantom_specs[0]
        val_spec = DatasetSpec(kind="phantoms", name="val_phantoms", n=spec.phantoms, seed=spec.phantom_seed,
                               size_range=[spec.phantom_size[0]] * 2 if spec.phantom_size else base.size_range,
                               spacing_range=base.spacing_range, random_orientation=base.random_orientation)
        source = PhantomSource(val_spec, structures, groups, config.transforms, config.data.cache_workers)
        items += [source.case(i) for i in range(spec.phantoms)]
    preprocess = Compose([preprocess_transforms(config.transforms)])
    for record in list(held_out)[: max(0, spec.max_cases - len(items))]:
        image, labels, values = load_case(record)
        items.append(preprocess(make_item(image, labels, values, structures, groups, record.case_id, record.dataset)))
    return items


# --------------------------------------------------------------------------------------------
# Training samples
# --------------------------------------------------------------------------------------------


def select_prompts(structure_values: dict[str, list[int]], label: np.ndarray, k: int, positive_fraction: float,
                   rng: np.random.Generator) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Choose ``k`` prompts for a patch among the structures its dataset annotates.

    Positives (structures present in the patch) fill ``ceil(k * positive_fraction)`` slots, then
    negatives (annotated but absent: empty target), then whichever is left; missing slots are
    padding with loss weight 0.

    Returns:
        ``(names, targets [k, D, H, W] uint8, weights [k] float32)``; padded names are ``""``.
    """
    names = list(structure_values)
    present, absent = [], []
    targets: dict[str, np.ndarray] = {}
    for name in names:
        mask = np.isin(label, structure_values[name])
        targets[name] = mask
        (present if mask.any() else absent).append(name)
    rng.shuffle(present)
    rng.shuffle(absent)
    n_pos = min(len(present), max(1, math.ceil(k * positive_fraction)))
    chosen = present[:n_pos]
    chosen += absent[: k - len(chosen)]
    chosen += present[n_pos : n_pos + k - len(chosen)]
    weights = np.zeros(k, dtype=np.float32)
    weights[: len(chosen)] = 1.0
    out = np.zeros((k, *label.shape), dtype=np.uint8)
    for i, name in enumerate(chosen):
        out[i] = targets[name]
    return chosen + [""] * (k - len(chosen)), out, weights


class TrainingSamples(Dataset):
    """Map-style dataset indexed by sample key (see the module docstring).

    ``dataset[key]`` returns ``{"image": [1, D, H, W] float32, "target": [K, D, H, W] uint8,
    "prompt_rows": [K] int64 (rows of the prompt-embedding table), "prompt_weight": [K] float32,
    "valid": [1, D, H, W] bool (false in padding)}``.

    Args:
        sources: the training sources, drawn with probability proportional to their weight.
        rows_for: structure id -> rows of the embedding table holding its prompt paraphrases.
        transforms: the transform settings (patch size, augmentation).
        prompts_per_sample: ``K``.
        positive_fraction: share of prompts taken from structures present in the patch.
        seed: base seed.
    """

    def __init__(self, sources: Sequence[CaseSource], rows_for: dict[str, list[int]], transforms: TransformConfig,
                 prompts_per_sample: int, positive_fraction: float, seed: int) -> None:
        if not sources:
            raise ValueError("sources must not be empty")
        self.sources = list(sources)
        weights = np.array([s.weight for s in self.sources], dtype=np.float64)
        self.probabilities = weights / weights.sum()
        self.rows_for = rows_for
        self.augment = augment_transforms(transforms)
        self.k = int(prompts_per_sample)
        self.positive_fraction = float(positive_fraction)
        self.seed = int(seed)

    def __len__(self) -> int:  # keys are unbounded; the sampler decides which are used
        return 2**62

    def __getitem__(self, key: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng(sample_seed(self.seed, key, 1))
        source = self.sources[int(rng.choice(len(self.sources), p=self.probabilities))]
        item = source.case(int(rng.integers(len(source))))
        item = dict(item)
        item["structure_values"] = {n: v for n, v in item["structure_values"].items() if n in self.rows_for}
        self.augment.set_random_state(seed=sample_seed(self.seed, key, 2))
        patch = self.augment(item)
        patch = patch[0] if isinstance(patch, list) else patch
        label = np.asarray(patch["label"])[0]
        names, targets, weights = select_prompts(patch["structure_values"], label, self.k, self.positive_fraction, rng)
        rows = [int(rng.choice(self.rows_for[n])) if n else 0 for n in names]
        return {
            "image": torch.as_tensor(np.asarray(patch["image"]), dtype=torch.float32),
            "target": torch.from_numpy(targets),
            "prompt_rows": torch.tensor(rows, dtype=torch.int64),
            "prompt_weight": torch.from_numpy(weights),
            "valid": torch.as_tensor(np.asarray(patch["valid"]), dtype=torch.bool),
        }


class StepSampler(Sampler[int]):
    """Keys of the samples that ``rank`` uses for steps ``start_step .. max_steps - 1``."""

    def __init__(self, start_step: int, max_steps: int, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        self.start_step, self.max_steps = int(start_step), int(max_steps)
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)

    def __iter__(self) -> Iterator[int]:
        for step in range(self.start_step, self.max_steps):
            base = (step * self.world_size + self.rank) * self.batch_size
            yield from range(base, base + self.batch_size)

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step) * self.batch_size
