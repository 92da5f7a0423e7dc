"""The disk formats: the portal's names for them, and each one's own header checks.

No Django here. OWN_CHECKS holds, for each format that has any, a function that reads the
format's header (from an `Evidence`: the first and last bytes of the file, and the inspector
that matched) and refuses every way the format has of naming another file (a backing file, a
parent disk, an external data file or extent) before qemu-img ever sees the file, and what the
inspector does not cover. uploads/diskcheck.py runs them; each returns a Problem or None.
"""

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass

from oslo_utils.imageutils import format_inspector as oslo

from uploads.errors import Problem, refusal

PORTAL_FORMATS = ("qcow2", "qcow", "vmdk", "vhd", "vhdx", "vdi", "qed", "raw", "iso", "zvhd", "zvhd2")
PASS_THROUGH_FORMATS = ("zvhd", "zvhd2")  # Huawei formats neither the inspector nor qemu-img reads
# What a genuine ZVHD/ZVHD2 may look like to the inspector (it is VHD-based); anything else is
# a different, recognisable format and the user picked the wrong one.
PASS_THROUGH_LOOKS_LIKE = ("raw", "vhd")
LABELS = {name: name.upper() for name in PORTAL_FORMATS} | {"luks": "LUKS (encrypted)"}

HEAD_SIZE = 64 * 1024  # the first bytes kept for our own header checks (names of backing files)
TAIL_SIZE = 512  # a VHD footer
MAX_NAME_BYTES = 1023  # the longest backing file name QCOW2 allows (qcow2.txt); QED keeps to it too
# How much of a file's own text a detail for admins quotes: enough to recognise it, never a page.
DETAIL_LINE_CHARS = 200
DETAIL_FIELD_CHARS = 64
DETAIL_LINES = 4


@dataclass
class Evidence:
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


def fixed_vhd_footer(tail: bytes | None, size: int) -> bytes | None:
    """A fixed VHD is the raw disk plus a 512-byte footer; the inspector only looks at offset 0."""
    if tail and len(tail) == TAIL_SIZE and size > TAIL_SIZE and tail.startswith(b"conectix"):
        return tail
    return None


def _name_in_head(head: bytes, offset: int, length: int) -> str:
    """A file name stored in a header, for admins. Read from our buffer: never opened."""
    name = head[offset : offset + min(length, MAX_NAME_BYTES)] if offset else b""
    return repr(name.decode("utf-8", "replace")) if name else "name not in the first 64 KiB"


def qcow_backing_name(head: bytes) -> str:
    """QCOW v1 and v2/v3 alike: backing file name offset at 8 (8 bytes), its length at 16."""
    offset, length = struct.unpack_from(">QI", head, 8)
    return "backing file " + _name_in_head(head, offset, length)


def _check_qcow_v1(ev: Evidence, inspector) -> Problem | None:
    """QCOW v1 (the inspector only knows v2/v3 flags): backing file at 8, encryption at 36."""
    backing_offset, backing_length = struct.unpack_from(">QI", ev.head, 8)
    if backing_offset or backing_length:
        return refusal("backing_file", "qcow v1 " + qcow_backing_name(ev.head))
    (crypt_method,) = struct.unpack_from(">I", ev.head, 36)
    if crypt_method:
        return refusal("unsafe", "qcow v1 image is encrypted (AES)")
    return None


QCOW2_INCOMPATIBLE_DATA_FILE = 1 << 2
QCOW2_INCOMPATIBLE_EXTENDED_L2 = 1 << 4
QCOW2_EXTENSION_END, QCOW2_EXTENSION_DATA_FILE = 0, 0x44415441


