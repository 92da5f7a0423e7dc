"""An upload's life: one row per image file, one state machine, and the events that tell its story.

The row is the source of truth for every upload. Its status changes only through
`uploads.services`, with guarded updates that check the move against `ALLOWED_MOVES`.
"""

import uuid

from django.conf import settings
from django.db import models
from django.urls import reverse


class Status(models.TextChoices):
    RECEIVING = "receiving", "Receiving"  # the browser is sending bytes to staging (tus)
    RECEIVED = "received", "Received"  # all bytes staged; waiting for a worker to send them
    CHECKING = "checking", "Checking the file"  # a worker inspects what the file really is
    CONVERTING = "converting", "Converting"  # into a format IMS takes (qcow2)
    PUSHING = "pushing", "Sending to IMS"  # a worker streams the file to IMS
    PROCESSING = "processing", "IMS processing"  # IMS has the bytes and is checking them
    READY = "ready", "Ready"  # the image is active in IMS
    FAILED = "failed", "Failed"  # stopped with a reason; Retry may help
    RECONNECT = "reconnect", "Reconnect needed"  # the cloud sign-in expired or was refused
    CANCELLED = "cancelled", "Cancelled"  # the owner gave up; staged file and IMS image removed


# Every move an upload may make. Anything not listed here is refused by the services.
ALLOWED_MOVES: dict[str, set[str]] = {
    Status.RECEIVING: {Status.RECEIVED, Status.CANCELLED, Status.FAILED},
    Status.RECEIVED: {Status.CHECKING, Status.RECONNECT, Status.CANCELLED, Status.FAILED},
    # CHECKING/CONVERTING -> RECEIVED: a temporary problem (no room to convert, a dead worker).
    # CHECKING/CONVERTING -> RECONNECT: the converted file takes longer to send than the token lasts.
    Status.CHECKING: {
        Status.PUSHING, Status.CONVERTING, Status.FAILED, Status.RECEIVED, Status.RECONNECT, Status.CANCELLED,
    },
    Status.CONVERTING: {Status.PUSHING, Status.FAILED, Status.RECEIVED, Status.RECONNECT, Status.CANCELLED},
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
    # RECONNECT -> PROCESSING: IMS already has the whole file; only checking on it was cut short.
    Status.RECONNECT: {Status.RECEIVED, Status.PROCESSING, Status.CANCELLED},
    Status.READY: set(),
    Status.CANCELLED: set(),
}

FINISHED = {Status.READY, Status.CANCELLED}
# States in which a worker is busy with the upload (and keeps its heartbeat fresh).
WORKING = {Status.CHECKING, Status.CONVERTING, Status.PUSHING}
# States in which the owner may press Retry / Cancel.
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


