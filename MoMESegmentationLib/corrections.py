"""Corrected segmentations as training data: a folder of cases plus the manifest the trainer reads.

A radiologist corrects a segmentation (in 3D Slicer or elsewhere); :func:`add_correction_case`
copies the CT and the corrected segmentation into a *corrections folder* and lists them in its
``manifest.json``, in the format of the trainer's ``kind: manifest`` datasets
(:func:`MoMESegmentationLib.training.datasets.manifest_records`)::

    corrections/
      manifest.json
      case-0001/image.nrrd
      case-0001/segmentation.seg.nrrd       (a Slicer segmentation; labels.nii.gz for a label map)

    {"format": "mome-corrections", "version": 1, "cases": [
      {"case_id": "case-0001", "image": "case-0001/image.nrrd",
       "label": "case-0001/segmentation.seg.nrrd",
       "labels": {"Liver": "liver", "Left kidney": "kidney_left"},
       "split": "train", "structures": ["kidney_left", "liver"],
       "source": "correction", "created": "2026-11-30T09:12:03Z", "model": "mome-demo",
       "original_image": "CT.nrrd", "original_label": "CT.seg.nrrd",
       "image_sha256": "...", "label_sha256": "..."}]}

Paths are relative to the manifest, so the folder can be moved or copied to a training machine.
``labels`` maps segment names (``.seg.nrrd``) or label values (label maps) to structure ids of the
vocabulary (``Resources/vocabulary.json``); every structure named there counts as annotated in the
case (where its segment is empty, it is absent), the others as unknown, so a case that corrects
only the liver teaches nothing about the spleen. Segments that name no structure stay in the copied
file with no ids (``"Tumour": []``): the trainer leaves them out, and they take no voxels from the
segments they overlap. Fine-tune with ``configs/finetune_corrections.yaml``.

Writes are atomic: the files are copied into a hidden staging folder, read back through the
trainer's own loader, and only then moved into place, followed by the manifest (written to a
temporary file and renamed). A failure at any point leaves the folder as it was.

:func:`register` adds ``mome corrections add`` and ``mome corrections list``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import InputError, MoMEError

__all__ = [
    "MANIFEST_NAME",
    "MANIFEST_FORMAT",
    "add_correction_case",
    "list_correction_cases",
    "parse_labels",
    "register",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "mome-corrections"
_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_LOCK_NAME = ".manifest.lock"
_STALE_LOCK_S = 600.0  # a lock file older than this was left by a writer that died
LOCK_TIMEOUT_S = 30.0  # how long a writer waits for another one to finish


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in _IMAGE_SUFFIXES if name.endswith(s)), None)


def _default_case_id(image: Path) -> str:
    name = image.name
    suffix = _suffix(image)
    stem = name[: -len(suffix)] if suffix else name.split(".")[0]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")
    return stem[:100] or "case"


def _check_case_id(case_id: str) -> str:
    case_id = str(case_id).strip()
    if not _CASE_ID.match(case_id) or case_id in (".", ".."):
        raise InputError(f"case id {case_id!r}: use 1-100 letters, digits, '.', '_' or '-', starting with a "
                         "letter or digit")
    return case_id


def _known_ids() -> tuple[set[str], Any]:
    from .vocabulary import Vocabulary

    vocabulary = Vocabulary.load()
    return set(vocabulary.ids) | set(vocabulary.groups), vocabulary


def _check_ids(key: str, ids: Any, known: set[str], vocabulary: Any) -> list[str]:
    """The structure ids of one labels entry, each checked against the vocabulary."""
    values = [ids] if isinstance(ids, str) else list(ids) if isinstance(ids, (list, tuple)) else None
    if not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise InputError(f"labels[{key!r}]: expected a structure id or a list of them, got {ids!r}")
    out = []
    for value in (v.strip() for v in values):
        if value not in known:
            hint = ""
            with contextlib.suppress(MoMEError):
                best, ratio = vocabulary.string_similarity(value)
                hint = f" (did you mean {best!r}?)" if ratio > 0.6 else ""
            raise InputError(f"labels[{key!r}]: unknown structure id {value!r}{hint}; ids are listed in "
                             "Resources/vocabulary.json")
        out.append(value)
    return out


def _is_slicer_segmentation(path: Path) -> bool:
    if path.name.lower().endswith(".seg.nrrd"):
        return True
    if not path.name.lower().endswith(".nrrd"):
        return False
    import nrrd

    try:
        header = nrrd.read_header(str(path))
    except Exception as exc:  # pynrrd raises several types for damaged headers
        raise InputError(f"{path}: not a readable NRRD file ({' '.join(str(exc).split())[:200]})") from exc
    return any(re.match(r"^Segment\d+_", key) for key in header)


def _segment_labels(path: Path, labels: Mapping[str, Any] | None, known: set[str], vocabulary: Any
                    ) -> tuple[dict[str, list[str]], list[str]]:
    """The segment table of a Slicer segmentation, checked against its segments.

    ``labels`` keys must name segments as the trainer matches them (exact, then case-insensitive);
    the segments they do not name are left out. Without ``labels`` each segment is named through
    the vocabulary (ids, display names such as "Left kidney", synonyms) and the ones it does not
    know are left out. Returns the table, in which a left-out segment has no ids (the trainer then
    ignores it), and the names of the left-out segments.
    """
    from .io.segmentation import read_segmentation

    names = [s.name.strip() for s in read_segmentation(path).segments]
    lowered = {n.lower() for n in names}
    table: dict[str, list[str]] = {}
    for key, ids in (labels or {}).items():
        key = str(key).strip()
        if key not in names and key.lower() not in lowered:
            raise InputError(f"{path.name}: no segment named {key!r}; its segments are "
                             f"{', '.join(repr(n) for n in names) or 'none'}")
        table[key] = _check_ids(key, ids, known, vocabulary)
    mapped = {k.lower() for k in table}
    unused = []
    for name in names:
        if name.lower() in mapped:
            continue
        mapped.add(name.lower())
        as_id = name.lower().replace(" ", "_").replace("-", "_")
        found = vocabulary.lookup(name) if labels is None else []
        if labels is None and (name in known or as_id in known):
            table[name] = [name if name in known else as_id]
        elif len(found) == 1:
            table[name] = [found[0].id]
        else:
            table[name] = []
            unused.append(name)
    return table, unused


def _labelmap_labels(path: Path, labels: Mapping[Any, Any] | None, known: set[str], vocabulary: Any
                     ) -> dict[str, list[str]]:
    if not labels:
        raise InputError(f"{path.name}: a label map needs labels (label value -> structure id, e.g. "
                         "--labels 1=liver,2=spleen)")
    table: dict[str, list[str]] = {}
    for key, ids in labels.items():
        try:
            value = int(str(key).strip())
        except ValueError:
            raise InputError(f"labels: {key!r} is not a label value; a label map's labels map integers "
                             "to structure ids") from None
        if value < 1:
            raise InputError(f"labels: label value {value} must be 1 or more (0 is background)")
        table[str(value)] = _check_ids(str(key), ids, known, vocabulary)
    return table


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _copy(source: Path, target: Path) -> str:
    """Copy ``source`` to ``target`` (flushed to disk); return the SHA-256 of the bytes."""
    digest = hashlib.sha256()
    with open(source, "rb") as src, open(target, "xb") as dst:
        while True:
            chunk = src.read(1 << 20)
            if not chunk:
                break
            digest.update(chunk)
            dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    return digest.hexdigest()


@contextlib.contextmanager
def _manifest_lock(folder: Path):
    """One writer at a time per corrections folder (a lock file; a stale one is broken)."""
    lock = folder / _LOCK_NAME
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    while True:
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            with contextlib.suppress(OSError):
                if time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
                    lock.unlink()
                    continue
            if time.monotonic() >= deadline:
                raise MoMEError(f"{folder}: another writer holds {_LOCK_NAME}; try again (or delete the file "
                                "if no one else is adding cases)") from None
            time.sleep(0.1)
        except OSError as exc:
            raise MoMEError(f"{folder}: cannot write ({exc.strerror or exc})") from exc
    try:
        os.write(handle, str(os.getpid()).encode())
        os.close(handle)
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()


def _read_manifest(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The entries of ``path`` and, for the ``{"cases": [...]}`` form, the document around them."""
    if not path.is_file():
        return [], {"format": MANIFEST_FORMAT, "version": 1, "cases": []}
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable JSON manifest ({' '.join(str(exc).split())[:200]})") from None
    if isinstance(loaded, list):
        cases, document = loaded, None
    elif isinstance(loaded, dict) and isinstance(loaded.get("cases"), list):
        cases, document = loaded["cases"], loaded
    else:
        raise InputError(f"{path}: expected a list of cases or {{\"cases\": [...]}}")
    if not all(isinstance(c, dict) for c in cases):
        raise InputError(f"{path}: every case must be a JSON object")
    return list(cases), document


