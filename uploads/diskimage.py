"""What a staged file really is (format, virtual size, unsafe features) before it may be pushed.

No Django here: every function takes a path (or a file object), a format name and limits; the
caller passes settings in. Three steps, each cheap and each reading only what it needs:

1. `inspect_file()` reads the first few hundred KiB (and the last 512 bytes) with OpenStack's own
   pure-Python inspector, `oslo_utils.imageutils.format_inspector` (what Glance and Nova use),
   runs its safety checks plus ours (OWN_CHECKS: every way a format has of naming another file,
   such as a VMDK descriptor's extents, which we parse ourselves), and only if all passed asks
   `qemu-img info` (and `qemu-img check`) for a second opinion, under CPU and memory limits as
   Glance does, and alone with the file in a private folder (`_alone`). The answer
   is an `Inspection`; a refusal is its `problem`, in words a non-technical person can act on,
   with the technical detail kept for admins.
2. `convert_to_qcow2()` turns a safe file in a format the target does not accept into QCOW2.
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
import fcntl
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from oslo_utils.imageutils import format_inspector as oslo

GiB = 1024**3
# IMS limits: an uploaded file must be under 128 GB; min_disk is 1..1024 GB (OpenStack GB = GiB).
IMS_MAX_FILE_BYTES = 128 * GiB
IMS_MAX_VIRTUAL_BYTES = 1024 * GiB

CHUNK_SIZE = 64 * 1024  # bytes handed to the inspectors per step while detecting
# Past the first MiB (only a streamOptimized VMDK with its footer at the end, or a VHDX with its
# metadata further in, get there), bigger steps: the inspectors cost per step, not per byte.
LONG_READ_CHUNK_SIZE = 1024 * 1024
HEAD_SIZE = 64 * 1024  # the first bytes kept for our own header checks (names of backing files)
TAIL_SIZE = 512  # a VHD footer


@dataclass(frozen=True)
class Limits:
    """Resource limits for one qemu-img run: a parser bug fed a hostile file must not eat the host."""

    cpu_seconds: int
    address_space: int  # bytes of virtual memory
    timeout: float | None  # wall-clock seconds; None waits as long as it takes


# Glance and Nova run `qemu-img info` with 1 GiB of address space; reading headers needs < 1 s CPU.
INFO_LIMITS = Limits(cpu_seconds=10, address_space=1 * GiB, timeout=60)
# Converting is real work (about 1 CPU second per GB of data) but never needs much memory.
CONVERT_LIMITS = Limits(cpu_seconds=4 * 3600, address_space=1 * GiB, timeout=None)

PORTAL_FORMATS = ("qcow2", "qcow", "vmdk", "vhd", "vhdx", "vdi", "qed", "raw", "iso", "zvhd", "zvhd2")
PASS_THROUGH_FORMATS = ("zvhd", "zvhd2")  # Huawei formats neither the inspector nor qemu-img reads
# What a genuine ZVHD/ZVHD2 may look like to the inspector (it is VHD-based); anything else is
# a different, recognisable format and the user picked the wrong one.
PASS_THROUGH_LOOKS_LIKE = ("raw", "vhd")
QEMU_DRIVERS = {
    "qcow2": "qcow2", "qcow": "qcow", "vmdk": "vmdk", "vhd": "vpc", "vhdx": "vhdx",
    "vdi": "vdi", "qed": "qed", "raw": "raw", "iso": "raw",
}
# Formats `qemu-img check` can verify (it finds clusters past the end of a truncated file).
QEMU_CHECKABLE = ("qcow2", "qed", "vdi", "vhdx", "vmdk")
LABELS = {name: name.upper() for name in PORTAL_FORMATS} | {"luks": "LUKS (encrypted)"}


# ---------------------------------------------------------------------------------------------
# Results and errors


@dataclass(frozen=True)
class Problem:
    """Why a file is refused. `message` and `hint` are for the uploader; `detail` for admins."""

    code: str
    message: str
    hint: str = ""
    detail: str = ""
    suggested_format: str | None = None  # the one-click fix: upload it as this format instead


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


class InspectError(Exception):
    """Inspecting or converting could not be done, through no fault of the file: qemu-img is
    missing, the disk is full, a run took too long. `permanent`: retrying will not help."""

    def __init__(self, message: str, *, hint: str = "", detail: str = "", permanent: bool = False):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.detail = detail
        self.permanent = permanent


class QemuImgFailed(InspectError):
    """qemu-img ran but refused the file (or was stopped by its limits)."""

    def __init__(self, message: str, *, detail: str, returncode: int):
        super().__init__(message, detail=detail, permanent=True)
        self.returncode = returncode


class FileChanged(Exception):
    """Raised while pushing: the bytes no longer are the file that was inspected. Abort the PUT.

    Deliberately not an OSError, so requests does not turn it into a (retryable) network error.
    """

    permanent = True

    def __init__(self, detail: str):
        super().__init__(detail)
        self.problem = Problem(
            "file_changed",
            "The file changed after it was checked, so it was not sent.",
            hint="Upload the file again.",
            detail=detail,
        )
        self.message = self.problem.message
        self.hint = self.problem.hint


# ---------------------------------------------------------------------------------------------
# Problems, in plain words

HINT_EXPORT_AGAIN = (
    "Export the disk again from the tool that made it as one standalone image file, then upload that."
)
HINT_COPY_AGAIN = "Copy or download the file again, then upload the new copy."


def _mismatch(declared: str, detected: str) -> Problem:
    if detected == "raw":
        return Problem(
            "unknown_format",
            f"This file is not a {LABELS[declared]} disk: "
            "the portal cannot recognise any disk image format in it.",
            hint="If it is a raw disk image, upload it as RAW; "
            "otherwise check that you picked the right file.",
            detail=f"declared {declared}, inspector found no known format (raw)",
            suggested_format="raw",
        )
    return Problem(
        "format_mismatch",
        f"This file is a {LABELS[detected]} disk, not {LABELS[declared]} — upload it as {LABELS[detected]}?",
        hint=f"Choose {LABELS[detected]} and the portal takes the same file again, nothing to re-upload.",
        detail=f"declared {declared}, inspector found {detected}",
        suggested_format=detected,
    )


def _backing_file(detail: str) -> Problem:
    return Problem(
        "backing_file",
        "This disk image only holds the changes made on top of another disk, so on its own it is incomplete.",
        hint=HINT_EXPORT_AGAIN,
        detail=detail,
    )


def _data_file(detail: str) -> Problem:
    return Problem(
        "data_file",
        "This disk image keeps its data in other files, so the file you chose is not the whole disk.",
        hint=HINT_EXPORT_AGAIN,
        detail=detail,
    )


def _unsafe(detail: str) -> Problem:
    return Problem(
        "unsafe",
        "This disk image uses features the cloud does not accept.",
        hint=HINT_EXPORT_AGAIN,
        detail=detail,
    )


def _truncated(detail: str) -> Problem:
    return Problem(
        "truncated",
        "This file is incomplete: part of the disk image is missing, probably cut off while it was copied.",
        hint=HINT_COPY_AGAIN,
        detail=detail,
    )


def _corrupt(detail: str) -> Problem:
    return Problem(
        "corrupt",
        "This disk image is damaged.",
        hint=HINT_COPY_AGAIN + " If that does not help, export the disk again.",
        detail=detail,
    )


def _extended_l2(detail: str) -> Problem:
    return Problem(
        "unsafe",
        "This QCOW2 file was saved with \u201cextended L2 entries\u201d, a newer QCOW2 layout "
        "the cloud cannot read.",
        hint="Convert it to a standard QCOW2 and upload that, for example: "
        "qemu-img convert -O qcow2 -o extended_l2=off yours.qcow2 standard.qcow2",
        detail=detail,
    )


def _partition_table(detail: str) -> Problem:
    """A raw disk whose first sector is a boot sector (55 AA) with no usable partition table."""
    if "no partitions" in detail:
        return Problem(
            "unsafe",
            "This file starts with a boot sector that lists no partitions: it looks like a single "
            "partition or a disk whose partition table is missing, and the cloud cannot start a "
            "server from that.",
            hint="Upload the whole disk, with its partition table, not one partition of it: "
            "export the disk again from the tool that made it.",
            detail=detail,
        )
    return Problem(
        "unsafe",
        "The partition table at the start of this disk is damaged, so the cloud cannot tell what "
        "is on the disk.",
        hint=HINT_COPY_AGAIN + " If that does not help, export the disk again.",
        detail=detail,
    )


def _size_text(n: int) -> str:
    """128 GB, 1.5 GB, 300 MB: OpenStack's GB (GiB), as IMS counts them."""
    value, unit = (n / GiB, "GB") if n >= GiB else (n / 1024**2, "MB")
    return f"{value:.1f}".removesuffix(".0") + f" {unit}"


