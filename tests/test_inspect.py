"""The inspect step (uploads/diskimage.py): what a staged file really is, before it may be pushed.

A corpus of disk images is made once per test session: the ordinary ones with qemu-img
(create/convert), the hostile ones by hand (a backing file pointing at /etc/passwd, a VMDK
extent at /etc/shadow, truncated and mislabelled files...). Each is inspected as the user
declared it; the test knows the format or the refusal it must get. No database needed.
"""

import concurrent.futures
import fcntl
import hashlib
import json
import os
import random
import shutil
import struct
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from uploads import diskcheck, diskformats, diskimage, qemu
from uploads.diskimage import FileChanged, inspect_file, wrap_stream
from uploads.errors import InspectError
from uploads.qemu import convert_to_qcow2

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("prlimit") is None,
    reason="needs qemu-img (Debian's qemu-utils) and prlimit (util-linux)",
)

KiB, MiB, GiB = 1024, 1024**2, 1024**3
DISK_SIZE = 64 * MiB  # the virtual size of every image in the corpus
VHD_DISK_SIZE = 482 * 16 * 17 * 512  # VHD rounds 64 MiB up to whole cylinders: 482 x 16 heads x 17 sectors
ISO_SIZE = 64 * 2048  # make_iso's 64 blocks
IMS_FORMATS = ("qcow2", "vhd", "raw", "zvhd2")  # the default of the IMS_DISK_FORMATS setting


# ---------------------------------------------------------------------------------------------
# Making the corpus


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def cut(src: Path, dst: Path, length: int) -> None:
    """Copy the first `length` bytes: a file cut short while it was copied."""
    dst.write_bytes(src.read_bytes()[:length])


def make_boot_disk(path: Path) -> None:
    """A raw disk with an MBR: one Linux partition from sector 2048, and some data in it."""
    with open(path, "wb") as f:
        f.truncate(DISK_SIZE)
        f.seek(446)  # the first partition entry: bootable, type 0x83, start LBA, sectors
        sectors = DISK_SIZE // 512 - 2048
        f.write(struct.pack("<B3sB3sII", 0x80, b"\x00\x21\x00", 0x83, b"\xfe\xff\xff", 2048, sectors))
        f.seek(510)
        f.write(b"\x55\xaa")
        f.seek(1 * MiB)
        f.write(random.Random(1).randbytes(256 * KiB))


def make_iso(path: Path, *, hybrid: bool = False) -> None:
    """A minimal ISO 9660 image: 16 empty sectors, a primary volume descriptor, a terminator.
    A hybrid (bootable from USB) ISO also carries an MBR in its first sector."""
    blocks = ISO_SIZE // 2048
    data = bytearray(ISO_SIZE)
    pvd = 16 * 2048
    data[pvd : pvd + 7] = b"\x01CD001\x01"
    # Volume size in blocks and block size, each written in both byte orders.
    data[pvd + 80 : pvd + 88] = struct.pack("<I", blocks) + struct.pack(">I", blocks)
    data[pvd + 128 : pvd + 132] = struct.pack("<H", 2048) + struct.pack(">H", 2048)
    data[pvd + 2048 : pvd + 2048 + 7] = b"\xffCD001\x01"
    if hybrid:
        struct.pack_into("<B3sB3sII", data, 446, 0x80, b"\x00\x01\x00", 0x17, b"\xfe\xff\xff", 0, blocks * 4)
        data[510:512] = b"\x55\xaa"
    path.write_bytes(data)


def vmdk_descriptor(extent: str, *, create_type: str = "monolithicSparse", extra: str = "") -> bytes:
    return (
        "# Disk DescriptorFile\nversion=1\nCID=25e94618\nparentCID=ffffffff\n"
        f'createType="{create_type}"\n{extra}'
        f"\n# Extent description\n{extent}\n"
    ).encode()


def replace_embedded_descriptor(src: Path, dst: Path, descriptor: bytes) -> None:
    """A monolithicSparse VMDK keeps a text descriptor right after its 512-byte header."""
    data = bytearray(src.read_bytes())
    (sectors,) = struct.unpack_from("<Q", data, 36)  # descriptorSize, in sectors
    assert len(descriptor) <= sectors * 512
    data[512 : 512 + sectors * 512] = descriptor.ljust(sectors * 512, b"\x00")
    dst.write_bytes(data)


def make_corpus(d: Path) -> None:
    make_boot_disk(d / "boot.raw")
    (d / "plain.raw").write_bytes(random.Random(2).randbytes(4 * MiB))  # no boot sector
    base = str(d / "boot.raw")
    for name, args in {
        "v2.qcow2": ["-O", "qcow2", "-o", "compat=0.10"],
        "v3.qcow2": ["-O", "qcow2", "-o", "compat=1.1"],
        "v1.qcow": ["-O", "qcow"],
        "sparse.vmdk": ["-O", "vmdk", "-o", "subformat=monolithicSparse"],
        "stream.vmdk": ["-O", "vmdk", "-o", "subformat=streamOptimized"],
        "fixed.vhd": ["-O", "vpc", "-o", "subformat=fixed"],
        "dynamic.vhd": ["-O", "vpc", "-o", "subformat=dynamic"],
        "disk.vhdx": ["-O", "vhdx"],
        "disk.vdi": ["-O", "vdi"],
        "disk.qed": ["-O", "qed"],
    }.items():
        qemu_img("convert", "-f", "raw", *args, base, str(d / name))
    make_iso(d / "disk.iso")
    make_iso(d / "hybrid.iso", hybrid=True)
    make_hostile(d)


