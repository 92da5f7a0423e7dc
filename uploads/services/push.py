"""Sending a received upload to IMS: claim it, check it, make the image, stream the bytes,
and end a failed attempt (try again later, wait for a new sign-in, or fail). A heartbeat tells
the reconciler that the worker is alive; a push whose heartbeat stopped is taken over."""

import logging
import threading
import time
from contextlib import contextmanager
from datetime import timedelta

from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django.db.models import Q
from django.utils import timezone
from django.utils.translation import gettext_noop
from celery.exceptions import SoftTimeLimitExceeded

from uploads import diskimage, fairness, obs_import, staging
from uploads.errors import PortalError, Problem, StagedFileMissing
from uploads.filebody import Sealed
from uploads.ims import HINT_CONTACT_ADMIN, CloudError, ImsClient
from uploads.models import WORKING, ErrorCode, Status, Upload
from uploads.services import cloud, dispatch, images
from uploads.services.check import Stopped, check_file
from uploads.services.poll import upload_poll
from uploads.services.state import (
    NO_ERROR,
    PROGRESS_WRITE_SECONDS,
    PushOutcome,
    end_with,
    error_fields,
    move,
    note,
    save,
)
from uploads.sizes import human_size

log = logging.getLogger(__name__)

MAX_PUSH_ATTEMPTS = 5
# An automatic retry waits FIRST_RETRY_DELAY seconds, then RETRY_BACKOFF times longer each time.
FIRST_RETRY_DELAY = 5
RETRY_BACKOFF = 3
MAX_RETRY_DELAY = 300  # seconds; far below the broker's visibility timeout (settings)
# How many uploads one run of the reconciler queues again at the most.
RECONCILE_BATCH = 500


def uploads_to_reconcile() -> list[int]:
    """Uploads that expect a push but may have none coming: received ones nobody claimed (the
    message was lost, say Redis restarted without its data) and pushes whose heartbeat stopped
    (the worker died). Queueing them again is harmless: only one push can claim a row."""
    now = timezone.now()
    stale = now - timedelta(seconds=settings.RECONCILE_GRACE_SECONDS)
    unclaimed = Q(status=Status.RECEIVED, status_changed_at__lte=stale) & (
        Q(retry_at__isnull=True) | Q(retry_at__lte=stale)
    )
    found = list(Upload.objects.filter(unclaimed | _abandoned()).values_list("pk", flat=True)[:RECONCILE_BATCH])
    return fairness.worth_nudging(found)  # one waiting for a slot is queued when the slot frees


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
    token = cloud.owner_token(upload.owner_id)
    why_not = cloud.why_token_cannot_push(token, upload)
    if why_not:
        _wait_for_reconnect(upload, why_not)
        return PushOutcome()
    attempt = upload.attempt + 1
    with transaction.atomic():  # the fair-share check and the claim, under the slots' locks
        turn = fairness.take_turn(upload)
        if turn.goes_first:
            dispatch.enqueue_push(turn.goes_first)
        # Over a cap it waits, RECEIVED, without a retry: a push that ends queues it (_hand_off).
        if not turn.may_start or not _claim(upload, attempt):
            return PushOutcome()
    try:
        return push_claimed(upload, token, attempt)
    finally:
        _hand_off(upload)


def _hand_off(upload: Upload) -> None:
    """The push ended, one way or another: its slot is free for the next waiting uploads."""
    for upload_id in fairness.next_after(upload):
        dispatch.enqueue_push(upload_id)


def push_claimed(upload: Upload, token: cloud.OwnerToken, attempt: int) -> PushOutcome:
    """Check, convert and send an upload this worker claimed, on this attempt."""
    client = cloud.ims_client(token.value)
    try:
        with _heartbeat(upload.pk, attempt):
            sent = _check_and_send(upload, token, client, attempt)
    except Stopped:
        return PushOutcome()
    except Exception as exc:  # whatever it was, the upload is never left stuck
        return _attempt_failed(upload, client, attempt, _push_error(upload, exc))
    if sent:
        # The next check is due after one interval: this one happens now, so beat does not race it.
        move(
            upload,
            Status.PROCESSING,
            gettext_noop("IMS received the whole file and is processing it"),
            on_attempt=attempt,
            sent_bytes=upload.send_size,
            next_poll_at=timezone.now() + timedelta(seconds=settings.UPLOAD_POLL_SECONDS),
            ims_status="saving",
        )
        upload_poll(upload_id=upload.pk)
    return PushOutcome()