def _entry_id(entry: Mapping[str, Any]) -> str:
    """A manifest entry's case id as the trainer derives it."""
    return str(entry.get("case_id") or Path(str(entry.get("image", ""))).name.split(".")[0])


def _load_like_the_trainer(entry: dict[str, Any], base: Path) -> dict[str, int]:
    """Read the staged case through the trainer's manifest and case loaders; voxels per structure."""
    import numpy as np

    from .training.config import DatasetSpec
    from .training.datasets import load_case, manifest_records

    from .io.readers import one_line

    staged = dict(entry, image=str(base / entry["image"]), label=str(base / entry["label"]))
    (record, _), = manifest_records(DatasetSpec(kind="manifest", name="corrections", entries=[staged]))
    try:
        _, labels, values = load_case(record)
    except MoMEError as exc:  # name the caller's files, not the staged copies
        message = str(exc).replace(staged["image"], entry["original_image"])
        raise InputError(message.replace(staged["label"], entry["original_label"])) from exc
    except Exception as exc:  # readers raise several types for damaged files
        raise InputError(f"{entry['original_label']}: the trainer cannot read this case with "
                         f"{entry['original_image']} ({one_line(exc)})") from exc
    counts: dict[str, int] = {}
    for structure in entry["structures"]:
        mapped = [v for v, ids in values.items() if structure in ids]
        counts[structure] = int(np.isin(labels, mapped).sum()) if mapped else 0
    return counts


