"""An upload's life: one row per image file, one state machine, and the events that tell its story.

The row is the source of truth for every upload. Its status changes only through
`uploads.services`, with guarded updates that check the move against `ALLOWED_MOVES`
(uploads/choices.py, with the statuses, disk formats and error codes).
"""

import hashlib
import uuid
from datetime import timedelta, timezone as dt_timezone

from django.conf import settings
from django.db import models
from django.urls import reverse
from django.utils import timezone
from django.utils.translation import gettext, gettext_lazy as _

from uploads.choices import (  # handed on: the app imports these from uploads.models
    ACTIVE,
    ALLOWED_MOVES,
    CANCELLABLE,
    EXTENSION_FORMATS,
    FINISHED,
    RECEIVING_STATES,
    RETRYABLE,
    WAITING_FOR_A_PERSON,
    WAITING_ON,
    WORKING,
    DiskFormat,
    ErrorCode,
    Status,
    can_move,
)
from uploads.i18n import local_size, stored_text


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

    # A token this close to its end is not used to start work: it could expire mid-call.
    USABLE_MARGIN = timedelta(minutes=2)

    def __str__(self):
        return f"{self.user_name}@{self.domain_name} / {self.project_name or self.project_id}"

    @property
    def is_usable(self) -> bool:
        """The token lasts long enough to start work with (USABLE_MARGIN and more)."""
        return self.expires_at > timezone.now() + self.USABLE_MARGIN


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

    # What the file really is (uploads.diskimage), and what is sent: the staged file, or its
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
    # The staged file's MD5 and SHA-512 as it arrived (uploads/running_sums.py): while it arrives
    # the hashes' state after the last PATCH ({"offset", "kind", "md5_ctx", "sha512_ctx"}), then
    # {"md5", "sha512", "seal"} (staging/local.py seal()); empty or without "seal" when it was not
    # hashed on arrival (object staging, a PATCH that found no usable state). The push trusts
    # the sums while the seal holds, instead of hashing the file again while sending.
    received_sums = models.JSONField(default=dict, blank=True, editable=False)

    # IMS's view of the image.
    ims_image_id = models.CharField(max_length=64, blank=True, db_index=True)
    ims_status = models.CharField(max_length=32, blank=True)
    # IMS's import from OBS (uploads/obs_import.py): the job that makes the image.
    ims_job_id = models.CharField(max_length=64, blank=True)
    next_poll_at = models.DateTimeField(null=True, blank=True, db_index=True)
    poll_count = models.PositiveIntegerField(default=0)

    # Why it stopped, for the owner (message + hint) and for admins (code + raw reply).
    error_message = models.TextField(blank=True)
    error_hint = models.TextField(blank=True)
    error_code = models.CharField(max_length=64, blank=True)

    # Review (uploads/review.py): what the checked file looked like when it went to the reviewers
    # (size, mtime, inode of the staged and converted files), and the decision taken on it.
    checked_file = models.JSONField(default=dict, blank=True, editable=False)
    review_decision = models.CharField(max_length=16, blank=True, choices=[
        ("approved", _("Approved")), ("rejected", _("Rejected")),
    ])
    reviewed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="reviewed_uploads"
    )
    reviewed_at = models.DateTimeField(null=True, blank=True)
    review_reason = models.TextField(blank=True)

    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        # The second: the review queue, oldest first (uploads/review.py review_queue). The third:
        # All uploads, newest first, page by page (uploads/all_uploads.py; bench/review.py).
        indexes = [
            models.Index(fields=["status", "next_poll_at"]),
            models.Index(fields=["status", "status_changed_at"]),
            models.Index(fields=["-created_at", "-id"], name="uploads_upload_newest_idx"),
        ]
        # Admins need it for the admin's Retry and Cancel actions; viewing needs only view_upload.
        permissions = [("review_upload", "Can review, retry and cancel uploads")]

    def __str__(self):
        return f"{self.name} ({self.filename})"

    @property
    def error_message_text(self) -> str:
        """error_message in the person's language: stored in English, translated when shown."""
        return stored_text(self.error_message)

    @property
    def error_hint_text(self) -> str:
        return stored_text(self.error_hint)

    def get_absolute_url(self):
        return reverse("upload_detail", args=[self.uid])

    @property
    def is_finished(self) -> bool:
        """Nothing will ever change: the live status need not be asked again."""
        return self.status in FINISHED

    @property
    def is_active(self) -> bool:
        """Someone is busy with it right now: the browser, a worker or IMS (the page's bar moves)."""
        return self.status in ACTIVE

    @property
    def receive_deadline(self):
        """When an unfinished upload expires: TUS_UPLOAD_EXPIRY_SECONDS after it was created. Rows
        from before this rule may carry a later receive_expires_at (each PATCH pushed it back): the
        creation time caps it."""
        cap = self.created_at + timedelta(seconds=settings.TUS_UPLOAD_EXPIRY_SECONDS)
        return min(self.receive_expires_at or cap, cap)

    @property
    def is_expired(self) -> bool:
        """Still receiving, but its time to finish ran out (staging_cleanup then ends it)."""
        return self.status in RECEIVING_STATES and self.receive_deadline <= timezone.now()

    @property
    def waits_for_a_person(self) -> bool:
        """Nothing changes until a person acts (Retry, Remove, a format fix, a new sign-in)."""
        return self.status in WAITING_FOR_A_PERSON

    @property
    def waiting_on(self) -> str | None:
        """Who moves the upload on next: "browser" (the rest of the file), "portal" (a worker),
        "ims" (processing the image), "person" (the owner: see primary_action); None: nobody, ever."""
        return WAITING_ON.get(self.status)

    @property
    def has_staged_copy(self) -> bool:
        return self.staged_deleted_at is None

    @property
    def can_retry(self) -> bool:
        """Retry may help: a fault of the portal or the cloud, and the file is still here."""
        return self.status in RETRYABLE and self.has_staged_copy

    @property
    def can_cancel(self) -> bool:
        return self.status in CANCELLABLE

    @property
    def suggested_format(self) -> str | None:
        """The format the check found, when it refused the file for not being the one chosen:
        the one-click fix sends the staged file again as that format."""
        if self.status != Status.REFUSED or not self.has_staged_copy:
            return None
        found = (self.inspection.get("problem") or {}).get("suggested_format")
        return found if found in DiskFormat.values and found != self.disk_format else None

    def actions(self) -> list[dict]:
        """What the owner can do now, as the page offers it; the one to do first comes first.

        Each is {"kind", "label", "url", "primary"} ("url": a form to POST to, but for
        "reconnect": a page), plus "format" for "use_format" and "confirm" (the question to ask
        first) for "remove" and "cancel". Only an upload that waits for a person has a primary
        action: the first.
        """
        actions = []
        if self.suggested_format:
            actions.append({
                "kind": "use_format",
                "label": gettext("Upload it as %(format)s") % {"format": DiskFormat(self.suggested_format).label},
                "format": self.suggested_format, "url": reverse("upload_use_format", args=[self.uid]),
            })
        if self.status == Status.FAILED and self.can_retry:
            actions.append({"kind": "retry", "label": gettext("Retry"), "url": reverse("upload_retry", args=[self.uid])})
        if self.status == Status.REJECTED:
            actions.append({"kind": "upload_again", "label": str(_("Upload a fixed file")), "url": reverse("upload")})
        if self.status == Status.RECONNECT:
            actions.append({"kind": "reconnect", "label": gettext("Reconnect your cloud account"),
                            "url": reverse("cloud_account")})
        if self.can_cancel:
            kind = "remove" if self.is_stopped else "cancel"
            actions.append({"kind": kind, "label": str(STOP_LABELS[kind]), "url": reverse("upload_cancel", args=[self.uid]),
                            "confirm": self.stop_question()})
        for number, action in enumerate(actions):
            action["primary"] = number == 0 and self.waits_for_a_person
        return actions

    @property
    def actions_by_slot(self) -> dict[str, dict]:
        """actions() by the part of the status block that shows each: "use_format", "retry",
        "reconnect" and "stop" (Remove or Cancel upload)."""
        return {("stop" if a["kind"] in STOP_LABELS else a["kind"]): a for a in self.actions()}

    @property
    def is_stopped(self) -> bool:
        """Failed, refused or rejected: nothing runs any more, so the upload is removed rather than cancelled."""
        return self.status in {Status.FAILED, Status.REFUSED, Status.REJECTED}

    @property
    def primary_action(self) -> dict | None:
        """The one clear next step of an upload that waits for a person; None while it moves on."""
        return next((action for action in self.actions() if action["primary"]), None)

    def what_stopping_deletes(self) -> str:
        """What Cancel or Remove deletes, as it stands now: only what really exists."""
        staged = self.has_staged_copy and (
            gettext("the part received so far") if self.status in RECEIVING_STATES else gettext("its copy of the file")
        )
        image = self.ims_image_id and gettext("the image it made in IMS")
        if staged and image:
            return gettext("%(staged)s and %(image)s") % {"staged": staged, "image": image}
        return staged or image or ""

    def stop_question(self) -> str:
        """The question Remove or Cancel asks before it deletes anything."""
        deletes = self.what_stopping_deletes()
        if not deletes:
            question = (gettext("Remove “%(name)s”? The portal keeps nothing of it any more, so nothing else is deleted.")
                        if self.is_stopped else
                        gettext("Cancel “%(name)s”? The portal keeps nothing of it any more, so nothing else is deleted."))
            return question % {"name": self.name}
        question = (gettext("Remove “%(name)s”? The portal deletes %(deletes)s. This cannot be undone.")
                    if self.is_stopped else
                    gettext("Cancel “%(name)s”? The portal deletes %(deletes)s. This cannot be undone."))
        return question % {"name": self.name, "deletes": deletes}

    @property
    def phase_detail(self) -> str:
        """One line that says where the upload stands, on the pages and in the status JSON."""
        s = self.status
        if s == Status.RECEIVING:
            return gettext("%(done)s of %(size)s received") % {
                "done": local_size(self.received_bytes), "size": local_size(self.size)}
        if s == Status.SENDING_EARLY:  # both hops at once: browser -> portal, portal -> IMS
            return gettext("%(received)s of %(size)s received · %(sent)s sent to IMS") % {
                "received": local_size(self.received_bytes), "size": local_size(self.size),
                "sent": local_size(self.sent_bytes)}
        if s == Status.RECEIVED:
            if not self.retry_at:
                return gettext("Waiting to be sent to IMS")
            at = self.retry_at.astimezone(dt_timezone.utc).strftime("%H:%M")
            return gettext("Waiting to be sent again (attempt %(attempt)d) at %(time)s UTC") % {
                "attempt": self.attempt + 1, "time": at}
        if s == Status.PUSHING and self.ims_status == "importing":
            return gettext("IMS is importing the file from OBS")
        if s == Status.PUSHING:
            parts = [gettext("%(done)s of %(size)s sent") % {
                "done": local_size(self.sent_bytes), "size": local_size(self.send_size or self.size)}]
            if self.send_rate >= 1:
                parts.append(gettext("%(size)s/s") % {"size": local_size(self.send_rate)})
            if self.eta_seconds is not None:
                parts.append(gettext("%(duration)s left") % {"duration": _duration_words(self.eta_seconds)})
            return " · ".join(parts)
        if s == Status.CONVERTING:
            return gettext("Converting to QCOW2, which IMS takes · %(percent)d%%") % {"percent": self.convert_percent}
        if s == Status.PROCESSING:
            return gettext("IMS is checking the image (status: %(status)s)") % {"status": self.ims_status or "saving"}
        if s == Status.REJECTED:
            return str(_("Not sent to IMS: a reviewer rejected it"))
        if s == Status.REFUSED:
            if self.has_staged_copy:
                return gettext("Not sent to IMS: the file did not pass the check")
            return gettext("Not sent to IMS: the file did not pass the check; the portal no longer keeps the file")
        return str(PHASE_WORDS.get(s, self.get_status_display()))

    @property
    def details_version(self) -> str:
        """Changes whenever what the upload's own page shows besides its status may have changed
        (its details, its timeline): the live page then fetches them again."""
        shown = (
            self.status, self.disk_format, self.detected_format, self.send_format, self.virtual_size,
            self.min_disk, self.ims_image_id, self.ims_status, self.md5, self.sha512, self.staged_sha512,
            self.attempt, self.finished_at, self.error_code, self.review_decision, self.reviewed_at,
        )
        return hashlib.blake2s(repr(shown).encode(), digest_size=8).hexdigest()

    @property
    def progress_percent(self) -> int:
        """How far along the current phase is, 0-100."""
        if not self.size:
            return 0
        if self.status in RECEIVING_STATES:
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
    def send_percent(self) -> int:
        """How much of what goes to IMS was sent, 0-100: the second hop, which moves while the
        browser still sends when the upload is pushed early (Status.SENDING_EARLY)."""
        if self.status in {Status.PROCESSING, Status.READY}:
            return 100
        total = self.send_size or self.size
        return min(100, int(self.sent_bytes * 100 / total)) if total else 0

    @property
    def eta_seconds(self) -> int | None:
        if self.status != Status.PUSHING or self.send_rate <= 0:
            return None
        return int(((self.send_size or self.size) - self.sent_bytes) / self.send_rate)


