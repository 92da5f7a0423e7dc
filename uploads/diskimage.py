"""What a staged file really is (format, virtual size, unsafe features) before it may be pushed.

No Django here: every function takes a path (or a file object), a format name and limits; the
caller passes settings in. Three steps, each cheap and each reading only what it needs:

1. `inspect_file()` reads the first few hundred KiB (and the last 512 bytes) with OpenStack's own
   pure-Python inspector, `oslo_utils.imageutils.format_inspector` (what Glance and Nova use),
   runs its safety checks plus ours (uploads/diskcheck.py, with each format's header checks in
   uploads/diskformats.py: every way a format has of naming another file, such as a VMDK
   descriptor's extents, which we parse ourselves), and only if all passed asks `qemu-img info`
   (and `qemu-img check`) for a second opinion (uploads/qemu.py: under CPU and memory limits as
   Glance does, and alone with the file in a private folder). The answer is an `Inspection`; a
   refusal is its `problem` (uploads/errors.py), in words a non-technical person can act on,
   with the technical detail kept for admins.
2. `qemu.convert_to_qcow2()` turns a safe file in a format the target does not accept into QCOW2.
3. `wrap_stream()` checks the bytes again while they are pushed, so a file that changed on disk
   since step 1 aborts the PUT instead of reaching the cloud.

Format names. The portal's names (`PORTAL_FORMATS`) are Glance's disk_format names plus `qcow`
(QCOW version 1) and the Huawei `zvhd`/`zvhd2`. The inspector and qemu-img name some of them
differently:

    portal  oslo inspector                         qemu-img -f
    qcow2   qcow2 (versions 2 and 3)               qcow2
    qcow    qcow2 too (same magic): told apart by  qcow
            the version in the header, here
    vmdk    vmdk (monolithicSparse and             vmdk
            streamOptimized only)
    vhd     vhd, only when the footer copy is at   vpc
            offset 0 (dynamic); a fixed VHD looks
            raw to it: we read its footer ourselves
    vhdx    vhdx                                   vhdx
    vdi     vdi                                    vdi
    qed     qed, always "banned": we check the     qed
            header ourselves and ask qemu-img
    raw     raw, or gpt (any disk with an MBR)     raw
    iso     iso (a bootable ISO also matches gpt)  raw
    zvhd,   not known to either: passed through as declared, unless the inspector finds a
    zvhd2   format that cannot be a ZVHD (such as QCOW2)
"""

import contextlib
import os
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

from oslo_utils.imageutils import format_inspector as oslo

from uploads import nbd, qemu
from uploads.diskcheck import LONG_READ_CHUNK_SIZE, Collector, judge, read_evidence, virtual_size
from uploads.diskformats import LABELS, PASS_THROUGH_FORMATS, PORTAL_FORMATS
from uploads.errors import (
    HINT_COPY_OR_EXPORT_AGAIN, HINT_EXPORT_AGAIN, ErrorCode, PortalError, Problem, gettext_noop, refusal,
)

GiB = 1024**3
# IMS limits: an uploaded file must be under 128 GB; min_disk is 1..1024 GB (OpenStack GB = GiB).
IMS_MAX_FILE_BYTES = 128 * GiB
IMS_MAX_VIRTUAL_BYTES = 1024 * GiB