def _check_qcow2(ev: Evidence, inspector) -> Problem | None:
    """QCOW2 (qemu docs/interop/qcow2.txt): a backing file (name offset 8, length 16), an
    external data file (incompatible feature bit 2, or its name in a header extension), and
    extended L2 entries (bit 4), which the inspector only knows as "unknown"."""
    version, backing_offset, backing_length, cluster_bits = struct.unpack_from(">IQII", ev.head, 4)
    if backing_offset or backing_length:
        return refusal("backing_file", qcow_backing_name(ev.head))
    incompatible, header_length = (0, 72) if version < 3 else (
        struct.unpack_from(">Q", ev.head, 72)[0], struct.unpack_from(">I", ev.head, 100)[0])
    if incompatible & QCOW2_INCOMPATIBLE_DATA_FILE:
        return refusal("data_file", "qcow2 incompatible feature bit 2: external data file")
    if incompatible & QCOW2_INCOMPATIBLE_EXTENDED_L2:
        return refusal("extended_l2", "qcow2 incompatible feature bit 4: extended L2 entries (subclusters)")
    return _check_qcow2_extensions(ev.head, header_length, 1 << min(cluster_bits, 21))


def _check_qcow2_extensions(head: bytes, offset: int, cluster_size: int) -> Problem | None:
    """Header extensions run from the end of the header to an end marker in the first cluster;
    one of them can name a data file. qemu reads them all, so we do too (fail closed)."""
    while offset + 8 <= cluster_size:
        if offset + 8 > len(head):
            return refusal("unsafe", f"qcow2 header extensions run past the first {len(head)} bytes")
        kind, length = struct.unpack_from(">II", head, offset)
        if kind == QCOW2_EXTENSION_END:
            return None
        if kind == QCOW2_EXTENSION_DATA_FILE:
            return refusal("data_file", "qcow2 data file " + _name_in_head(head, offset + 8, length))
        offset += 8 + (length + 7) // 8 * 8
    return None  # qemu stops at the end of the first cluster as well


QED_FEATURE_BACKING_FILE = 0x01
QED_KNOWN_FEATURES = 0x07  # backing file, needs check, backing format not probed


def _check_qed(ev: Evidence, inspector) -> Problem | None:
    """QED (qemu docs/interop/qed_spec.txt): features at 16, backing file name offset/size at 56."""
    (features,) = struct.unpack_from("<Q", ev.head, 16)
    offset, length = struct.unpack_from("<II", ev.head, 56)
    if features & QED_FEATURE_BACKING_FILE or offset or length:
        return refusal("backing_file", "qed backing file " + _name_in_head(ev.head, offset, length))
    if features & ~QED_KNOWN_FEATURES:
        return refusal("unsafe", f"qed unknown feature bits {features:#x}")
    return None


def _check_vmdk(ev: Evidence, inspector) -> Problem | None:
    """A VMDK may go only when it is one self-contained file: a sparse header (KDMV) whose own
    descriptor names exactly one extent, the file itself (see vmdk_descriptor_problem)."""
    if not ev.head.startswith(b"KDMV"):
        return refusal("data_file", "VMDK text descriptor without data: its extents are other files")
    (capacity,) = struct.unpack_from("<Q", ev.head, 12)  # sectors
    (descriptor_sectors,) = struct.unpack_from("<Q", ev.head, 36)
    if descriptor_sectors * 512 > oslo.VMDKInspector.DESC_MAX_SIZE:  # the inspector reads no more
        return refusal("unsafe", f"VMDK embedded descriptor of {descriptor_sectors} sectors: larger than 1 MiB")
    if not inspector.has_region("descriptor") or not inspector.region("descriptor").complete:
        return refusal("unsafe", "VMDK embedded descriptor could not be read")
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
        return refusal("unsafe", "VMDK descriptor has more text after its end (a NUL byte)")
    try:
        text = text.decode("ascii")
    except UnicodeDecodeError:
        return refusal("unsafe", "VMDK descriptor is not ASCII text")
    # qemu finds these names anywhere in the text (strstr), comments included.
    if "parentfilenamehint" in text.lower():
        return refusal("backing_file", "VMDK descriptor names a parent disk (parentFileNameHint)")
    if text.lower().count("createtype") != 1:
        return refusal("unsafe", "VMDK descriptor must name its createType exactly once")
    fields, extents = {}, []
    for line in (raw.strip() for raw in text.split("\n")):  # strip() also takes CR and tabs
        if not line or line.startswith("#"):
            continue
        if not line.replace("\t", " ").isprintable():
            return refusal("unsafe", f"VMDK descriptor line with control characters: {line[:DETAIL_LINE_CHARS]!r}")
        field = _VMDK_FIELD.fullmatch(line)
        if field is None:
            extents.append(line)
            continue
        key = field[1].lower()
        if key in fields or not (key in VMDK_HEADER_KEYS or key.startswith("ddb.")):
            return refusal("unsafe", f"VMDK descriptor field {field[1]!r} is repeated or unknown")
        fields[key] = field[2] if field[2] is not None else field[3]
    return _judge_vmdk_fields(fields) or _judge_vmdk_extents(extents, capacity)