STOP_LABELS = {"remove": _("Remove"), "cancel": _("Cancel upload")}

PHASE_WORDS = {
    Status.CHECKING: _("Checking what the file really is"),
    Status.READY: _("Ready · image id"),
    Status.FAILED: _("Stopped"),
    Status.RECONNECT: _("Waiting for you to reconnect your cloud account"),
    Status.AWAITING_REVIEW: _(
        "The file passed the check; waiting for a reviewer to approve it before it is sent to IMS"
    ),
    Status.CANCELLED: _("Cancelled · the portal removed its copy of the file"),
}


def _duration_words(seconds: int) -> str:
    if seconds < 60:
        return gettext("less than a minute")
    if seconds < 3600:
        return gettext("about %(minutes)d min") % {"minutes": round(seconds / 60)}
    hours, minutes = divmod(round(seconds / 60), 60)
    if not minutes:
        return gettext("about %(hours)d h") % {"hours": hours}
    return gettext("about %(hours)d h %(minutes)d min") % {"hours": hours, "minutes": minutes}


def status_label(status: str) -> str:
    """The words for a status value, also for one a timeline line recorded long ago."""
    return Status(status).label if status in Status.values else status


class UploadEvent(models.Model):
    """One line of an upload's timeline: a move between states, progress milestone or an error."""

    upload = models.ForeignKey(Upload, on_delete=models.CASCADE, related_name="events")
    at = models.DateTimeField(auto_now_add=True)
    from_status = models.CharField(max_length=16, blank=True)
    to_status = models.CharField(max_length=16, blank=True)
    message = models.TextField()
    # The raw reply of IMS (status line and body) for admins; never shown to the owner.
    detail = models.TextField(blank=True)
    # The code the upload stopped with (Upload.error_code) on a move that records one: the
    # dashboard counts failures and refusals by reason from these, whatever the row says later.
    error_code = models.CharField(max_length=64, blank=True)

    class Meta:
        ordering = ["at", "id"]
        # The dashboard's counts of moves by day (uploads/dashboard.py).
        indexes = [models.Index(fields=["to_status", "at"])]

    def __str__(self):
        return self.message

    @property
    def message_text(self) -> str:
        """The timeline's words in the person's language (stored in English)."""
        return stored_text(self.message)

    @property
    def from_label(self) -> str:
        return status_label(self.from_status)

    @property
    def to_label(self) -> str:
        return status_label(self.to_status)


