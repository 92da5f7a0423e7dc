"""Every change of an upload's state, and of a user's cloud connection, happens here.

Each move is a guarded UPDATE (`filter(pk=…, status=old).update(status=new)`): when nothing got
updated, another request or worker got there first and this one does nothing. Every move is
written to the timeline as an UploadEvent in the same transaction. Tasks and views are thin:
they call these functions with ids and plain values.
"""

import hashlib
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import BinaryIO

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import DatabaseError, connection, transaction
from django.db.models import Count, F, Q, QuerySet, Sum
from django.urls import reverse
from django.utils import timezone
from celery.exceptions import SoftTimeLimitExceeded

from uploads import crypto, inspect, obs_import, staging
from uploads.ims import HINT_CONTACT_ADMIN, HINT_RECONNECT, IamClient, ImsClient, ImsError
from uploads.models import (
    FINISHED,
    RETRYABLE,
    WORKING,
    CloudAccount,
    DiskFormat,
    Status,
    Upload,
    UploadEvent,
    can_move,
)
from uploads.sizes import human_size

log = logging.getLogger(__name__)

MAX_PUSH_ATTEMPTS = 5
MAX_RETRY_DELAY = 300  # seconds; far below the broker's visibility timeout (settings)
# Before any push has been measured: a cautious guess of the speed to IMS (10 MiB/s).
ASSUMED_SEND_RATE = 10 * 1024 * 1024
# IAM tokens live 24 hours: a push that needs longer starts with a token at least this fresh.
LONGEST_TOKEN_WAIT = timedelta(hours=23)
# A token this close to its end is not used to start work: it could expire mid-call.
TOKEN_MARGIN = timedelta(minutes=2)
IMS_DONE_STATUSES = {"active"}
IMS_FAILED_STATUSES = {"killed", "deleted", "pending_delete"}


class ServiceError(Exception):
    """A request that cannot be done now; the message is for the person who asked."""


@dataclass
class PushOutcome:
    """What the task should do next: nothing, or try again after `retry_in` seconds."""

    retry_in: float | None = None


# ---------------------------------------------------------------------------------------------
# The one way to change an upload's status


def _move(
    upload: Upload,
    to: str,
    message: str,
    *,
    detail: str = "",
    on_attempt: int | None = None,
    where: Q | None = None,
    **fields,
) -> bool:
    """Move `upload` from its current status to `to` if nobody else moved it first.

    `on_attempt` additionally requires the row to still be on that push attempt, `where` any
    other condition. Returns False, changing nothing, when the move is not allowed or the row
    changed under us.
    """
    old = upload.status
    if not can_move(old, to):
        return False
    now = timezone.now()
    fields.update(status=to, status_changed_at=now)
    if to in {Status.READY, Status.CANCELLED}:
        fields["finished_at"] = now
    rows = Upload.objects.filter(pk=upload.pk, status=old)
    if on_attempt is not None:
        rows = rows.filter(attempt=on_attempt)
    if where is not None:
        rows = rows.filter(where)
    with transaction.atomic():
        if rows.update(**fields) == 0:
            return False
        UploadEvent.objects.create(
            upload_id=upload.pk, from_status=old, to_status=to, message=message, detail=detail
        )
    for key, value in fields.items():
        setattr(upload, key, value)
    log.info("upload %s: %s -> %s: %s", upload.pk, old, to, message)
    return True


def _note(upload: Upload, message: str, detail: str = "") -> None:
    """A timeline line that is not a change of status."""
    UploadEvent.objects.create(upload_id=upload.pk, message=message, detail=detail)


def _error_fields(exc: ImsError) -> dict:
    return {"error_message": exc.message, "error_hint": exc.hint, "error_code": exc.code or exc.kind}


NO_ERROR = {"error_message": "", "error_hint": "", "error_code": ""}


def _enqueue_push(upload_id: int) -> None:
    from uploads import tasks  # tasks import services: import here to avoid the cycle

    # robust: with Redis away the message is lost, not the request; the reconciler queues it later.
    transaction.on_commit(lambda: tasks.push_upload.delay(upload_id), robust=True)


def _enqueue_discard(upload_id: int) -> None:
    from uploads import tasks

    transaction.on_commit(lambda: tasks.discard_upload.delay(upload_id), robust=True)


# ---------------------------------------------------------------------------------------------
# Cloud account


def cloud_account_connect(*, user, domain: str, user_name: str, password: str, project: str) -> CloudAccount:
    """Ask IAM for a project-scoped token and keep only the token (encrypted) and its expiry.

    Raises ImsError with a message for the person when IAM refuses. Uploads that waited for a
    new sign-in continue by themselves.
    """
    token = IamClient(settings.IAM_ENDPOINT).get_token(
        domain=domain, user=user_name, password=password, project=project
    )
    account, _ = CloudAccount.objects.update_or_create(
        user=user,
        defaults={
            "domain_name": token.domain_name or domain,
            "user_name": token.user_name or user_name,
            "project_name": token.project_name or project,
            "project_id": token.project_id,
            "token_encrypted": crypto.encrypt(token.value),
            "expires_at": token.expires_at,
        },
    )
    for upload in Upload.objects.filter(owner=user, status=Status.RECONNECT):
        if upload.ims_image_id and upload.send_size and upload.sent_bytes == upload.send_size:
            # IMS has the whole file: go on checking on it rather than sending it again.
            _move(upload, Status.PROCESSING, "Cloud account reconnected: checking on the image continues",
                  next_poll_at=timezone.now(), **NO_ERROR)
        else:
            _requeue(upload, "Cloud account reconnected: sending continues")
    return account


def cloud_account_disconnect(*, user) -> None:
    CloudAccount.objects.filter(user=user).delete()


