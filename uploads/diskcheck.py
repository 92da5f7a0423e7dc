"""Judging a file's bytes: which format they are in, and whether that format's safety checks pass.

No Django here. Shared by the check before a push (`inspect_file`, which reads only what it
needs) and the check during it (`wrap_stream`, which sees every byte go by): both collect an
`Evidence` with a `Collector` (OpenStack's own inspectors, `oslo_utils.imageutils.format_inspector`,
all at once, plus the first and last bytes) and call `judge()`: identify the format, run the
inspector's safety checks and ours (uploads/diskformats.py), compare with the declared format.
"""

import struct
from typing import BinaryIO

from oslo_utils.imageutils import format_inspector as oslo

from uploads.diskformats import (
    HEAD_SIZE, LABELS, OWN_CHECKS, PASS_THROUGH_FORMATS, PASS_THROUGH_LOOKS_LIKE, TAIL_SIZE, Evidence,
    check_pass_through_parent, fixed_vhd_footer, qcow_backing_name,
)
from uploads.errors import ErrorCode, Problem, gettext_noop, refusal

CHUNK_SIZE = 64 * 1024  # bytes handed to the inspectors per step while detecting
# Past the first MiB (only a streamOptimized VMDK with its footer at the end, or a VHDX with its
# metadata further in, get there), bigger steps: the inspectors cost per step, not per byte.
LONG_READ_CHUNK_SIZE = 1024 * 1024


class _NoClose:
    """Lets InspectWrapper read a file without closing it when it finishes."""

    def __init__(self, fileobj: BinaryIO):
        self.read = fileobj.read


class Collector:
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

    def evidence(self, size: int, *, at_end: bool) -> Evidence | None:
        """None while the inspectors still need more bytes to decide."""
        matches = self.wrapper.formats
        if matches is None:
            return None
        return Evidence(list(matches), bytes(self.head), self.tail if at_end else None, size)


def read_evidence(image, size: int) -> tuple[Evidence, int]:
    """Read only until every inspector has decided (a few hundred KiB for most formats; a
    streamOptimized VMDK keeps its footer at the end, so that one is read through), then the
    last 512 bytes. `image` is a diskimage.Image: a file, or a staged object read by ranges.
    Returns the evidence and the number of bytes read."""
    with image.open() as f:
        collector = Collector(f)
        evidence = None
        while evidence is None:
            step = CHUNK_SIZE if collector.count < LONG_READ_CHUNK_SIZE else LONG_READ_CHUNK_SIZE
            if not collector.read(step):
                collector.finish()  # EOF: inspectors still waiting for data did not match
            evidence = collector.evidence(size, at_end=collector.count >= size)
        read = collector.count
    if evidence.tail is None:
        evidence.tail = image.read_at(max(0, size - TAIL_SIZE), min(size, TAIL_SIZE))
        read += len(evidence.tail)
    evidence.read_at = lambda offset, length: image.read_at(offset, min(length, MAX_TABLE_READ))
    return evidence, read


MAX_TABLE_READ = 64 * 1024  # the most evidence.read_at returns: the tables it is used for are small


# ---------------------------------------------------------------------------------------------
# Judging the evidence (shared by inspect_file and wrap_stream)


VDI_TEXT_SIZE = 64  # a VDI starts with a line of text: "<<< Oracle VM VirtualBox Disk Image >>>"


def magic_format(head: bytes) -> str | None:
    """The format the first bytes announce (see IMS-API.md), whether or not the rest parses."""
    if head.startswith(b"QFI\xfb"):
        return "qcow" if head[4:8] == b"\x00\x00\x00\x01" else "qcow2"
    for magic, fmt in ((b"KDMV", "vmdk"), (b"conectix", "vhd"), (b"vhdxfile", "vhdx"), (b"QED\x00", "qed")):
        if head.startswith(magic):
            return fmt
    if head.startswith(b"<<< ") and b"VirtualBox Disk Image" in head[:VDI_TEXT_SIZE]:
        return "vdi"
    return None


