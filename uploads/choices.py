"""The words an upload's fields take: its statuses with the one table of moves between them
(the state machine), the disk formats, and (from uploads.errors) the error codes the portal sets. uploads.models
hands them on, so the rest of the app imports them from there.
"""

from django.db import models
from django.utils.translation import gettext_lazy as _

from uploads.errors import ErrorCode  # handed on with the other words of the row


class Status(models.TextChoices):
    RECEIVING = "receiving", _("Receiving")  # the browser is sending bytes to staging (tus)
    # The browser is still sending, and a worker already sends the bytes that arrived on to IMS,
    # holding back the end of the file until the whole file passed the check (services/early_push.py).
    SENDING_EARLY = "sending_early", _("Receiving and sending to IMS")
    RECEIVED = "received", _("Received")  # all bytes staged; waiting for a worker to send them
    CHECKING = "checking", _("Checking the file")  # a worker inspects what the file really is
    CONVERTING = "converting", _("Converting")  # into a format IMS takes (qcow2)
    PUSHING = "pushing", _("Sending to IMS")  # a worker streams the file to IMS
    PROCESSING = "processing", _("IMS processing")  # IMS has the bytes and is checking them
    READY = "ready", _("Ready")  # the image is active in IMS
    FAILED = "failed", _("Failed")  # stopped by a fault of the portal or the cloud; Retry may help
    # The check found the file unsafe, damaged or not what it was said to be: sending it again
    # cannot help. The staged file is kept for a while, so that a format fix needs no new upload.
    REFUSED = "refused", _("Refused")
    RECONNECT = "reconnect", _("Reconnect needed")  # the cloud sign-in expired or was refused
    # The file passed the check; a reviewer must approve it before anything is sent (uploads/review.py).
    AWAITING_REVIEW = "awaiting_review", _("Awaiting review")
    # A reviewer said no, with a reason; the staged file is kept for STAGING_RETENTION_HOURS.
    REJECTED = "rejected", _("Rejected")
    CANCELLED = "cancelled", _("Cancelled")  # the owner gave up; staged file and IMS image removed


# Every move an upload may make. Anything not listed here is refused by the services.
ALLOWED_MOVES: dict[str, set[str]] = {
    # RECEIVING -> SENDING_EARLY: a worker starts the early push (qcow2, raw, VHD sent as they are).
    Status.RECEIVING: {Status.RECEIVED, Status.SENDING_EARLY, Status.CANCELLED, Status.FAILED},
    # SENDING_EARLY -> CHECKING: the last byte arrived; the whole file is checked with the PUT held open.
    # -> RECEIVING / RECEIVED: the early push was given up (the browser stalled, the worker died, the
    # file is not what its header said): the normal push runs once every byte is in.
    # -> FAILED: the unfinished upload expired.
    Status.SENDING_EARLY: {Status.CHECKING, Status.RECEIVING, Status.RECEIVED, Status.CANCELLED, Status.FAILED},
    Status.RECEIVED: {Status.CHECKING, Status.RECONNECT, Status.CANCELLED, Status.FAILED},
    # CHECKING/CONVERTING -> RECEIVED: a temporary problem (no room to convert, a dead worker).
    # CHECKING/CONVERTING -> RECONNECT: the converted file takes longer to send than the token lasts.
    # CHECKING/CONVERTING -> REFUSED: the file (or what conversion made of it) failed the check.
    # CHECKING/CONVERTING -> AWAITING_REVIEW: the file passed the check and needs a reviewer's approval.
    Status.CHECKING: {
        Status.PUSHING, Status.CONVERTING, Status.FAILED, Status.REFUSED, Status.RECEIVED, Status.RECONNECT,
        Status.CANCELLED, Status.AWAITING_REVIEW,
    },
    Status.CONVERTING: {
        Status.PUSHING, Status.FAILED, Status.REFUSED, Status.RECEIVED, Status.RECONNECT, Status.CANCELLED,
        Status.AWAITING_REVIEW,
    },
    # PUSHING -> RECEIVED: a transient fault; the push is queued again with backoff.
    Status.PUSHING: {
        Status.PROCESSING,
        Status.RECEIVED,
        Status.FAILED,
        Status.RECONNECT,
        Status.CANCELLED,
    },
    Status.PROCESSING: {Status.READY, Status.FAILED, Status.RECONNECT, Status.CANCELLED},
    Status.FAILED: {Status.RECEIVED, Status.CANCELLED},
    # REFUSED -> RECEIVED only with another format (the one-click fix), never as a plain Retry.
    Status.REFUSED: {Status.RECEIVED, Status.CANCELLED},
    # RECONNECT -> PROCESSING: IMS already has the whole file; only checking on it was cut short.
    Status.RECONNECT: {Status.RECEIVED, Status.PROCESSING, Status.CANCELLED},
    # AWAITING_REVIEW -> RECEIVED: approved; the push is queued (and skips the check if the file
    # did not change since). -> REJECTED: a reviewer said no. -> CANCELLED: the owner gave up.
    Status.AWAITING_REVIEW: {Status.RECEIVED, Status.REJECTED, Status.CANCELLED},
    # A rejected file is never sent: the owner uploads a fixed one; Remove deletes this one now.
    Status.REJECTED: {Status.CANCELLED},
    Status.READY: set(),
    Status.CANCELLED: set(),
}