# ---------------------------------------------------------------------------------------------
# Reading: the oslo inspectors plus the first and last bytes for our own checks


@dataclass
class _Evidence:
    """What one pass over (part of) a file showed."""

    matches: list[oslo.FileInspector]  # oslo's matches: [raw] when nothing specific matched
    head: bytes  # the first HEAD_SIZE bytes
    tail: bytes | None  # the last TAIL_SIZE bytes; None while the end is not known yet
    size: int  # the file's size
    # Bytes at (offset, length) anywhere in the file, for tables a header points to (a VHDX's
    # metadata items). None when they cannot be had: while pushing, only the head is kept.
    read_at: Callable[[int, int], bytes | None] = lambda offset, length: None

    def bytes_at(self, offset: int, length: int) -> bytes | None:
        """From the head when it holds them, else read_at."""
        if offset + length <= len(self.head):
            return self.head[offset : offset + length]
        return self.read_at(offset, length)


class _NoClose:
    """Lets InspectWrapper read a file without closing it when it finishes."""

    def __init__(self, fileobj: BinaryIO):
        self.read = fileobj.read


class _Collector:
    """Feeds bytes to oslo's InspectWrapper (every inspector at once, as detect_file_format does)
    and keeps the first and last bytes of the stream."""

    def __init__(self, fileobj: BinaryIO, *, expected_inspector: str | None = None):
        self.wrapper = oslo.InspectWrapper(_NoClose(fileobj), expected_format=expected_inspector)
        self.head = bytearray()
        self.tail = b""
        self.count = 0

    def read(self, size: int) -> bytes:
        chunk = self.wrapper.read(size)  # raises ImageFormatError early on an expected-format miss
        self.count += len(chunk)
        if len(self.head) < HEAD_SIZE:
            self.head += chunk[: HEAD_SIZE - len(self.head)]
        self.tail = (self.tail + chunk[-TAIL_SIZE:])[-TAIL_SIZE:]
        return chunk

    def finish(self) -> None:
        self.wrapper.close()

    def evidence(self, size: int, *, at_end: bool) -> _Evidence | None:
        """None while the inspectors still need more bytes to decide."""
        matches = self.wrapper.formats
        if matches is None:
            return None
        return _Evidence(list(matches), bytes(self.head), self.tail if at_end else None, size)


def _read_evidence(path: str, size: int) -> tuple[_Evidence, int]:
    """Read only until every inspector has decided (a few hundred KiB for most formats; a
    streamOptimized VMDK keeps its footer at the end, so that one is read through), then the
    last 512 bytes. Returns the evidence and the number of bytes read."""
    with open(path, "rb") as f:
        collector = _Collector(f)
        evidence = None
        while evidence is None:
            step = CHUNK_SIZE if collector.count < LONG_READ_CHUNK_SIZE else LONG_READ_CHUNK_SIZE
            if not collector.read(step):
                collector.finish()  # EOF: inspectors still waiting for data did not match
            evidence = collector.evidence(size, at_end=collector.count >= size)
        read = collector.count
        if evidence.tail is None:
            f.seek(max(0, size - TAIL_SIZE))
            evidence.tail = f.read(TAIL_SIZE)
            read += len(evidence.tail)
    evidence.read_at = lambda offset, length: _read_at(path, offset, min(length, MAX_TABLE_READ))
    return evidence, read


MAX_TABLE_READ = 64 * 1024  # the most _read_at returns: the tables it is used for are small


def _read_at(path: str, offset: int, length: int) -> bytes:
    """length bytes at offset (fewer at the end of the file)."""
    with open(path, "rb") as f:
        return os.pread(f.fileno(), length, offset)


# ---------------------------------------------------------------------------------------------
# Judging the evidence (shared by inspect_file and wrap_stream)


def _magic_format(head: bytes) -> str | None:
    """The format the first bytes announce (see IMS-API.md), whether or not the rest parses."""
    if head.startswith(b"QFI\xfb"):
        return "qcow" if head[4:8] == b"\x00\x00\x00\x01" else "qcow2"
    for magic, fmt in ((b"KDMV", "vmdk"), (b"conectix", "vhd"), (b"vhdxfile", "vhdx"), (b"QED\x00", "qed")):
        if head.startswith(magic):
            return fmt
    if head.startswith(b"<<< ") and b"VirtualBox Disk Image" in head[:64]:
        return "vdi"
    return None