def _claim(upload: Upload, attempt: int) -> bool:
    """RECEIVED -> CHECKING for this attempt, unless another worker (or a cancel) got there first."""
    return move(
        upload,
        Status.CHECKING,
        gettext_noop("Checking the file (attempt %(attempt)d)") % {"attempt": attempt},
        on_attempt=upload.attempt,
        attempt=attempt,
        sent_bytes=0,
        send_rate=0,
        heartbeat_at=timezone.now(),
        retry_at=None,
        **NO_ERROR,
    )


def _check_and_send(upload: Upload, token: cloud.OwnerToken, client: ImsClient, attempt: int) -> bool:
    """Check (and maybe convert) the file, then make sure IMS holds it; False when the push
    stopped on the way (cancelled, waiting for a longer-lasting sign-in or for a reviewer)."""
    from uploads import review  # review uses state.move: import here to avoid the cycle

    if review.approved_and_unchanged(upload):
        note(upload, gettext_noop("Approved, and the file is unchanged since its check: sent without checking again"))
    else:
        check_file(upload, attempt)
        if review.upload_hold_for_review(upload=upload, attempt=attempt):
            return False  # a reviewer approves (and queues the push) or rejects
    if upload.converted_name:
        # Converting took a while and may have made the file bigger: the same token, asked again.
        why_not = cloud.why_token_cannot_push(token, upload)
        if why_not:
            _wait_for_reconnect(upload, why_not, on_attempt=attempt)
            return False
    by_import = obs_import.applies(upload)  # IMS reads the object from OBS itself
    if not move(upload, Status.PUSHING, obs_import.MESSAGE if by_import else gettext_noop("Sending to IMS"), on_attempt=attempt,
                push_started_at=timezone.now(), **({"ims_status": obs_import.IMPORTING} if by_import else {})):
        return False  # cancelled meanwhile
    if by_import:
        return obs_import.import_image(upload, client, attempt)  # False: cancelled meanwhile
    if not images.prepare_image(upload, client, attempt):
        _send_file(upload, client, attempt)
    return True


HINT_RECONNECT_KEPT = gettext_noop(
    "Reconnect on the Cloud account page: the upload then continues by itself. Your file is kept until then."
)
NO_SCRATCH_ROOM = gettext_noop("The server has no room just now for the working copy it needs to check this file.")


def _push_error(upload: Upload, exc: Exception) -> PortalError:
    """What ended the push, as the one error type: a known error as it is; the time limit and
    anything unexpected (a bug, an outage of our own) in words of their own."""
    if isinstance(exc, PortalError):
        return exc
    if isinstance(exc, staging.StagingUnavailable):  # object storage away, or refusing the keys: try again
        return PortalError(exc.message, hint=exc.for_admin or HINT_CONTACT_ADMIN, code="staging_unavailable",
                           detail=exc.for_admin)
    if isinstance(exc, staging.StagedFileChanged):  # during the check: what was pinned is gone
        return diskimage.FileChanged("the staged file changed while it was checked")
    if isinstance(exc, staging.ScratchNoRoom):
        return PortalError(NO_SCRATCH_ROOM, hint=HINT_CONTACT_ADMIN, code="no_scratch_room",
                           detail="STAGING_SCRATCH_DIR is full")
    if isinstance(exc, SoftTimeLimitExceeded):
        return PortalError(
            gettext_noop("Sending this file took too long: the link to the cloud is slower than the portal supports."),
            hint=gettext_noop("Press Retry at a quieter time; if it happens again, ask an administrator."),
            code=ErrorCode.TIMED_OUT, detail="Celery soft time limit of the push", permanent=True,
        )
    log.exception("upload %s: the push failed unexpectedly", upload.pk, exc_info=exc)
    return PortalError(gettext_noop("The portal ran into a problem of its own."), hint=HINT_CONTACT_ADMIN,
                       code=ErrorCode.INTERNAL, detail=f"{type(exc).__name__}: {exc}")