def _identify(ev: Evidence) -> tuple[str | None, oslo.FileInspector | None, Problem | None]:
    """Name the one format the file is in (portal name), with the inspector that matched."""
    names = sorted(str(i) for i in ev.matches)
    if names == ["gpt", "iso"]:  # a bootable ("hybrid") ISO also carries an MBR
        return "iso", next(i for i in ev.matches if str(i) == "iso"), None
    if len(ev.matches) > 1:
        return None, None, refusal("ambiguous", f"the inspector matched {', '.join(names)}")
    inspector = ev.matches[0]
    name = str(inspector)
    if name == "luks":
        return None, None, refusal("luks", "the inspector found a LUKS container")
    if name in ("raw", "gpt"):
        magic = magic_format(ev.head)
        if magic is not None and ev.tail is not None:
            # The file announces a format whose header the inspector could not complete.
            return None, None, refusal("truncated", f"starts like {magic} but its header is cut short or unreadable")
        if fixed_vhd_footer(ev.tail, ev.size) is not None:
            return "vhd", inspector, None
        return "raw", inspector, None
    if name == "qcow2" and magic_format(ev.head) == "qcow":
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


def _oslo_problem(fmt: str, failures: dict, ev: Evidence) -> Problem:
    """Turn the inspector's failures into one problem, the most telling one first."""
    detail = "; ".join(f"{name}: {exc}" for name, exc in failures.items())
    if "backing_file" in failures:
        return refusal("backing_file", f"{detail} ({qcow_backing_name(ev.head)})")
    if "data_file" in failures:
        return refusal("data_file", detail)
    if "footer" in failures:  # a streamOptimized VMDK's end is missing or overwritten
        return refusal("truncated", detail)
    if fmt == "vmdk" and "Invalid extent filenames" in detail:
        return refusal("data_file", detail)
    if "mbr" in failures:  # a raw disk: the inspector read its first sector as a partition table
        return _partition_table(detail)
    return refusal("unsafe", detail)


def _mismatch(declared: str, detected: str) -> Problem:
    if detected == "raw":
        return Problem(
            "unknown_format",
            gettext_noop("This file is not a %(declared)s disk: the portal cannot recognise any disk image format "
                         "in it.") % {"declared": LABELS[declared]},
            hint=gettext_noop("If it is a raw disk image, upload it as RAW; otherwise check that you picked the "
                              "right file."),
            detail=f"declared {declared}, inspector found no known format (raw)",
            suggested_format="raw",
        )
    return Problem(
        ErrorCode.FORMAT_MISMATCH,
        gettext_noop("This file is a %(detected)s disk, not %(declared)s — upload it as %(detected)s?")
        % {"detected": LABELS[detected], "declared": LABELS[declared]},
        hint=gettext_noop("Choose %(detected)s and the portal takes the same file again, nothing to re-upload.")
        % {"detected": LABELS[detected]},
        detail=f"declared {declared}, inspector found {detected}",
        suggested_format=detected,
    )


def _partition_table(detail: str) -> Problem:
    """A raw disk whose first sector is a boot sector (55 AA) with no usable partition table."""
    return refusal("no_partitions" if "no partitions" in detail else "bad_partition_table", detail)


def _check_safety(ev: Evidence, fmt: str, inspector, checks: dict[str, str]) -> Problem | None:
    """The inspector's safety checks, then ours; ours name the cause more precisely."""
    failures = _run_oslo_checks(fmt, inspector, checks)
    own = None
    if fmt in OWN_CHECKS:
        own = OWN_CHECKS[fmt](ev, inspector)
        checks[f"{fmt}_header"] = f"failed: {own.detail}" if own else "passed"
    if own:
        return own
    return _oslo_problem(fmt, failures, ev) if failures else None


def judge(
    ev: Evidence, declared: str, checks: dict[str, str]
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
        problem = check_pass_through_parent(ev) if fmt == "vhd" else None
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


def virtual_size(ev: Evidence, fmt: str, inspector) -> int:
    """The inspector's virtual size, corrected where it is known to be wrong or missing."""
    if fmt == "raw":
        return ev.size  # the inspector reports the bytes it read
    if fmt == "qed":
        return struct.unpack_from("<Q", ev.head, 48)[0]  # the inspector reports the bytes it read
    if fmt == "vhd" and not ev.head.startswith(b"conectix"):  # fixed: original and current size
        return max(struct.unpack_from(">QQ", fixed_vhd_footer(ev.tail, ev.size), 40))
    size = inspector.virtual_size
    if fmt == "iso":
        return max(size, ev.size)  # the volume may not fill the file
    return size

