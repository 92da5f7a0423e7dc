"""Receiving a file over tus: creating the upload (within the owner's limits), appending
chunks, and expiring an upload that was never finished."""

import hashlib
import logging
import time
from contextlib import nullcontext
from datetime import timedelta
from typing import BinaryIO

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import Count, QuerySet, Sum
from django.urls import reverse
from django.utils import timezone
from django.utils.translation import gettext, gettext_noop

from uploads import obs_import, running_sums, staging
from uploads.filebody import Hashing
from uploads.models import FINISHED, RECEIVING_STATES, ErrorCode, Status, Upload
from uploads.services import dispatch, early_push
from uploads.services.state import ServiceError, delete_staged, duration, move, note
from uploads.i18n import local_size
from uploads.sizes import human_size

log = logging.getLogger(__name__)

# While a PATCH streams, the bytes received are written to the row at most this often, so that
# My uploads moves during a 50 MB chunk; at the end of the chunk they are written in any case.
RECEIVE_PROGRESS_SECONDS = 1.0


class UploadLimitReached(ServiceError):
    """The owner already holds as many unfinished uploads (or bytes) as one person may."""


class StagingNoRoom(ServiceError):
    """The staging disk has too little free space for the declared size plus the reserve."""


class OffsetConflict(Exception):
    """The chunk does not start where the staged bytes end (or the upload stopped receiving)."""

    def __init__(self, received_bytes: int):
        super().__init__(received_bytes)
        self.received_bytes = received_bytes


class ChecksumMismatch(Exception):
    """The chunk's bytes do not match the checksum the client sent with them."""


class UploadStopped(Exception):
    """The upload stopped receiving (cancelled, expired) while this chunk was on its way."""


def upload_create(*, owner, size: int, filename: str, name: str, disk_format: str, os_version: str = "",
                  min_disk: int = 0, min_ram: int = 0, tags: list[str] | None = None) -> Upload:
    """A new upload and its empty staged file, if the owner's limits and the staging disk allow
    (UploadLimitReached, StagingNoRoom). It expires TUS_UPLOAD_EXPIRY_SECONDS from now."""
    _check_staging_room(size)
    upload = Upload(
        owner=owner,
        size=size,
        filename=filename,
        name=name,
        disk_format=disk_format,
        os_version=os_version,
        min_disk=min_disk,
        min_ram=min_ram,
        tags=tags or [],
        receive_expires_at=timezone.now() + timedelta(seconds=settings.TUS_UPLOAD_EXPIRY_SECONDS),
    )
    upload.staged_name = staging.name_for(upload.uid, obs_import.staged_suffix(disk_format))
    with transaction.atomic():
        # The owner's row, locked until this commits: two creations at once are counted one
        # after the other, so that they cannot both slip past the limits.
        get_user_model().objects.select_for_update().filter(pk=owner.pk).exists()
        _check_owner_limits(owner, size)
        staging.create(upload.staged_name, size)
        upload.save()
        note(upload, gettext_noop("Upload started: %(file)s (%(size)s)") % {"file": filename, "size": human_size(size)})
    return upload


def _check_staging_room(size: int) -> None:
    free = staging.free_bytes()
    if free < size + settings.STAGING_FREE_RESERVE_BYTES:
        log.warning("staging: refused a new upload of %s bytes, %s bytes free", size, free)
        raise StagingNoRoom(gettext(
            "The portal's staging disk does not have room for this file (%(size)s) just now. Nothing was uploaded: "
            "try again later, and if it keeps happening, tell your portal administrator."
        ) % {"size": local_size(size)})


def _unfinished_uploads(owner) -> QuerySet:
    """The owner's uploads that still hold a staged file and are not done with (neither ready
    nor cancelled): failed, refused or waiting ones count, because their bytes stay on disk."""
    return Upload.objects.filter(owner=owner, staged_deleted_at__isnull=True).exclude(status__in=FINISHED)


def _check_owner_limits(owner, size: int) -> None:
    held = _unfinished_uploads(owner).aggregate(count=Count("pk"), size=Sum("size"))
    what_to_do = gettext("Finish or cancel some of them on My uploads (%(url)s), then add this file again.") % {
        "url": reverse("my_uploads")}
    most = settings.UPLOAD_MAX_UNFINISHED_PER_USER
    if held["count"] >= most:
        raise UploadLimitReached(gettext(
            "You already have %(count)d unfinished uploads (in progress, stopped or waiting for you), and %(most)d "
            "is the most one person may have at once. %(what_to_do)s"
        ) % {"count": held["count"], "most": most, "what_to_do": what_to_do})
    most_bytes = settings.UPLOAD_MAX_UNFINISHED_BYTES_PER_USER
    held_bytes = held["size"] or 0
    if held_bytes + size > most_bytes:
        raise UploadLimitReached(gettext(
            "Your unfinished uploads already take %(held)s; with this file (%(size)s) they would pass %(most)s, the "
            "most one person may have at once. %(what_to_do)s"
        ) % {"held": local_size(held_bytes), "size": local_size(size), "most": local_size(most_bytes),
             "what_to_do": what_to_do})


def upload_expire(*, upload: Upload) -> None:
    """An unfinished upload whose time ran out: free its staging space."""
    allowed = duration(timedelta(seconds=settings.TUS_UPLOAD_EXPIRY_SECONDS))
    if move(
        upload,
        Status.FAILED,
        gettext_noop("The unfinished upload expired"),
        error_message=gettext_noop("This upload was not finished within %(allowed)s of its start, so it has expired.")
        % {"allowed": allowed},
        error_hint=gettext_noop("Upload the file again."),
        error_code=ErrorCode.EXPIRED,
    ):
        delete_staged(upload, gettext_noop("Deleted the staged copy of the unfinished upload"))