def cloud_account_usable(account: CloudAccount | None) -> bool:
    return account is not None and account.expires_at > timezone.now() + TOKEN_MARGIN


def _usable_token(user_id: int) -> str | None:
    account = CloudAccount.objects.filter(user_id=user_id).first()
    if not cloud_account_usable(account):
        return None
    return crypto.decrypt(account.token_encrypted)


def _ims(token: str) -> ImsClient:
    return ImsClient(settings.IMS_ENDPOINT, token)


# ---------------------------------------------------------------------------------------------
# Receiving (tus)


class UploadLimitReached(ServiceError):
    """The owner already holds as many unfinished uploads (or bytes) as one person may."""


class StagingNoRoom(ServiceError):
    """The staging disk has too little free space for the declared size plus the reserve."""


def upload_create(
    *,
    owner,
    size: int,
    filename: str,
    name: str,
    disk_format: str,
    os_version: str = "",
    min_disk: int = 0,
    min_ram: int = 0,
    tags: list[str] | None = None,
) -> Upload:
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
    upload.staged_name = staging.name_for(upload.uid)
    with transaction.atomic():
        # The owner's row, locked until this commits: two creations at once are counted one
        # after the other, so that they cannot both slip past the limits.
        get_user_model().objects.select_for_update().filter(pk=owner.pk).exists()
        _check_owner_limits(owner, size)
        staging.create(upload.staged_name, size)
        upload.save()
        _note(upload, f"Upload started: {filename} ({human_size(size)})")
    return upload


def _check_staging_room(size: int) -> None:
    free = staging.free_bytes()
    if free < size + settings.STAGING_FREE_RESERVE_BYTES:
        log.warning("staging: refused a new upload of %s bytes, %s bytes free", size, free)
        raise StagingNoRoom(
            f"The portal's staging disk does not have room for this file ({human_size(size)}) "
            "just now. Nothing was uploaded: try again later, and if it keeps happening, tell your "
            "portal administrator."
        )


def _unfinished_uploads(owner) -> QuerySet:
    """The owner's uploads that still hold a staged file and are not done with (neither ready
    nor cancelled): failed, refused or waiting ones count, because their bytes stay on disk."""
    return Upload.objects.filter(owner=owner, staged_deleted_at__isnull=True).exclude(status__in=FINISHED)


def _check_owner_limits(owner, size: int) -> None:
    held = _unfinished_uploads(owner).aggregate(count=Count("pk"), size=Sum("size"))
    what_to_do = f"Finish or cancel some of them on My uploads ({reverse('my_uploads')}), then add this file again."
    most = settings.UPLOAD_MAX_UNFINISHED_PER_USER
    if held["count"] >= most:
        raise UploadLimitReached(
            f"You already have {held['count']} unfinished uploads (in progress, stopped or waiting for "
            f"you), and {most} is the most one person may have at once. {what_to_do}"
        )
    most_bytes = settings.UPLOAD_MAX_UNFINISHED_BYTES_PER_USER
    held_bytes = held["size"] or 0
    if held_bytes + size > most_bytes:
        raise UploadLimitReached(
            f"Your unfinished uploads already take {human_size(held_bytes)}; with this file "
            f"({human_size(size)}) they would pass {human_size(most_bytes)}, the most one person "
            f"may have at once. {what_to_do}"
        )


def _receive_deadline(upload: Upload):
    """When an unfinished upload expires: TUS_UPLOAD_EXPIRY_SECONDS after it was created. Rows
    from before this rule may carry a later receive_expires_at (each PATCH pushed it back): the
    creation time caps it."""
    cap = upload.created_at + timedelta(seconds=settings.TUS_UPLOAD_EXPIRY_SECONDS)
    return min(upload.receive_expires_at or cap, cap)


def upload_is_expired(upload: Upload) -> bool:
    return upload.status == Status.RECEIVING and _receive_deadline(upload) <= timezone.now()


def upload_expire(*, upload: Upload) -> None:
    """An unfinished upload whose time ran out: free its staging space."""
    allowed = _duration(timedelta(seconds=settings.TUS_UPLOAD_EXPIRY_SECONDS))
    if _move(
        upload,
        Status.FAILED,
        "The unfinished upload expired",
        error_message=f"This upload was not finished within {allowed} of its start, so it has expired.",
        error_hint="Upload the file again.",
        error_code="expired",
    ):
        _delete_staged(upload, "Deleted the staged copy of the unfinished upload")


def _delete_staged(upload: Upload, message: str) -> None:
    staging.delete(upload.staged_name)
    staging.delete(upload.converted_name)
    now = timezone.now()
    if Upload.objects.filter(pk=upload.pk, staged_deleted_at__isnull=True).update(staged_deleted_at=now):
        upload.staged_deleted_at = now
        _note(upload, message)


def staging_cleanup() -> int:
    """Delete staged copies that no upload needs any more; returns how many.

    Ready uploads keep theirs for STAGING_RETENTION_HOURS (to compare or send again), refused ones
    as long (time to choose the format fix), cancelled ones lose it at once (should their clean-up
    task have been lost), unfinished browser uploads when they expire. Failed uploads and those
    waiting for a reconnect keep it for Retry.
    """
    now = timezone.now()
    count = 0
    started_before = now - timedelta(seconds=settings.TUS_UPLOAD_EXPIRY_SECONDS)
    expired = Q(receive_expires_at__lte=now) | Q(created_at__lte=started_before)  # see _receive_deadline
    for upload in Upload.objects.filter(expired, status=Status.RECEIVING):
        upload_expire(upload=upload)
        count += 1
    kept_until = now - timedelta(hours=settings.STAGING_RETENTION_HOURS)
    finished = Q(status=Status.READY, finished_at__lte=kept_until) | Q(status=Status.CANCELLED)
    finished |= Q(status=Status.REFUSED, status_changed_at__lte=kept_until)
    for upload in Upload.objects.filter(finished, staged_deleted_at__isnull=True):
        _delete_staged(upload, "Deleted the staged copy: no longer needed")
        count += 1
    # A cancel whose clean-up message was lost (Redis away) still has its image in IMS; only an
    # owner with a usable sign-in can have it deleted.
    signed_in = Q(owner__cloud_account__expires_at__gt=now + TOKEN_MARGIN)
    lost_discards = Upload.objects.filter(signed_in, status=Status.CANCELLED).exclude(ims_image_id="")
    count += staging.abort_orphans(started_before)  # object staging: multipart uploads no row owns
    for upload_id in lost_discards.values_list("pk", flat=True):
        upload_discard(upload_id=upload_id)
    return count