def _fixed_vhd_footer(tail: bytes | None, size: int) -> bytes | None:
    """A fixed VHD is the raw disk plus a 512-byte footer; the inspector only looks at offset 0."""
    if tail and len(tail) == TAIL_SIZE and size > TAIL_SIZE and tail.startswith(b"conectix"):
        return tail
    return None


def _identify(ev: _Evidence) -> tuple[str | None, oslo.FileInspector | None, Problem | None]:
    """Name the one format the file is in (portal name), with the inspector that matched."""
    names = sorted(str(i) for i in ev.matches)
    if names == ["gpt", "iso"]:  # a bootable ("hybrid") ISO also carries an MBR
        return "iso", next(i for i in ev.matches if str(i) == "iso"), None
    if len(ev.matches) > 1:
        return None, None, Problem(
            "ambiguous",
            "This file looks like several kinds of disk image at once, so the cloud could read it "
            "differently from what you expect.",
            hint=HINT_EXPORT_AGAIN,
            detail=f"the inspector matched {', '.join(names)}",
        )
    inspector = ev.matches[0]
    name = str(inspector)
    if name == "luks":
        return None, None, Problem(
            "unsupported",
            "This file is an encrypted (LUKS) disk; the cloud cannot start a server from it.",
            hint="Upload the disk without encryption.",
            detail="the inspector found a LUKS container",
        )
    if name in ("raw", "gpt"):
        magic = _magic_format(ev.head)
        if magic is not None and ev.tail is not None:
            # The file announces a format whose header the inspector could not complete.
            return None, None, _truncated(f"starts like {magic} but its header is cut short or unreadable")
        if _fixed_vhd_footer(ev.tail, ev.size) is not None:
            return "vhd", inspector, None
        return "raw", inspector, None
    if name == "qcow2" and _magic_format(ev.head) == "qcow":
        return "qcow", inspector, None
    return name, inspector, None


# Inspector checks that refuse a format as such rather than a feature of the file; OWN_CHECKS
# below and qemu-img check these formats instead.
WAIVED_CHECKS = {
    "qed": {"banned": "the inspector refuses every QED file; qed_header and qemu-img check it"},
    "qcow": {
        "unknown_features": "QCOW v1 has no feature flags; qcow_header checks it",
        "data_file": "QCOW v1 cannot have a data file",
    },
}


def _run_oslo_checks(fmt: str, inspector: oslo.FileInspector, checks: dict[str, str]) -> dict:
    """Run the inspector's safety_check(); record each check; return the failures by name."""
    # The inspector has no public list of its checks; its private dict is only read for names.
    names = list(getattr(inspector, "_safety_checks", {})) or ["safety_check"]
    try:
        inspector.safety_check()
        failures = {}
    except oslo.SafetyCheckFailed as exc:
        failures = dict(exc.failures)
    except oslo.ImageFormatError as exc:
        failures = {"safety_check": exc}
    waived = WAIVED_CHECKS.get(fmt, {})
    for name in names + [n for n in failures if n not in names]:
        if name in waived:
            checks[name] = f"skipped: {waived[name]}"
        elif name in failures:
            checks[name] = f"failed: {failures[name]}"
        else:
            checks[name] = "passed"
    return {name: exc for name, exc in failures.items() if name not in waived}


def _oslo_problem(fmt: str, failures: dict, ev: _Evidence) -> Problem:
    """Turn the inspector's failures into one problem, the most telling one first."""
    detail = "; ".join(f"{name}: {exc}" for name, exc in failures.items())
    if "backing_file" in failures:
        return _backing_file(f"{detail} ({_qcow_backing_name(ev.head)})")
    if "data_file" in failures:
        return _data_file(detail)
    if "footer" in failures:  # a streamOptimized VMDK's end is missing or overwritten
        return _truncated(detail)
    if fmt == "vmdk" and "Invalid extent filenames" in detail:
        return _data_file(detail)
    if "mbr" in failures:  # a raw disk: the inspector read its first sector as a partition table
        return _partition_table(detail)
    return _unsafe(detail)


def _name_in_head(head: bytes, offset: int, length: int) -> str:
    """A file name stored in a header, for admins. Read from our buffer: never opened."""
    name = head[offset : offset + min(length, 1023)] if offset else b""
    return repr(name.decode("utf-8", "replace")) if name else "name not in the first 64 KiB"


def _qcow_backing_name(head: bytes) -> str:
    """QCOW v1 and v2/v3 alike: backing file name offset at 8 (8 bytes), its length at 16."""
    offset, length = struct.unpack_from(">QI", head, 8)
    return "backing file " + _name_in_head(head, offset, length)


def _check_qcow_v1(ev: _Evidence, inspector) -> Problem | None:
    """QCOW v1 (the inspector only knows v2/v3 flags): backing file at 8, encryption at 36."""
    backing_offset, backing_length = struct.unpack_from(">QI", ev.head, 8)
    if backing_offset or backing_length:
        return _backing_file("qcow v1 " + _qcow_backing_name(ev.head))
    (crypt_method,) = struct.unpack_from(">I", ev.head, 36)
    if crypt_method:
        return _unsafe("qcow v1 image is encrypted (AES)")
    return None


QCOW2_INCOMPATIBLE_DATA_FILE = 1 << 2
QCOW2_INCOMPATIBLE_EXTENDED_L2 = 1 << 4
QCOW2_EXTENSION_END, QCOW2_EXTENSION_DATA_FILE = 0, 0x44415441


def _check_qcow2(ev: _Evidence, inspector) -> Problem | None:
    """QCOW2 (qemu docs/interop/qcow2.txt): a backing file (name offset 8, length 16), an
    external data file (incompatible feature bit 2, or its name in a header extension), and
    extended L2 entries (bit 4), which the inspector only knows as "unknown"."""
    version, backing_offset, backing_length, cluster_bits = struct.unpack_from(">IQII", ev.head, 4)
    if backing_offset or backing_length:
        return _backing_file(_qcow_backing_name(ev.head))
    incompatible, header_length = (0, 72) if version < 3 else (
        struct.unpack_from(">Q", ev.head, 72)[0], struct.unpack_from(">I", ev.head, 100)[0])
    if incompatible & QCOW2_INCOMPATIBLE_DATA_FILE:
        return _data_file("qcow2 incompatible feature bit 2: external data file")
    if incompatible & QCOW2_INCOMPATIBLE_EXTENDED_L2:
        return _extended_l2("qcow2 incompatible feature bit 4: extended L2 entries (subclusters)")
    return _check_qcow2_extensions(ev.head, header_length, 1 << min(cluster_bits, 21))


