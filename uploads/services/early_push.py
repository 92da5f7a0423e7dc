"""Pushing while the browser is still uploading (issue 12, part 2): the two hops overlap.

For a QCOW2, RAW or (dynamic) VHD file that IMS takes as it is, staged on local disk and needing
no reviewer, a worker starts as soon as the first HEAD_BYTES arrived: it checks them (the format
is the declared one, nothing names another file), creates the image, opens
`PUT /v2/images/{id}/file` with the whole file's Content-Length, and sends the bytes the portal
recorded as received while the browser sends the rest (SENDING_EARLY).

Safety is kept by holding back the end of the file. The last HOLD_BACK_BYTES go out only after
every byte arrived and the whole file passed the same check as any push (truncation, qemu-img,
the full inspection; CHECKING, then PUSHING); the sums of the bytes sent are compared with IMS's
as always. When the check refuses the file, the PUT is cut before its end, so IMS never has a
whole body and never makes the image active; the image is deleted and the upload is REFUSED
with the usual words.

The early push is given up, cleanly, whenever it cannot finish by itself: the browser silent for
EARLY_PUSH_STALL_SECONDS (below IMS's idle timeout), the bytes turning out not to be what their
header said, the file needing conversion or a larger min_disk than the image was made with, an
error of the cloud before the last byte. Its image is then deleted and the upload goes back to
RECEIVING (or RECEIVED when every byte is in), so that the usual push runs, exactly as without
an early push. A cancel or an expiry stops it (the PUT is cut, the image deleted); a worker that
dies is taken over by the reconciler like any push (`take_over`).
"""

import io
import logging
import os
import time
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone
from django.utils.translation import gettext_noop

from uploads import diskcheck, diskimage, fairness, staging
from uploads.diskimage import GiB
from uploads.errors import ErrorCode
from uploads.ims import CloudError, ImsClient
from uploads.models import Status, Upload
from uploads.services import check, cloud, dispatch, images, push
from uploads.services.check import Stopped
from uploads.services.poll import upload_poll
from uploads.services.state import NO_ERROR, PROGRESS_WRITE_SECONDS, PushOutcome, move, note, save
from uploads.sizes import human_size

log = logging.getLogger(__name__)

# Formats sent as they are, whose header tells the format (a fixed VHD's only footer is at the end:
# it is converted, so never pushed early).
EARLY_FORMATS = ("qcow2", "raw", "vhd")
# The first bytes checked before the image is made: every inspector decides within them.
HEAD_BYTES = 1024 * 1024
# The end of the file, sent only once the whole file passed the check.
HOLD_BACK_BYTES = 1024 * 1024
# Smaller files are received in a moment: no early push.
MIN_SIZE = 16 * 1024 * 1024
# How often the worker looks for newly received bytes when it has sent all it had.
WAIT_SECONDS = 0.1


class GiveUp(Exception):
    """The early push cannot finish by itself; the usual push sends the file instead."""


def applies(upload: Upload) -> bool:
    """Whether an early push may be tried for this upload (cheap: asked on every recorded chunk)."""
    from uploads import review  # review uses state.move: import here to avoid the cycle

    return (
        settings.EARLY_PUSH
        and upload.attempt == 0  # never tried (a given-up early push is not tried again)
        and upload.size >= MIN_SIZE
        and upload.disk_format in EARLY_FORMATS
        and upload.disk_format in settings.IMS_DISK_FORMATS
        and not staging.is_object_storage()
        and not review.review_needed(upload)
    )


def maybe_start(upload: Upload, *, before: int) -> None:
    """Called with each recorded chunk (receive.record_received): queue the early push once the
    first HEAD_BYTES are in, unless the whole file already is."""
    received = upload.received_bytes
    if before < HEAD_BYTES <= received < upload.size and applies(upload):
        dispatch.enqueue_early_push(upload.pk)