def _has_labelled_voxels(path: Path, table: dict[str, list[str]]) -> bool:
    """Whether the segmentation file itself labels any voxel with a structure of ``table`` (a case
    whose structures are all absent is a valid correction; one whose voxels miss the CT is not)."""
    from .io.segmentation import read_segmentation

    used = {k.lower() for k, ids in table.items() if ids}
    if path.name.endswith(".seg.nrrd"):
        return any(s.mask.any() for s in read_segmentation(path).segments if s.name.strip().lower() in used)
    import numpy as np

    from .io.readers import read_volume

    return bool(np.isin(np.rint(read_volume(path).array), [int(k) for k in used]).any())


# --------------------------------------------------------------------------------------------
# The writer
# --------------------------------------------------------------------------------------------


def add_correction_case(dataset_dir: str | os.PathLike, image_path: str | os.PathLike,
                        label_path: str | os.PathLike, labels: Mapping[Any, str | Sequence[str]] | None = None,
                        case_id: str | None = None, overwrite: bool = False, *, model: str | None = None,
                        split: str = "train", note: str | None = None) -> Path:
    """Copy a CT and its corrected segmentation into ``dataset_dir`` and list them in its manifest.

    Args:
        dataset_dir: the corrections folder (created when missing); ``manifest.json`` lives in it.
        image_path: the CT, one file: ``.nrrd``, ``.nii.gz``, ``.nii`` or ``.mha``.
        label_path: the corrected segmentation: a Slicer ``.seg.nrrd`` or a label map on any grid
            that covers the CT (it is put on the CT's grid when training).
        labels: ``.seg.nrrd``: segment name -> structure id (or list of ids), e.g.
            ``{"Liver": "liver", "Left kidney": "kidney_left"}``; segments it does not name are
            left out (listed in the entry's ``unused_segments``). ``None`` names every segment
            through the vocabulary (ids, display names such as "Left kidney", synonyms) and leaves
            out the ones it does not know. Label map: label value -> structure id, required.
            Structure ids (and group ids such as ``lumbar_vertebrae``) come from the vocabulary.
        case_id: the case's folder name and id (letters, digits, ``. _ -``); default: the CT's
            file name without its extension.
        overwrite: replace a case of the same id (its folder and its manifest entry).
        model: the model whose output was corrected, recorded with the case.
        split: ``"train"`` or ``"val"`` (held out from training, scored by validation).
        note: free text kept in the entry.

    Returns:
        The case folder, ``dataset_dir / case_id``.

    Raises:
        InputError: a missing or unreadable file, an unknown structure id, a segment that the
            segmentation lacks, a segmentation that does not overlap the CT, or an existing case
            without ``overwrite``. Nothing is written then.
        MoMEError: the folder cannot be written.
    """
    dataset = Path(dataset_dir).expanduser()
    image = Path(image_path).expanduser()
    label = Path(label_path).expanduser()
    for path, what in ((image, "CT"), (label, "segmentation")):
        if not path.exists():
            raise InputError(f"{path}: {what} not found")
        if not path.is_file():
            raise InputError(f"{path}: {what} must be one file (save it as .nrrd or .nii.gz)")
    image_suffix = _suffix(image)
    if image_suffix is None:
        raise InputError(f"{image}: CT must be {', '.join(_IMAGE_SUFFIXES)}; save it as .nrrd or .nii.gz")
    if split not in ("train", "val"):
        raise InputError(f"split {split!r}: must be 'train' or 'val'")
    case_id = _check_case_id(case_id if case_id is not None else _default_case_id(image))

    known, vocabulary = _known_ids()
    unused: list[str] = []
    if _is_slicer_segmentation(label):
        table, unused = _segment_labels(label, labels, known, vocabulary)
        if not any(table.values()):
            raise InputError(f"{label.name}: none of its segments names a known structure; pass labels "
                             "(segment name -> structure id)")
        label_name = "segmentation.seg.nrrd"
    else:
        if _suffix(label) is None:
            raise InputError(f"{label}: segmentation must be a .seg.nrrd or a label map "
                             f"({', '.join(_IMAGE_SUFFIXES)})")
        table = _labelmap_labels(label, labels, known, vocabulary)
        label_name = "labels" + _suffix(label)
    image_name = "image" + image_suffix

    if dataset.exists() and not dataset.is_dir():
        raise InputError(f"{dataset}: not a folder")
    created = not dataset.exists()
    try:
        dataset.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MoMEError(f"{dataset}: cannot create the corrections folder ({exc.strerror or exc})") from exc
    try:
        return _add(dataset, image, label, table, unused, image_name, label_name, case_id, overwrite,
                    {"split": split, "model": model, "note": note})
    except BaseException:
        if created:  # a folder made for this case only goes again
            with contextlib.suppress(OSError):
                dataset.rmdir()
        raise