def _check_qcow2_extensions(head: bytes, offset: int, cluster_size: int) -> Problem | None:
    """Header extensions run from the end of the header to an end marker in the first cluster;
    one of them can name a data file. qemu reads them all, so we do too (fail closed)."""
    while offset + 8 <= cluster_size:
        if offset + 8 > len(head):
            return _unsafe(f"qcow2 header extensions run past the first {len(head)} bytes")
        kind, length = struct.unpack_from(">II", head, offset)
        if kind == QCOW2_EXTENSION_END:
            return None
        if kind == QCOW2_EXTENSION_DATA_FILE:
            return _data_file("qcow2 data file " + _name_in_head(head, offset + 8, length))
        offset += 8 + (length + 7) // 8 * 8
    return None  # qemu stops at the end of the first cluster as well


QED_FEATURE_BACKING_FILE = 0x01
QED_KNOWN_FEATURES = 0x07  # backing file, needs check, backing format not probed


def _check_qed(ev: _Evidence, inspector) -> Problem | None:
    """QED (qemu docs/interop/qed_spec.txt): features at 16, backing file name offset/size at 56."""
    (features,) = struct.unpack_from("<Q", ev.head, 16)
    offset, length = struct.unpack_from("<II", ev.head, 56)
    if features & QED_FEATURE_BACKING_FILE or offset or length:
        return _backing_file("qed backing file " + _name_in_head(ev.head, offset, length))
    if features & ~QED_KNOWN_FEATURES:
        return _unsafe(f"qed unknown feature bits {features:#x}")
    return None


def _check_vmdk(ev: _Evidence, inspector) -> Problem | None:
    """A VMDK may go only when it is one self-contained file: a sparse header (KDMV) whose own
    descriptor names exactly one extent, the file itself (see vmdk_descriptor_problem)."""
    if not ev.head.startswith(b"KDMV"):
        return _data_file("VMDK text descriptor without data: its extents are other files")
    (capacity,) = struct.unpack_from("<Q", ev.head, 12)  # sectors
    (descriptor_sectors,) = struct.unpack_from("<Q", ev.head, 36)
    if descriptor_sectors * 512 > oslo.VMDKInspector.DESC_MAX_SIZE:  # the inspector reads no more
        return _unsafe(f"VMDK embedded descriptor of {descriptor_sectors} sectors: larger than 1 MiB")
    if not inspector.has_region("descriptor") or not inspector.region("descriptor").complete:
        return _unsafe("VMDK embedded descriptor could not be read")
    return vmdk_descriptor_problem(bytes(inspector.region("descriptor").data), capacity)


# ---------------------------------------------------------------------------------------------
# A VMDK's descriptor, read by us: the inspector only refuses extent names with a "/" in them.

VMDK_CREATE_TYPES = ("monolithicsparse", "streamoptimized")  # the self-contained ones
VMDK_HEADER_KEYS = ("version", "encoding", "cid", "parentcid", "createtype", "isnativesnapshot")
VMDK_NO_PARENT = "ffffffff"
_VMDK_FIELD = re.compile(r"([A-Za-z][A-Za-z0-9_.]*)\s*=\s*(?:\"([^\"]*)\"|([^\s\"]+))")
_VMDK_EXTENT = re.compile(r"(RW|RDONLY|NOACCESS)\s+([0-9]+)\s+SPARSE\s+\"([^\"]+)\"", re.IGNORECASE)


def vmdk_descriptor_problem(data: bytes, capacity: int) -> Problem | None:
    """The embedded descriptor of a sparse VMDK (`capacity`: the header's size in sectors).

    Accepted only when it describes this one file: createType monolithicSparse or
    streamOptimized, no parent, and exactly one extent line, a SPARSE extent as large as the
    disk with a plain file name (the file itself: qemu reads the data from the same file).
    Anything else, and anything we cannot read with certainty, refuses the file (fail closed):
    other readers may follow what we would have ignored.
    """
    text, _, rest = data.partition(b"\x00")
    if rest.strip(b"\x00"):
        return _unsafe("VMDK descriptor has more text after its end (a NUL byte)")
    try:
        text = text.decode("ascii")
    except UnicodeDecodeError:
        return _unsafe("VMDK descriptor is not ASCII text")
    # qemu finds these names anywhere in the text (strstr), comments included.
    if "parentfilenamehint" in text.lower():
        return _backing_file("VMDK descriptor names a parent disk (parentFileNameHint)")
    if text.lower().count("createtype") != 1:
        return _unsafe("VMDK descriptor must name its createType exactly once")
    fields, extents = {}, []
    for line in (raw.strip() for raw in text.split("\n")):  # strip() also takes CR and tabs
        if not line or line.startswith("#"):
            continue
        if not line.replace("\t", " ").isprintable():
            return _unsafe(f"VMDK descriptor line with control characters: {line[:200]!r}")
        field = _VMDK_FIELD.fullmatch(line)
        if field is None:
            extents.append(line)
            continue
        key = field[1].lower()
        if key in fields or not (key in VMDK_HEADER_KEYS or key.startswith("ddb.")):
            return _unsafe(f"VMDK descriptor field {field[1]!r} is repeated or unknown")
        fields[key] = field[2] if field[2] is not None else field[3]
    return _judge_vmdk_fields(fields) or _judge_vmdk_extents(extents, capacity)


def _judge_vmdk_fields(fields: dict[str, str]) -> Problem | None:
    create_type = fields.get("createtype", "")
    if create_type.lower() not in VMDK_CREATE_TYPES:
        return _data_file(f"VMDK createType {create_type[:64]!r}: only monolithicSparse or "
                          "streamOptimized keep the whole disk in one file")
    if fields.get("parentcid", VMDK_NO_PARENT).lower() != VMDK_NO_PARENT:
        parent = fields["parentcid"][:64]
        return _backing_file(f"VMDK parentCID {parent!r}: it was made on top of a parent disk")
    return None


def _judge_vmdk_extents(extents: list[str], capacity: int) -> Problem | None:
    if len(extents) != 1:
        listed = "; ".join(line[:200] for line in extents[:4]) or "none"
        return _data_file(f"VMDK descriptor has {len(extents)} extent lines, only one may be: {listed}")
    extent = _VMDK_EXTENT.fullmatch(extents[0])
    if extent is None:
        return _data_file(f"VMDK extent is not one SPARSE extent in this file: {extents[0][:200]!r}")
    sectors, name = int(extent[2]), extent[3]
    if any(c in name for c in "/\\") or name.strip(".") == "":
        return _data_file(f"VMDK extent names another place: {name[:200]!r}")
    if sectors != capacity:
        return _data_file(f"VMDK extent of {sectors} sectors, the disk has {capacity}: not this file alone")
    return None