class OffsetConflict(Exception):
    """The chunk does not start where the staged bytes end (or the upload stopped receiving)."""

    def __init__(self, received_bytes: int):
        super().__init__(received_bytes)
        self.received_bytes = received_bytes


class ChecksumMismatch(Exception):
    """The chunk's bytes do not match the checksum the client sent with them."""


class UploadStopped(Exception):
    """The upload stopped receiving (cancelled, expired) while this chunk was on its way."""


# While a PATCH streams, the bytes received are written to the row at most this often, so that
# My uploads moves during a 50 MB chunk; at the end of the chunk they are written in any case.
RECEIVE_PROGRESS_SECONDS = 1.0


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
    """
    try:
        writer = staging.locked_for_writing(upload.staged_name, settings.REQUEST_IDLE_TIMEOUT_SECONDS)
        with writer as staged:
            status, received = Upload.objects.values_list("status", "received_bytes").get(pk=upload.pk)
            if status != Status.RECEIVING:
                raise UploadStopped()
            if received != offset:
                raise OffsetConflict(received)
            new_offset = offset + _write_chunk(upload, staged, offset, stream, length, checksum)
            if not staged.record(lambda: _record_received(upload, new_offset)):
                raise UploadStopped()
    except FileNotFoundError:  # the staged file was deleted: cancelled or expired meanwhile
        raise UploadStopped() from None
    if new_offset == upload.size and _move(upload, Status.RECEIVED, "All bytes received"):
        _enqueue_push(upload.pk)
    return new_offset


def _write_chunk(upload: Upload, staged: staging.Writer, offset: int, stream: BinaryIO, length: int,
                 checksum: tuple[str, bytes] | None) -> int:
    """Write the chunk; returns how many bytes of it were kept."""
    hasher = hashlib.new(checksum[0]) if checksum else None
    last_record = time.monotonic()

    def progress(written: int) -> None:
        nonlocal last_record
        if time.monotonic() - last_record >= RECEIVE_PROGRESS_SECONDS:
            last_record = time.monotonic()
            if not staged.record(lambda: _record_received(upload, offset + written)):
                raise UploadStopped()

    try:
        written = staging.write_at(staged, offset, stream, length, hasher, None if checksum else progress)
    except staging.StagingFull as full:
        if not checksum:  # what was written before the disk filled up is kept
            staged.record(lambda: _record_received(upload, offset + full.written))
        raise
    if checksum and hasher.digest() != checksum[1]:
        staged.truncate(offset)
        raise ChecksumMismatch()
    return written


def _record_received(upload: Upload, received: int) -> bool:
    """Write the bytes received, forward only and only while receiving; False when the row
    stopped receiving (a cancel or expiry won). The expiry stays where creation put it: bytes
    that trickle in do not push it back."""
    rows = Upload.objects.filter(pk=upload.pk, status=Status.RECEIVING, received_bytes__lte=received)
    if not rows.update(received_bytes=received):
        return False
    upload.received_bytes = received
    return True


# ---------------------------------------------------------------------------------------------
# Sending to IMS


def uploads_to_reconcile() -> list[int]:
    """Uploads that expect a push but may have none coming: received ones nobody claimed (the
    message was lost, say Redis restarted without its data) and pushes whose heartbeat stopped
    (the worker died). Queueing them again is harmless: only one push can claim a row."""
    now = timezone.now()
    stale = now - timedelta(seconds=settings.RECONCILE_GRACE_SECONDS)
    unclaimed = Q(status=Status.RECEIVED, status_changed_at__lte=stale) & (
        Q(retry_at__isnull=True) | Q(retry_at__lte=stale)
    )
    return list(Upload.objects.filter(unclaimed | _abandoned()).values_list("pk", flat=True)[:500])


def upload_push(*, upload_id: int) -> PushOutcome:
    """Claim a received upload, check what the file really is (converting it when IMS does not
    take its format), and stream it to IMS with its owner's token.

    Safe to call twice: only one caller wins the claim (RECEIVED -> CHECKING).
    """
    upload = Upload.objects.filter(pk=upload_id).first()
    if upload is not None and _push_is_abandoned(upload):
        _take_over(upload)
    if upload is None or upload.status != Status.RECEIVED:
        return PushOutcome()
    token, why_not = _token_for_push(upload)
    if token is None:
        _wait_for_reconnect(upload, why_not)
        return PushOutcome()
    attempt = upload.attempt + 1
    if not _move(
        upload,
        Status.CHECKING,
        f"Checking the file (attempt {attempt})",
        on_attempt=upload.attempt,
        attempt=attempt,
        sent_bytes=0,
        send_rate=0,
        heartbeat_at=timezone.now(),
        retry_at=None,
        **NO_ERROR,
    ):
        return PushOutcome()
    client = _ims(token)
    try:
        with _heartbeat(upload.pk, attempt):
            _check_file(upload, attempt)
            if upload.converted_name and _token_for_push(upload)[0] is None:
                # Converting took a while and may have made the file bigger: ask again.
                _wait_for_reconnect(upload, _token_for_push(upload)[1], on_attempt=attempt)
                return PushOutcome()
            by_import = obs_import.applies(upload)  # IMS reads the object from OBS itself
            if not _move(upload, Status.PUSHING, obs_import.MESSAGE if by_import else "Sending to IMS",
                         on_attempt=attempt, push_started_at=timezone.now(),
                         **({"ims_status": obs_import.IMPORTING} if by_import else {})):
                return PushOutcome()  # cancelled meanwhile
            if by_import:
                if not obs_import.import_image(upload, client, attempt):
                    return PushOutcome()  # cancelled meanwhile
            elif not _prepare_image(upload, client, attempt):
                _send_file(upload, client, attempt)
    except _Stopped:
        return PushOutcome()
    except FileRefused as exc:
        _refuse(upload, client, attempt, exc.problem)
        return PushOutcome()
    except inspect.FileChanged as exc:  # the staged bytes changed under us: Retry checks them afresh
        problem = exc.problem
        return _retry_or_fail(upload, client, attempt, problem.message, hint=problem.hint, code=problem.code,
                              detail=problem.detail, permanent=True)
    except inspect.InspectError as exc:
        return _retry_or_fail(upload, client, attempt, exc.message, hint=exc.hint, code="check_failed",
                              detail=exc.detail, permanent=exc.permanent)
    except ImsError as exc:
        return _push_failed(upload, client, attempt, exc)
    except staging.StagingUnavailable as exc:  # object storage away, or refusing the keys: try again
        return _retry_or_fail(upload, client, attempt, exc.message, hint=exc.for_admin or HINT_CONTACT_ADMIN,
                              code="staging_unavailable", detail=exc.for_admin, permanent=False)
    except staging.ScratchNoRoom:
        return _retry_or_fail(upload, client, attempt, NO_SCRATCH_ROOM, hint=HINT_CONTACT_ADMIN,
                              code="no_scratch_room", detail="STAGING_SCRATCH_DIR is full", permanent=False)
    except SoftTimeLimitExceeded:
        return _retry_or_fail(
            upload, client, attempt,
            "Sending this file took too long: the link to the cloud is slower than the portal supports.",
            hint="Press Retry at a quieter time; if it happens again, ask an administrator.",
            code="timed_out", detail="Celery soft time limit of the push", permanent=True,
        )
    except Exception as exc:  # a bug or an outage of our own: never leave the upload stuck
        log.exception("upload %s: the push failed unexpectedly", upload.pk)
        return _retry_or_fail(upload, client, attempt, "The portal ran into a problem of its own.",
                              hint=HINT_CONTACT_ADMIN, code="internal", detail=f"{type(exc).__name__}: {exc}",
                              permanent=False)
    # The next check is due after one interval: this one happens now, so beat does not race it.
    _move(
        upload,
        Status.PROCESSING,
        "IMS received the whole file and is processing it",
        on_attempt=attempt,
        sent_bytes=upload.send_size,
        next_poll_at=timezone.now() + timedelta(seconds=settings.UPLOAD_POLL_SECONDS),
        ims_status="saving",
    )
    upload_poll(upload_id=upload.pk)
    return PushOutcome()


def _wait_for_reconnect(upload: Upload, why: str, on_attempt: int | None = None) -> None:
    _move(
        upload,
        Status.RECONNECT,
        "Waiting for the owner to reconnect the cloud account",
        on_attempt=on_attempt,
        error_message=why,
        error_hint=HINT_RECONNECT + " Your file is kept until then.",
        error_code="token_expired",
    )


def _take_over(upload: Upload) -> None:
    """The worker of this push died (no heartbeat): start again, or give up after the last attempt."""
    message = "The worker that was handling this upload stopped"
    if upload.attempt - upload.requeued_at_attempt >= MAX_PUSH_ATTEMPTS:
        _move(upload, Status.FAILED, message, on_attempt=upload.attempt, where=_abandoned(),
              error_message="The portal could not finish sending this file.", error_hint=HINT_CONTACT_ADMIN,
              error_code="abandoned")
    else:
        _move(upload, Status.RECEIVED, f"{message}; starting again", on_attempt=upload.attempt, where=_abandoned())


# ---------------------------------------------------------------------------------------------
# Checking (and converting) the file before it is sent


class FileRefused(Exception):
    """The file may not be sent as it is: `problem` says why, in plain words."""

    def __init__(self, problem: inspect.Problem):
        super().__init__(problem.code)
        self.problem = problem


NO_SCRATCH_ROOM = "The server has no room just now for the working copy it needs to check this file."


class _Stopped(Exception):
    """The upload was cancelled (or taken over) while this worker was busy with it."""


def _check_file(upload: Upload, attempt: int) -> None:
    """Inspect the staged file; convert it when IMS does not take its format. Afterwards the
    upload knows what to send: `send_format` and `send_size` of the staged or converted file."""
    with staging.local_copy(upload.staged_name) as source:  # object staging: a scratch copy
        _check_local_file(upload, attempt, source)


def _check_local_file(upload: Upload, attempt: int, source: str) -> None:
    result = inspect.inspect_file(source, declared_format=upload.disk_format)
    _save(upload, attempt, detected_format=result.detected_format or "", virtual_size=result.virtual_size,
          inspection=_inspection_record(result))
    if result.problem:
        raise FileRefused(result.problem)
    _note(upload, f"Checked the file: {_describe(result)}", _checks_text(result))
    needed_gb = result.suggested_min_disk_gb or 0
    if needed_gb > upload.min_disk:
        _note(upload, _min_disk_raised(upload.min_disk, needed_gb, result.virtual_size))
        _save(upload, attempt, min_disk=needed_gb)
    if result.needs_conversion(settings.IMS_DISK_FORMATS):
        _convert(upload, attempt, result, source)
        _save(upload, attempt, send_format="qcow2", send_size=staging.size(upload.converted_name))
    else:
        staging.delete(upload.converted_name)
        _save(upload, attempt, send_format=result.upload_format(settings.IMS_DISK_FORMATS), send_size=upload.size,
              converted_name="")


def _convert(upload: Upload, attempt: int, result: inspect.Inspection, source: str) -> None:
    label = inspect.LABELS[result.detected_format]
    if not _move(upload, Status.CONVERTING,
                 f"Converting the {label} file to QCOW2: IMS does not take {label} files directly",
                 on_attempt=attempt, convert_percent=0):
        raise _Stopped()
    # The file as uploaded is never sent: its SHA-512 is taken here, for the owner to compare.
    with staging.open_for_reading(upload.staged_name) as staged:
        _save(upload, attempt, staged_sha512=hashlib.file_digest(staged, "sha512").hexdigest())
    name = staging.name_for(upload.uid, "qcow2")
    staging.delete(name)  # what an earlier, interrupted attempt left
    _save(upload, attempt, converted_name=name)
    last_write = 0.0

    def progress(percent: float) -> None:
        nonlocal last_write
        if time.monotonic() - last_write >= 1.0:
            last_write = time.monotonic()
            if not Upload.objects.filter(pk=upload.pk, status=Status.CONVERTING, attempt=attempt).update(
                convert_percent=int(percent)
            ):
                raise _Stopped()  # cancelled or taken over: convert_to_qcow2 stops qemu-img

    with staging.local_output(name) as target:  # object staging: stored when qemu-img is done
        inspect.convert_to_qcow2(
            source, target, src_format=result.detected_format, virtual_size=result.virtual_size,
            on_progress=progress,
        )
        converted = inspect.inspect_file(target, declared_format="qcow2")
        if converted.problem:  # qemu-img wrote something unexpected: never send it
            raise FileRefused(converted.problem)
    _note(upload, f"Converted to QCOW2 ({human_size(staging.size(name))})")


def _save(upload: Upload, attempt: int, **fields) -> None:
    """Write fields of the upload this worker holds (same attempt), and keep the copy in step."""
    Upload.objects.filter(pk=upload.pk, attempt=attempt).update(**fields)
    for key, value in fields.items():
        setattr(upload, key, value)


def _inspection_record(result: inspect.Inspection) -> dict:
    record = {"checks": result.checks, "actual_size": result.actual_size}
    if result.problem:
        record["problem"] = {"code": result.problem.code, "detail": result.problem.detail,
                             "suggested_format": result.problem.suggested_format}
    return record


def _describe(result: inspect.Inspection) -> str:
    text = f"a {inspect.LABELS.get(result.detected_format, result.detected_format)} disk"
    if result.virtual_size:
        text += f" of {human_size(result.virtual_size)}"
    return text


def _min_disk_raised(old_gb: int, new_gb: int, virtual_size: int) -> str:
    """What happened to min_disk, in words: IMS counts it in whole GB, 1 at the least."""
    text = f"Min disk raised to {new_gb} GB" + (f" from {old_gb} GB" if old_gb else "")
    if virtual_size < 1024**3:
        return f"{text}, the smallest the cloud takes: the disk inside the file is {human_size(virtual_size)}"
    return f"{text} to hold the disk inside the file ({human_size(virtual_size)})"


def _checks_text(result: inspect.Inspection) -> str:
    return "\n".join(f"{name}: {outcome}" for name, outcome in result.checks.items())


def expected_send_rate() -> float:
    """Bytes per second that pushes to IMS reached lately (a cautious guess before there are any)."""
    rates = list(
        Upload.objects.filter(status=Status.READY, send_rate__gt=0)
        .order_by("-finished_at")
        .values_list("send_rate", flat=True)[:20]
    )
    return sum(rates) / len(rates) if rates else ASSUMED_SEND_RATE


def _token_for_push(upload: Upload) -> tuple[str | None, str]:
    """The owner's token if it will last until the push can have finished, else why not.

    A push that needs longer than any token lives (IAM tokens last 24 hours) starts with a
    fresh one.
    """
    account = CloudAccount.objects.filter(user_id=upload.owner_id).first()
    if not cloud_account_usable(account):
        return None, "Your cloud sign-in has expired (or was never made), so the file cannot be sent yet."
    needed = timedelta(seconds=(upload.send_size or upload.size) / expected_send_rate())
    if account.expires_at < timezone.now() + min(needed, LONGEST_TOKEN_WAIT) + TOKEN_MARGIN:
        return None, (
            f"Your cloud sign-in ends in {_duration(account.expires_at - timezone.now())}, but sending this "
            f"file takes about {_duration(needed)}, so it was not started."
        )
    token = crypto.decrypt(account.token_encrypted)
    if token is None:
        return None, "Your stored cloud sign-in can no longer be read (the portal's key changed)."
    return token, ""


def _duration(delta: timedelta) -> str:
    minutes = max(1, int(delta.total_seconds() // 60))
    return f"{minutes} minutes" if minutes < 120 else f"{minutes // 60} hours"


@contextmanager
def _heartbeat(upload_id: int, attempt: int):
    """While a push runs, say so every few seconds, whatever it is waiting for: a heartbeat
    that stops means the worker died, and the reconciler hands the upload to another."""
    stop = threading.Event()

    def beat():
        try:
            while not stop.wait(settings.PUSH_HEARTBEAT_SECONDS):
                try:
                    Upload.objects.filter(pk=upload_id, status__in=WORKING, attempt=attempt).update(
                        heartbeat_at=timezone.now()
                    )
                except DatabaseError:  # a locked or restarting database: beat again next time
                    log.warning("upload %s: heartbeat not written", upload_id, exc_info=True)
                    connection.close()
        finally:
            connection.close()

    thread = threading.Thread(target=beat, name=f"heartbeat-{upload_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _abandoned() -> Q:
    """Pushes whose worker died: their message may come again (late acknowledgement), or the
    reconciler finds them, but the row still says checking, converting or pushing."""
    stale = timezone.now() - timedelta(seconds=settings.PUSH_STALE_SECONDS)
    return Q(status__in=WORKING, heartbeat_at__lt=stale)


def _push_is_abandoned(upload: Upload) -> bool:
    return Upload.objects.filter(_abandoned(), pk=upload.pk).exists()


def _prepare_image(upload: Upload, client: ImsClient, attempt: int) -> bool:
    """Make sure an image record that can take the bytes exists; True if it already holds them.

    An image from an earlier attempt is reused while it is still `queued` and empty (Glance
    leaves a `queued` image with a checksum after a 415, which never takes data again);
    one that holds exactly our file already is kept; any other is deleted, so that one upload
    never leaves two images behind.
    """
    if upload.ims_image_id:
        image = _find_image(client, upload.ims_image_id)
        if image is not None:
            empty = image.status == "queued" and not image.checksum and not image.size
            if empty and image.raw.get("disk_format") == upload.send_format:
                return False
            if image.status == "active" and image.size == upload.send_size and _holds_the_file(upload, image, attempt):
                _note(upload, f"IMS image {image.id} already holds the file (same size, MD5 and SHA-512)")
                return True
            client.delete_image(image.id)
            _note(upload, f"Deleted unusable IMS image {image.id} (status {image.status}) before starting again")
    image = client.create_image(
        name=upload.name,
        disk_format=upload.send_format,
        os_version=upload.os_version,
        min_disk=upload.min_disk,
        min_ram=upload.min_ram,
        tags=upload.tags,
    )
    Upload.objects.filter(pk=upload.pk, attempt=attempt).update(ims_image_id=image.id, ims_status=image.status)
    upload.ims_image_id, upload.ims_status = image.id, image.status
    _note(upload, f"Image record created in IMS: {image.id}")
    return False


def _holds_the_file(upload: Upload, image, attempt: int) -> bool:
    """Whether an active image from an earlier attempt holds this attempt's file. Its worker may
    have died after IMS had the last byte but before it wrote the sums down, and sums from an
    older attempt may be of another file (converted again, sent as another format): this
    attempt's are computed from the file itself."""
    sums = _sums_of_file_to_send(upload)
    if sums is None:
        return False
    _save(upload, attempt, **sums)
    return not _stored_differences(upload, image)