def _add(dataset: Path, image: Path, label: Path, table: dict[str, list[str]], unused: list[str], image_name: str,
         label_name: str, case_id: str, overwrite: bool, extra: dict[str, Any]) -> Path:
    """The locked part of :func:`add_correction_case`: stage, check, move into place, list."""
    split, model, note = extra["split"], extra["model"], extra["note"]
    manifest = dataset / MANIFEST_NAME
    with _manifest_lock(dataset):
        cases, document = _read_manifest(manifest)
        target = dataset / case_id
        existing = [i for i, c in enumerate(cases) if _entry_id(c) == case_id]
        if (existing or target.exists()) and not overwrite:
            raise InputError(f"{dataset}: case {case_id!r} exists; pass overwrite (--overwrite) to replace it, "
                             "or another case id")
        staging = Path(tempfile.mkdtemp(prefix=f".{case_id}.", suffix=".tmp", dir=dataset))
        backup: Path | None = None
        moved = False
        manifest_tmp: Path | None = None
        try:
            entry: dict[str, Any] = {
                "case_id": case_id,
                "image": f"{case_id}/{image_name}",
                "label": f"{case_id}/{label_name}",
                "labels": {k: ids[0] if len(ids) == 1 else ids for k, ids in table.items()},  # [] = left out
                "split": split,
                "structures": sorted({i for ids in table.values() for i in ids}),
                "source": "correction",
                "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
            if model:
                entry["model"] = str(model)
            if note:
                entry["note"] = str(note)
            if unused:
                entry["unused_segments"] = unused
            entry["original_image"] = image.name
            entry["original_label"] = label.name
            entry["image_sha256"] = _copy(image, staging / image_name)
            entry["label_sha256"] = _copy(label, staging / label_name)
            staged_entry = dict(entry, image=image_name, label=label_name)
            counts = _load_like_the_trainer(staged_entry, staging)
            if not any(counts.values()) and _has_labelled_voxels(staging / label_name, table):
                raise InputError(f"{label.name}: no labelled voxel inside the CT {image.name}; is this the "
                                 "segmentation of that CT?")
            entry["voxels"] = counts

            if existing:
                cases[existing[0]] = entry
                cases = [c for i, c in enumerate(cases) if i not in existing[1:]]
            else:
                cases.append(entry)
            text = json.dumps(dict(document, cases=cases) if document is not None else cases, indent=1) + "\n"
            handle, name = tempfile.mkstemp(prefix=f".{MANIFEST_NAME}.", suffix=".tmp", dir=dataset)
            manifest_tmp = Path(name)
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                stream.write(text)
                stream.flush()
                os.fsync(stream.fileno())

            if target.exists():
                backup = dataset / f".{case_id}.replaced.{os.getpid()}.tmp"
                os.replace(target, backup)
            os.replace(staging, target)
            moved = True
            os.replace(manifest_tmp, manifest)
            manifest_tmp = None
        except OSError as exc:
            raise MoMEError(f"{dataset}: cannot write case {case_id!r} ({exc.strerror or exc}); "
                            "the corrections folder is unchanged") from exc
        finally:
            failed = manifest_tmp is not None
            if failed and moved:  # the manifest was not replaced: put the old case folder back
                with contextlib.suppress(OSError):
                    os.replace(target, staging)
            if backup is not None and backup.exists():
                if failed:
                    with contextlib.suppress(OSError):
                        os.replace(backup, target)
                else:
                    shutil.rmtree(backup, ignore_errors=True)
            if manifest_tmp is not None:
                with contextlib.suppress(OSError):
                    manifest_tmp.unlink()
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("added correction case %s to %s (%s)", case_id, manifest, ", ".join(entry["structures"]))
    return target


def list_correction_cases(dataset_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The manifest entries of a corrections folder, each with ``"missing"``: its files that are gone."""
    dataset = Path(dataset_dir).expanduser()
    manifest = dataset / MANIFEST_NAME
    if not manifest.is_file():
        raise InputError(f"{dataset}: no {MANIFEST_NAME} (add a case with mome corrections add)")
    cases, _ = _read_manifest(manifest)
    out = []
    for entry in cases:
        missing = [str(entry.get(k)) for k in ("image", "label")
                   if not (dataset / str(entry.get(k, ""))).is_file()]
        out.append(dict(entry, case_id=_entry_id(entry), missing=missing))
    return out


def parse_labels(text: str | None) -> dict[str, str] | None:
    """``--labels``: ``"Liver=liver,Left kidney=kidney_left"`` (or ``1=liver,2=spleen``), or a JSON file."""
    if text is None or not text.strip():
        return None
    candidate = Path(text).expanduser()
    if text.strip().lower().endswith(".json"):
        try:
            loaded = json.loads(candidate.read_text(encoding="utf-8"))
        except OSError as exc:
            raise InputError(f"{candidate}: cannot read labels ({exc.strerror or exc})") from None
        except ValueError as exc:
            raise InputError(f"{candidate}: not valid JSON ({' '.join(str(exc).split())[:200]})") from None
        if not isinstance(loaded, dict):
            raise InputError(f"{candidate}: expected {{\"segment name or label value\": \"structure id\"}}")
        return loaded
    out: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, _, value = item.partition("=")
        if not key.strip() or not value.strip():
            raise InputError(f"--labels {item.strip()!r}: expected NAME=structure_id, e.g. \"Liver=liver\"")
        out[key.strip()] = value.strip()
    return out or None


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def cmd_corrections(args: argparse.Namespace) -> int:
    action = getattr(args, "corrections_action", None)
    if action == "add":
        folder = add_correction_case(args.dataset, args.ct, args.seg, parse_labels(args.labels), args.case_id,
                                     overwrite=args.overwrite, model=args.model, split=args.split, note=args.note)
        entry = next(c for c in list_correction_cases(args.dataset) if c["case_id"] == folder.name)
        print(f"added {folder.name}: {', '.join(entry['structures'])} -> {folder}")
        if entry.get("unused_segments"):
            print(f"left out (no structure id): {', '.join(entry['unused_segments'])}")
        return 0
    if action == "list":
        cases = list_correction_cases(args.dataset)
        print(f"{'case':<24} {'split':<5} {'created':<20} {'model':<16} structures")
        for entry in cases:
            row = (f"{entry['case_id'][:24]:<24} {str(entry.get('split') or 'train'):<5} "
                   f"{str(entry.get('created') or '-'):<20} {str(entry.get('model') or '-')[:16]:<16} "
                   f"{', '.join(entry.get('structures') or [str(v) for v in (entry.get('labels') or {}).values()])}")
            if entry["missing"]:
                row += f"  MISSING {', '.join(entry['missing'])}"
            print(row)
        print(f"{len(cases)} case(s) in {Path(args.dataset) / MANIFEST_NAME}")
        return 0
    args.corrections_parser.print_help(sys.stderr)
    return 2


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``mome corrections add`` and ``mome corrections list``."""
    parser = subparsers.add_parser(
        "corrections",
        help="collect corrected segmentations as training data (a folder with a manifest for mome train)",
        description="Copy CTs with their corrected segmentations into a corrections folder and list them "
        "in its manifest.json, which configs/finetune_corrections.yaml fine-tunes on.",
    )
    sub = parser.add_subparsers(dest="corrections_action", metavar="ACTION")
    add = sub.add_parser("add", help="add a CT and its corrected segmentation",
                         description="Copy CT and SEG into DIR/CASE_ID/ and list them in DIR/manifest.json. "
                         "Nothing is written when a check fails.")
    add.add_argument("ct", metavar="CT", help="the CT: .nrrd, .nii.gz, .nii or .mha")
    add.add_argument("seg", metavar="SEG", help="the corrected segmentation: .seg.nrrd or a label map")
    add.add_argument("--dataset", "-d", required=True, metavar="DIR", help="corrections folder (created if missing)")
    add.add_argument("--labels", "-l", default=None,
                     help='segment name (or label value) -> structure id: "Liver=liver,Left kidney=kidney_left", '
                     "or a JSON file; default for a .seg.nrrd: its segment names read as structure names")
    add.add_argument("--case-id", default=None, help="case folder name (default: the CT's file name)")
    add.add_argument("--split", default="train", choices=["train", "val"],
                     help="train (default) or val (held out, scored by validation)")
    add.add_argument("--model", default=None, help="the model whose output was corrected (recorded)")
    add.add_argument("--note", default=None, help="free text kept with the case")
    add.add_argument("--overwrite", action="store_true", help="replace a case with the same id")
    listing = sub.add_parser("list", help="list the cases of a corrections folder")
    listing.add_argument("--dataset", "-d", required=True, metavar="DIR", help="corrections folder")
    parser.set_defaults(handler=cmd_corrections, corrections_parser=parser)
    return parser
