"""What ends an attempt, with one set of fields: the base every error of the pipeline shares.

No Django here (uploads/ims.py, which must not import Django, builds on it). Each error carries
`message` and `hint` for the person who uploaded (plain words they can act on), `code` (a short
word the portal stores and acts on), `detail` for admins, and `permanent`: True when trying again
cannot help. The kinds:

- `uploads.ims.CloudError`: IAM or IMS refused or could not be reached;
- `InspectError`: checking or converting the file could not be done (qemu-img missing, too slow,
  the disk full), through no fault of the file;
- `Problem`: the file itself is refused (`Inspection.problem`), with the one-click fix when there
  is one; `uploads.diskimage.FileChanged`: the file changed on disk after it was checked;
- `StagedFileMissing`: the staged copy is gone, so there is nothing to send.

`ErrorCode` names the codes the portal acts on or compares with, for every module that sets them.

Languages: messages and hints are English where they are made (a worker has no person's language)
and are stored so on the upload and its timeline; each is marked with `gettext_noop` below, so the
catalogue (locale/) holds it, and the pages translate the stored words when they show them
(uploads/i18n.py: stored_text). Words with values in them use %(name)s placeholders for that.
"""


def gettext_noop(message: str) -> str:
    """Marks words for the translation catalogue (`makemessages` looks for this name) and returns
    them unchanged: Django's own gettext_noop, without importing Django."""
    return message


class ErrorCode:
    """The `code` words (Upload.error_code) the portal acts on or compares with, written once.
    The check's refusals (REFUSALS below) and the cloud client's other kinds (uploads.ims) name
    theirs where they are made."""

    EXPIRED = "expired"  # the unfinished upload ran out of time (tus expiry)
    TOKEN_EXPIRED = "token_expired"  # no usable cloud sign-in: waits for a reconnect
    AUTH = "auth"  # the cloud refused the sign-in: waits for a reconnect
    ABORTED = "aborted"  # sending stopped because the upload was cancelled or taken over
    NOT_FOUND = "not_found"  # the image is not (or no longer) in IMS
    FORMAT_MISMATCH = "format_mismatch"  # the file is another format than the one chosen
    FILE_CHANGED = "file_changed"  # the staged bytes changed after the check
    CHECK_FAILED = "check_failed"  # checking or converting could not be done (not the file's fault)
    CHECKSUM_MISMATCH = "checksum_mismatch"  # IMS stored other bytes than were sent
    UNVERIFIABLE = "unverifiable"  # the staged copy is gone, so what IMS stored cannot be compared
    ABANDONED = "abandoned"  # the worker died on the last attempt
    TIMED_OUT = "timed_out"  # the push outlived its time limit
    INTERNAL = "internal"  # a fault of the portal itself
    MISSING = "missing"  # the staged copy to send is gone

    # Codes a new cloud sign-in cures: the upload waits for a reconnect rather than failing.
    CURED_BY_RECONNECT = frozenset({TOKEN_EXPIRED, AUTH})


class PortalError(Exception):
    """The base: message and hint for the uploader, code to act on, detail for admins."""

    def __init__(self, message: str, *, hint: str = "", code: str = "", detail: str = "", permanent: bool = False):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code
        self.detail = detail
        self.permanent = permanent


class InspectError(PortalError):
    """Inspecting or converting could not be done, through no fault of the file: qemu-img is
    missing, the disk is full, a run took too long."""

    def __init__(self, message: str, *, hint: str = "", detail: str = "", permanent: bool = False):
        super().__init__(message, hint=hint, code=ErrorCode.CHECK_FAILED, detail=detail, permanent=permanent)


class StagedFileMissing(PortalError):
    """The staged copy of the file is gone (cleaned up, or lost with its disk): nothing to send."""

    def __init__(self, detail: str = ""):
        super().__init__(
            gettext_noop("The staged copy of your file is missing, so it cannot be sent."),
            hint=gettext_noop("Upload the file again."), code=ErrorCode.MISSING, detail=detail, permanent=True,
        )


