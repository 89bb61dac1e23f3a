"""Uploaded scans: written with a size limit, checked with the library's readers, converted to NRRD.

An upload is a NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``), MetaImage (``.mha``) file or a ZIP of
one DICOM series. Every problem is an :class:`~MoMESegmentationLib.errors.InputError` with one line
that names the file and what is wrong; nothing half-written is left behind.
"""

from __future__ import annotations

import os
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

__all__ = ["UPLOAD_SUFFIXES", "UploadLimits", "UploadWriter", "safe_upload_name", "prepare_scan",
           "server_scans"]

#: What the upload field and the server-side folder accept.
UPLOAD_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".zip")
#: Scans listed from a server-side folder (a DICOM series is offered as its folder).
_SCAN_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".zip")


@dataclass(frozen=True)
class UploadLimits:
    """Largest upload (bytes on the wire, also the most a ZIP may expand to) and largest scan (voxels)."""

    max_upload_bytes: int = 1_000_000_000
    max_voxels: int = 512 * 512 * 1500

    def __post_init__(self) -> None:
        if self.max_upload_bytes < 1 or self.max_voxels < 1:
            raise ValueError("upload limits must be positive")


def _megabytes(count: int) -> str:
    return f"{count / 1e6:.0f} MB" if count >= 1e6 else f"{count} bytes"


def safe_upload_name(name: str) -> str:
    """The file name of an upload without folders or odd characters; refuses unsupported types."""
    base = re.split(r"[\\/]", str(name or ""))[-1].strip()
    cleaned = re.sub(r"[^A-Za-z0-9_.+-]+", "_", base).strip("._") or "upload"
    if not cleaned.lower().endswith(UPLOAD_SUFFIXES):
        raise InputError(f"{base or 'upload'}: not a supported scan; upload a NIfTI (.nii, .nii.gz), "
                         "NRRD (.nrrd), MetaImage (.mha) file or a zipped DICOM folder (.zip)")
    return cleaned


class UploadWriter:
    """Write an upload's bytes as they arrive, refusing more than the limit (the partial file is removed)."""

    def __init__(self, path: Path, display_name: str, limit: int) -> None:
        self.path = Path(path)
        self.display_name = display_name
        self.limit = int(limit)
        self.written = 0
        self._stream = open(self.path, "wb")  # noqa: SIM115 - closed by close()/abort()

    def write(self, chunk: bytes) -> None:
        self.written += len(chunk)
        if self.written > self.limit:
            self.abort()
            raise InputError(f"{self.display_name}: larger than this server's upload limit of "
                             f"{_megabytes(self.limit)}")
        self._stream.write(chunk)

    def close(self) -> Path:
        self._stream.close()
        if self.written == 0:
            self.path.unlink(missing_ok=True)
            raise InputError(f"{self.display_name}: the upload is empty")
        return self.path

    def abort(self) -> None:
        self._stream.close()
        self.path.unlink(missing_ok=True)


def _extract_dicom_zip(path: Path, display_name: str, folder: Path, limit: int) -> Path:
    """Unpack a ZIP's files into ``folder`` (flat names, no paths from the archive), within ``limit`` bytes."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise InputError(f"{display_name}: not a readable ZIP archive") from None
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        if not members:
            raise InputError(f"{display_name}: the ZIP archive is empty")
        if sum(m.file_size for m in members) > limit:
            raise InputError(f"{display_name}: unpacks to more than this server's limit of {_megabytes(limit)}")
        folder.mkdir(parents=True, exist_ok=True)
        total = 0
        for index, member in enumerate(members):
            if member.flag_bits & 0x1:
                raise InputError(f"{display_name}: the ZIP archive is encrypted")
            # flat, numbered names: nothing from the archive decides where a file goes
            target = folder / f"{index:06d}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', Path(member.filename).name)}"
            try:
                with archive.open(member) as source, open(target, "wb") as out:
                    while chunk := source.read(1 << 20):
                        total += len(chunk)
                        if total > limit:  # the sizes in the directory can lie
                            raise InputError(f"{display_name}: unpacks to more than this server's limit of "
                                             f"{_megabytes(limit)}")
                        out.write(chunk)
            except (zipfile.BadZipFile, OSError, RuntimeError, EOFError) as error:
                raise InputError(f"{display_name}: a file in the ZIP archive cannot be read ({error})") from None
    return folder


def prepare_scan(path: str | os.PathLike, work_dir: str | os.PathLike, limits: UploadLimits,
                 display_name: str | None = None) -> Path:
    """Check a scan and write it as ``work_dir/<name>.nrrd`` for Slicer; returns that path.

    Raises:
        InputError: one line naming ``display_name`` (default: the file's name): not an image, not
            3D, more voxels than ``limits.max_voxels``, a ZIP that is not one DICOM series, ...
    """
    from ..io.readers import read_volume, write_volume

    path = Path(path)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    display = display_name or path.name
    source = path
    unpacked = None
    if path.is_file() and path.name.lower().endswith(".zip"):
        unpacked = _extract_dicom_zip(path, display, work / (path.name + ".unpacked"), limits.max_upload_bytes)
        source = unpacked
    try:
        try:
            volume = read_volume(source)
        except InputError as error:
            # the reader names our temporary path; the user knows the upload's name
            raise InputError(_rename(str(error), str(source), display)) from None
        except (OSError, ValueError, RuntimeError, EOFError) as error:
            raise InputError(f"{display}: not a readable scan ({type(error).__name__}: "
                             f"{str(error).strip().splitlines()[0] if str(error).strip() else ''})") from None
        voxels = int(volume.array.size)
        if voxels > limits.max_voxels:
            raise InputError(f"{display}: {'x'.join(str(n) for n in volume.shape)} = {voxels:,} voxels, more "
                             f"than this server's limit of {limits.max_voxels:,}")
        stem = re.sub(r"(\.nii\.gz|\.nii|\.nrrd|\.mha|\.zip)$", "", path.name, flags=re.IGNORECASE) or "scan"
        target = work / f"{stem}.nrrd"
        write_volume(volume, target)
        return target
    finally:
        if unpacked is not None:
            shutil.rmtree(unpacked, ignore_errors=True)


def _rename(message: str, temporary: str, display: str) -> str:
    """The reader's message about the server's temporary file, told with the name the user knows."""
    message = message.strip().splitlines()[0] if message.strip() else "not a readable scan"
    if message.startswith(temporary + ":"):
        message = display + message[len(temporary):]
    else:
        message = f"{display}: {message}"
    # the temporary path may also appear inside (a library's own message): no server paths in the page
    head, _, rest = message.partition(": ")
    rest = rest.replace(temporary, display).replace(Path(temporary).name, display)
    return f"{head}: {rest}"


def server_scans(folder: str | os.PathLike | None) -> list[Path]:
    """Scans in a server-side folder (top level): image files, ZIPs and DICOM series folders."""
    if folder is None:
        return []
    root = Path(folder)
    if not root.is_dir():
        return []
    found = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name.lower()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.name.lower().endswith(_SCAN_SUFFIXES):
            found.append(entry)
        elif entry.is_dir() and any(child.is_file() for child in entry.iterdir()):
            found.append(entry)  # a DICOM series folder; the reader says so if it is not one
    return found