def _judge_vmdk_fields(fields: dict[str, str]) -> Problem | None:
    create_type = fields.get("createtype", "")
    if create_type.lower() not in VMDK_CREATE_TYPES:
        return refusal("data_file", f"VMDK createType {create_type[:DETAIL_FIELD_CHARS]!r}: only monolithicSparse or "
                          "streamOptimized keep the whole disk in one file")
    if fields.get("parentcid", VMDK_NO_PARENT).lower() != VMDK_NO_PARENT:
        parent = fields["parentcid"][:DETAIL_FIELD_CHARS]
        return refusal("backing_file", f"VMDK parentCID {parent!r}: it was made on top of a parent disk")
    return None


def _judge_vmdk_extents(extents: list[str], capacity: int) -> Problem | None:
    if len(extents) != 1:
        listed = "; ".join(line[:DETAIL_LINE_CHARS] for line in extents[:DETAIL_LINES]) or "none"
        return refusal("data_file", f"VMDK descriptor has {len(extents)} extent lines, only one may be: {listed}")
    extent = _VMDK_EXTENT.fullmatch(extents[0])
    if extent is None:
        return refusal("data_file", f"VMDK extent is not one SPARSE extent in this file: {extents[0][:DETAIL_LINE_CHARS]!r}")
    sectors, name = int(extent[2]), extent[3]
    if any(c in name for c in "/\\") or name.strip(".") == "":
        return refusal("data_file", f"VMDK extent names another place: {name[:DETAIL_LINE_CHARS]!r}")
    if sectors != capacity:
        return refusal("data_file", f"VMDK extent of {sectors} sectors, the disk has {capacity}: not this file alone")
    return None


VHD_FIXED, VHD_DYNAMIC, VHD_DIFFERENCING = 2, 3, 4
VHD_PARENT_FIELDS = slice(40, 576 + 8 * 24)  # parent UUID, time stamp, name and 8 locators


def _check_vhd(ev: Evidence, inspector) -> Problem | None:
    """Disk type (footer offset 60): a differencing VHD has a parent disk. A dynamic VHD keeps a
    copy of its footer at both ends: no copy at the end means the file was cut short; its dynamic
    header (at the footer's data offset) must not name a parent either."""
    footer = ev.head if ev.head.startswith(b"conectix") else fixed_vhd_footer(ev.tail, ev.size)
    end_footer = ev.tail if ev.tail and ev.tail.startswith(b"conectix") else footer
    disk_types = {struct.unpack_from(">I", f, 60)[0] for f in (footer, end_footer)}
    if VHD_DIFFERENCING in disk_types:
        return refusal("backing_file", "VHD disk type 4 (differencing): it has a parent disk")
    if len(disk_types) > 1 or not disk_types <= {VHD_FIXED, VHD_DYNAMIC}:
        return refusal("unsafe", f"VHD disk types {sorted(disk_types)}: unknown or not the same in both footers")
    (disk_type,) = disk_types
    if disk_type == VHD_DYNAMIC and ev.tail is not None and not ev.tail.startswith(b"conectix"):
        return refusal("truncated", "dynamic VHD: the footer copy at the end of the file is missing")
    if disk_type == VHD_DYNAMIC:
        return _check_vhd_dynamic_header(ev, struct.unpack_from(">Q", footer, 16)[0])
    return None


def _check_vhd_dynamic_header(ev: Evidence, offset: int) -> Problem | None:
    header = ev.bytes_at(offset, 1024)
    if header is None:
        return None  # while pushing, past the head: inspect_file read it before
    if len(header) < 1024 or not header.startswith(b"cxsparse"):
        return refusal("truncated", f"dynamic VHD: no dynamic disk header at {offset}")
    if any(header[VHD_PARENT_FIELDS]):
        return refusal("backing_file", "VHD dynamic header names a parent disk (parent UUID, name or locators set)")
    return None