def make_hostile(d: Path) -> None:
    size = str(DISK_SIZE)
    # -u: do not open the backing file while creating the image.
    passwd = ["-u", "-b", "/etc/passwd", "-F", "raw"]
    qemu_img("create", "-f", "qcow2", *passwd, str(d / "backing-passwd.qcow2"), size)
    qemu_img("create", "-f", "qed", *passwd, str(d / "backing-passwd.qed"), size)
    data_file = f"data_file={d / 'data-file.raw'}"
    qemu_img("create", "-f", "qcow2", "-o", data_file, str(d / "data-file.qcow2"), size)
    shutil.copy(d / "v3.qcow2", d / "unknown-feature.qcow2")
    patch(d / "unknown-feature.qcow2", 0x48 + 7, b"\x20")  # incompatible feature bit 5: unknown
    (d / "extent-shadow.vmdk").write_bytes(
        vmdk_descriptor('RW 2048 FLAT "/etc/shadow" 0', create_type="monolithicFlat")
    )
    # A text descriptor that names a file next to it: no slash for the inspector to object to.
    (d / "relative-extent.vmdk").write_bytes(vmdk_descriptor('RW 2048 SPARSE "boot.raw"'))
    replace_embedded_descriptor(
        d / "sparse.vmdk", d / "extent-shadow-sparse.vmdk", vmdk_descriptor('RW 131072 SPARSE "/etc/shadow"')
    )
    replace_embedded_descriptor(
        d / "sparse.vmdk", d / "parent-hint.vmdk",
        vmdk_descriptor('RW 131072 SPARSE "parent-hint.vmdk"', extra='parentFileNameHint="/etc/passwd"\n'),
    )
    make_differencing_vhd(d / "dynamic.vhd", d / "differencing.vhd")
    cut(d / "v3.qcow2", d / "truncated-header.qcow2", 100)
    qcow2 = d / "v3.qcow2"
    cut(qcow2, d / "truncated.qcow2", qcow2.stat().st_size - 64 * KiB)  # the last data cluster
    cut(d / "disk.vhdx", d / "truncated.vhdx", (d / "disk.vhdx").stat().st_size // 2)
    cut(d / "dynamic.vhd", d / "truncated-dynamic.vhd", (d / "dynamic.vhd").stat().st_size - 512)
    shutil.copy(d / "v3.qcow2", d / "qcow2-inside.vmdk")
    (d / "empty.qcow2").write_bytes(b"")
    (d / "random.qcow2").write_bytes(random.Random(3).randbytes(1 * MiB))
    shutil.copy(d / "v3.qcow2", d / "polyglot.qcow2")
    patch(d / "polyglot.qcow2", 510, b"\x55\xaa")  # also an MBR signature: QCOW2 and raw disk at once
    shutil.copy(d / "disk.qed", d / "broken-table.qed")
    patch(d / "broken-table.qed", 40, struct.pack("<Q", 1 << 40))  # L1 table far past the end
    shutil.copy(d / "boot.raw", d / "no-partitions.raw")
    patch(d / "no-partitions.raw", 446, bytes(64))  # an MBR signature but no partition
    qemu_img("create", "-f", "qcow2", "-o", "extended_l2=on", str(d / "extended-l2.qcow2"), size)
    make_references(d)


# ---------------------------------------------------------------------------------------------
# Images that name another file, in every way each format has (issue 14). Each must be refused
# before qemu-img sees it.

SELF = 'RW 131072 SPARSE "disk.vmdk"'  # the one extent a monolithicSparse VMDK of 64 MiB has
VMDK_HEADER = 'version=1\nCID=25e94618\nparentCID=ffffffff\ncreateType="monolithicSparse"\n'
SECOND_EXTENTS = {  # a second extent line after the file's own, however it is written
    "flat-relative": 'RW 2048 FLAT "shadow" 0',
    "flat-absolute": 'RW 2048 FLAT "/etc/shadow" 0',
    "flat-dot-slash": 'RW 2048 FLAT "./shadow" 0',
    "lower-case": 'rw 2048 flat "shadow" 0',
    "single-quoted": "RW 2048 FLAT 'shadow' 0",
    "unquoted": "RW 2048 FLAT shadow 0",
    "spaced": '\t RW   2048\tFLAT  "shadow"   0   ',
    "sparse": 'RDONLY 2048 SPARSE "shadow"',
    "zero": "NOACCESS 2048 ZERO",
    "vmfs": 'RW 2048 VMFS "shadow"',
}
VMDK_DESCRIPTORS = {  # file name: (descriptor, the refusal)
    **{f"second-extent-{k}.vmdk": (VMDK_HEADER + f"{SELF}\n{line}\n", "data_file")
       for k, line in SECOND_EXTENTS.items()},
    "second-extent-first.vmdk": (VMDK_HEADER + f'RW 2048 FLAT "shadow" 0\n{SELF}\n', "data_file"),
    "second-extent-crlf.vmdk": ((VMDK_HEADER + f'{SELF}\nRW 2048 FLAT "shadow" 0\n').replace("\n", "\r\n"),
                                "data_file"),
    "one-flat-extent.vmdk": (VMDK_HEADER + 'RW 131072 FLAT "disk.vmdk" 0\n', "data_file"),
    "one-extent-elsewhere.vmdk": (VMDK_HEADER + 'RW 131072 SPARSE "../disk.vmdk"\n', "data_file"),
    "one-extent-backslash.vmdk": (VMDK_HEADER + 'RW 131072 SPARSE "..\\\\disk.vmdk"\n', "data_file"),
    "one-extent-too-small.vmdk": (VMDK_HEADER + 'RW 4096 SPARSE "disk.vmdk"\n', "data_file"),
    "no-extent.vmdk": (VMDK_HEADER, "data_file"),
    **{f"create-type-{t.lower()}.vmdk": (VMDK_HEADER.replace("monolithicSparse", t) + SELF, "data_file")
       for t in ("monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat", "vmfs", "vmfsSparse",
                 "custom", "fullDevice")},
    "create-type-twice.vmdk": ('# createType="monolithicFlat"\n' + VMDK_HEADER + SELF + "\n", "unsafe"),
    "create-type-missing.vmdk": (VMDK_HEADER.replace('createType="monolithicSparse"\n', "") + SELF, "unsafe"),
    "parent-hint-relative.vmdk": (VMDK_HEADER + 'parentFileNameHint="base.vmdk"\n' + SELF, "backing_file"),
    "parent-hint-in-comment.vmdk": (f'{VMDK_HEADER}{SELF}\n# parentFileNameHint="x"', "backing_file"),
    "parent-cid.vmdk": (VMDK_HEADER.replace("ffffffff", "12345678") + SELF, "backing_file"),
    "change-tracking.vmdk": (VMDK_HEADER + 'changeTrackPath="disk-ctk.vmdk"\n' + SELF, "unsafe"),
    "hidden-after-end.vmdk": (VMDK_HEADER + SELF + '\n\x00RW 2048 FLAT "shadow" 0\n', "unsafe"),
}
# Written as VMware and VirtualBox do (CRLF, tabs, spaces around "=", comments): accepted.
GOOD_VMDK_DESCRIPTOR = (
    "# Disk DescriptorFile\r\nversion=1\r\nencoding=\"UTF-8\"\r\nCID=fffffffe\r\nparentCID=ffffffff\r\n"
    'isNativeSnapshot="no"\r\ncreateType="monolithicSparse"\r\n\r\n# Extent description\r\n'
    '\tRW 131072 SPARSE "My Disk (1).vmdk"\r\n\r\n# The Disk Data Base\r\n#DDB\r\n\r\n'
    'ddb.adapterType = "lsilogic"\r\nddb.uuid.parent="00000000-0000-0000-0000-000000000000"\r\n'
)


def make_references(d: Path) -> None:
    for name, (descriptor, _) in VMDK_DESCRIPTORS.items():
        replace_embedded_descriptor(d / "sparse.vmdk", d / name, descriptor.encode())
    replace_embedded_descriptor(d / "sparse.vmdk", d / "vmware-style.vmdk", GOOD_VMDK_DESCRIPTOR.encode())
    # A descriptor area of 2 MiB: past what the inspector reads, text could hide.
    (d / "huge-descriptor.vmdk").write_bytes((d / "sparse.vmdk").read_bytes().ljust(3 * MiB, b"\x00"))
    patch(d / "huge-descriptor.vmdk", 36, struct.pack("<Q", 4096))
    passwd = ["-u", "-b", "/etc/passwd", "-F", "raw"]
    qemu_img("create", "-f", "qcow", *passwd, str(d / "backing-passwd.qcow"), str(DISK_SIZE))
    qemu_img("create", "-f", "qcow2", "-u", "-b", "neighbour.raw", "-F", "raw",
             str(d / "backing-relative.qcow2"), str(DISK_SIZE))
    shutil.copy(d / "v3.qcow2", d / "backing-length-only.qcow2")
    patch(d / "backing-length-only.qcow2", 16, struct.pack(">I", 11))  # a name length, offset 0
    shutil.copy(d / "data-file.qcow2", d / "data-file-extension-only.qcow2")
    patch(d / "data-file-extension-only.qcow2", 0x48 + 7, b"\x00")  # the feature bit gone, the name kept
    shutil.copy(d / "disk.qed", d / "backing-name-only.qed")
    patch(d / "backing-name-only.qed", 56, struct.pack("<II", 1024, 11))  # a name, no feature flag
    make_vhd_with_parent_locator(d / "dynamic.vhd", d / "parent-locator.vhd")
    make_vhdx_with_parent(d / "disk.vhdx", d / "parent-locator.vhdx", locator=True)
    make_vhdx_with_parent(d / "disk.vhdx", d / "has-parent.vhdx", locator=False)
    shutil.copy(d / "disk.vdi", d / "differencing.vdi")
    patch(d / "differencing.vdi", 0x4C, struct.pack("<I", 4))  # image type: differencing
    shutil.copy(d / "disk.vdi", d / "parent-uuid.vdi")
    patch(d / "parent-uuid.vdi", 0x1B8, random.Random(4).randbytes(16))  # uuid_parent


def make_vhd_with_parent_locator(src: Path, dst: Path) -> None:
    """A dynamic VHD (disk type 3, not 4) whose dynamic header still names a parent: its UUID,
    its name (UTF-16) and one Windows relative-path locator (platform code W2ru)."""
    shutil.copy(src, dst)
    (header,) = struct.unpack(">Q", dst.read_bytes()[16:24])  # the footer's data offset
    patch(dst, header + 40, random.Random(5).randbytes(16))
    patch(dst, header + 64, "base.vhd".encode("utf-16-be"))
    patch(dst, header + 576, struct.pack(">4sIIIQ", b"W2ru", 512, 16, 0, 1536))


VHDX_FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VHDX_PARENT_LOCATOR = uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")


def make_vhdx_with_parent(src: Path, dst: Path, *, locator: bool) -> None:
    """A VHDX made a differencing disk by hand (qemu-img cannot make one): a parent locator
    item added to its metadata table, or the HasParent flag set in its file parameters."""
    shutil.copy(src, dst)
    data = dst.read_bytes()
    metadata = next(  # the region table at 192 KiB: the metadata region's offset
        struct.unpack_from("<Q", data, entry + 16)[0]
        for entry in range(192 * KiB + 16, 192 * KiB + 16 + 32 * 8, 32)
        if data[entry : entry + 16] == uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E").bytes_le
    )
    (count,) = struct.unpack_from("<H", data, metadata + 10)
    entries = {data[e : e + 16]: e for e in range(metadata + 32, metadata + 32 + 32 * count, 32)}
    if locator:
        entry = metadata + 32 + 32 * count
        patch(dst, entry, VHDX_PARENT_LOCATOR.bytes_le + struct.pack("<IIII", 128 * KiB, 64, 0b100, 0))
        patch(dst, metadata + 10, struct.pack("<H", count + 1))
    else:
        (item,) = struct.unpack_from("<I", data, entries[VHDX_FILE_PARAMETERS.bytes_le] + 16)
        (flags,) = struct.unpack_from("<I", data, metadata + item + 4)
        patch(dst, metadata + item + 4, struct.pack("<I", flags | 0b10))


def make_differencing_vhd(src: Path, dst: Path) -> None:
    """A VHD whose disk type (footer offset 60) says "differencing": it needs a parent disk."""
    shutil.copy(src, dst)
    size = dst.stat().st_size
    for footer in (0, size - 512):  # a dynamic VHD has its footer at both ends
        patch(dst, footer + 60, struct.pack(">I", 4))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    make_corpus(folder)
    return folder


# ---------------------------------------------------------------------------------------------
# Every file of the corpus


@dataclass(frozen=True)
class Sample:
    file: str
    declared: str
    detected: str | None
    problem: str | None = None
    suggested: str | None = None
    virtual: int = DISK_SIZE

    def __str__(self):
        return f"{self.file} as {self.declared}"


GOOD = [
    Sample("v2.qcow2", "qcow2", "qcow2"),
    Sample("v3.qcow2", "qcow2", "qcow2"),
    Sample("v1.qcow", "qcow", "qcow"),
    Sample("sparse.vmdk", "vmdk", "vmdk"),
    Sample("stream.vmdk", "vmdk", "vmdk"),
    Sample("fixed.vhd", "vhd", "vhd", virtual=VHD_DISK_SIZE),
    Sample("dynamic.vhd", "vhd", "vhd", virtual=VHD_DISK_SIZE),
    Sample("disk.vhdx", "vhdx", "vhdx"),
    Sample("disk.vdi", "vdi", "vdi"),
    Sample("disk.qed", "qed", "qed"),
    Sample("vmware-style.vmdk", "vmdk", "vmdk"),
    Sample("plain.raw", "raw", "raw", virtual=4 * MiB),
    Sample("boot.raw", "raw", "raw"),
    Sample("disk.iso", "iso", "iso", virtual=ISO_SIZE),
    Sample("hybrid.iso", "iso", "iso", virtual=ISO_SIZE),
]
REFUSED = [
    Sample("backing-passwd.qcow2", "qcow2", "qcow2", "backing_file"),
    Sample("data-file.qcow2", "qcow2", "qcow2", "data_file"),
    Sample("unknown-feature.qcow2", "qcow2", "qcow2", "unsafe"),
    Sample("extent-shadow.vmdk", "vmdk", "vmdk", "data_file"),
    Sample("relative-extent.vmdk", "vmdk", "vmdk", "data_file"),
    Sample("extent-shadow-sparse.vmdk", "vmdk", "vmdk", "data_file"),
    Sample("parent-hint.vmdk", "vmdk", "vmdk", "backing_file"),
    Sample("backing-passwd.qed", "qed", "qed", "backing_file"),
    Sample("differencing.vhd", "vhd", "vhd", "backing_file"),
    Sample("truncated-header.qcow2", "qcow2", None, "truncated"),
    Sample("truncated.qcow2", "qcow2", "qcow2", "truncated"),
    Sample("truncated.vhdx", "vhdx", "vhdx", "truncated"),
    Sample("truncated-dynamic.vhd", "vhd", "vhd", "truncated"),
    Sample("qcow2-inside.vmdk", "vmdk", "qcow2", "format_mismatch", suggested="qcow2"),
    Sample("empty.qcow2", "qcow2", None, "empty"),
    Sample("random.qcow2", "qcow2", "raw", "unknown_format", suggested="raw"),
    Sample("polyglot.qcow2", "qcow2", None, "ambiguous"),
    Sample("broken-table.qed", "qed", "qed", "qemu_disagrees"),
    Sample("no-partitions.raw", "raw", "raw", "unsafe"),
    Sample("extended-l2.qcow2", "qcow2", "qcow2", "unsafe"),
    # Good files declared as something else: the portal offers the right format.
    Sample("sparse.vmdk", "qcow2", "vmdk", "format_mismatch", suggested="vmdk"),
    Sample("fixed.vhd", "raw", "vhd", "format_mismatch", suggested="vhd"),
    Sample("v1.qcow", "qcow2", "qcow", "format_mismatch", suggested="qcow"),
    Sample("disk.qed", "qcow2", "qed", "format_mismatch", suggested="qed"),
    Sample("plain.raw", "vhd", "raw", "unknown_format", suggested="raw"),
]
# Every way of naming another file (see make_references): refused before qemu-img runs.
REFERENCES = [
    *[Sample(name, "vmdk", "vmdk", code) for name, (_, code) in VMDK_DESCRIPTORS.items()],
    Sample("extent-shadow-sparse.vmdk", "vmdk", "vmdk", "data_file"),
    Sample("parent-hint.vmdk", "vmdk", "vmdk", "backing_file"),
    Sample("huge-descriptor.vmdk", "vmdk", "vmdk", "unsafe"),
    Sample("backing-passwd.qcow", "qcow", "qcow", "backing_file"),
    Sample("backing-passwd.qcow2", "qcow2", "qcow2", "backing_file"),
    Sample("backing-relative.qcow2", "qcow2", "qcow2", "backing_file"),
    Sample("backing-length-only.qcow2", "qcow2", "qcow2", "backing_file"),
    Sample("data-file.qcow2", "qcow2", "qcow2", "data_file"),
    Sample("data-file-extension-only.qcow2", "qcow2", "qcow2", "data_file"),
    Sample("backing-passwd.qed", "qed", "qed", "backing_file"),
    Sample("backing-name-only.qed", "qed", "qed", "backing_file"),
    Sample("differencing.vhd", "vhd", "vhd", "backing_file"),
    Sample("parent-locator.vhd", "vhd", "vhd", "backing_file"),
    Sample("parent-locator.vhdx", "vhdx", "vhdx", "backing_file"),
    Sample("has-parent.vhdx", "vhdx", "vhdx", "backing_file"),
    Sample("differencing.vdi", "vdi", "vdi", "backing_file"),
    Sample("parent-uuid.vdi", "vdi", "vdi", "backing_file"),
]
REFUSED += [sample for sample in REFERENCES if sample not in REFUSED]

# Words an uploader should not have to know; they belong in `detail`.
JARGON = ("qemu", "inspector", "backing", "header", "descriptor", "extent", "cluster", "offset",
          "footer", "safety", "oslo", "magic", "/", "_", "exit")


def assert_plain_words(problem) -> None:
    assert problem.message.endswith((".", "?")), problem.message
    assert not [w for w in JARGON if w in problem.message.lower()], problem.message
    assert problem.hint, f"{problem.code} has no hint"
    assert problem.detail, f"{problem.code} keeps no detail for admins"


@pytest.mark.parametrize("sample", GOOD, ids=str)
def test_it_accepts_a_good_image_and_measures_it(corpus, sample):
    result = inspect_file(corpus / sample.file, declared_format=sample.declared)

    assert result.problem is None, result.problem
    assert result.detected_format == sample.detected
    assert result.actual_size == (corpus / sample.file).stat().st_size
    assert result.virtual_size == sample.virtual
    assert result.suggested_min_disk_gb == 1
    assert all(v.startswith(("passed", "skipped")) for v in result.checks.values()), result.checks


@pytest.mark.parametrize("sample", REFUSED, ids=str)
def test_it_refuses_a_bad_image_in_plain_words(corpus, sample):
    result = inspect_file(corpus / sample.file, declared_format=sample.declared)

    assert result.problem is not None, result.checks
    assert (result.problem.code, result.detected_format) == (sample.problem, sample.detected)
    assert result.problem.suggested_format == sample.suggested
    assert_plain_words(result.problem)


class ServedImage:
    """A file seen as object staging sees an object: no path, so qemu-img reads it over NBD
    (uploads/nbd.py) and the inspectors through read_at/open only."""

    path = None

    def __init__(self, file):
        self.file = diskimage.FileImage(file)
        self.size = self.file.size

    def read_at(self, offset, length):
        return self.file.read_at(offset, length)

    def open(self):
        return self.file.open()


@pytest.mark.parametrize("sample", GOOD + REFUSED, ids=str)
def test_an_image_read_by_ranges_and_over_nbd_is_judged_as_the_file_is(corpus, sample):
    on_disk = inspect_file(corpus / sample.file, declared_format=sample.declared)
    served = ServedImage(corpus / sample.file)

    remote = inspect_file(served, declared_format=sample.declared)

    def outcomes(checks):  # qemu-img's messages name the file (a path, or the socket)
        return {name: outcome.split(":")[0] for name, outcome in checks.items()}

    assert outcomes(remote.checks) == outcomes(on_disk.checks)
    assert (remote.detected_format, remote.virtual_size) == (on_disk.detected_format, on_disk.virtual_size)
    assert (remote.problem and remote.problem.code) == (on_disk.problem and on_disk.problem.code)


def test_a_read_that_fails_during_qemu_img_is_raised_not_taken_for_a_damaged_file(corpus):
    class StoreAway(Exception):
        pass

    class Flaky(ServedImage):
        def read_at(self, offset, length):
            if offset >= 64 * KiB:  # the inspectors are done; qemu-img's reads fail
                raise StoreAway()
            return super().read_at(offset, length)

    with pytest.raises(StoreAway):
        inspect_file(Flaky(corpus / "v3.qcow2"), declared_format="qcow2")


@pytest.fixture
def no_qemu_img(monkeypatch):
    """qemu-img must not run: any attempt fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"qemu-img ran: {args}")

    monkeypatch.setattr(qemu, "_run_limited", refuse)
    monkeypatch.setattr(qemu, "_run_with_progress", refuse)


@pytest.mark.parametrize("sample", REFERENCES, ids=str)
def test_an_image_naming_another_file_is_refused_before_qemu_img_sees_it(corpus, sample, no_qemu_img):
    result = inspect_file(corpus / sample.file, declared_format=sample.declared)

    assert result.problem is not None and result.problem.code == sample.problem, result.checks
    assert_plain_words(result.problem)
    assert not [check for check in result.checks if check.startswith("qemu_img")]


@pytest.mark.parametrize("sample", [s for s in REFERENCES if s.file != "has-parent.vhdx"], ids=str)
def test_the_push_wrapper_stops_an_image_naming_another_file(corpus, sample):
    # has-parent.vhdx: its flag lies past the head the wrapper keeps; inspect_file reads it.
    with pytest.raises(FileChanged):
        push(corpus / sample.file, sample.detected)


def test_the_issues_vmdk_with_a_second_extent_is_refused_in_plain_words(corpus):
    result = inspect_file(corpus / "second-extent-flat-relative.vmdk", declared_format="vmdk")

    assert result.problem.message == (
        "This disk image keeps its data in other files, so the file you chose is not the whole disk."
    )
    assert 'RW 2048 FLAT "shadow" 0' in result.problem.detail  # for admins


def test_a_boot_sector_without_partitions_is_explained_as_such(corpus):
    result = inspect_file(corpus / "no-partitions.raw", declared_format="raw")

    assert "lists no partitions" in result.problem.message
    assert "partition table" in result.problem.hint
    assert "standalone" not in result.problem.hint  # not the hint about disks made of several files


def test_extended_l2_entries_are_named_with_the_way_out(corpus):
    result = inspect_file(corpus / "extended-l2.qcow2", declared_format="qcow2")

    assert "extended L2 entries" in result.problem.message
    assert "extended_l2=off" in result.problem.hint
    assert "bit 4" in result.problem.detail


def test_it_offers_the_detected_format_in_one_sentence(corpus):
    result = inspect_file(corpus / "sparse.vmdk", declared_format="qcow2")

    assert result.problem.message == "This file is a VMDK disk, not QCOW2 — upload it as VMDK?"
    assert result.problem.suggested_format == "vmdk"


def test_it_records_every_check_it_ran(corpus):
    result = inspect_file(corpus / "v3.qcow2", declared_format="qcow2")

    assert result.checks == {
        "file_size": "passed",
        "format_detected": "passed: qcow2",
        "backing_file": "passed",
        "data_file": "passed",
        "unknown_features": "passed",
        "qcow2_header": "passed",
        "format_matches": "passed",
        "virtual_size": "passed",
        "qemu_img_info": "passed",
        "qemu_img_check": "passed",
    }


def test_it_names_the_backing_file_for_admins_only(corpus):
    result = inspect_file(corpus / "backing-passwd.qcow2", declared_format="qcow2")

    assert result.checks["backing_file"].startswith("failed: ")
    assert "/etc/passwd" in result.problem.detail
    assert "/etc/passwd" not in result.problem.message + result.problem.hint
    assert "qemu_img_info" not in result.checks  # qemu-img never saw the hostile file


def test_it_checks_qed_itself_because_the_inspector_bans_it(corpus):
    result = inspect_file(corpus / "disk.qed", declared_format="qed")

    assert result.checks["banned"].startswith("skipped: ")
    assert result.checks["qed_header"] == "passed"
    assert result.checks["qemu_img_info"] == "passed"


def test_it_refuses_a_file_of_128_gb_without_reading_it(tmp_path):
    huge = tmp_path / "huge.raw"
    with open(huge, "wb") as f:
        f.truncate(128 * GiB)  # sparse: takes no room

    result = inspect_file(huge, declared_format="raw")

    assert result.problem.code == "too_large"
    assert result.problem.message == "This file is 128 GB; the cloud takes files under 128 GB."
    assert result.bytes_read == 0


def test_it_accepts_a_file_just_under_128_gb(tmp_path):
    big = tmp_path / "big.raw"
    with open(big, "wb") as f:
        f.truncate(128 * GiB - 1)

    result = inspect_file(big, declared_format="raw")

    assert result.problem is None
    assert result.suggested_min_disk_gb == 128


@pytest.mark.parametrize(("virtual_gb", "code"), [(1024, None), (1025, "virtual_too_large")])
def test_it_limits_the_virtual_size_to_what_ims_allows(tmp_path, virtual_gb, code):
    image = tmp_path / "wide.qcow2"
    qemu_img("create", "-f", "qcow2", str(image), f"{virtual_gb}G")

    result = inspect_file(image, declared_format="qcow2")

    assert (result.problem and result.problem.code) == code
    assert result.virtual_size == virtual_gb * GiB
    if code:
        assert_plain_words(result.problem)
    else:
        assert result.suggested_min_disk_gb == 1024


@pytest.mark.parametrize(("size", "min_disk"), [(1, 1), (GiB, 1), (GiB + 1, 2), (10 * GiB - 4096, 10)])
def test_min_disk_is_the_virtual_size_rounded_up_to_whole_gb(tmp_path, size, min_disk):
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(size)

    assert inspect_file(image, declared_format="raw").suggested_min_disk_gb == min_disk


@pytest.mark.parametrize(
    ("file", "declared", "conversion", "upload_as"),
    [
        ("v3.qcow2", "qcow2", False, "qcow2"),
        ("dynamic.vhd", "vhd", False, "vhd"),
        # Glance reads a fixed VHD as raw and refuses it as vhd (tests/test_corpus_e2e.py): converted.
        ("fixed.vhd", "vhd", True, "qcow2"),
        ("boot.raw", "raw", False, "raw"),
        ("sparse.vmdk", "vmdk", True, "qcow2"),
        ("disk.vhdx", "vhdx", True, "qcow2"),
        ("disk.vdi", "vdi", True, "qcow2"),
        ("disk.qed", "qed", True, "qcow2"),
        ("v1.qcow", "qcow", True, "qcow2"),
        ("disk.iso", "iso", True, "qcow2"),
    ],
)
def test_it_tells_which_files_must_be_converted(corpus, file, declared, conversion, upload_as):
    result = inspect_file(corpus / file, declared_format=declared)

    assert result.needs_conversion(IMS_FORMATS) is conversion
    assert result.upload_format(IMS_FORMATS) == upload_as


def test_it_passes_zvhd2_through_as_declared(corpus):
    result = inspect_file(corpus / "plain.raw", declared_format="zvhd2")

    assert result.problem is None
    assert result.detected_format == "zvhd2"
    assert result.virtual_size is None and result.suggested_min_disk_gb is None
    assert not result.needs_conversion(IMS_FORMATS)
    assert result.checks["qemu_img_info"].startswith("skipped: ")


def test_it_refuses_a_qcow2_declared_as_zvhd2(corpus):
    result = inspect_file(corpus / "v3.qcow2", declared_format="zvhd2")

    assert result.problem.code == "format_mismatch"
    assert result.problem.suggested_format == "qcow2"


def test_it_rejects_a_format_name_it_does_not_know(corpus):
    with pytest.raises(ValueError):
        inspect_file(corpus / "v3.qcow2", declared_format="qcow3")


# ---------------------------------------------------------------------------------------------
# qemu-img runs under limits, and only when it can


def test_qemu_img_runs_under_cpu_and_memory_limits(tmp_path):
    fake = tmp_path / "qemu-img"  # prints the limits it was started with, as JSON
    fake.write_text(
        "#!/bin/sh\n"
        """printf '{"format": "raw", "cpu": "%s", "memory_kib": "%s"}' "$(ulimit -t)" "$(ulimit -v)"\n"""
    )
    fake.chmod(0o755)
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(4096))

    info = qemu.qemu_img_info(image, "raw", qemu_img=str(fake))

    assert info["cpu"] == "10"
    assert info["memory_kib"] == str(GiB // 1024)


def test_qemu_img_stopped_by_its_cpu_limit_is_a_refusal(tmp_path):
    fake = tmp_path / "qemu-img"  # spins until the kernel stops it
    fake.write_text("#!/bin/sh\nwhile :; do :; done\n")
    fake.chmod(0o755)
    limits = qemu.Limits(cpu_seconds=1, address_space=GiB, timeout=30)
    (tmp_path / "any").write_bytes(bytes(512))

    with pytest.raises(qemu.QemuImgFailed) as caught:
        qemu.qemu_img_info(tmp_path / "any", "raw", qemu_img=str(fake), limits=limits)

    assert "CPU limit" in caught.value.detail


def test_a_missing_qemu_img_is_an_error_not_a_refusal(corpus):
    with pytest.raises(InspectError) as caught:
        inspect_file(corpus / "v3.qcow2", declared_format="qcow2", qemu_img="/nonexistent/qemu-img")

    assert caught.value.permanent
    assert "qemu-img" in caught.value.hint


# ---------------------------------------------------------------------------------------------
# Converting


@pytest.mark.parametrize(
    ("file", "fmt"),
    [("sparse.vmdk", "vmdk"), ("stream.vmdk", "vmdk"), ("disk.vhdx", "vhdx"), ("disk.vdi", "vdi"),
     ("disk.qed", "qed"), ("v1.qcow", "qcow"), ("disk.iso", "iso")],
)
def test_it_converts_a_safe_image_to_the_same_disk_in_qcow2(corpus, tmp_path, file, fmt):
    src, dst = corpus / file, tmp_path / "out.qcow2"
    progress = []
    inspected = inspect_file(src, declared_format=fmt)

    convert_to_qcow2(
        src, dst, src_format=fmt, virtual_size=inspected.virtual_size, on_progress=progress.append
    )

    result = inspect_file(dst, declared_format="qcow2")
    assert result.problem is None
    assert result.virtual_size == inspected.virtual_size
    driver = qemu.QEMU_DRIVERS[fmt]
    compare = ["qemu-img", "compare", "-f", driver, "-F", "qcow2", str(src), str(dst)]
    same = subprocess.run(compare, capture_output=True)
    assert same.returncode == 0, same.stdout
    assert progress and progress[-1] == 100.0


def test_it_refuses_to_convert_without_room_for_the_virtual_size(corpus, tmp_path):
    dst = tmp_path / "out.qcow2"

    with pytest.raises(InspectError) as caught:
        convert_to_qcow2(corpus / "sparse.vmdk", dst, src_format="vmdk", virtual_size=1 << 60)

    assert "not enough free disk space" in caught.value.message
    assert not caught.value.permanent  # room may free up: retrying can help
    assert not dst.exists()


def test_a_failed_conversion_leaves_no_half_file(corpus, tmp_path):
    dst = tmp_path / "out.qcow2"

    with pytest.raises(InspectError) as caught:  # raw bytes are not a VMDK: qemu-img refuses
        convert_to_qcow2(corpus / "plain.raw", dst, src_format="vmdk", virtual_size=DISK_SIZE)

    assert caught.value.permanent
    assert not dst.exists()


# ---------------------------------------------------------------------------------------------
# Checking again while pushing


def push(path: Path, fmt: str, *, buffer_size: int = 1 * MiB) -> tuple[int, str]:
    """Read the file through wrap_stream as the IMS client does; return bytes and their SHA-256."""
    size = path.stat().st_size
    digest, sent = hashlib.sha256(), 0
    with open(path, "rb") as f:
        stream = wrap_stream(f, fmt, size=size)
        while sent < size:
            chunk = stream.read(min(buffer_size, size - sent))
            if not chunk:
                break
            digest.update(chunk)
            sent += len(chunk)
    return sent, digest.hexdigest()


@pytest.mark.parametrize("sample", GOOD, ids=str)
def test_the_push_wrapper_passes_every_byte_of_a_good_image(corpus, sample):
    path = corpus / sample.file
    sent, digest = push(path, sample.detected, buffer_size=64 * KiB)

    assert sent == path.stat().st_size
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_push_stops_at_the_first_chunk_when_the_format_changed(corpus, tmp_path):
    staged = tmp_path / "staged.vmdk"
    shutil.copy(corpus / "sparse.vmdk", staged)
    assert inspect_file(staged, declared_format="vmdk").problem is None
    shutil.copy(corpus / "v3.qcow2", staged)  # swapped after inspection

    with open(staged, "rb") as f:
        stream = wrap_stream(f, "vmdk", size=staged.stat().st_size)
        with pytest.raises(FileChanged) as caught:
            stream.read(64 * KiB)

    assert caught.value.code == "file_changed"
    assert not isinstance(caught.value, OSError)  # requests must not turn it into a network error


def test_the_push_stops_early_when_a_backing_file_appeared(corpus, tmp_path):
    staged = tmp_path / "staged.qcow2"  # inspected as v3.qcow2, now hostile, 8 MiB long
    staged.write_bytes((corpus / "backing-passwd.qcow2").read_bytes() + bytes(8 * MiB))
    returned = 0

    with open(staged, "rb") as f:
        stream = wrap_stream(f, "qcow2", size=staged.stat().st_size)
        with pytest.raises(FileChanged, match="backing"):
            while chunk := stream.read(64 * KiB):
                returned += len(chunk)

    assert returned < 1 * MiB  # as soon as the inspectors decided, not at the end


def test_the_push_holds_back_the_last_chunk_when_the_end_changed(corpus, tmp_path):
    staged = tmp_path / "staged.vhd"
    shutil.copy(corpus / "truncated-dynamic.vhd", staged)  # a dynamic VHD lost its end footer
    returned = 0

    with open(staged, "rb") as f:
        stream = wrap_stream(f, "vhd", size=staged.stat().st_size)
        with pytest.raises(FileChanged, match="truncated"):
            while chunk := stream.read(64 * KiB):
                returned += len(chunk)

    assert returned < staged.stat().st_size


def test_the_push_stops_when_the_file_got_shorter(corpus):
    path = corpus / "v3.qcow2"

    with open(path, "rb") as f:
        stream = wrap_stream(f, "qcow2", size=path.stat().st_size + 1)
        with pytest.raises(FileChanged, match="ended after"):
            while stream.read(64 * KiB):
                pass


# ---------------------------------------------------------------------------------------------
# A hostile image never makes the portal open the file it points at


class FifoWatch:
    """Tells whether any process opened a named pipe for reading.

    A writer thread waits in a blocking open(O_WRONLY), which returns only once a reader opens
    the pipe. A reader that comes later either finds the writer waiting (both opens return and
    `opened` is set) or would block itself, so inspection would not finish in time. The test
    waits until the writer really sleeps in the kernel before it starts inspecting.
    """

    def __init__(self, path: Path):
        self.path = path
        os.mkfifo(path)
        self.opened = threading.Event()
        self.was_opened: bool | None = None  # set by release()
        self.thread = threading.Thread(target=self._wait_for_a_reader, daemon=True)
        self.thread.start()
        self._wait_until_blocked()

    def _wait_for_a_reader(self) -> None:
        fd = os.open(self.path, os.O_WRONLY)
        self.opened.set()
        os.close(fd)

    def _wait_until_blocked(self) -> None:
        wchan = Path(f"/proc/self/task/{self.thread.native_id}/wchan")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if wchan.exists() and wchan.read_text() == "wait_for_partner":
                return
            time.sleep(0.01)
        time.sleep(0.5)  # no wchan in this kernel: give the thread time to get there

    def release(self) -> bool:
        """Let the writer go (once); return whether anything else had opened the pipe."""
        if self.was_opened is None:
            self.was_opened = self.opened.is_set()
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
            self.thread.join(5)
            os.close(fd)
        return self.was_opened


def make_pointing_at(kind: str, folder: Path, target: Path) -> tuple[Path, str]:
    """An image that names `target` as a backing file, data file, extent or parent (and its
    format). Made before the pipe exists, so that qemu-img does not open the pipe itself."""
    image = folder / f"{kind}.img"
    if kind == "qcow2-backing":
        qemu_img("create", "-f", "qcow2", "-u", "-b", str(target), "-F", "raw", str(image), "64M")
        return image, "qcow2"
    if kind == "qcow2-data-file":  # qemu-img creates the data file: the test swaps in the pipe
        qemu_img("create", "-f", "qcow2", "-o", f"data_file={target}", str(image), "64M")
        return image, "qcow2"
    if kind == "qed-backing":
        qemu_img("create", "-f", "qed", "-u", "-b", str(target), "-F", "raw", str(image), "64M")
        return image, "qed"
    if kind == "vmdk-extent":
        image.write_bytes(vmdk_descriptor(f'RW 2048 FLAT "{target}" 0', create_type="monolithicFlat"))
        return image, "vmdk"
    if kind == "vmdk-relative-extent":
        image.write_bytes(vmdk_descriptor(f'RW 2048 SPARSE "{target.name}"'))
        return image, "vmdk"
    if kind == "vmdk-parent":
        sparse = folder / "sparse.vmdk"
        qemu_img("create", "-f", "vmdk", str(sparse), "64M")
        parent = f'parentFileNameHint="{target}"\n'
        descriptor = vmdk_descriptor('RW 131072 SPARSE "sparse.vmdk"', extra=parent)
        replace_embedded_descriptor(sparse, image, descriptor)
        return image, "vmdk"
    raise ValueError(kind)


def inspect_in_time(image: Path, fmt: str, watch: FifoWatch, *, seconds: float = 20):
    """Inspect in a thread: a reader blocked on the pipe would make this time out."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(inspect_file, image, declared_format=fmt)
        try:
            result = future.result(timeout=seconds)
        finally:
            opened = watch.release()
    return result, opened


POINTERS = [
    "qcow2-backing", "qcow2-data-file", "qed-backing", "vmdk-extent", "vmdk-relative-extent", "vmdk-parent",
]


def test_the_fifo_watch_sees_a_reader(tmp_path):
    """The watch itself works: if it could not see a reader, the next test would prove nothing."""
    watch = FifoWatch(tmp_path / "pipe")
    fd = os.open(watch.path, os.O_RDONLY)  # what an image parser following the pointer would do
    watch.thread.join(5)
    os.close(fd)

    assert watch.release() is True


@pytest.mark.parametrize("kind", POINTERS)
def test_a_hostile_image_never_opens_the_file_it_points_at(tmp_path, kind):
    target = tmp_path / "pipe"
    image, fmt = make_pointing_at(kind, tmp_path, target)
    if target.exists():
        target.unlink()
    watch = FifoWatch(target)

    result, opened = inspect_in_time(image, fmt, watch)

    assert not opened, "something opened the file the image points at"
    assert result.problem is not None and result.problem.code in ("backing_file", "data_file", "unsafe")
    assert "qemu_img_info" not in result.checks


def test_qemu_img_catches_a_pointer_our_checks_missed_without_following_it(tmp_path, monkeypatch):
    """Defence in depth: were our VMDK check gone (the inspector alone misses parentFileNameHint),
    `qemu-img info`, which does not open backing files, refuses the image before `qemu-img
    check`, which would, ever runs."""
    monkeypatch.setitem(diskformats.OWN_CHECKS, "vmdk", lambda evidence, inspector: None)
    target = tmp_path / "pipe"
    image, fmt = make_pointing_at("vmdk-parent", tmp_path, target)
    watch = FifoWatch(target)

    result, opened = inspect_in_time(image, fmt, watch)

    assert not opened
    assert result.problem.code == "backing_file"
    assert result.checks["qemu_img_info"].startswith("failed: qemu-img reports backing-filename")
    assert "qemu_img_check" not in result.checks


# ---------------------------------------------------------------------------------------------
# qemu-img runs alone with the file: a relative name in it finds nothing next to the staged file


def test_qemu_img_runs_in_a_private_folder_holding_only_the_file(tmp_path):
    fake = tmp_path / "qemu-img"  # reports where it ran, what it saw there, and the file it got
    fake.write_text(
        "#!/bin/sh\nfor last; do :; done\n"
        """printf '{"format": "raw", "cwd": "%s", "seen": "%s", "file": "%s"}' "$PWD" "$(ls -A)" "$last"\n"""
    )
    fake.chmod(0o755)
    staged = tmp_path / "uploads" / "upload.img"
    staged.parent.mkdir()
    staged.write_bytes(bytes(4096))
    (staged.parent / "someone-elses-upload.img").write_bytes(b"theirs")

    info = qemu.qemu_img_info(staged, "raw", qemu_img=str(fake))

    assert info["seen"] == "disk"
    assert info["file"] == f"{info['cwd']}/disk"
    assert Path(info["cwd"]).parent == staged.parent  # same file system: a hard link, no copy
    assert sorted(p.name for p in staged.parent.iterdir()) == ["someone-elses-upload.img", "upload.img"]


def test_without_hard_links_qemu_img_gets_a_descriptor_in_an_empty_folder(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError("no hard links here")

    monkeypatch.setattr(os, "link", no_links)
    fake = tmp_path / "qemu-img"
    fake.write_text(
        "#!/bin/sh\nfor last; do :; done\n"
        """printf '{"format": "raw", "seen": "%s", "size": "%s"}' "$(ls -A)" "$(wc -c < "$last")"\n"""
    )
    fake.chmod(0o755)
    staged = tmp_path / "upload.img"
    staged.write_bytes(bytes(4096))

    info = qemu.qemu_img_info(staged, "raw", qemu_img=str(fake))

    assert (info["seen"], info["size"].strip()) == ("", "4096")


def test_private_folders_left_by_a_killed_run_are_removed_and_live_ones_kept(tmp_path):
    staged = tmp_path / "upload.img"
    staged.write_bytes(bytes(4096))
    folders = {}
    for state in ("abandoned", "in-use", "just-made"):
        folders[state] = tmp_path / f"{qemu.PRIVATE_PREFIX}{state}"
        folders[state].mkdir()
        os.link(staged, folders[state] / "disk")  # what a worker killed mid-run leaves
        (folders[state] / "converted.qcow2").write_bytes(b"half a conversion")
    for state in ("abandoned", "in-use"):
        os.utime(folders[state], (time.time() - 3600,) * 2)
    lock = os.open(folders["in-use"], os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(lock, fcntl.LOCK_EX)  # its run is still going
    try:
        qemu.qemu_img_info(staged, "raw")
    finally:
        os.close(lock)

    assert not folders["abandoned"].exists()
    assert folders["in-use"].exists() and folders["just-made"].exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(qemu.PRIVATE_PREFIX)
                and p not in folders.values()]  # its own folder is gone too


def run_in_time(function, watch: FifoWatch, *, seconds: float = 20):
    """Run function() in a thread: a reader blocked on the pipe would make this time out."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(function)
        try:
            return future.exception(timeout=seconds), watch.release()
        finally:
            watch.release()


def unchecked_neighbour_pointer(kind: str, staging: Path) -> tuple[Path, str]:
    """A staged image naming "neighbour" (relative: the file next to it), which our checks would
    refuse; the tests below hand it to qemu-img directly, as if a check had been missed."""
    image = staging / f"{kind}.img"
    if kind == "vmdk-text-extent":
        image.write_bytes(vmdk_descriptor('RW 2048 FLAT "neighbour" 0', create_type="monolithicFlat"))
        return image, "vmdk"
    if kind == "qcow2-backing":
        qemu_img("create", "-f", "qcow2", "-u", "-b", "neighbour", "-F", "raw", str(image), "64M")
        return image, "qcow2"
    raise ValueError(kind)


QEMU_IMG_RUNS = {
    "info": lambda image, fmt: qemu.qemu_img_info(image, fmt),
    "check": lambda image, fmt: diskimage._run_qemu_check(
        str(image), fmt, qemu_img="qemu-img", limits=qemu.INFO_LIMITS),
    "convert": lambda image, fmt: convert_to_qcow2(
        image, image.with_suffix(".qcow2"), src_format=fmt, virtual_size=DISK_SIZE),
}


@pytest.mark.parametrize("kind", ["vmdk-text-extent", "qcow2-backing"])
@pytest.mark.parametrize("run", list(QEMU_IMG_RUNS))
def test_qemu_img_never_reaches_a_file_next_to_the_staged_one(tmp_path, kind, run):
    staging = tmp_path / "uploads"
    staging.mkdir()
    image, fmt = unchecked_neighbour_pointer(kind, staging)
    watch = FifoWatch(staging / "neighbour")  # another upload, as the relative name finds it

    _, opened = run_in_time(lambda: QEMU_IMG_RUNS[run](image, fmt), watch)

    assert not opened, f"qemu-img {run} opened the file next to the staged one"
    assert sorted(p.name for p in staging.iterdir()) == sorted([image.name, "neighbour"])


def test_a_missed_check_still_leaves_qemu_img_nothing_to_follow(tmp_path, monkeypatch):
    monkeypatch.setattr(diskcheck, "_check_safety", lambda *args: None)  # every check of ours missed
    image, fmt = unchecked_neighbour_pointer("vmdk-text-extent", tmp_path)
    watch = FifoWatch(tmp_path / "neighbour")

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(inspect_file, image, declared_format=fmt)
        try:
            result = future.result(timeout=20)
        finally:
            opened = watch.release()

    assert not opened
    assert result.problem is not None and "qemu_img_check" not in result.checks


# ---------------------------------------------------------------------------------------------
# Reading only what it needs


def bytes_read_by_this_process() -> int:
    """rchar counts every byte read() returned, including by children once they are reaped
    (qemu-img runs as one), so this measures the whole inspection."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_inspecting_a_4_gib_image_reads_only_a_small_part_of_it(tmp_path, fmt):
    image = tmp_path / f"big.{fmt}"
    if fmt == "raw":
        with open(image, "wb") as f:
            f.truncate(4 * GiB)
    else:  # metadata preallocation: a qcow2 file of 4 GiB, all of its tables filled in
        qemu_img("create", "-f", "qcow2", "-o", "preallocation=metadata", str(image), "4G")
    assert image.stat().st_size >= 4 * GiB

    before = bytes_read_by_this_process()
    result = inspect_file(image, declared_format=fmt)
    read = bytes_read_by_this_process() - before

    assert result.problem is None and result.virtual_size == 4 * GiB
    assert result.bytes_read <= 512 * KiB  # by the Python inspector
    assert read < 8 * MiB, f"inspection read {read} bytes"  # with qemu-img info and check


def test_qemu_img_info_reports_json(corpus):
    info = qemu.qemu_img_info(corpus / "dynamic.vhd", "vhd")

    assert info["format"] == "vpc"
    json.dumps(info)  # plain data, storable on the upload as it is


@pytest.mark.parametrize("file", ["differencing.vhd", "parent-locator.vhd"])
@pytest.mark.parametrize("declared", ["zvhd", "zvhd2"])
def test_a_vhd_naming_a_parent_is_refused_even_when_declared_as_zvhd(corpus, file, declared, no_qemu_img):
    result = inspect_file(corpus / file, declared_format=declared)

    assert result.problem is not None and result.problem.code == "backing_file", result.checks
    assert_plain_words(result.problem)


def test_a_plain_dynamic_vhd_declared_as_zvhd2_still_passes_through(corpus):
    result = inspect_file(corpus / "dynamic.vhd", declared_format="zvhd2")

    assert result.problem is None, result.checks
    assert result.detected_format == "zvhd2"