@dataclass
class Inspection:
    """What `inspect_file` found. `checks` maps a check's name to "passed", "failed: why" or
    "skipped: why", in the order they ran; inspection stops at the first problem."""

    declared_format: str
    actual_size: int  # bytes on disk: what will be sent unless converted
    detected_format: str | None = None
    virtual_size: int | None = None  # bytes of the disk a server would see
    checks: dict[str, str] = field(default_factory=dict)
    problem: Problem | None = None
    bytes_read: int = 0  # by this process, not counting qemu-img
    fixed_vhd: bool = False  # a VHD with its only footer at the end (the raw disk plus 512 bytes)

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def suggested_min_disk_gb(self) -> int | None:
        """IMS's min_disk: the virtual size rounded up to whole GB, never below it (nor below 1)."""
        if not self.virtual_size:
            return None
        return max(1, -(-self.virtual_size // GiB))

    def needs_conversion(self, accepted_formats: Collection[str]) -> bool:
        """True when the target does not take this format: convert_to_qcow2() first.

        A fixed VHD is converted too: Glance's own inspector reads only the start of a file, so
        it takes a fixed VHD for raw and refuses it as vhd (415); IMS is built on Glance. As
        qcow2 it is lossless, and smaller (the disk's empty parts are left out)."""
        fmt = self.detected_format
        if fmt is None or fmt in PASS_THROUGH_FORMATS:
            return False
        return fmt not in accepted_formats or self.fixed_vhd

    def upload_format(self, accepted_formats: Collection[str]) -> str:
        """The disk_format to create the image with (after conversion, when one is needed)."""
        return "qcow2" if self.needs_conversion(accepted_formats) else self.detected_format


class FileChanged(PortalError):
    """Raised while pushing: the bytes no longer are the file that was inspected. Abort the PUT.

    Deliberately not an OSError, so requests does not turn it into a (retryable) network error.
    """

    def __init__(self, detail: str):
        super().__init__(
            gettext_noop("The file changed after it was checked, so it was not sent."),
            hint=gettext_noop("Upload the file again."), code=ErrorCode.FILE_CHANGED, detail=detail, permanent=True,
        )

    def __str__(self) -> str:
        return f"{self.message} ({self.detail})"  # a log says which check failed


class Image(Protocol):
    """What inspect_file reads: a local file (FileImage), or a staged object read by ranged GETs
    (uploads/staging/s3.py: ObjectImage), which qemu-img reads through uploads/nbd.py."""

    size: int
    path: str | None  # a local file's path, None for an object

    def open(self) -> BinaryIO:
        """The bytes from the start, read in order (a context manager)."""

    def read_at(self, offset: int, length: int) -> bytes:
        """`length` bytes at `offset`, fewer at the end."""


class FileImage:
    """A local file as an Image."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.size = os.stat(self.path).st_size

    def open(self) -> BinaryIO:
        return open(self.path, "rb")

    def read_at(self, offset: int, length: int) -> bytes:
        with open(self.path, "rb") as f:
            return os.pread(f.fileno(), length, offset)


def _size_text(n: int) -> str:
    """128 GB, 1.5 GB, 300 MB: OpenStack's GB (GiB), as IMS counts them."""
    value, unit = (n / GiB, "GB") if n >= GiB else (n / 1024**2, "MB")
    return f"{value:.1f}".removesuffix(".0") + f" {unit}"


# ---------------------------------------------------------------------------------------------
# inspect_file


def inspect_file(
    image: "str | os.PathLike | Image",
    *,
    declared_format: str,
    max_bytes: int = IMS_MAX_FILE_BYTES,
    max_virtual_bytes: int = IMS_MAX_VIRTUAL_BYTES,
    qemu_img: str = "qemu-img",
    limits: qemu.Limits = qemu.INFO_LIMITS,
) -> Inspection:
    """Find out what the file (a path, or an Image) is and whether it may be sent as
    `declared_format`.

    Never raises for anything about the file itself (that is `Inspection.problem`); raises
    InspectError when the check could not run (qemu-img missing or too slow), ValueError for a
    format name the portal does not know, OSError when the file cannot be read (and whatever an
    object Image raises when its store is away or the object changed).
    """
    if isinstance(image, (str, os.PathLike)):
        image = FileImage(image)
    declared = declared_format.lower()
    if declared not in PORTAL_FORMATS:
        raise ValueError(f"unknown disk format {declared_format!r}")
    result = Inspection(declared_format=declared, actual_size=image.size)
    result.problem = _check_file_size(result, max_bytes)
    if result.problem:
        return result

    evidence, result.bytes_read = read_evidence(image, result.actual_size)
    fmt, inspector, result.problem = judge(evidence, declared, result.checks)
    result.detected_format = fmt
    if result.problem:
        return result
    if fmt in PASS_THROUGH_FORMATS:  # no virtual size to read; the user gives min_disk
        result.checks["qemu_img_info"] = f"skipped: qemu-img cannot read {fmt}"
        return result

    result.fixed_vhd = fmt == "vhd" and not evidence.head.startswith(b"conectix")
    result.virtual_size = virtual_size(evidence, fmt, inspector)
    result.problem = _check_virtual_size(result, max_virtual_bytes)
    if result.problem:
        return result
    with _for_qemu(image) as target:
        result.problem = _second_opinion(target, result, qemu_img=qemu_img, limits=limits)
    if result.problem is None:
        result.problem = _check_virtual_size(result, max_virtual_bytes)  # qemu-img may say more
    return result


def _check_file_size(result: Inspection, max_bytes: int) -> Problem | None:
    size = result.actual_size
    if size == 0:
        result.checks["file_size"] = "failed: 0 bytes"
        return refusal("empty", "0 bytes")
    if size >= max_bytes:
        result.checks["file_size"] = f"failed: {size} bytes"
        return Problem(
            "too_large",
            gettext_noop("This file is %(size)s; the cloud takes files under %(most)s.")
            % {"size": _size_text(size), "most": _size_text(max_bytes)},
            hint=gettext_noop("Convert it to QCOW2, which leaves out empty space, and upload that; or ask an "
                              "administrator about importing it through object storage."),
            detail=f"{size} bytes >= limit {max_bytes}",
        )
    result.checks["file_size"] = "passed"
    return None


def _check_virtual_size(result: Inspection, max_virtual_bytes: int) -> Problem | None:
    size = result.virtual_size or 0
    if size > max_virtual_bytes:
        result.checks["virtual_size"] = f"failed: {size} bytes"
        return Problem(
            "virtual_too_large",
            gettext_noop("This disk is %(size)s when in use; the cloud allows disks up to %(most)s.")
            % {"size": _size_text(size), "most": _size_text(max_virtual_bytes)},
            hint=gettext_noop("Shrink the disk (its partitions, then the image) before uploading it."),
            detail=f"virtual size {size} bytes > limit {max_virtual_bytes}",
        )
    result.checks["virtual_size"] = "passed"
    return None


@contextlib.contextmanager
def _for_qemu(image: Image) -> Iterator["str | nbd.Export"]:
    """What qemu-img opens: a local file's path, or else the image served over NBD (nbd.py says
    why); a read that failed there (the store away, the object changed) is raised afterwards
    instead of being taken for qemu-img's verdict on the file."""
    if image.path is not None:
        yield image.path
        return
    with nbd.export(image.read_at, image.size) as served:
        yield served
        if served.error is not None:
            raise served.error


def _second_opinion(path: "str | nbd.Export", result: Inspection, *, qemu_img: str, limits: qemu.Limits) -> Problem | None:
    """Ask qemu-img, forced to the detected format, whether it sees the same safe image."""
    fmt = result.detected_format
    try:
        info = qemu.qemu_img_info(path, fmt, qemu_img=qemu_img, limits=limits)
    except qemu.QemuImgFailed as exc:
        result.checks["qemu_img_info"] = f"failed: {exc.detail}"
        if _says_truncated(exc.detail):
            return refusal("truncated", f"qemu-img info: {exc.detail}")
        return Problem(
            "qemu_disagrees",
            gettext_noop("The portal's second check could not read this file as a %(format)s disk.")
            % {"format": LABELS[fmt]},
            hint=HINT_COPY_OR_EXPORT_AGAIN,
            detail=f"qemu-img info -f {qemu.QEMU_DRIVERS[fmt]}: {exc.detail}",
        )
    problem = _judge_qemu_info(info, fmt)
    result.checks["qemu_img_info"] = f"failed: {problem.detail}" if problem else "passed"
    if problem:
        return problem
    result.virtual_size = max(result.virtual_size or 0, int(info.get("virtual-size") or 0))

    # Only now: unlike `info`, `qemu-img check` (and convert) open a backing file if there is one.
    if fmt not in qemu.QEMU_CHECKABLE:
        result.checks["qemu_img_check"] = f"skipped: qemu-img cannot check {fmt}"
        return None
    problem = _run_qemu_check(path, fmt, qemu_img=qemu_img, limits=limits)
    result.checks["qemu_img_check"] = f"failed: {problem.detail}" if problem else "passed"
    return problem


def _judge_qemu_info(info: dict, fmt: str) -> Problem | None:
    if info.get("format") != qemu.QEMU_DRIVERS[fmt]:
        return Problem(
            "qemu_disagrees",
            gettext_noop("The portal's second check does not see a %(format)s disk in this file.")
            % {"format": LABELS[fmt]},
            hint=HINT_EXPORT_AGAIN,
            detail=f"qemu-img says format {info.get('format')!r}, inspector {fmt!r}",
        )
    if info.get("backing-filename") or info.get("full-backing-filename"):
        return refusal("backing_file", f"qemu-img reports backing-filename {info.get('backing-filename')!r}")
    specific = (info.get("format-specific") or {}).get("data") or {}
    if specific.get("data-file"):
        return refusal("data_file", f"qemu-img reports data-file {specific['data-file']!r}")
    if info.get("encrypted"):
        return refusal("unsafe", "qemu-img reports an encrypted image")
    return None


# `qemu-img check` exit codes that pass: 0 clean; 3 only leaked clusters (wasted space, harmless);
# 63 checking is not supported for the format.
QEMU_CHECK_PASSED = (0, 3, 63)


def _run_qemu_check(path: str, fmt: str, *, qemu_img: str, limits: qemu.Limits) -> Problem | None:
    """`qemu-img check` reads the format's tables and finds data that points past the end."""
    proc = qemu.qemu_img_check(path, fmt, qemu_img=qemu_img, limits=limits)
    if proc.returncode in QEMU_CHECK_PASSED:
        return None
    detail = f"qemu-img check exit {proc.returncode}: {qemu.last_lines(proc.stderr)}"
    return refusal("truncated", detail) if _says_truncated(proc.stderr) else refusal("corrupt", detail)


def _says_truncated(message: str) -> bool:
    """qemu-img's words for data that points past the end of the file."""
    message = message.lower()
    return any(w in message for w in ("end of the file", "end of file", "truncated", "beyond eof"))


# ---------------------------------------------------------------------------------------------
# wrap_stream: the same checks again, on the bytes as they are pushed

# Inspector names InspectWrapper can check against as early as the first header: it then raises
# as soon as the header does not match. Raw, VHD (a fixed VHD looks raw until its last 512
# bytes) and ZVHD are only judged once the whole stream went by.
EARLY_INSPECTOR = {
    "qcow2": "qcow2", "qcow": "qcow2", "vmdk": "vmdk", "vhdx": "vhdx",
    "vdi": "vdi", "qed": "qed", "iso": "iso",
}


class InspectedStream:
    """A file-like object for the PUT body: read(n) returns the file's bytes, and raises
    FileChanged when they stop being a safe `expected_format` file.

    - at the first header that does not match (oslo's InspectWrapper(expected_format=...)),
    - as soon as the inspectors have decided (a few hundred KiB in) if the format or a safety
      check differs from inspection,
    - at the end, before the last chunk is returned, with the full checks (a VHD's footer, a
      streamOptimized VMDK's footer): the PUT is aborted before its body is complete.

    Read from the start, in buffers of 1 MiB or more: InspectWrapper runs ten inspectors per
    read() whatever its size, so small buffers cost CPU per GiB (figures: bench/README.md).
    """

    def __init__(self, fileobj: BinaryIO, expected_format: str, size: int):
        if expected_format not in PORTAL_FORMATS:
            raise ValueError(f"unknown disk format {expected_format!r}")
        self.expected = expected_format
        self.size = size
        self._collector = Collector(fileobj, expected_inspector=EARLY_INSPECTOR.get(expected_format))
        self._decided = False
        self._done = False

    def read(self, size: int = LONG_READ_CHUNK_SIZE) -> bytes:
        if self._done:
            return b""
        try:
            chunk = self._collector.read(size)
        except oslo.ImageFormatError as exc:
            raise FileChanged(f"inspector: {exc}") from None
        if not chunk and self._collector.count < self.size:
            raise FileChanged(f"the file ended after {self._collector.count} of {self.size} bytes")
        self._done = self._collector.count >= self.size
        if self._done:
            self._collector.finish()
        if self._done or not self._decided:
            self._check(at_end=self._done)
        return chunk

    def _check(self, at_end: bool) -> None:
        evidence = self._collector.evidence(self.size, at_end=at_end)
        if evidence is None:
            return
        self._decided = True
        fmt, _, problem = judge(evidence, self.expected, {})
        if problem is None:
            return
        # Before the end, a file that looks raw may still prove to be a fixed VHD (its footer).
        if not at_end and fmt == "raw" and problem.code == "unknown_format":
            return
        raise FileChanged(f"{problem.code}: {problem.detail}")


def wrap_stream(fileobj: BinaryIO, expected_format: str, *, size: int) -> InspectedStream:
    """Wrap the staged file for the PUT; `size` is the number of bytes that will be read."""
    return InspectedStream(fileobj, expected_format, size)