class StagedMultipart(models.Model):
    """A staged file still being received into object storage as an S3 multipart upload
    (uploads/staging/s3.py): the parts stored so far, and the bytes that do not yet fill a part,
    kept in a small object of their own, so that the next PATCH may land on any web process.
    The row goes when the multipart upload is completed or aborted."""

    name = models.CharField(max_length=255, unique=True)
    size = models.BigIntegerField()  # the whole file, as declared
    multipart_id = models.CharField(max_length=1024)
    parts = models.JSONField(default=list)  # [[number, size, etag], ...] in order
    pending_key = models.CharField(max_length=1024, blank=True)  # the incomplete part's object
    pending_size = models.BigIntegerField(default=0)
    # The writer that may write (each request takes the next number) and its last sign of life;
    # None when no request is writing.
    generation = models.PositiveIntegerField(default=0)
    active_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.name


class NotificationSettings(models.Model):
    """Which e-mails one person wants and in which language (the profile page), and when they were
    last told about uploads awaiting review: uploads/notifications.py sends a reviewer at most one
    such mail per REVIEW_MAIL_WINDOW. One row per person, made when first needed."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="notification_settings"
    )
    mail_upload_outcomes = models.BooleanField(
        _("E-mail me when an upload of mine is ready or needs me"), default=True,
        help_text=_("Ready, failed, refused by the file check, rejected by a reviewer, or waiting for you to "
                    "reconnect your cloud account."),
    )
    mail_review_requests = models.BooleanField(
        _("E-mail me when uploads await my review"), default=True,
        help_text=_("At most one mail every 15 minutes, listing every upload that waits; never for your own."),
    )
    # One of settings.LANGUAGES (the profile's form offers those), so that adding a language
    # needs no migration.
    language = models.CharField(_("Language of the e-mails"), max_length=8, default="en")
    # The last review mail: sent_at is the moment it was claimed (the uploads that moved to
    # Awaiting review after that are still news); claimed_at is set while a worker sends one, so
    # that two workers never send the same mail, and expires if that worker died.
    review_mail_sent_at = models.DateTimeField(null=True, blank=True, editable=False)
    review_mail_claimed_at = models.DateTimeField(null=True, blank=True, editable=False)

    def __str__(self) -> str:
        return f"mail settings of {self.user}"


class UploadMail(models.Model):
    """A mail to an upload's owner about one of its moves (the UploadEvent of that move): ready,
    failed, refused, rejected or reconnect. A worker claims it before sending and marks it sent
    after, so a repeated message never mails twice; a second failure after a Retry is a new move
    and mails again."""

    event = models.OneToOneField(UploadEvent, on_delete=models.CASCADE, related_name="mail")
    upload = models.ForeignKey(Upload, on_delete=models.CASCADE, related_name="mails")
    kind = models.CharField(max_length=16)  # the status it moved to: ready, failed ...
    claimed_at = models.DateTimeField(null=True, blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.kind} mail of upload {self.upload_id}"