def check_pass_through_parent(ev: Evidence) -> Problem | None:
    """ZVHD/ZVHD2 are VHD-based and pass through unread, but the VHD ways of naming a parent
    disk still apply: a differencing disk type or a dynamic header naming a parent is refused.
    Nothing else of the VHD checks is applied, since a genuine ZVHD need not follow them."""
    footer = ev.head if ev.head.startswith(b"conectix") else fixed_vhd_footer(ev.tail, ev.size)
    footers = [f for f in (footer, ev.tail) if f and f.startswith(b"conectix")]
    if any(struct.unpack_from(">I", f, 60)[0] == VHD_DIFFERENCING for f in footers):
        return refusal("backing_file", "VHD disk type 4 (differencing): it has a parent disk")
    header = ev.bytes_at(struct.unpack_from(">Q", footers[0], 16)[0], 1024) if footers else None
    if header and header.startswith(b"cxsparse") and any(header[VHD_PARENT_FIELDS]):
        return refusal("backing_file", "VHD dynamic header names a parent disk (parent UUID, name or locators set)")
    return None


VHDX_FILE_PARAMETERS = "CAA16737-FA36-4D43-B3B6-33F0AA44E76B"
VHDX_PARENT_LOCATOR = "A8D35F2D-B30B-454D-ABF7-D3D84834AB0C"
VHDX_HAS_PARENT = 0x02  # File Parameters flags


def _check_vhdx(ev: Evidence, inspector) -> Problem | None:
    """MS-VHDX 2.6: a parent locator metadata item, or HasParent in the file parameters, makes
    a differencing disk. The inspector keeps the metadata table; the items are read here."""
    if not inspector.has_region("metadata") or len(inspector.region("metadata").data) < 32:
        return refusal("unsafe", "VHDX metadata table could not be read")
    table = bytes(inspector.region("metadata").data)
    (count,) = struct.unpack_from("<H", table, 10)
    if 32 + 32 * count > len(table):
        return refusal("unsafe", f"VHDX metadata table of {count} entries could not be read whole")
    items = {}
    for entry in range(32, 32 + 32 * count, 32):
        guid = oslo.VHDXInspector._guid(table[entry : entry + 16])
        items[guid] = struct.unpack_from("<I", table, entry + 16)[0]
    if VHDX_PARENT_LOCATOR in items:
        return refusal("backing_file", "VHDX metadata has a parent locator: it is a differencing disk")
    if VHDX_FILE_PARAMETERS not in items:
        return refusal("unsafe", "VHDX metadata has no file parameters")
    params = ev.bytes_at(inspector.region("metadata").offset + items[VHDX_FILE_PARAMETERS], 8)
    if params is None:
        return None  # while pushing, past the head: inspect_file read it before
    if len(params) < 8:
        return refusal("truncated", "VHDX file parameters lie past the end of the file")
    if struct.unpack_from("<I", params, 4)[0] & VHDX_HAS_PARENT:
        return refusal("backing_file", "VHDX file parameters: HasParent is set (a differencing disk)")
    return None


VDI_DYNAMIC, VDI_STATIC, VDI_UNDO, VDI_DIFFERENCING = 1, 2, 3, 4


def _check_vdi(ev: Evidence, inspector) -> Problem | None:
    """VDI (qemu block/vdi.c): image type at 0x4c; the link and parent UUIDs at 0x1a8 and 0x1b8
    name the image a differencing (or undo) image was made from."""
    (image_type,) = struct.unpack_from("<I", ev.head, 0x4C)
    if image_type in (VDI_UNDO, VDI_DIFFERENCING) or any(ev.head[0x1A8:0x1C8]):
        uuids = ev.head[0x1A8:0x1C8].hex()
        return refusal("backing_file", f"VDI image type {image_type} with link and parent UUIDs {uuids}")
    if image_type not in (VDI_DYNAMIC, VDI_STATIC):
        return refusal("unsafe", f"VDI image type {image_type} is unknown")
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