class CloudAccount(models.Model):
    """A user's link to their cloud identity: a project-scoped IAM token, never a password."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="cloud_account"
    )
    domain_name = models.CharField(max_length=255)
    user_name = models.CharField(max_length=255)
    project_name = models.CharField(max_length=255, blank=True)
    project_id = models.CharField(max_length=64, blank=True)
    # The token, encrypted with TOKEN_ENCRYPTION_KEY (see uploads.crypto); never shown anywhere.
    token_encrypted = models.TextField()
    expires_at = models.DateTimeField()
    connected_at = models.DateTimeField(auto_now=True)

    def __str__(self):
        return f"{self.user_name}@{self.domain_name} / {self.project_name or self.project_id}"


class Upload(models.Model):
    uid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="uploads"
    )

    # What the user told us.
    name = models.CharField(max_length=255)
    filename = models.CharField(max_length=255)
    disk_format = models.CharField(max_length=8, choices=DiskFormat.choices)
    os_version = models.CharField(max_length=255, blank=True)
    min_disk = models.PositiveIntegerField(default=0, help_text="GB")
    min_ram = models.PositiveIntegerField(default=0, help_text="MB")
    tags = models.JSONField(default=list, blank=True)

    status = models.CharField(max_length=16, choices=Status.choices, default=Status.RECEIVING)
    status_changed_at = models.DateTimeField(auto_now_add=True)

    # Receiving (tus): bytes staged so far out of size.
    size = models.BigIntegerField()
    received_bytes = models.BigIntegerField(default=0)
    staged_name = models.CharField(max_length=255, editable=False)
    # When the staged copy was deleted (after the retention time, or on cancel/expiry).
    staged_deleted_at = models.DateTimeField(null=True, blank=True)
    receive_expires_at = models.DateTimeField(null=True, blank=True)

    # What the file really is (uploads.inspect), and what is sent: the staged file, or its
    # conversion to qcow2 (another staged file) when IMS does not take the detected format.
    detected_format = models.CharField(max_length=8, blank=True)
    virtual_size = models.BigIntegerField(null=True, blank=True)
    inspection = models.JSONField(default=dict, blank=True, help_text="checks run and their results")
    send_format = models.CharField(max_length=8, blank=True)
    converted_name = models.CharField(max_length=255, blank=True, editable=False)
    send_size = models.BigIntegerField(null=True, blank=True)
    convert_percent = models.PositiveSmallIntegerField(default=0)

    # Sending to IMS.
    attempt = models.PositiveIntegerField(default=0)
    # The attempt at which a person last sent it again (Retry, reconnect, format fix): automatic
    # retries are counted from there.
    requeued_at_attempt = models.PositiveIntegerField(default=0)
    sent_bytes = models.BigIntegerField(default=0)
    push_started_at = models.DateTimeField(null=True, blank=True)
    send_rate = models.FloatField(default=0, help_text="bytes per second")
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    retry_at = models.DateTimeField(null=True, blank=True)
    # Checksums of the bytes sent to IMS (the converted copy, when converted), and the SHA-512 of
    # the file as the person uploaded it, for them to compare with their own copy.
    md5 = models.CharField(max_length=32, blank=True)
    sha512 = models.CharField(max_length=128, blank=True)
    staged_sha512 = models.CharField(max_length=128, blank=True)

    # IMS's view of the image.
    ims_image_id = models.CharField(max_length=64, blank=True, db_index=True)
    ims_status = models.CharField(max_length=32, blank=True)
    next_poll_at = models.DateTimeField(null=True, blank=True, db_index=True)
    poll_count = models.PositiveIntegerField(default=0)

    # Why it stopped, for the owner (message + hint) and for admins (code + raw reply).
    error_message = models.TextField(blank=True)
    error_hint = models.TextField(blank=True)
    error_code = models.CharField(max_length=64, blank=True)

    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["status", "next_poll_at"])]
        # Admins need it for the admin's Retry and Cancel actions; viewing needs only view_upload.
        permissions = [("review_upload", "Can review, retry and cancel uploads")]

    def __str__(self):
        return f"{self.name} ({self.filename})"

    def get_absolute_url(self):
        return reverse("upload_detail", args=[self.uid])

    @property
    def is_finished(self) -> bool:
        return self.status in FINISHED

    @property
    def can_retry(self) -> bool:
        return self.status in RETRYABLE

    @property
    def can_cancel(self) -> bool:
        return self.status in CANCELLABLE

    @property
    def progress_percent(self) -> int:
        """How far along the current phase is, 0-100."""
        if not self.size:
            return 0
        if self.status == Status.RECEIVING:
            done = self.received_bytes
        elif self.status == Status.CONVERTING:
            return self.convert_percent
        elif self.status == Status.PUSHING:
            return min(100, int(self.sent_bytes * 100 / (self.send_size or self.size)))
        elif self.status in {Status.PROCESSING, Status.READY}:
            done = self.size
        else:
            done = self.received_bytes
        return min(100, int(done * 100 / self.size))

    @property
    def eta_seconds(self) -> int | None:
        if self.status != Status.PUSHING or self.send_rate <= 0:
            return None
        return int(((self.send_size or self.size) - self.sent_bytes) / self.send_rate)


class UploadEvent(models.Model):
    """One line of an upload's timeline: a move between states, progress milestone or an error."""

    upload = models.ForeignKey(Upload, on_delete=models.CASCADE, related_name="events")
    at = models.DateTimeField(auto_now_add=True)
    from_status = models.CharField(max_length=16, blank=True)
    to_status = models.CharField(max_length=16, blank=True)
    message = models.TextField()
    # The raw reply of IMS (status line and body) for admins; never shown to the owner.
    detail = models.TextField(blank=True)

    class Meta:
        ordering = ["at", "id"]

    def __str__(self):
        return self.message