def _wait_for_reconnect(upload: Upload, why: str, on_attempt: int | None = None) -> None:
    error = PortalError(why, hint=HINT_RECONNECT_KEPT, code=ErrorCode.TOKEN_EXPIRED)
    end_with(upload, error, event=gettext_noop("Waiting for the owner to reconnect the cloud account"),
             on_attempt=on_attempt)


def _take_over(upload: Upload) -> None:
    """The worker of this push died (no heartbeat): start again, or give up after the last attempt."""
    if upload.status == Status.SENDING_EARLY:  # sent while the browser still uploads it
        from uploads.services import early_push  # early_push builds on this module

        early_push.take_over(upload, _abandoned())
        return
    if upload.attempt - upload.requeued_at_attempt >= MAX_PUSH_ATTEMPTS:
        error = PortalError(gettext_noop("The portal could not finish sending this file."), hint=HINT_CONTACT_ADMIN,
                            code=ErrorCode.ABANDONED)
        end_with(upload, error, event=gettext_noop("The worker that was handling this upload stopped"),
                 on_attempt=upload.attempt, where=_abandoned())
    else:
        move(upload, Status.RECEIVED, gettext_noop("The worker that was handling this upload stopped; starting again"),
             on_attempt=upload.attempt, where=_abandoned())


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


def _send_file(upload: Upload, client: ImsClient, attempt: int) -> None:
    """Stream the file to the image, proving on the way that the bytes sent are the bytes
    checked: a file sealed when it arrived (its sums computed then, `_sealed`) goes without
    being read or hashed again, its tail held back until the seal is confirmed; any other file
    is hashed while it is sent and its bytes inspected again on the way. Either way a file that
    changed since it was checked stops the PUT before its end (diskimage.FileChanged)."""
    name = upload.converted_name or upload.staged_name
    try:  # the version the check saw, and no other (an object's ETag: If-Match)
        staged = staging.open_for_reading(name, (upload.checked_file or {}).get(name))
    except FileNotFoundError:  # not an error of IMS: the file to send is gone
        raise StagedFileMissing() from None
    except staging.StagedFileChanged:
        raise diskimage.FileChanged("the staged file's version is not the one checked") from None
    with staged:
        sealed = _sealed(upload, staged)
        reading = _StagedReads(staged)
        body = staged if sealed else diskimage.wrap_stream(reading, upload.send_format, size=upload.send_size)
        try:
            result = client.upload_file(
                upload.ims_image_id, body, upload.send_size, on_progress=_progress_recorder(upload, attempt),
                sealed=sealed,
            )
        except CloudError:
            if reading.failed is not None:  # not IMS's connection: the object storage went away
                raise reading.failed from None
            raise
    sums = {"md5": result.md5, "sha512": result.sha512}
    if not upload.converted_name:  # what was sent is the file as uploaded
        sums["staged_sha512"] = result.sha512
    save(upload, attempt, **sums)
    values = {"size": human_size(result.sent_bytes), "md5": result.md5}
    if sealed:
        note(upload, gettext_noop("Sent %(size)s to IMS (md5 %(md5)s) (sums computed as it arrived; sealed since)")
             % values)
    else:
        note(upload, gettext_noop("Sent %(size)s to IMS (md5 %(md5)s)") % values)


class _StagedReads:
    """The staged file as the PUT reads it, remembering a failure of staging (object storage
    gone mid-read), which requests would otherwise report as a broken connection to IMS."""

    def __init__(self, stream):
        self.stream = stream
        self.failed: staging.StagingUnavailable | None = None

    def read(self, size: int = -1) -> bytes:
        try:
            return self.stream.read(size)
        except staging.StagingUnavailable as exc:
            self.failed = exc
            raise