VHD_FIXED, VHD_DYNAMIC, VHD_DIFFERENCING = 2, 3, 4
VHD_PARENT_FIELDS = slice(40, 576 + 8 * 24)  # parent UUID, time stamp, name and 8 locators


def _check_vhd(ev: _Evidence, inspector) -> Problem | None:
    """Disk type (footer offset 60): a differencing VHD has a parent disk. A dynamic VHD keeps a
    copy of its footer at both ends: no copy at the end means the file was cut short; its dynamic
    header (at the footer's data offset) must not name a parent either."""
    footer = ev.head if ev.head.startswith(b"conectix") else _fixed_vhd_footer(ev.tail, ev.size)
    end_footer = ev.tail if ev.tail and ev.tail.startswith(b"conectix") else footer
    disk_types = {struct.unpack_from(">I", f, 60)[0] for f in (footer, end_footer)}
    if VHD_DIFFERENCING in disk_types:
        return _backing_file("VHD disk type 4 (differencing): it has a parent disk")
    if len(disk_types) > 1 or not disk_types <= {VHD_FIXED, VHD_DYNAMIC}:
        return _unsafe(f"VHD disk types {sorted(disk_types)}: unknown or not the same in both footers")
    (disk_type,) = disk_types
    if disk_type == VHD_DYNAMIC and ev.tail is not None and not ev.tail.startswith(b"conectix"):
        return _truncated("dynamic VHD: the footer copy at the end of the file is missing")
    if disk_type == VHD_DYNAMIC:
        return _check_vhd_dynamic_header(ev, struct.unpack_from(">Q", footer, 16)[0])
    return None


def _check_vhd_dynamic_header(ev: _Evidence, offset: int) -> Problem | None:
    header = ev.bytes_at(offset, 1024)
    if header is None:
        return None  # while pushing, past the head: inspect_file read it before
    if len(header) < 1024 or not header.startswith(b"cxsparse"):
        return _truncated(f"dynamic VHD: no dynamic disk header at {offset}")
    if any(header[VHD_PARENT_FIELDS]):
        return _backing_file("VHD dynamic header names a parent disk (parent UUID, name or locators set)")
    return None


def _check_pass_through_parent(ev: _Evidence) -> Problem | None:
    """ZVHD/ZVHD2 are VHD-based and pass through unread, but the VHD ways of naming a parent
    disk still apply: a differencing disk type or a dynamic header naming a parent is refused.
    Nothing else of the VHD checks is applied, since a genuine ZVHD need not follow them."""
    footer = ev.head if ev.head.startswith(b"conectix") else _fixed_vhd_footer(ev.tail, ev.size)
    footers = [f for f in (footer, ev.tail) if f and f.startswith(b"conectix")]
    if any(struct.unpack_from(">I", f, 60)[0] == VHD_DIFFERENCING for f in footers):
        return _backing_file("VHD disk type 4 (differencing): it has a parent disk")
    header = ev.bytes_at(struct.unpack_from(">Q", footers[0], 16)[0], 1024) if footers else None
    if header and header.startswith(b"cxsparse") and any(header[VHD_PARENT_FIELDS]):
        return _backing_file("VHD dynamic header names a parent disk (parent UUID, name or locators set)")
    return None


VHDX_FILE_PARAMETERS = "CAA16737-FA36-4D43-B3B6-33F0AA44E76B"
VHDX_PARENT_LOCATOR = "A8D35F2D-B30B-454D-ABF7-D3D84834AB0C"
VHDX_HAS_PARENT = 0x02  # File Parameters flags


def _check_vhdx(ev: _Evidence, inspector) -> Problem | None:
    """MS-VHDX 2.6: a parent locator metadata item, or HasParent in the file parameters, makes
    a differencing disk. The inspector keeps the metadata table; the items are read here."""
    if not inspector.has_region("metadata") or len(inspector.region("metadata").data) < 32:
        return _unsafe("VHDX metadata table could not be read")
    table = bytes(inspector.region("metadata").data)
    (count,) = struct.unpack_from("<H", table, 10)
    if 32 + 32 * count > len(table):
        return _unsafe(f"VHDX metadata table of {count} entries could not be read whole")
    items = {}
    for entry in range(32, 32 + 32 * count, 32):
        guid = oslo.VHDXInspector._guid(table[entry : entry + 16])
        items[guid] = struct.unpack_from("<I", table, entry + 16)[0]
    if VHDX_PARENT_LOCATOR in items:
        return _backing_file("VHDX metadata has a parent locator: it is a differencing disk")
    if VHDX_FILE_PARAMETERS not in items:
        return _unsafe("VHDX metadata has no file parameters")
    params = ev.bytes_at(inspector.region("metadata").offset + items[VHDX_FILE_PARAMETERS], 8)
    if params is None:
        return None  # while pushing, past the head: inspect_file read it before
    if len(params) < 8:
        return _truncated("VHDX file parameters lie past the end of the file")
    if struct.unpack_from("<I", params, 4)[0] & VHDX_HAS_PARENT:
        return _backing_file("VHDX file parameters: HasParent is set (a differencing disk)")
    return None


VDI_DYNAMIC, VDI_STATIC, VDI_UNDO, VDI_DIFFERENCING = 1, 2, 3, 4


def _check_vdi(ev: _Evidence, inspector) -> Problem | None:
    """VDI (qemu block/vdi.c): image type at 0x4c; the link and parent UUIDs at 0x1a8 and 0x1b8
    name the image a differencing (or undo) image was made from."""
    (image_type,) = struct.unpack_from("<I", ev.head, 0x4C)
    if image_type in (VDI_UNDO, VDI_DIFFERENCING) or any(ev.head[0x1A8:0x1C8]):
        uuids = ev.head[0x1A8:0x1C8].hex()
        return _backing_file(f"VDI image type {image_type} with link and parent UUIDs {uuids}")
    if image_type not in (VDI_DYNAMIC, VDI_STATIC):
        return _unsafe(f"VDI image type {image_type} is unknown")
    return None


