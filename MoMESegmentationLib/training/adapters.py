"""Table-driven readers for public CT segmentation datasets.

Each public dataset (and version) is described by one JSON data table in
``Resources/datasets/<name>.json``; a single :class:`DatasetAdapter` reads any of them.
A table holds:

``layout``
    How the folder is organised. ``kind`` is one of

    * ``"paired"``: one image file and one label-map file per case. ``images`` and ``labels``
      are glob patterns relative to the dataset root; ``image_regex`` / ``label_regex`` pull
      the case id out of each relative path (named group ``case`` or the first group), and
      images and labels are paired by case id (MSD ``imagesTr``/``labelsTr``, BTCV
      ``img/imgXXXX`` + ``label/labelXXXX``, KiTS ``case_XXXXX/imaging`` + ``segmentation``).
    * ``"structure_files"``: one binary mask file per structure in a folder beside the image
      (TotalSegmentator ``sXXXX/ct.nii.gz`` + ``sXXXX/segmentations/<structure>.nii.gz``);
      ``segmentations`` names that folder and the file stem is the structure id.
    * ``"dicom_png"``: a DICOM series folder per case and a folder of PNG label slices, one per
      DICOM file in file-name order (CHAOS CT ``DICOM_anon`` + ``Ground``).

    Optional ``case_number_max`` keeps cases whose last number in the id is at most that value
    (AMOS: CT cases are 1-500, MR cases above).
``labels``
    Label value -> structure id, or list of ids when one value belongs to several structures.
``include``
    Structure id -> ids whose voxels also belong to it (``liver`` includes ``liver_tumor``).
``split_laterality``
    Structure id -> ``[right_id, left_id]``: the dataset labels both organs with one value
    (KiTS "kidney", CT-ORG "lungs"); the loader splits connected components by side in
    patient (LPS) space so that ``kidney_left`` really is the patient's left kidney.

Label values and folder layouts are public facts from each dataset's documentation
(MSD ``dataset.json``, KiTS and AMOS challenge pages, the WORD and AbdomenCT-1K papers,
TotalSegmentator's class map).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MoMEError
from ..resources import resources_dir

__all__ = [
    "LabelTable",
    "DatasetTable",
    "CaseRecord",
    "ScanReport",
    "DatasetAdapter",
    "list_adapters",
    "load_table",
    "LAYOUT_KINDS",
]

logger = logging.getLogger(__name__)

LAYOUT_KINDS = ("paired", "structure_files", "dicom_png")
TABLES_FOLDER = "datasets"


@dataclass
class LabelTable:
    """What the values of a dataset's label maps mean.

    Attributes:
        values: label value -> structure ids that value belongs to (after ``include`` closure).
        split_laterality: structure id -> ``(right_id, left_id)`` to split by patient side.
    """

    values: dict[int, tuple[str, ...]] = field(default_factory=dict)
    split_laterality: dict[str, tuple[str, str]] = field(default_factory=dict)

    @classmethod
    def from_json(cls, labels: dict[str, Any], include: dict[str, list[str]] | None = None,
                  split: dict[str, list[str]] | None = None) -> LabelTable:
        """Build from the JSON form ``{"1": "liver", "2": ["liver_tumor"]}`` plus ``include``."""
        values: dict[int, tuple[str, ...]] = {}
        for key, ids in (labels or {}).items():
            try:
                value = int(key)
            except ValueError as exc:
                raise ValueError(f"label value {key!r} is not an integer") from exc
            ids = [ids] if isinstance(ids, str) else list(ids)
            values[value] = tuple(dict.fromkeys(str(i) for i in ids))
        for parent, children in (include or {}).items():
            for value, ids in list(values.items()):
                if any(child in ids for child in children) and parent not in ids:
                    values[value] = ids + (parent,)
        split_table = {}
        for source, pair in (split or {}).items():
            if len(pair) != 2:
                raise ValueError(f"split_laterality[{source!r}] must be [right_id, left_id]")
            split_table[source] = (str(pair[0]), str(pair[1]))
        return cls(values=values, split_laterality=split_table)

    @classmethod
    def from_names(cls, table: dict[int, str]) -> LabelTable:
        """One structure id per value (phantoms, the bundled CT, TotalSegmentator maps)."""
        return cls(values={int(v): (str(n),) for v, n in table.items()})

    def structures(self) -> list[str]:
        """Every structure id this table annotates (split sources replaced by both sides)."""
        ids: dict[str, None] = {}
        for names in self.values.values():
            for name in names:
                ids[name] = None
        for source, (right, left) in self.split_laterality.items():
            if source in ids:
                ids[right] = None
                ids[left] = None
        return list(ids)

    def to_json(self) -> dict[str, Any]:
        return {
            "labels": {str(v): list(ids) for v, ids in sorted(self.values.items())},
            "split_laterality": {k: list(v) for k, v in self.split_laterality.items()},
        }


@dataclass
class DatasetTable:
    """A parsed ``Resources/datasets/*.json`` file."""

    name: str
    title: str
    version: str
    layout: dict[str, Any]
    labels: LabelTable
    url: str = ""
    notes: str = ""
    path: str = ""

    @classmethod
    def from_file(cls, path: Path) -> DatasetTable:
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise MoMEError(f"{path}: cannot read dataset table ({exc})") from exc
        layout = raw.get("layout") or {}
        if layout.get("kind") not in LAYOUT_KINDS:
            raise MoMEError(f"{path}: layout.kind must be one of {LAYOUT_KINDS}, got {layout.get('kind')!r}")
        try:
            labels = LabelTable.from_json(raw.get("labels", {}), raw.get("include"), raw.get("split_laterality"))
        except ValueError as exc:
            raise MoMEError(f"{path}: {exc}") from exc
        return cls(
            name=str(raw.get("name", Path(path).stem)),
            title=str(raw.get("title", "")),
            version=str(raw.get("version", "")),
            layout=layout,
            labels=labels,
            url=str(raw.get("url", "")),
            notes=str(raw.get("notes", "")),
            path=str(path),
        )


@dataclass
class CaseRecord:
    """One training case: where its image and labels are and what the label values mean.

    ``label_kind`` is ``"labelmap"`` (one integer map), ``"structure_files"`` (one mask per
    structure in ``structure_files``), ``"dicom_png"`` (``image`` is a DICOM folder, ``label``
    a folder of PNG slices) or ``"seg_nrrd"`` (a Slicer segmentation; ``segment_map`` maps segment
    names to structure ids, unmapped segments are taken to be named by their id).
    """

    case_id: str
    dataset: str
    image: str
    label: str | None
    table: LabelTable
    label_kind: str = "labelmap"
    structure_files: dict[str, str] = field(default_factory=dict)
    segment_map: dict[str, list[str]] = field(default_factory=dict)  # seg.nrrd: segment name -> ids

    def to_json(self) -> dict[str, Any]:
        return {
            "case_id": self.case_id,
            "dataset": self.dataset,
            "image": self.image,
            "label": self.label,
            "label_kind": self.label_kind,
            "structure_files": dict(self.structure_files),
            "table": self.table.to_json(),
        }


@dataclass
class ScanReport:
    """Result of scanning a dataset folder."""

    cases: list[CaseRecord]
    images_without_labels: list[str] = field(default_factory=list)
    labels_without_images: list[str] = field(default_factory=list)


def list_adapters() -> list[str]:
    """Names of the bundled dataset tables (file stems in ``Resources/datasets``)."""
    folder = resources_dir() / TABLES_FOLDER
    return sorted(p.stem for p in folder.glob("*.json"))


def load_table(name: str, version: str | None = None) -> DatasetTable:
    """Load ``Resources/datasets/<name>.json`` (or ``<name>_<version>.json`` when given).

    ``name`` may also be a path to a table file of one's own.
    """
    candidate = Path(name)
    if candidate.suffix == ".json" and candidate.is_file():
        return DatasetTable.from_file(candidate)
    folder = resources_dir() / TABLES_FOLDER
    stems = [f"{name}_{version}", name] if version else [name]
    for stem in stems:
        path = folder / f"{stem}.json"
        if path.is_file():
            table = DatasetTable.from_file(path)
            if version and table.version and table.version != version and stem == name:
                raise MoMEError(f"{path}: dataset table is version {table.version}, config asks for {version}")
            return table
    raise MoMEError(f"dataset adapter {name!r} unknown; available: {', '.join(list_adapters())}")


def _case_id(regex: re.Pattern[str], relative: str) -> str | None:
    match = regex.search(relative)
    if match is None:
        return None
    if "case" in regex.groupindex:
        return match.group("case")
    return match.group(1) if match.groups() else match.group(0)


def _glob(root: Path, pattern: str) -> list[Path]:
    return sorted(p for p in root.glob(pattern) if not p.name.startswith("._"))


class DatasetAdapter:
    """Find the cases of a public dataset folder described by a :class:`DatasetTable`.

    Args:
        table: the dataset table.
        root: the dataset folder as downloaded (the layout's globs are relative to it).
    """

    def __init__(self, table: DatasetTable, root: str | Path) -> None:
        self.table = table
        self.root = Path(root)

    def scan(self) -> ScanReport:
        """Pair images and labels; raise :class:`MoMEError` if the folder holds no case."""
        if not self.root.is_dir():
            raise MoMEError(f"{self.root}: dataset folder for {self.table.name} not found")
        kind = self.table.layout["kind"]
        if kind == "structure_files":
            report = self._scan_structure_files()
        else:
            report = self._scan_paired(kind)
        limit = self.table.layout.get("case_number_max")
        if limit is not None:
            report.cases = [c for c in report.cases if _last_number(c.case_id) <= int(limit)]
        if not report.cases:
            raise MoMEError(
                f"{self.root}: no {self.table.name} cases found (expected layout: "
                f"{self.table.layout.get('images')} with {self.table.layout.get('labels', 'labels')})"
            )
        return report

    def find_cases(self) -> list[CaseRecord]:
        """The cases sorted by case id."""
        return self.scan().cases

    def _scan_paired(self, kind: str) -> ScanReport:
        layout = self.table.layout
        image_re = re.compile(layout["image_regex"])
        label_re = re.compile(layout["label_regex"])
        images: dict[str, Path] = {}
        for path in _glob(self.root, layout["images"]):
            case = _case_id(image_re, path.relative_to(self.root).as_posix())
            if case is not None:
                images.setdefault(case, path)
        labels: dict[str, Path] = {}
        for path in _glob(self.root, layout["labels"]):
            case = _case_id(label_re, path.relative_to(self.root).as_posix())
            if case is not None and path not in images.values():
                labels.setdefault(case, path)
        label_kind = "dicom_png" if kind == "dicom_png" else "labelmap"
        cases = [
            CaseRecord(case, self.table.name, str(images[case]), str(labels[case]), self.table.labels, label_kind)
            for case in sorted(images)
            if case in labels
        ]
        return ScanReport(
            cases=cases,
            images_without_labels=[str(images[c]) for c in sorted(images) if c not in labels],
            labels_without_images=[str(labels[c]) for c in sorted(labels) if c not in images],
        )

    def _scan_structure_files(self) -> ScanReport:
        layout = self.table.layout
        image_re = re.compile(layout["image_regex"])
        folder_name = layout.get("segmentations", "segmentations")
        suffix = layout.get("mask_suffix", ".nii.gz")
        known = set(self.table.labels.structures())
        cases, missing = [], []
        for path in _glob(self.root, layout["images"]):
            case = _case_id(image_re, path.relative_to(self.root).as_posix())
            if case is None:
                continue
            folder = path.parent / folder_name
            files = {
                p.name[: -len(suffix)]: str(p) for p in sorted(folder.glob(f"*{suffix}")) if p.name.endswith(suffix)
            } if folder.is_dir() else {}
            if not files:
                missing.append(str(path))
                continue
            unknown = sorted(set(files) - known)
            if unknown:
                logger.debug("%s: ignoring masks not in the %s table: %s", folder, self.table.name, unknown)
            files = {name: p for name, p in files.items() if name in known}
            values = {i + 1: (name,) for i, name in enumerate(sorted(files))}
            table = LabelTable(values=values, split_laterality=dict(self.table.labels.split_laterality))
            cases.append(CaseRecord(case, self.table.name, str(path), str(folder), table, "structure_files",
                                    {name: files[name] for name in sorted(files)}))
        cases.sort(key=lambda c: c.case_id)
        return ScanReport(cases=cases, images_without_labels=missing)


def _last_number(case_id: str) -> int:
    numbers = re.findall(r"\d+", case_id)
    return int(numbers[-1]) if numbers else 0