def _sums_of_file_to_send(upload: Upload) -> dict | None:
    """MD5 and SHA-512 of the file IMS is given (the staged or the converted one), in one read
    with a fixed buffer; None when that file is gone."""
    try:
        source = staging.open_for_reading(upload.converted_name or upload.staged_name)
    except FileNotFoundError:
        return None
    md5, sha512 = hashlib.md5(usedforsecurity=False), hashlib.sha512()
    buffer = bytearray(1024 * 1024)
    with source:
        while read := source.readinto(buffer):
            md5.update(buffer[:read])
            sha512.update(buffer[:read])
    sums = {"md5": md5.hexdigest(), "sha512": sha512.hexdigest()}
    if not upload.converted_name:  # the file as uploaded
        sums["staged_sha512"] = sums["sha512"]
    return sums


def _find_image(client: ImsClient, image_id: str):
    try:
        return client.get_image(image_id)
    except ImsError as exc:
        if exc.kind == "not_found":
            return None
        raise


def _send_file(upload: Upload, client: ImsClient, attempt: int) -> None:
    """Stream the file to the image; the bytes are inspected again on the way, so a file that
    changed since it was checked stops the PUT (inspect.FileChanged)."""
    try:
        staged = staging.open_for_reading(upload.converted_name or upload.staged_name)
    except FileNotFoundError:
        raise ImsError(
            "The staged copy of your file is missing, so it cannot be sent.",
            kind="missing", permanent=True, hint="Upload the file again.",
        ) from None
    with staged:
        body = inspect.wrap_stream(staged, upload.send_format, size=upload.send_size)
        result = client.upload_file(
            upload.ims_image_id, body, upload.send_size, on_progress=_progress_recorder(upload, attempt)
        )
    sums = {"md5": result.md5, "sha512": result.sha512}
    if not upload.converted_name:  # what was sent is the file as uploaded
        sums["staged_sha512"] = result.sha512
    _save(upload, attempt, **sums)
    _note(upload, f"Sent {human_size(result.sent_bytes)} to IMS (md5 {result.md5})")