def upload_push_early(*, upload_id: int) -> PushOutcome:
    """Claim a receiving upload (RECEIVING -> SENDING_EARLY) and send it while it arrives.
    Safe to call twice: only one caller wins the claim, and only on the first attempt."""
    upload = Upload.objects.filter(pk=upload_id).first()
    if upload is None or upload.status != Status.RECEIVING or not applies(upload):
        return PushOutcome()
    token = cloud.owner_token(upload.owner_id)
    if cloud.why_token_cannot_push(token, upload):
        return PushOutcome()  # the usual push says why, once the file arrived
    attempt = upload.attempt + 1
    with transaction.atomic():  # the fair-share check and the claim, under the slots' locks
        turn = fairness.take_turn(upload)
        if turn.goes_first:
            dispatch.enqueue_push(turn.goes_first)
        if not turn.may_start or not _claim(upload, attempt):
            return PushOutcome()
    try:
        return _push_claimed(upload, cloud.ims_client(token.value), attempt)
    finally:
        push._hand_off(upload)


def _claim(upload: Upload, attempt: int) -> bool:
    now = timezone.now()
    return move(
        upload, Status.SENDING_EARLY, gettext_noop("Sending to IMS while the file arrives"),
        where=Q(attempt=0, received_bytes__gte=HEAD_BYTES),
        attempt=attempt, sent_bytes=0, send_rate=0, heartbeat_at=now, push_started_at=now, retry_at=None,
        **NO_ERROR,
    )


class Progress:
    """Where the early push stands: before the last byte (`early`), the image it made."""

    def __init__(self):
        self.early = True
        self.image_id = ""
        self.min_disk = 0


def _push_claimed(upload: Upload, client: ImsClient, attempt: int) -> PushOutcome:
    progress = Progress()
    try:
        with push._heartbeat(upload.pk, attempt):
            _check_head_and_make_image(upload, client, attempt, progress)
            _send(upload, client, attempt, progress)
    except Stopped:
        _after_stop(upload, client, progress)
        return PushOutcome()
    except GiveUp as why:
        _give_up(upload, client, attempt, str(why))
        return PushOutcome()
    except Exception as exc:  # whatever it was, the upload is never left stuck
        if isinstance(exc, CloudError) and exc.code == ErrorCode.ABORTED:
            _after_stop(upload, client, progress)
            return PushOutcome()
        if progress.early:  # before the last byte: the usual push does it all once the file is in
            log.info("upload %s: early push given up", upload.pk, exc_info=exc)
            _give_up(upload, client, attempt, getattr(exc, "message", "") or type(exc).__name__)
            return PushOutcome()
        return push._attempt_failed(upload, client, attempt, push._push_error(upload, exc))
    move(
        upload, Status.PROCESSING, gettext_noop("IMS received the whole file and is processing it"), on_attempt=attempt,
        sent_bytes=upload.size, next_poll_at=timezone.now() + timedelta(seconds=settings.UPLOAD_POLL_SECONDS),
        ims_status="saving",
    )
    upload_poll(upload_id=upload.pk)
    return PushOutcome()