# Our own checks, for what the inspector does not cover (or refuses outright, as QED). Each
# refuses every way its format has of naming another file, before qemu-img ever sees the file.
OWN_CHECKS = {
    "qcow": _check_qcow_v1,
    "qcow2": _check_qcow2,
    "qed": _check_qed,
    "vmdk": _check_vmdk,
    "vhd": _check_vhd,
    "vhdx": _check_vhdx,
    "vdi": _check_vdi,
}


def _check_safety(ev: _Evidence, fmt: str, inspector, checks: dict[str, str]) -> Problem | None:
    """The inspector's safety checks, then ours; ours name the cause more precisely."""
    failures = _run_oslo_checks(fmt, inspector, checks)
    own = None
    if fmt in OWN_CHECKS:
        own = OWN_CHECKS[fmt](ev, inspector)
        checks[f"{fmt}_header"] = f"failed: {own.detail}" if own else "passed"
    if own:
        return own
    return _oslo_problem(fmt, failures, ev) if failures else None


def _judge(
    ev: _Evidence, declared: str, checks: dict[str, str]
) -> tuple[str | None, oslo.FileInspector | None, Problem | None]:
    """Identify the format, run the safety checks, compare with what the user declared.
    Returns (portal format, the oslo inspector that matched, the problem or None).

    Safety comes before the comparison: never offer "upload it as X" for a file X would refuse.
    """
    fmt, inspector, problem = _identify(ev)
    checks["format_detected"] = f"failed: {problem.detail}" if problem else f"passed: {fmt}"
    if problem:
        return fmt, inspector, problem
    if declared in PASS_THROUGH_FORMATS and fmt in PASS_THROUGH_LOOKS_LIKE:
        problem = _check_pass_through_parent(ev) if fmt == "vhd" else None
        checks["pass_through_parent"] = f"failed: {problem.detail}" if problem else "passed"
        if problem:
            return fmt, inspector, problem
        checks["format_matches"] = f"skipped: {declared} cannot be inspected; passed through as declared"
        return declared, inspector, None
    problem = _check_safety(ev, fmt, inspector, checks)
    if problem:
        return fmt, inspector, problem
    if fmt != declared:
        problem = _mismatch(declared, fmt)
        checks["format_matches"] = f"failed: {problem.detail}"
        return fmt, inspector, problem
    checks["format_matches"] = "passed"
    return fmt, inspector, None


def _virtual_size(ev: _Evidence, fmt: str, inspector) -> int:
    """The inspector's virtual size, corrected where it is known to be wrong or missing."""
    if fmt == "raw":
        return ev.size  # the inspector reports the bytes it read
    if fmt == "qed":
        return struct.unpack_from("<Q", ev.head, 48)[0]  # the inspector reports the bytes it read
    if fmt == "vhd" and not ev.head.startswith(b"conectix"):  # fixed: original and current size
        return max(struct.unpack_from(">QQ", _fixed_vhd_footer(ev.tail, ev.size), 40))
    size = inspector.virtual_size
    if fmt == "iso":
        return max(size, ev.size)  # the volume may not fill the file
    return size


# ---------------------------------------------------------------------------------------------
# inspect_file


def inspect_file(
    path: str | os.PathLike,
    *,
    declared_format: str,
    max_bytes: int = IMS_MAX_FILE_BYTES,
    max_virtual_bytes: int = IMS_MAX_VIRTUAL_BYTES,
    qemu_img: str = "qemu-img",
    limits: Limits = INFO_LIMITS,
) -> Inspection:
    """Find out what the file at `path` is and whether it may be sent as `declared_format`.

    Never raises for anything about the file itself (that is `Inspection.problem`); raises
    InspectError when the check could not run (qemu-img missing or too slow), ValueError for a
    format name the portal does not know, OSError when the file cannot be read.
    """
    path = os.fspath(path)
    declared = declared_format.lower()
    if declared not in PORTAL_FORMATS:
        raise ValueError(f"unknown disk format {declared_format!r}")
    result = Inspection(declared_format=declared, actual_size=os.stat(path).st_size)
    result.problem = _check_file_size(result, max_bytes)
    if result.problem:
        return result

    evidence, result.bytes_read = _read_evidence(path, result.actual_size)
    fmt, inspector, result.problem = _judge(evidence, declared, result.checks)
    result.detected_format = fmt
    if result.problem:
        return result
    if fmt in PASS_THROUGH_FORMATS:  # no virtual size to read; the user gives min_disk
        result.checks["qemu_img_info"] = f"skipped: qemu-img cannot read {fmt}"
        return result

    result.fixed_vhd = fmt == "vhd" and not evidence.head.startswith(b"conectix")
    result.virtual_size = _virtual_size(evidence, fmt, inspector)
    result.problem = _check_virtual_size(result, max_virtual_bytes)
    if result.problem:
        return result
    result.problem = _second_opinion(path, result, qemu_img=qemu_img, limits=limits)
    if result.problem is None:
        result.problem = _check_virtual_size(result, max_virtual_bytes)  # qemu-img may say more
    return result


def _check_file_size(result: Inspection, max_bytes: int) -> Problem | None:
    size = result.actual_size
    if size == 0:
        result.checks["file_size"] = "failed: 0 bytes"
        return Problem(
            "empty", "This file is empty.",
            hint="Pick the disk image file itself and upload it again.", detail="0 bytes",
        )
    if size >= max_bytes:
        result.checks["file_size"] = f"failed: {size} bytes"
        return Problem(
            "too_large",
            f"This file is {_size_text(size)}; the cloud takes files under {_size_text(max_bytes)}.",
            hint="Convert it to QCOW2, which leaves out empty space, and upload that; or ask an "
            "administrator about importing it through object storage.",
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
            f"This disk is {_size_text(size)} when in use; the cloud allows disks up to "
            f"{_size_text(max_virtual_bytes)}.",
            hint="Shrink the disk (its partitions, then the image) before uploading it.",
            detail=f"virtual size {size} bytes > limit {max_virtual_bytes}",
        )
    result.checks["virtual_size"] = "passed"
    return None