def _progress_recorder(upload: Upload, attempt: int):
    """Record bytes sent at most once a second; tell the sender to stop when the upload was
    cancelled or taken over (the guarded update then matches no row)."""
    started = time.monotonic()
    last_write = 0.0

    def record(sent: int) -> bool:
        nonlocal last_write
        now = time.monotonic()
        if now - last_write < 1.0 and sent < upload.send_size:
            return True
        last_write = now
        rate = sent / max(now - started, 1e-6)
        return bool(
            Upload.objects.filter(pk=upload.pk, status=Status.PUSHING, attempt=attempt).update(
                sent_bytes=sent, send_rate=rate
            )
        )

    return record


def _push_failed(upload: Upload, client: ImsClient, attempt: int, exc: ImsError) -> PushOutcome:
    if exc.kind == "aborted":  # cancelled (or taken over) while sending: the canceller cleans up
        _note(upload, "Sending stopped")
        return PushOutcome()
    if exc.kind == "auth":
        _move(upload, Status.RECONNECT, exc.message, detail=exc.raw, on_attempt=attempt, **_error_fields(exc))
        return PushOutcome()
    return _retry_or_fail(upload, client, attempt, exc.message, hint=exc.hint, code=exc.code or exc.kind,
                          detail=exc.raw, permanent=exc.permanent)