# Nothing will ever change: no moves lead on.
FINISHED = {Status.READY, Status.CANCELLED}
# Nothing changes until a person acts: Retry or Remove, a format fix, or a new cloud sign-in.
WAITING_FOR_A_PERSON = {Status.FAILED, Status.REFUSED, Status.RECONNECT, Status.REJECTED}
# Who moves an unfinished upload on next (Upload.waiting_on; the status JSON's `waiting_on`).
WAITING_ON = {
    Status.RECEIVING: "browser", Status.SENDING_EARLY: "browser",
    Status.RECEIVED: "portal", Status.CHECKING: "portal", Status.CONVERTING: "portal", Status.PUSHING: "portal",
    Status.PROCESSING: "ims",
    Status.AWAITING_REVIEW: "reviewer",
    **{status: "person" for status in WAITING_FOR_A_PERSON},
}
# States in which a worker is busy with the upload (and keeps its heartbeat fresh).
WORKING = {Status.SENDING_EARLY, Status.CHECKING, Status.CONVERTING, Status.PUSHING}
# States in which the browser may still send bytes (tus PATCH), and an unfinished upload expires.
RECEIVING_STATES = {Status.RECEIVING, Status.SENDING_EARLY}
# Someone is busy with the upload right now: the browser, a worker or IMS (Upload.is_active).
# Not RECEIVED: it waits for a worker, maybe until a retry's time has come.
ACTIVE = {Status.RECEIVING, *WORKING, Status.PROCESSING}
# States in which Retry may help. Not REFUSED: the same file would be refused the same way.
RETRYABLE = {Status.FAILED, Status.RECONNECT}
CANCELLABLE = {s for s, moves in ALLOWED_MOVES.items() if Status.CANCELLED in moves}


def can_move(old: str, new: str) -> bool:
    return new in ALLOWED_MOVES.get(old, set())


class DiskFormat(models.TextChoices):
    QCOW2 = "qcow2", "QCOW2"
    VMDK = "vmdk", "VMDK"
    VHD = "vhd", "VHD"
    RAW = "raw", "RAW"
    VHDX = "vhdx", "VHDX"
    QED = "qed", "QED"
    VDI = "vdi", "VDI"
    QCOW = "qcow", "QCOW"
    ZVHD2 = "zvhd2", "ZVHD2"
    ZVHD = "zvhd", "ZVHD"


# File name endings people bring, and the format each one means.
EXTENSION_FORMATS = {
    ".qcow2": DiskFormat.QCOW2,
    ".vmdk": DiskFormat.VMDK,
    ".vhd": DiskFormat.VHD,
    ".raw": DiskFormat.RAW,
    ".img": DiskFormat.RAW,
    ".vhdx": DiskFormat.VHDX,
    ".qed": DiskFormat.QED,
    ".vdi": DiskFormat.VDI,
    ".qcow": DiskFormat.QCOW,
    ".zvhd2": DiskFormat.ZVHD2,
    ".zvhd": DiskFormat.ZVHD,
}