def _second_opinion(path: str, result: Inspection, *, qemu_img: str, limits: Limits) -> Problem | None:
    """Ask qemu-img, forced to the detected format, whether it sees the same safe image."""
    fmt = result.detected_format
    try:
        info = qemu_img_info(path, fmt, qemu_img=qemu_img, limits=limits)
    except QemuImgFailed as exc:
        result.checks["qemu_img_info"] = f"failed: {exc.detail}"
        if _says_truncated(exc.detail):
            return _truncated(f"qemu-img info: {exc.detail}")
        return Problem(
            "qemu_disagrees",
            f"The portal's second check could not read this file as a {LABELS[fmt]} disk.",
            hint=HINT_COPY_AGAIN + " If that does not help, export the disk again.",
            detail=f"qemu-img info -f {QEMU_DRIVERS[fmt]}: {exc.detail}",
        )
    problem = _judge_qemu_info(info, fmt)
    result.checks["qemu_img_info"] = f"failed: {problem.detail}" if problem else "passed"
    if problem:
        return problem
    result.virtual_size = max(result.virtual_size or 0, int(info.get("virtual-size") or 0))

    # Only now: unlike `info`, `qemu-img check` (and convert) open a backing file if there is one.
    if fmt not in QEMU_CHECKABLE:
        result.checks["qemu_img_check"] = f"skipped: qemu-img cannot check {fmt}"
        return None
    problem = _run_qemu_check(path, fmt, qemu_img=qemu_img, limits=limits)
    result.checks["qemu_img_check"] = f"failed: {problem.detail}" if problem else "passed"
    return problem


def _judge_qemu_info(info: dict, fmt: str) -> Problem | None:
    if info.get("format") != QEMU_DRIVERS[fmt]:
        return Problem(
            "qemu_disagrees",
            f"The portal's second check does not see a {LABELS[fmt]} disk in this file.",
            hint=HINT_EXPORT_AGAIN,
            detail=f"qemu-img says format {info.get('format')!r}, inspector {fmt!r}",
        )
    if info.get("backing-filename") or info.get("full-backing-filename"):
        return _backing_file(f"qemu-img reports backing-filename {info.get('backing-filename')!r}")
    specific = (info.get("format-specific") or {}).get("data") or {}
    if specific.get("data-file"):
        return _data_file(f"qemu-img reports data-file {specific['data-file']!r}")
    if info.get("encrypted"):
        return _unsafe("qemu-img reports an encrypted image")
    return None


def _run_qemu_check(path: str, fmt: str, *, qemu_img: str, limits: Limits) -> Problem | None:
    """`qemu-img check` reads the format's tables and finds data that points past the end."""
    with _alone(path) as alone:
        cmd = [qemu_img, "check", "-f", QEMU_DRIVERS[fmt], "--force-share", "--output=json", alone.path]
        proc = _run_limited(cmd, limits, alone)
    # 0: clean; 3: only leaked clusters (wasted space, harmless); 63: check not supported.
    if proc.returncode in (0, 3, 63):
        return None
    detail = f"qemu-img check exit {proc.returncode}: {_last_lines(proc.stderr)}"
    return _truncated(detail) if _says_truncated(proc.stderr) else _corrupt(detail)


def _says_truncated(message: str) -> bool:
    """qemu-img's words for data that points past the end of the file."""
    message = message.lower()
    return any(w in message for w in ("end of the file", "end of file", "truncated", "beyond eof"))


# ---------------------------------------------------------------------------------------------
# qemu-img alone with the file


@dataclass(frozen=True)
class _Alone:
    """Where qemu-img runs: `folder` (its working directory) holds nothing but the file."""

    folder: str
    path: str  # the file, as qemu-img is to name it
    pass_fds: tuple[int, ...] = ()


PRIVATE_PREFIX = ".qemu-img-"
ABANDONED_AFTER_SECONDS = 60  # a new private folder is locked within microseconds


@contextlib.contextmanager
def _alone(path: str | os.PathLike) -> Iterator[_Alone]:
    """A fresh private folder beside the file, holding only a hard link to it named "disk".

    qemu-img resolves a relative name in an image (a backing file, an extent) against the
    image's own folder: next to a staged file, that is other people's uploads. Here it finds
    nothing, even if our checks missed the name. Where hard links are not possible, qemu-img
    gets the file as /proc/self/fd/N of a descriptor it inherits, and the folder stays empty.
    The folder is removed afterwards, with anything qemu-img left in it.
    """
    path = os.path.abspath(path)
    _remove_abandoned(os.path.dirname(path))
    folder = tempfile.mkdtemp(prefix=PRIVATE_PREFIX, dir=os.path.dirname(path))
    lock = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held while in use: see _remove_abandoned
        link = os.path.join(folder, "disk")
        try:
            os.link(path, link)
            linked = True
        except OSError:  # a file system without hard links (or not ours to link)
            linked = False
        if linked:
            yield _Alone(folder, link)
        else:
            with open(path, "rb") as f:
                yield _Alone(folder, f"/proc/self/fd/{f.fileno()}", (f.fileno(),))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        os.close(lock)


def _remove_abandoned(parent: str) -> None:
    """Remove the private folders of processes that died in a run (a worker killed mid-way):
    each holds a link to a staged file and perhaps half a conversion. A folder in use is locked
    (flock: the kernel releases it when its process dies, in any container on this disk)."""
    now = time.time()
    for entry in os.scandir(parent):
        if not entry.name.startswith(PRIVATE_PREFIX) or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime < ABANDONED_AFTER_SECONDS:
                continue  # perhaps created a moment ago and not locked yet
            fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue  # removed meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(entry.path, ignore_errors=True)
        except BlockingIOError:
            pass  # in use
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------------------------
# qemu-img under limits


def _limited(cmd: list[str], limits: Limits) -> list[str]:
    """cmd run under prlimit: CPU seconds and address space, as Glance's ProcessLimits do."""
    for program in ("prlimit", cmd[0]):
        # Checked here: prlimit itself would only answer "failed to execute" with exit 1,
        # which would read as qemu-img refusing the file.
        if shutil.which(program) is None:
            raise InspectError(
                "The portal cannot check disk images right now.",
                hint="Ask an administrator: qemu-img (Debian's qemu-utils) and prlimit must be installed.",
                detail=f"{program} not found", permanent=True,
            )
    program = os.path.abspath(shutil.which(cmd[0]))  # it runs in another working directory
    return ["prlimit", f"--cpu={limits.cpu_seconds}", f"--as={limits.address_space}", "--", program, *cmd[1:]]


def _run_limited(cmd: list[str], limits: Limits, alone: _Alone) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            _limited(cmd, limits), capture_output=True, text=True, errors="replace",
            timeout=limits.timeout, env=_qemu_env(), stdin=subprocess.DEVNULL,
            cwd=alone.folder, pass_fds=alone.pass_fds,
        )
    except subprocess.TimeoutExpired:
        raise InspectError(
            "Checking the disk image took too long.",
            hint="The portal tries again later.",
            detail=f"{' '.join(cmd[:3])} did not finish within {limits.timeout} s",
        ) from None