def _retry_or_fail(
    upload: Upload, client: ImsClient, attempt: int, message: str, *, hint: str, code: str, detail: str,
    permanent: bool,
) -> PushOutcome:
    """End this attempt: back to RECEIVED to try again after a backoff when that can help and
    attempts are left, else FAILED with no image left behind in IMS."""
    fields = {"error_message": message, "error_hint": hint or HINT_CONTACT_ADMIN, "error_code": code}
    if not permanent and attempt - upload.requeued_at_attempt < MAX_PUSH_ATTEMPTS:
        delay = min(MAX_RETRY_DELAY, 5 * 3 ** (attempt - 1))
        moved = _move(upload, Status.RECEIVED, f"{message} Trying again in {delay} seconds.", detail=detail,
                      on_attempt=attempt, retry_at=timezone.now() + timedelta(seconds=delay), **fields)
        return PushOutcome(retry_in=delay if moved else None)
    if upload.ims_image_id:
        _delete_quietly(upload, client)
    _move(upload, Status.FAILED, message, detail=detail, on_attempt=attempt, **fields)
    return PushOutcome()


def _refuse(upload: Upload, client: ImsClient, attempt: int, problem: inspect.Problem) -> None:
    """The check refused the file: it never goes to IMS as it is. The staged file stays (for
    STAGING_RETENTION_HOURS), so that the one-click format fix needs no new upload; a copy
    converted from it and an image an earlier attempt made are deleted."""
    staging.delete(upload.converted_name)
    _save(upload, attempt, converted_name="")
    if upload.ims_image_id:
        _delete_quietly(upload, client)
    _move(upload, Status.REFUSED, problem.message, detail=problem.detail, on_attempt=attempt,
          error_message=problem.message, error_hint=problem.hint or HINT_CONTACT_ADMIN, error_code=problem.code)