# ---------------------------------------------------------------------------------------------
# Refusals: why a file may not be sent, in plain words


class Problem(PortalError):
    """Why a file is refused. Permanent: the same bytes are refused again, whoever retries.
    `suggested_format` is the one-click fix: upload the same file as this format instead."""

    def __init__(self, code: str, message: str, *, hint: str = "", detail: str = "",
                 suggested_format: str | None = None):
        super().__init__(message, hint=hint, code=code, detail=detail, permanent=True)
        self.suggested_format = suggested_format

    def __repr__(self) -> str:
        return f"Problem({self.code!r}, {self.message!r}, detail={self.detail!r})"


HINT_EXPORT_AGAIN = gettext_noop(
    "Export the disk again from the tool that made it as one standalone image file, then upload that."
)
HINT_COPY_AGAIN = gettext_noop("Copy or download the file again, then upload the new copy.")
HINT_COPY_OR_EXPORT_AGAIN = gettext_noop(
    "Copy or download the file again, then upload the new copy. If that does not help, export the disk again."
)

# Each reason a file's own bytes give for refusing it: (code, message, hint). The code is what
# the portal stores; several reasons share one ("unsafe") where the person's way out differs.
REFUSALS = {
    "backing_file": (
        "backing_file",
        gettext_noop("This disk image only holds the changes made on top of another disk, so on its own it is incomplete."),
        HINT_EXPORT_AGAIN,
    ),
    "data_file": (
        "data_file",
        gettext_noop("This disk image keeps its data in other files, so the file you chose is not the whole disk."),
        HINT_EXPORT_AGAIN,
    ),
    "unsafe": ("unsafe", gettext_noop("This disk image uses features the cloud does not accept."), HINT_EXPORT_AGAIN),
    "truncated": (
        "truncated",
        gettext_noop("This file is incomplete: part of the disk image is missing, probably cut off while it was copied."),
        HINT_COPY_AGAIN,
    ),
    "corrupt": ("corrupt", gettext_noop("This disk image is damaged."), HINT_COPY_OR_EXPORT_AGAIN),
    "extended_l2": (
        "unsafe",
        gettext_noop("This QCOW2 file was saved with “extended L2 entries”, a newer QCOW2 layout "
        "the cloud cannot read."),
        gettext_noop("Convert it to a standard QCOW2 and upload that, for example: "
        "qemu-img convert -O qcow2 -o extended_l2=off yours.qcow2 standard.qcow2"),
    ),
    # A raw disk whose first sector is a boot sector (55 AA) with no usable partition table.
    "no_partitions": (
        "unsafe",
        gettext_noop("This file starts with a boot sector that lists no partitions: it looks like a single "
        "partition or a disk whose partition table is missing, and the cloud cannot start a "
        "server from that."),
        gettext_noop("Upload the whole disk, with its partition table, not one partition of it: "
        "export the disk again from the tool that made it."),
    ),
    "bad_partition_table": (
        "unsafe",
        gettext_noop("The partition table at the start of this disk is damaged, so the cloud cannot tell what "
        "is on the disk."),
        HINT_COPY_OR_EXPORT_AGAIN,
    ),
    "ambiguous": (
        "ambiguous",
        gettext_noop("This file looks like several kinds of disk image at once, so the cloud could read it "
        "differently from what you expect."),
        HINT_EXPORT_AGAIN,
    ),
    "luks": (
        "unsupported",
        gettext_noop("This file is an encrypted (LUKS) disk; the cloud cannot start a server from it."),
        gettext_noop("Upload the disk without encryption."),
    ),
    "empty": ("empty", gettext_noop("This file is empty."), gettext_noop("Pick the disk image file itself and upload it again.")),
}


def refusal(reason: str, detail: str) -> Problem:
    """The Problem for one of REFUSALS, with the technical detail for admins."""
    code, message, hint = REFUSALS[reason]
    return Problem(code, message, hint=hint, detail=detail)