def _qemu_env() -> dict[str, str]:
    # C locale: qemu-img's messages are matched in English. One malloc arena: glibc reserves 64 MiB
    # of address space for each thread's own arena, and qemu-img starts more I/O threads when the
    # machine is busy, until the address-space limit makes it abort ("qemu_thread_create: Resource
    # temporarily unavailable", which read as a damaged file, or "failed to allocate memory for
    # stack" in a conversion).
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "MALLOC_ARENA_MAX": "1"}


def _last_lines(text: str, n: int = 3) -> str:
    return " | ".join(text.strip().splitlines()[-n:]) or "(no message)"


def qemu_img_info(
    path: str | os.PathLike, fmt: str, *, qemu_img: str = "qemu-img", limits: Limits = INFO_LIMITS
) -> dict:
    """`qemu-img info -f <driver> --output=json --force-share` under limits; fmt is a portal name.

    The format is always forced: letting qemu-img guess is what made backing-file attacks possible.
    qemu-img info does not open backing files, and runs alone with the file (_alone).
    Raises QemuImgFailed when it refuses the file.
    """
    with _alone(path) as alone:
        cmd = [qemu_img, "info", "-f", QEMU_DRIVERS[fmt], "--output=json", "--force-share", alone.path]
        proc = _run_limited(cmd, limits, alone)
    if proc.returncode != 0:
        raise QemuImgFailed(
            "qemu-img could not read the file.",
            detail=f"exit {proc.returncode}{_limit_note(proc.returncode)}: {_last_lines(proc.stderr)}",
            returncode=proc.returncode,
        )
    return json.loads(proc.stdout)


def _limit_note(returncode: int) -> str:
    # The kernel ends a process over its CPU limit with SIGXCPU (24), then SIGKILL (9).
    return " (stopped by its CPU limit)" if returncode in (-24, -9) else ""


# ---------------------------------------------------------------------------------------------
# convert_to_qcow2


def convert_to_qcow2(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    src_format: str,
    virtual_size: int,
    qemu_img: str = "qemu-img",
    limits: Limits = CONVERT_LIMITS,
    on_progress: Callable[[float], None] | None = None,
) -> None:
    """Convert an inspected, safe file to QCOW2 at dst (only there once it is complete).

    Only call this for a file inspect_file() passed: the source format is forced, never guessed.
    on_progress(percent) is called as qemu-img reports progress (0.0 .. 100.0).
    Raises InspectError: not enough free space (retryable), qemu-img failed (permanent).
    """
    if src_format in PASS_THROUGH_FORMATS or src_format not in QEMU_DRIVERS:
        raise ValueError(f"qemu-img cannot convert {src_format!r}")
    dst = os.fspath(dst)
    _remove(dst)
    with _alone(src) as alone:  # the QCOW2 is written in the private folder too, then moved
        _check_free_space(alone.folder, virtual_size)
        cmd = [
            qemu_img, "convert", "-p", "--force-share", "-f", QEMU_DRIVERS[src_format],
            "-O", "qcow2", "-o", "compat=1.1", alone.path, "converted.qcow2",
        ]
        returncode, stderr = _run_with_progress(cmd, limits, on_progress, alone)
        if returncode == 0:
            try:
                shutil.move(os.path.join(alone.folder, "converted.qcow2"), dst)
            except BaseException:
                _remove(dst)  # a copy to another file system stopped half-way
                raise
    if returncode != 0:
        if "no space left" in stderr.lower():
            raise InspectError(
                "The server ran out of disk space while converting the image.",
                hint="The portal tries again later; if it keeps failing, ask an administrator.",
                detail=_last_lines(stderr),
            )
        raise InspectError(
            "The disk image could not be converted to QCOW2.",
            hint=HINT_EXPORT_AGAIN,
            detail=f"qemu-img convert exit {returncode}{_limit_note(returncode)}: {_last_lines(stderr)}",
            permanent=True,
        )


def _check_free_space(folder: str, virtual_size: int) -> None:
    # A QCOW2 holds at most the virtual size plus a little metadata; 64 MiB covers that to 1 TB.
    needed = virtual_size + 64 * 1024**2
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise InspectError(
            "There is not enough free disk space on the server to convert this image.",
            hint="The portal tries again later; if it keeps failing, ask an administrator.",
            detail=f"converting needs up to {needed} bytes in {folder}, {free} are free",
        )


def _run_with_progress(cmd: list[str], limits: Limits, on_progress, alone: _Alone) -> tuple[int, str]:
    """Run qemu-img -p under limits, passing each "(12.34/100%)" it prints to on_progress."""
    limited = _limited(cmd, limits)
    # stderr goes to a file: a pipe nobody reads while we follow stdout could fill and stall.
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(
            limited, stdout=subprocess.PIPE, stderr=errors, stdin=subprocess.DEVNULL, env=_qemu_env(),
            cwd=alone.folder, pass_fds=alone.pass_fds,
        )
        try:
            _follow_progress(proc.stdout, on_progress)
            proc.wait(timeout=limits.timeout)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            proc.stdout.close()
        errors.seek(0)
        return proc.returncode, errors.read().decode("utf-8", "replace")


def _follow_progress(stdout, on_progress) -> None:
    """qemu-img rewrites one line with "\\r": "    (45.00/100%)"."""
    pending = b""
    while chunk := stdout.read1(4096):
        pending += chunk
        *done, pending = pending.split(b"\r")
        for piece in done:
            text = piece.strip().strip(b"()").split(b"/")[0]
            if on_progress is not None and text:
                try:
                    on_progress(float(text))
                except ValueError:
                    pass  # not a progress line


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


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
    read() whatever its size (about 40 µs): ~0.05 s per GiB with 1 MiB, ~2.5 s with 64 KiB.
    """

    def __init__(self, fileobj: BinaryIO, expected_format: str, size: int):
        if expected_format not in PORTAL_FORMATS:
            raise ValueError(f"unknown disk format {expected_format!r}")
        self.expected = expected_format
        self.size = size
        self._collector = _Collector(fileobj, expected_inspector=EARLY_INSPECTOR.get(expected_format))
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
        fmt, _, problem = _judge(evidence, self.expected, {})
        if problem is None:
            return
        # Before the end, a file that looks raw may still prove to be a fixed VHD (its footer).
        if not at_end and fmt == "raw" and problem.code == "unknown_format":
            return
        raise FileChanged(f"{problem.code}: {problem.detail}")


def wrap_stream(fileobj: BinaryIO, expected_format: str, *, size: int) -> InspectedStream:
    """Wrap the staged file for the PUT; `size` is the number of bytes that will be read."""
    return InspectedStream(fileobj, expected_format, size)