def _delete_quietly(upload: Upload, client: ImsClient) -> None:
    """Remove a half-made image after a failure; a failure to do so is noted, not raised."""
    try:
        client.delete_image(upload.ims_image_id)
    except ImsError as exc:
        _note(upload, f"Could not delete IMS image {upload.ims_image_id}: {exc.message}", exc.raw)
        return
    _note(upload, f"Deleted IMS image {upload.ims_image_id}")
    Upload.objects.filter(pk=upload.pk).update(ims_image_id="", ims_status="")
    upload.ims_image_id = upload.ims_status = ""


# ---------------------------------------------------------------------------------------------
# Following the image in IMS


def uploads_due_for_poll() -> list[int]:
    """Lease the uploads whose next poll is due, so that a slow poll is not queued twice."""
    now = timezone.now()
    lease = now + timedelta(seconds=max(30, settings.UPLOAD_POLL_SECONDS * 6))
    due = []
    for upload_id, next_poll_at in Upload.objects.filter(
        status=Status.PROCESSING, next_poll_at__lte=now
    ).values_list("pk", "next_poll_at")[:500]:
        if Upload.objects.filter(pk=upload_id, next_poll_at=next_poll_at).update(next_poll_at=lease):
            due.append(upload_id)
    return due


def upload_poll(*, upload_id: int) -> None:
    """Ask IMS how the image is doing; finish the upload when IMS has decided."""
    upload = Upload.objects.filter(pk=upload_id).first()
    if upload is None or upload.status != Status.PROCESSING:
        return
    token = _usable_token(upload.owner_id)
    if token is None:
        _move(
            upload,
            Status.RECONNECT,
            "The cloud sign-in expired while IMS was processing the image",
            error_message="Your cloud sign-in has expired, so the portal cannot check on your image.",
            error_hint="Reconnect on the Cloud account page: checking then continues by itself.",
            error_code="token_expired",
        )
        return
    client = _ims(token)
    try:
        image = client.get_image(upload.ims_image_id)
    except ImsError as exc:
        _poll_failed(upload, exc)
        return
    if image.status in IMS_DONE_STATUSES:
        _finish(upload, client, image)
    elif image.status in IMS_FAILED_STATUSES:
        failed = _move(
            upload,
            Status.FAILED,
            f"IMS could not process the image (status {image.status})",
            detail=str(image.raw),
            ims_status=image.status,
            error_message="The cloud could not turn your file into an image "
            f"(it reports the image as {image.status}).",
            error_hint="Check that the file is a bootable disk in the format you chose, then press Retry "
            "or upload a corrected file.",
            error_code=f"ims_{image.status}",
        )
        if failed:  # a failed attempt leaves no image behind
            _delete_quietly(upload, client)
    else:
        _schedule_poll(upload, image.status)