def upload_receive(
    *, upload: Upload, offset: int, stream: BinaryIO, length: int, checksum: tuple[str, bytes] | None = None
) -> int:
    """Append one tus chunk at `offset`; returns the new offset. The last byte starts the push.

    The offset is checked again once the staged file is locked, so that two requests racing
    with the same offset can never both write. With `checksum` (algorithm, digest) a chunk whose
    bytes do not match is not kept (ChecksumMismatch), and so no progress is recorded before its
    end. A writer silent for REQUEST_IDLE_TIMEOUT_SECONDS is taken over by the next PATCH
    (staging.TakenOver then ends the silent one). The row is only ever moved forward, and only
    while it is receiving (UploadStopped otherwise: a cancel during the chunk wins).

    In local staging, the MD5 and SHA-512 of the file are computed on the way in, going on from
    the state the PATCH before saved with the offset (`Upload.received_sums`: uploads/
    running_sums.py); the PATCH that writes the last byte seals the file and records both sums
    with it (`{"md5", "sha512", "seal"}`), so that the push need not hash it again.
    """
    try:
        writer = staging.locked_for_writing(upload.staged_name, settings.REQUEST_IDLE_TIMEOUT_SECONDS)
        with writer as staged:
            status, received, saved = Upload.objects.values_list(
                "status", "received_bytes", "received_sums").get(pk=upload.pk)
            if status not in RECEIVING_STATES:
                raise UploadStopped()
            if received != offset:
                raise OffsetConflict(received)
            # An early push hashes what it sends as it sends it: the same bytes are not hashed twice
            # (should it give up, the push after the last byte hashes while sending, as without sums).
            hashing = _hashes_on_arrival() and status != Status.SENDING_EARLY
            sums = running_sums.start_or_restore(saved, offset) if hashing else None
            new_offset = offset + _write_chunk(upload, staged, offset, stream, length, checksum, sums)
            fields = _sums_fields(staged, sums, upload.size)
            if not staged.record(lambda: record_received(upload, new_offset, **fields)):
                raise UploadStopped()
    except FileNotFoundError:  # the staged file was deleted: cancelled or expired meanwhile
        raise UploadStopped() from None
    if new_offset == upload.size:
        _all_received(upload)
    return new_offset


def _all_received(upload: Upload) -> None:
    """The last byte is in: queue the push. An early push that holds the row (SENDING_EARLY) sees
    the last byte itself; one that gave up a moment ago left the row RECEIVING: hence read again."""
    upload.status = Upload.objects.values_list("status", flat=True).get(pk=upload.pk)
    if upload.status == Status.RECEIVING and move(upload, Status.RECEIVED, gettext_noop("All bytes received")):
        dispatch.enqueue_push(upload.pk)


def _hashes_on_arrival() -> bool:
    """Object staging keeps hashing while sending (its reads are streamed anyway)."""
    return settings.UPLOAD_HASH_ON_ARRIVAL and not staging.is_object_storage()


def _sums_fields(staged: staging.Writer, sums: running_sums.RunningSums | None, size: int) -> dict:
    """What the row keeps of the sums with the new offset: their state for the next PATCH, or
    at the last byte the sums themselves and the file's seal; nothing when not hashing."""
    if sums is None:
        return {}
    if sums.abandoned:  # the receiving outran the hashing: from here on the push hashes
        return {"received_sums": {}}
    if sums.offset < size:
        return {"received_sums": sums.saved()}
    md5, sha512 = sums.hexdigests()
    return {"received_sums": {"md5": md5, "sha512": sha512, "seal": staged.seal()}}


def _write_chunk(upload: Upload, staged: staging.Writer, offset: int, stream: BinaryIO, length: int,
                 checksum: tuple[str, bytes] | None, sums: running_sums.RunningSums | None = None) -> int:
    """Write the chunk; returns how many bytes of it were kept. `sums`, when given, go on over
    exactly those bytes (a chunk that is not kept leaves the state saved in the row as it was)."""
    hasher = hashlib.new(checksum[0]) if checksum else None
    last_record = time.monotonic()

    def progress(written: int) -> None:
        nonlocal last_record
        if time.monotonic() - last_record >= RECEIVE_PROGRESS_SECONDS:
            last_record = time.monotonic()
            if not staged.record(lambda: record_received(upload, offset + written)):
                raise UploadStopped()

    try:
        hashing = Hashing(sums.md5, sums.sha512) if sums is not None else nullcontext()
        with hashing as hashing:
            written = staging.write_at(staged, offset, stream, length, hasher, None if checksum else progress,
                                       hashing=hashing)
    except (staging.StagingFull, staging.StagingUnavailable) as stopped:
        # What was written before the disk filled up (or the object storage went away) is kept.
        if not checksum and stopped.written:
            staged.record(lambda: record_received(upload, offset + stopped.written))
        raise
    if checksum and hasher.digest() != checksum[1]:
        staged.truncate(offset)
        raise ChecksumMismatch()
    if sums is not None:
        sums.offset = offset + written
        sums.abandoned = hashing.abandoned
    return written


def record_received(upload: Upload, received: int, **fields) -> bool:
    """Write the bytes received (and `fields` with them), forward only and only while receiving;
    False when the row stopped receiving (a cancel or expiry won). The expiry stays where
    creation put it: bytes that trickle in do not push it back."""
    rows = Upload.objects.filter(pk=upload.pk, status__in=RECEIVING_STATES, received_bytes__lte=received)
    if not rows.update(received_bytes=received, **fields):
        return False
    before, upload.received_bytes = upload.received_bytes, received
    for key, value in fields.items():
        setattr(upload, key, value)
    early_push.maybe_start(upload, before=before)
    return True