def _sealed(upload: Upload, staged) -> Sealed | None:
    """The staged file as it arrived, with the sums computed then, when that is what is sent and
    its seal still holds (uploads/staging/local.py seal()); None: hash it while sending."""
    received = upload.received_sums
    if upload.converted_name or not received.get("seal") or staging.is_object_storage():
        return None  # ("seal" is missing too while only the state of a PATCH before the last is kept)
    seal = received["seal"]
    fd = staged.fileno()
    if seal["size"] != upload.send_size or not staging.local.seal_holds(fd, seal):
        note(upload, gettext_noop("The staged file changed since it arrived: its sums are computed again while sending"))
        return None

    def confirm(tail: bytes) -> None:
        if not staging.local.tail_holds(fd, seal, tail):
            raise diskimage.FileChanged("the staged file changed while it was being sent (its seal broke)")

    return Sealed(md5=received["md5"], sha512=received["sha512"], tail_size=seal["tail_size"], confirm=confirm)


def _progress_recorder(upload: Upload, attempt: int):
    """Record bytes sent at most once a second; tell the sender to stop when the upload was
    cancelled or taken over (the guarded update then matches no row)."""
    started = time.monotonic()
    last_write = 0.0

    def record(sent: int) -> bool:
        nonlocal last_write
        now = time.monotonic()
        if now - last_write < PROGRESS_WRITE_SECONDS and sent < upload.send_size:
            return True
        last_write = now
        rate = sent / max(now - started, 1e-6)
        return bool(
            Upload.objects.filter(pk=upload.pk, status=Status.PUSHING, attempt=attempt).update(
                sent_bytes=sent, send_rate=rate
            )
        )

    return record


def _attempt_failed(upload: Upload, client: ImsClient, attempt: int, error: PortalError) -> PushOutcome:
    """End this attempt. The check refused the file: REFUSED. Stopped on purpose (cancelled,
    taken over): the canceller cleans up. Cured by a new sign-in: wait for it. Else try again
    after a backoff when that can help and attempts are left, or fail with no image left behind."""
    if isinstance(error, Problem):
        _refuse(upload, client, attempt, error)
        return PushOutcome()
    if error.code == ErrorCode.ABORTED:
        note(upload, gettext_noop("Sending stopped"))
        return PushOutcome()
    if error.code in ErrorCode.CURED_BY_RECONNECT:
        end_with(upload, error, on_attempt=attempt)
        return PushOutcome()
    if not error.permanent and attempt - upload.requeued_at_attempt < MAX_PUSH_ATTEMPTS:
        delay = retry_delay(attempt)
        moved = move(upload, Status.RECEIVED, gettext_noop("%(error)s Trying again in %(seconds)d seconds.") % {
                     "error": error.message, "seconds": delay},
                     detail=error.detail, on_attempt=attempt, retry_at=timezone.now() + timedelta(seconds=delay),
                     **error_fields(error))
        return PushOutcome(retry_in=delay if moved else None)
    if upload.ims_image_id:
        images.delete_quietly(upload, client)
    end_with(upload, error, on_attempt=attempt)
    return PushOutcome()


def retry_delay(attempt: int) -> int:
    """Seconds before automatic attempt `attempt + 1`: FIRST_RETRY_DELAY, growing RETRY_BACKOFF
    times with each attempt, at most MAX_RETRY_DELAY."""
    return min(MAX_RETRY_DELAY, FIRST_RETRY_DELAY * RETRY_BACKOFF ** (attempt - 1))


def _refuse(upload: Upload, client: ImsClient, attempt: int, problem: Problem) -> None:
    """The check refused the file: it never goes to IMS as it is. The staged file stays (for
    STAGING_RETENTION_HOURS), so that the one-click format fix needs no new upload; a copy
    converted from it and an image an earlier attempt made are deleted."""
    staging.delete(upload.converted_name)
    save(upload, attempt, converted_name="")
    if upload.ims_image_id:
        images.delete_quietly(upload, client)
    move(upload, Status.REFUSED, problem.message, detail=problem.detail, on_attempt=attempt,
         **error_fields(problem))