def _schedule_poll(upload: Upload, ims_status: str) -> None:
    delay = min(60.0, settings.UPLOAD_POLL_SECONDS * (1 + upload.poll_count // 10))
    if ims_status != upload.ims_status:
        _note(upload, f"IMS reports the image as {ims_status}")
    Upload.objects.filter(pk=upload.pk, status=Status.PROCESSING).update(
        ims_status=ims_status,
        poll_count=F("poll_count") + 1,
        next_poll_at=timezone.now() + timedelta(seconds=delay),
    )


def _poll_failed(upload: Upload, exc: ImsError) -> None:
    if exc.kind == "auth":
        _move(upload, Status.RECONNECT, exc.message, detail=exc.raw, **_error_fields(exc))
    elif not exc.permanent:
        _note(upload, f"Checking the image failed for now: {exc.message}", exc.raw)
        _schedule_poll(upload, upload.ims_status)
    else:
        _move(upload, Status.FAILED, exc.message, detail=exc.raw, **_error_fields(exc))


def _finish(upload: Upload, client: ImsClient, image) -> None:
    """The image is active: it becomes Ready only if it holds exactly the bytes of the file.
    Sums missing on the row (a worker died between IMS's last byte and writing them) are
    computed from the file."""
    if not (upload.md5 and upload.sha512):
        sums = _sums_of_file_to_send(upload)
        if sums is None:
            _delete_quietly(upload, client)
            _move(upload, Status.FAILED, "The staged file is gone: what IMS stored cannot be compared with it",
                  detail=str(image.raw), error_code="unverifiable",
                  error_message="The portal's copy of your file is gone, so it could not check that the cloud "
                  "stored exactly your file; the unchecked image was deleted.",
                  error_hint="Upload the file again.")
            return
        _save(upload, upload.attempt, **sums)
    mismatch = _stored_differences(upload, image)
    if mismatch:
        _delete_quietly(upload, client)
        _move(
            upload,
            Status.FAILED,
            "IMS stored something other than the file that was sent: " + ", ".join(mismatch),
            detail=str(image.raw),
            error_message="The cloud stored something other than what you uploaded.",
            error_hint="The bad image was deleted. Press Retry to send the file again.",
            error_code="checksum_mismatch",
        )
        return
    _move(upload, Status.READY, f"Image {image.id} is active in IMS", ims_status=image.status, next_poll_at=None)


def _stored_differences(upload: Upload, image) -> list[str]:
    """How what IMS stored differs from the file: its size, MD5 (`checksum`) and SHA-512
    (`os_hash_value`) must all be reported and equal, since an image nobody compared is never
    Ready. Empty: the same."""
    differences = []
    stored_size = image.size if image.size is not None else image.raw.get("__image_size")
    if stored_size is None or int(stored_size) != upload.send_size:
        differences.append(f"size {stored_size} != {upload.send_size}")
    if image.checksum != upload.md5:
        differences.append(f"md5 {image.checksum} != {upload.md5}")
    if image.os_hash_value != upload.sha512:
        differences.append("sha512 differs")
    return differences


# ---------------------------------------------------------------------------------------------
# What the owner (or an admin) asks for


def upload_retry(*, upload: Upload, by) -> None:
    if upload.status == Status.REFUSED:
        why = "This file was refused by the check, and sending the same file again would be refused the same way."
        raise ServiceError(f"{why} {upload.error_hint}".strip())
    if upload.status not in RETRYABLE:
        raise ServiceError("Only a failed upload, or one waiting for a new cloud sign-in, can be retried.")
    if upload.status == Status.RECONNECT and _token_for_push(upload)[0] is None:
        raise ServiceError(
            "The cloud sign-in of this upload's owner has expired: reconnect on the Cloud account page, "
            "and the upload continues by itself."
        )
    _requeue_for_person(upload, f"Retry requested by {by}")


def _requeue(upload: Upload, message: str, **fields) -> bool:
    """Send it again because a person acted: automatic retries count afresh from here."""
    if not _move(upload, Status.RECEIVED, message, requeued_at_attempt=upload.attempt, **NO_ERROR, **fields):
        return False
    _enqueue_push(upload.pk)
    return True


def _requeue_for_person(upload: Upload, message: str, **fields) -> None:
    """_requeue for a button press: say why it cannot be done."""
    if not staging.exists(upload.staged_name):
        raise ServiceError("The staged copy of this file is gone: please upload the file again.")
    if not _requeue(upload, message, **fields):
        raise ServiceError("This upload changed in the meantime; reload the page and try again.")


def upload_use_format(*, upload: Upload, disk_format: str, by) -> None:
    """The one-click fix for a refused file: check and send the staged file again as the format
    the check found in it (Upload.suggested_format)."""
    if not disk_format or disk_format != upload.suggested_format:
        if upload.status == Status.REFUSED and not upload.has_staged_copy:
            raise ServiceError("The portal no longer keeps this file: upload it again, choosing the right format.")
        raise ServiceError("This upload can no longer be changed that way; reload the page.")
    label = DiskFormat(disk_format).label
    _requeue_for_person(upload, f"{by} chose to send the file as {label}", disk_format=disk_format)


def upload_cancel(*, upload: Upload, by) -> str:
    """Cancel an upload, or remove a failed or refused one; returns what gets deleted, in words."""
    deletes = upload.what_stopping_deletes()
    verb = "Removed" if upload.is_stopped else "Cancelled"
    if not _move(upload, Status.CANCELLED, f"{verb} by {by}", next_poll_at=None, **NO_ERROR):
        raise ServiceError("This upload has finished or changed and can no longer be cancelled.")
    _enqueue_discard(upload.pk)
    return deletes


def upload_discard(*, upload_id: int) -> None:
    """After a cancel: delete the staged file and the image in IMS (with the owner's token)."""
    upload = Upload.objects.filter(pk=upload_id, status=Status.CANCELLED).first()
    if upload is None:
        return
    _delete_staged(upload, "Deleted the staged copy of the cancelled upload")
    if upload.ims_image_id:
        token = _usable_token(upload.owner_id)
        if token is None:
            _note(upload, f"IMS image {upload.ims_image_id} was not deleted: the cloud sign-in has expired")
            return
        _delete_quietly(upload, _ims(token))