def _check_head_and_make_image(upload: Upload, client: ImsClient, attempt: int, progress: Progress) -> None:
    """Check the first bytes; make the image with the format and min_disk they tell."""
    with staging.open_for_reading(upload.staged_name) as staged:
        head = staged.read(HEAD_BYTES)
    collector = diskcheck.Collector(io.BytesIO(head))
    while collector.read(diskcheck.LONG_READ_CHUNK_SIZE):
        pass
    evidence = collector.evidence(upload.size, at_end=False)
    if evidence is None:
        raise GiveUp(gettext_noop("the first bytes do not tell the file's format"))
    fmt, inspector, problem = diskcheck.judge(evidence, upload.disk_format, {})
    if problem is not None:  # the check after the last byte says why, in the usual words
        raise GiveUp(gettext_noop("the first bytes did not pass the check (%(code)s)") % {"code": problem.code})
    if fmt == "vhd" and not evidence.head.startswith(b"conectix"):
        raise GiveUp(gettext_noop("a fixed VHD is converted to QCOW2 first"))
    needed_gb = max(1, -(-diskcheck.virtual_size(evidence, fmt, inspector) // GiB))
    progress.min_disk = max(upload.min_disk, needed_gb)
    image = client.create_image(name=upload.name, disk_format=fmt, os_version=upload.os_version,
                                min_disk=progress.min_disk, min_ram=upload.min_ram, tags=upload.tags)
    progress.image_id = image.id
    save(upload, attempt, ims_image_id=image.id, ims_status=image.status, send_format=fmt, send_size=upload.size,
         converted_name="")
    note(upload, gettext_noop("Image record created in IMS: %(id)s; sending the file while it arrives "
                              "(its last %(size)s once the whole file passed the check)")
         % {"id": image.id, "size": human_size(HOLD_BACK_BYTES)})


def _send(upload: Upload, client: ImsClient, attempt: int, progress: Progress) -> None:
    sent = SendProgress(upload, attempt)
    with staging.open_for_reading(upload.staged_name) as staged:
        growing = GrowingFile(staged, upload, attempt, on_wait=sent.waiting,
                              on_complete=lambda: _check_whole_file(upload, attempt, progress))
        body = diskimage.wrap_stream(growing, upload.send_format, size=upload.size)
        result = client.upload_file(upload.ims_image_id, body, upload.size, on_progress=sent)
    save(upload, attempt, md5=result.md5, sha512=result.sha512, staged_sha512=result.sha512)
    note(upload, gettext_noop("Sent %(size)s to IMS (md5 %(md5)s)") % {"size": human_size(result.sent_bytes), "md5": result.md5})


def _check_whole_file(upload: Upload, attempt: int, progress: Progress) -> None:
    """Every byte is in: check the whole file as any push does, with the PUT held open. Returns
    when its end may be sent; raises to cut the PUT (the Problem that refuses the file, GiveUp,
    Stopped)."""
    if not move(upload, Status.CHECKING, gettext_noop("Every byte arrived: checking the whole file before its end is sent"),
                on_attempt=attempt):
        raise Stopped()
    progress.early = False
    _, result = check.inspect_and_record(upload, attempt)
    from uploads import review  # review uses state.move: import here to avoid the cycle

    if result.needs_conversion(settings.IMS_DISK_FORMATS):
        raise GiveUp(gettext_noop("the file needs converting"))
    if result.upload_format(settings.IMS_DISK_FORMATS) != upload.send_format:
        raise GiveUp(gettext_noop("the file is sent as another format"))
    if upload.min_disk > progress.min_disk:
        raise GiveUp(gettext_noop("the image needs a larger min disk than its header said"))
    if review.review_needed(upload):
        raise GiveUp(gettext_noop("the file now needs a reviewer's approval"))
    if not move(upload, Status.PUSHING, gettext_noop("The whole file passed the check: sending its end to IMS"),
                on_attempt=attempt):
        raise Stopped()


class GrowingFile:
    """The staged file while the browser adds to it, as the PUT body reads it.

    read() returns only bytes the portal recorded as received (the row's received_bytes: what a
    tus PATCH wrote and kept; tus never writes below it again), waiting for more when it caught
    up (telling `on_wait` how far it got); it keeps back the last HOLD_BACK_BYTES until every byte
    is in and `on_complete` returned.
    It raises Stopped when the upload was cancelled, expired or taken over, and GiveUp when the
    browser sent nothing for EARLY_PUSH_STALL_SECONDS.
    """

    def __init__(self, fileobj, upload: Upload, attempt: int, *, on_wait, on_complete):
        self.fd = fileobj.fileno()
        self.upload = upload
        self.attempt = attempt
        self.size = upload.size
        self.on_wait = on_wait
        self.on_complete = on_complete
        self.pos = 0
        self.released = False
        self.received = upload.received_bytes
        self.received_at = time.monotonic()

    def read(self, size: int = -1) -> bytes:
        if self.pos >= self.size:
            return b""
        limit = self.size if self.released else self.size - HOLD_BACK_BYTES
        if self.pos >= limit:
            self._wait_for(self.size)
            self.on_complete()
            self.released = True
            limit = self.size
        want = limit - self.pos if size is None or size < 0 else min(size, limit - self.pos)
        self._wait_for(self.pos + want)
        data = os.pread(self.fd, want, self.pos)
        if len(data) != want:
            raise diskimage.FileChanged(f"the staged file ended at {self.pos + len(data)} of {self.received} "
                                        "bytes received")
        self.pos += want
        return data

    def _wait_for(self, wanted: int) -> None:
        while self.received < wanted:
            self._look()
            if self.received >= wanted:
                return
            if time.monotonic() - self.received_at > settings.EARLY_PUSH_STALL_SECONDS:
                raise GiveUp(gettext_noop("the browser sent nothing for %(seconds)s seconds")
                              % {"seconds": f"{settings.EARLY_PUSH_STALL_SECONDS:g}"})
            self.on_wait(self.pos)
            time.sleep(WAIT_SECONDS)

    def _look(self) -> None:
        row = Upload.objects.filter(pk=self.upload.pk).values_list("status", "attempt", "received_bytes").first()
        if row is None or row[0] != Status.SENDING_EARLY or row[1] != self.attempt:
            raise Stopped()
        if row[2] > self.received:
            self.received, self.received_at = row[2], time.monotonic()


class SendProgress:
    """Records bytes sent at most once a second (called after each buffer sent), and at once when
    the sender waits for the browser, so that the page shows where both hops stand. Returns False
    (stop sending) when the upload was cancelled or taken over: the guarded update matches no row."""

    def __init__(self, upload: Upload, attempt: int):
        self.upload, self.attempt = upload, attempt
        self.started = time.monotonic()
        self.written_at = 0.0
        self.written = -1

    def __call__(self, sent: int) -> bool:
        if time.monotonic() - self.written_at < PROGRESS_WRITE_SECONDS and sent < self.upload.size:
            return True
        return self.write(sent)

    def waiting(self, sent: int) -> None:
        if sent != self.written:
            self.write(sent)

    def write(self, sent: int) -> bool:
        now = time.monotonic()
        self.written_at, self.written = now, sent
        rows = Upload.objects.filter(pk=self.upload.pk, attempt=self.attempt,
                                     status__in=[Status.SENDING_EARLY, Status.CHECKING, Status.PUSHING])
        return bool(rows.update(sent_bytes=sent, send_rate=sent / max(now - self.started, 1e-6)))


def _give_up(upload: Upload, client: ImsClient, attempt: int, why: str) -> None:
    """The PUT was cut before its end: delete the image, and let the usual push send the file
    once it arrived (the next attempts counted afresh)."""
    if upload.ims_image_id:
        images.delete_quietly(upload, client)
    fields = {"requeued_at_attempt": attempt, "sent_bytes": 0, "send_rate": 0, "heartbeat_at": None}
    if move(upload, Status.RECEIVING, gettext_noop("Stopped sending early: %(why)s. The file is sent once it has arrived")
            % {"why": why}, on_attempt=attempt,
            where=Q(received_bytes__lt=F("size")), **fields):
        return
    if move(upload, Status.RECEIVED, gettext_noop("Stopped sending early: %(why)s. Sending the file the usual way")
            % {"why": why}, on_attempt=attempt, **fields):
        dispatch.enqueue_push(upload.pk)


def _after_stop(upload: Upload, client: ImsClient, progress: Progress) -> None:
    """The upload was cancelled, expired or taken over while being sent early: the PUT was cut.
    The image goes unless the upload moved on to a push that may reuse it."""
    row = Upload.objects.filter(pk=upload.pk).first()
    if row is None or not progress.image_id or row.ims_image_id != progress.image_id:
        return
    if row.status in {Status.CANCELLED, Status.FAILED, Status.RECEIVING}:
        images.delete_quietly(row, client)


def take_over(upload: Upload, abandoned: Q) -> None:
    """The worker of an early push died (no heartbeat): back to RECEIVING, its image deleted, or to
    RECEIVED when every byte is in (the usual push then reuses or deletes the image)."""
    fields = {"requeued_at_attempt": upload.attempt, "heartbeat_at": None, "sent_bytes": 0, "send_rate": 0}
    if move(upload, Status.RECEIVING,
            gettext_noop("The worker that was sending this upload early stopped; the file is sent once it has arrived"),
            where=abandoned & Q(received_bytes__lt=F("size")), **fields):
        token = cloud.owner_token(upload.owner_id)
        if upload.ims_image_id and token.value is not None:
            images.delete_quietly(upload, cloud.ims_client(token.value))
        return
    move(upload, Status.RECEIVED, gettext_noop("The worker that was sending this upload early stopped; sending the file now"),
         where=abandoned, **fields)
