"""Staging in S3-compatible object storage (OBS, Swift's s3api, AWS): the storage "staging" is
django-storages' S3Storage, which names the bucket, prefix, endpoint, region and keys; its boto3
client does the work, because S3Storage's own open() spools a whole object into memory or a
temp file.

A tus upload is an S3 multipart upload (the state in uploads.models.StagedMultipart): each
PATCH's bytes are spooled to a local temp file one part (STAGING_S3_PART_SIZE) at a time and
sent as the next part; what is left at the end of a PATCH is a part of its own when it is large
enough (parts may differ in size), else it waits in a small "incomplete part" object next to the
upload (`<key>.part-<generation>`, as the reference tus server's S3
store does), and the next PATCH, on any process or machine, starts its first part with them.
The database row changes only together with the upload's offset (Writer.record), so HEAD
always reports what object storage really holds. The last byte completes the multipart upload.
"""

import io
import os
import queue
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta

from botocore.exceptions import BotoCoreError, ClientError
from django.conf import settings
from django.core.files.storage import storages
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone
from django.utils.translation import gettext_noop

from uploads.staging.errors import ScratchNoRoom, StagedFileChanged, StagingBusy, StagingUnavailable, TakenOver

BUFFER_SIZE = 1024 * 1024
PENDING_INFIX = ".part-"
# How often a writer that is streaming tells the database it is alive (so no PATCH takes over).
ALIVE_EVERY_SECONDS = 5
MISSING_CODES = {"NoSuchKey", "NoSuchUpload", "404", "NotFound"}
CHANGED_CODES = {"PreconditionFailed", "412"}
KEY_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidSecurity", "403"}
FOR_ADMIN_KEYS = (
    "The object storage refuses the portal's keys: check STAGING_S3_ACCESS_KEY and "
    "STAGING_S3_SECRET_KEY (and that this key may use the bucket)."
)


def is_s3(storage) -> bool:
    from storages.backends.s3 import S3Storage  # only imported where object staging is looked for

    return isinstance(storage, S3Storage)


def _storage():
    return storages["staging"]


def client():
    return _storage().connection.meta.client


def bucket() -> str:
    return _storage().bucket_name


def key(name: str) -> str:
    prefix = (_storage().location or "").strip("/")
    return f"{prefix}/{name}" if prefix else name


def location_of(name: str) -> tuple[str, str]:
    return bucket(), key(name)


@contextmanager
def s3_errors(what: str) -> Iterator[None]:
    """Turn boto's errors into FileNotFoundError (no such object or upload) or StagingUnavailable
    with words a person can act on; the raw error goes to the log only."""
    try:
        yield
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in MISSING_CODES:
            raise FileNotFoundError(what) from None
        if code in CHANGED_CODES:  # If-Match: the object is another one than the one pinned
            raise StagedFileChanged(what) from None
        if code in KEY_CODES:
            _log().error("staging: object storage refused the portal's keys (%s) for %s", code, what)
            raise StagingUnavailable(
                gettext_noop("The portal cannot use its file storage just now. Nothing is lost: an administrator "
                             "has to fix the storage settings, then your upload continues."), for_admin=FOR_ADMIN_KEYS,
            ) from None
        _log().warning("staging: object storage error %s for %s", code, what)
        raise StagingUnavailable(gettext_noop("The portal's file storage had a problem; try again in a moment.")) from None
    except BotoCoreError as exc:  # unreachable, timed out, connection cut
        _log().warning("staging: object storage unreachable for %s: %s", what, type(exc).__name__)
        raise StagingUnavailable(
            gettext_noop("The portal cannot reach its file storage just now. Nothing is lost: try again in a moment.")
        ) from None


def _log():
    import logging

    return logging.getLogger("uploads.staging")


def _multipart():
    from uploads.models import StagedMultipart  # the app's models load after this package

    return StagedMultipart


# ---------------------------------------------------------------------------------------------
# Receiving


def free_bytes() -> int:
    """Object storage has no disk to fill: the owner limits bound what one person may stage."""
    return 2**63 - 1


def create(name: str, size: int) -> None:
    """Start the multipart upload the tus upload becomes."""
    with s3_errors(name):
        reply = client().create_multipart_upload(Bucket=bucket(), Key=key(name))
    _multipart().objects.create(name=name, size=size, multipart_id=reply["UploadId"])


# S3's smallest part (but the last one).
MIN_PART = 5 * 1024**2


def smallest_part(total: int) -> int:
    """The smallest part (but the last) a file of `total` bytes may have: parts that small still
    let the whole file fit in STAGING_S3_MAX_PARTS parts."""
    return max(MIN_PART, -(-total // settings.STAGING_S3_MAX_PARTS))


def part_size(total: int) -> int:
    """Where a PATCH that carries more cuts its parts: STAGING_S3_PART_SIZE, or larger when the
    file would not fit in STAGING_S3_MAX_PARTS parts of that size."""
    return max(settings.STAGING_S3_PART_SIZE, smallest_part(total))


def locked_for_writing(name: str, idle_seconds: float) -> "Writer":
    return Writer(name, idle_seconds)


class Writer:
    """The one request writing into a staged object, fenced by a generation number in its
    database row: a request takes the next number when no one is writing, or when the writer
    has given no sign of life for `idle_seconds`; a writer checks its number before it sends a
    part and when it records, and stops (TakenOver) when another took over."""

    def __init__(self, name: str, idle_seconds: float):
        self.name = name
        self.idle_seconds = idle_seconds
        self.row = None
        self.generation = 0
        self.parts: list = []
        self.pending_key = ""
        self.pending_size = 0
        self.committed: tuple = ()
        self.completed = False
        self.recovered = False  # the multipart upload had been completed by a request that died
        self.stale_pending: set[str] = set()
        self.last_alive = time.monotonic()
        self.confirmed = 0  # bytes of the current chunk in parts the store confirmed

    def __enter__(self) -> "Writer":
        rows = _multipart().objects
        row = rows.filter(name=self.name).first()
        if row is None:  # completed, aborted (cancelled, expired) or never made
            raise FileNotFoundError(self.name)
        now = timezone.now()
        free = Q(active_at__isnull=True) | Q(active_at__lte=now - timedelta(seconds=self.idle_seconds))
        if not rows.filter(free, pk=row.pk, generation=row.generation).update(
            generation=F("generation") + 1, active_at=now
        ):
            silent = (now - row.active_at).total_seconds() if row.active_at else 0
            raise StagingBusy(self.name, self.idle_seconds - silent)
        self.row = row
        self.generation = row.generation + 1
        self.parts, self.pending_key, self.pending_size = list(row.parts), row.pending_key, row.pending_size
        self.committed = (list(self.parts), self.pending_key, self.pending_size)
        return self

    def __exit__(self, *exc_info) -> None:
        _multipart().objects.filter(pk=self.row.pk, generation=self.generation).update(active_at=None)
        for stale in self.stale_pending:  # incomplete parts this writer put and did not keep
            _delete_object(stale)

    @property
    def offset(self) -> int:
        return sum(size for _, size, _ in self.parts) + self.pending_size

    def _alive(self, force: bool = False) -> None:
        """Check this writer still holds the upload, and say it is alive."""
        if not force and time.monotonic() - self.last_alive < ALIVE_EVERY_SECONDS:
            return
        if not _multipart().objects.filter(pk=self.row.pk, generation=self.generation).update(
            active_at=timezone.now()
        ):
            raise TakenOver(self.name)
        self.last_alive = time.monotonic()

    def write_at(self, offset: int, body, length: int, hasher=None,
                 progress: Callable[[int], None] | None = None) -> int:
        """Copy up to `length` bytes of `body` after the bytes staged so far (`offset`), one part
        at a time; returns how many were kept. A client that goes away mid-chunk leaves what
        arrived: the bytes that do not fill a part go to a new incomplete part object."""
        if offset != self.offset:  # the caller checked the row; the row and this agree
            raise TakenOver(self.name)
        if offset + length == self.row.size and self._completed_earlier():
            return self._take_as_sent(body, length, hasher)
        with tempfile.TemporaryFile(dir=_scratch_dir()) as spool, \
                tempfile.TemporaryFile(dir=_scratch_dir()) as spare:
            if self.pending_size:
                self._copy_pending(spool)
            written, spool = self._fill_parts(spool, spare, body, length, hasher, progress)
            try:
                self._keep_rest(spool)
            except StagingUnavailable as away:  # the parts before it are in the store: keep them
                away.written = self.confirmed
                raise
        return written

    def _completed_earlier(self) -> bool:
        """A request that sent the last part completed the multipart upload, then died before
        it recorded that: the object is whole, and only this row is behind."""
        try:
            with s3_errors(self.name):
                found = client().head_object(Bucket=bucket(), Key=key(self.name))["ContentLength"]
        except FileNotFoundError:
            return False
        return found == self.row.size

    def _take_as_sent(self, body, length: int, hasher) -> int:
        """The client sends the end of the file again: read it (for its checksum) and count the
        object as whole."""
        buffer = memoryview(bytearray(min(BUFFER_SIZE, max(length, 1))))
        read = 0
        while read < length and (count := body.readinto(buffer[: min(len(buffer), length - read)])):
            if hasher is not None:
                hasher.update(buffer[:count])
            read += count
        if read == length:
            self.parts, self.pending_key, self.pending_size = [], "", self.row.size
            self.recovered = True
        return read if read == length else 0

    def _fill_parts(self, spool, spare, body, length: int, hasher, progress):
        """Receive into `spool` until it holds a part, then send that part from a thread while
        the next one is received into the other spool file: receiving and sending overlap, and
        at most two parts wait on the local disk (never in memory). A part joins `parts` only
        once the store confirmed it, in order, so what record() stores is always what the
        store holds. Returns the bytes kept and the spool holding the rest."""
        written = 0
        buffer = memoryview(bytearray(min(BUFFER_SIZE, max(length, 1))))
        sender = _PartSender(self)
        self.confirmed = 0
        try:
            while written < length:
                room = part_size(self.row.size) - spool.tell()
                try:
                    count = body.readinto(buffer[: min(len(buffer), length - written, room)])
                except OSError:  # the client went away mid-chunk
                    break
                if not count:
                    break
                if hasher is not None:
                    hasher.update(buffer[:count])
                spool.write(buffer[:count])
                written += count
                self._alive()
                if spool.tell() == part_size(self.row.size) and written < length:
                    self._confirm(sender.wait(), progress)
                    self._alive(force=True)
                    sender.send(spool, len(self.parts) + 1, written)
                    spool, spare = spare, spool
                    spool.seek(0)
                    spool.truncate()
            self._confirm(sender.wait(), progress)
        except StagingUnavailable as away:
            away.written = self.confirmed  # the caller records the parts the store holds
            raise
        finally:
            sender.close()  # a part still in flight ends before its spool file is closed
        return written, spool

    def _confirm(self, sent: tuple | None, progress) -> None:
        """A part the store confirmed (number, size, ETag, the chunk's bytes up to its end)."""
        if sent is None:
            return
        number, size, etag, written = sent
        self.parts.append([number, size, etag])
        self.pending_key, self.pending_size = "", 0
        self.confirmed = written
        if progress is not None:
            progress(written)

    def _copy_pending(self, spool) -> None:
        with s3_errors(self.name):
            reply = client().get_object(Bucket=bucket(), Key=self.pending_key,
                                        Range=f"bytes=0-{self.pending_size - 1}")
            _copy_stream(reply["Body"], spool, self.pending_size)
        self.pending_size = 0  # now the start of the spooled part

    def _send_part(self, spool) -> None:
        """Send the spooled bytes (the spool holds one part and nothing else) as the next part,
        and empty the spool."""
        self._alive(force=True)
        number, size = len(self.parts) + 1, spool.tell()
        spool.seek(0)
        with s3_errors(self.name):
            reply = client().upload_part(Bucket=bucket(), Key=key(self.name), UploadId=self.row.multipart_id,
                                         PartNumber=number, Body=spool, ContentLength=size)
        self.parts.append([number, size, reply["ETag"]])
        self.pending_key, self.pending_size = "", 0
        spool.seek(0)
        spool.truncate()

    def _keep_rest(self, spool) -> None:
        """The bytes at the end of a PATCH: a part of their own when they are enough for one
        (or the file is whole), else an incomplete part object of this writer's own (a silent
        writer that wakes up cannot overwrite the one the next writer keeps). So a PATCH of any
        size at least the smallest part never waits in, nor re-reads, an incomplete part."""
        size = spool.tell()
        if not size:
            return
        if self.offset + size == self.row.size or size >= smallest_part(self.row.size):
            self._send_part(spool)
            return
        self._alive(force=True)
        pending = f"{key(self.name)}{PENDING_INFIX}{self.generation}-{uuid.uuid4().hex[:8]}"
        spool.seek(0)
        with s3_errors(self.name):
            client().put_object(Bucket=bucket(), Key=pending, Body=spool, ContentLength=size)
        self.stale_pending.add(pending)
        self.pending_key, self.pending_size = pending, size

    def truncate(self, offset: int) -> None:
        """Forget what this writer sent since the last record (a chunk with a wrong checksum):
        parts sent again later overwrite those of the same number."""
        self.parts, self.pending_key, self.pending_size = list(self.committed[0]), *self.committed[1:]
        if self.offset != offset:
            raise TakenOver(self.name)

    def seek(self, offset: int) -> None:  # the local writer's interface; nothing to do here
        pass

    def record(self, update: Callable[[], bool]) -> bool:
        """Store the parts and the incomplete part in the row together with `update` (the
        upload's offset), only while still the writer; the last byte completes the upload."""
        if self.completed:
            return update()
        whole = self.offset == self.row.size
        if whole and not self.recovered:
            self._alive(force=True)
            self._complete()
        with transaction.atomic():
            rows = _multipart().objects.filter(pk=self.row.pk, generation=self.generation)
            if whole:
                kept = rows.delete()[0]
            else:
                kept = rows.update(parts=self.parts, pending_key=self.pending_key, pending_size=self.pending_size,
                                   active_at=timezone.now())
            if not kept:
                raise TakenOver(self.name)
            if not update():
                transaction.set_rollback(True)
                return False
        self.completed = whole
        old_pending = self.committed[1]
        self.committed = (list(self.parts), self.pending_key, self.pending_size)
        self.stale_pending.discard(self.pending_key)
        if old_pending and old_pending != self.pending_key:
            self.stale_pending.add(old_pending)
        if whole and self.pending_key:
            self.stale_pending.add(self.pending_key)
        return True

    def _complete(self) -> None:
        parts = [{"PartNumber": number, "ETag": etag} for number, _, etag in self.parts]
        with s3_errors(self.name):
            if not parts:  # an empty file: S3 has no multipart upload of no parts
                client().put_object(Bucket=bucket(), Key=key(self.name), Body=b"")
                client().abort_multipart_upload(Bucket=bucket(), Key=key(self.name), UploadId=self.row.multipart_id)
                return
            client().complete_multipart_upload(Bucket=bucket(), Key=key(self.name), UploadId=self.row.multipart_id,
                                               MultipartUpload={"Parts": parts})


class _PartSender:
    """Sends one part at a time in a thread of its own (boto3's clients may be shared between
    threads; the database is only touched by the request's thread)."""

    def __init__(self, writer: Writer):
        self.writer = writer
        self.pool: ThreadPoolExecutor | None = None
        self.future = None

    def send(self, spool, number: int, written: int) -> None:
        if self.pool is None:
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="s3-part")
        self.future = self.pool.submit(self._send, spool, number, written)

    def _send(self, spool, number: int, written: int) -> tuple:
        size = spool.tell()
        spool.seek(0)
        writer = self.writer
        with s3_errors(writer.name):
            reply = client().upload_part(Bucket=bucket(), Key=key(writer.name), UploadId=writer.row.multipart_id,
                                         PartNumber=number, Body=spool, ContentLength=size)
        return number, size, reply["ETag"], written

    def wait(self) -> tuple | None:
        """The part in flight, once the store confirmed it (its error if it failed); None if none."""
        future, self.future = self.future, None
        return None if future is None else future.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def _copy_stream(stream, out, size: int) -> int:
    copied = 0
    while copied < size:
        data = stream.read(min(BUFFER_SIZE, size - copied))
        if not data:
            break
        out.write(data)
        copied += len(data)
    return copied


# ---------------------------------------------------------------------------------------------
# Reading


def size(name: str) -> int | None:
    """The object's size; while it is being received, the bytes staged so far; None when gone."""
    try:
        with s3_errors(name):
            return client().head_object(Bucket=bucket(), Key=key(name))["ContentLength"]
    except FileNotFoundError:
        row = _multipart().objects.filter(name=name).first()
        return None if row is None else sum(size for _, size, _ in row.parts) + row.pending_size


def version(name: str) -> list | None:
    """A completed object's size and ETag (a new write makes a new ETag); None while it is gone
    or still being received."""
    try:
        with s3_errors(name):
            head = client().head_object(Bucket=bucket(), Key=key(name))
    except FileNotFoundError:
        return None
    return [head["ContentLength"], head["ETag"]]


class ObjectReader(io.RawIOBase):
    """One streaming GET of an object (or of a range of it), read in the caller's buffers; with
    `etag`, only of that version of the object (If-Match: StagedFileChanged otherwise)."""

    def __init__(self, name: str, byte_range: str | None = None, etag: str | None = None):
        self.name = name
        extra = {"Range": byte_range} if byte_range else {}
        if etag:
            extra["IfMatch"] = etag
        with s3_errors(name):
            reply = client().get_object(Bucket=bucket(), Key=key(name), **extra)
        self.body = reply["Body"]
        self.length = reply["ContentLength"]

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        # The body's own bytes, without the copy into a buffer readinto() makes (the push reads so).
        with s3_errors(self.name):
            return self.body.read(None if size is None or size < 0 else size)

    def readinto(self, buffer) -> int:
        with s3_errors(self.name):
            data = self.body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self.body.close()
        super().close()


def open_for_reading(name: str, version: list | None = None) -> "ReadAhead":
    """One streaming GET; with `version` (see version()), of that version only. A thread reads
    ahead (READ_AHEAD_BUFFERS of 1 MiB at most), so that the bytes come from the store while the
    caller sends the previous ones on (the push: to IMS)."""
    return ReadAhead(ObjectReader(name, etag=version[1] if version else None))


READ_AHEAD_BUFFERS = 4


class ReadAhead(io.RawIOBase):
    """A stream read by a thread of its own into a bounded queue: receiving from the store and
    whatever the reader does with the bytes overlap, in at most READ_AHEAD_BUFFERS buffers."""

    def __init__(self, reader: ObjectReader):
        self.reader = reader
        self.length = reader.length
        self._queue = queue.Queue(maxsize=READ_AHEAD_BUFFERS)
        self._left = memoryview(b"")
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._fill, name="s3-read-ahead", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                data = self.reader.read(BUFFER_SIZE)
                self._put(data)
                if not data:
                    return
        except BaseException as exc:  # handed to the reader, raised in its thread
            self._put(exc)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return b"".join(iter(lambda: self.read(BUFFER_SIZE), b""))
        if not self._left:
            if self._done:
                return b""
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._done = True
                raise item
            if not item:
                self._done = True
                return b""
            self._left = memoryview(item)
        data, self._left = self._left[:size], self._left[size:]
        return bytes(data) if len(data) < len(data.obj) else data.obj

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._stop.set()
            self._thread.join(timeout=30)
            self.reader.close()
        super().close()


def read_range(name: str, offset: int, length: int) -> bytes:
    """`length` bytes from `offset` (fewer at the end of the object), by one ranged GET."""
    with ObjectReader(name, f"bytes={offset}-{offset + length - 1}") as reader:
        return reader.read()


class ObjectImage:
    """A staged object as uploads/diskimage.py's Image, pinned to one version (its ETag): the
    check reads only what it needs, by ranged GETs, and qemu-img reads it through
    uploads/nbd.py; nothing is copied to a local disk (bench/README.md: why, and the figures).

    Ranges are fetched in aligned blocks of BLOCK bytes (at least), and the last BLOCKS_KEPT
    blocks are kept: qemu-img asks for a cluster at a time, and a format's tables sit together,
    so a few GETs serve many of its reads, in bounded memory."""

    BLOCK = 256 * 1024
    BLOCKS_KEPT = 16

    def __init__(self, name: str, version: list):
        self.name = name
        self.version = version
        self.size, self.etag = version
        self.path = None
        self._blocks: dict[int, bytes] = {}  # block number -> bytes; insertion order: oldest first
        self._lock = threading.Lock()  # the NBD export may read from a thread per connection
        self.gets = 0

    def open(self) -> "SequentialReader":
        return SequentialReader(self)

    def read_at(self, offset: int, length: int) -> bytes:
        with self._lock:
            return self._read_at(offset, length)

    def _read_at(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        first, last = offset // self.BLOCK, (end - 1) // self.BLOCK
        missing = [n for n in range(first, last + 1) if n not in self._blocks]
        if missing:
            self._fetch(missing[0], missing[-1])
        data = b"".join(self._blocks[n] for n in range(first, last + 1))
        return data[offset - first * self.BLOCK : end - first * self.BLOCK]

    def _fetch(self, first: int, last: int) -> None:
        start, stop = first * self.BLOCK, min((last + 1) * self.BLOCK, self.size)
        self.gets += 1
        with ObjectReader(self.name, f"bytes={start}-{stop - 1}", etag=self.etag) as reader:
            for n in range(first, last + 1):
                want = min(self.BLOCK, stop - n * self.BLOCK)
                block = reader.read(want)
                if len(block) != want:
                    raise StagingUnavailable("The portal's file storage had a problem; try again in a moment.")
                self._blocks.pop(n, None)
                self._blocks[n] = block
        while len(self._blocks) > max(self.BLOCKS_KEPT, last - first + 1):
            del self._blocks[next(iter(self._blocks))]

    def range_reader(self, offset: int, length: int) -> ObjectReader:
        return ObjectReader(self.name, f"bytes={offset}-{offset + length - 1}", etag=self.etag)


class SequentialReader(io.RawIOBase):
    """The object from its start, read in order by ranged GETs of growing length (1 MiB first:
    most formats are decided within it; up to 64 MiB for a file read through), each streamed in
    the caller's buffers; closing stops after the current range."""

    FIRST, LARGEST = 1024 * 1024, 64 * 1024 * 1024

    def __init__(self, image: ObjectImage):
        self.image = image
        self.position = 0
        self.window = self.FIRST
        self.reader: ObjectReader | None = None
        self.left = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.position >= self.image.size or not len(buffer):
            return 0
        if not self.left:
            if self.reader is not None:
                self.reader.close()
            self.left = min(self.window, self.image.size - self.position)
            self.reader = self.image.range_reader(self.position, self.left)
            self.window = min(self.window * 4, self.LARGEST)
        count = self.reader.readinto(memoryview(buffer)[: min(len(buffer), self.left)])
        if not count:
            raise StagingUnavailable("The portal's file storage had a problem; try again in a moment.")
        self.left -= count
        self.position += count
        return count

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
        super().close()


def image(name: str) -> ObjectImage:
    """The staged object as it is now, pinned (FileNotFoundError while it is not whole)."""
    pinned = version(name)
    if pinned is None:
        raise FileNotFoundError(name)
    return ObjectImage(name, pinned)


def _scratch_dir() -> str:
    os.makedirs(settings.STAGING_SCRATCH_DIR, exist_ok=True)
    return settings.STAGING_SCRATCH_DIR


@contextmanager
def local_copy(name: str, version: list | None = None) -> Iterator[str]:
    """A scratch copy of the object (of that `version` only, when given) for a program that
    needs a file (qemu-img convert), after checking the scratch folder has room for it (and the
    reserve); deleted when the block ends."""
    folder = _scratch_dir()
    with open_for_reading(name, version) as reader:
        free = shutil.disk_usage(folder).free
        if free < reader.length + settings.STAGING_FREE_RESERVE_BYTES:
            _log().warning("staging: no scratch room for %s (%s bytes, %s free)", name, reader.length, free)
            raise ScratchNoRoom(name)
        copy = os.path.join(folder, f"{uuid.uuid4().hex}-{name}")
        try:
            with open(copy, "wb") as out:
                shutil.copyfileobj(reader, out, BUFFER_SIZE)
            yield copy
        finally:
            _unlink(copy)


@contextmanager
def local_output(name: str) -> Iterator[str]:
    """A scratch file for a local program to write; staged as `name` when the block succeeds."""
    target = os.path.join(_scratch_dir(), f"{uuid.uuid4().hex}-{name}")
    try:
        yield target
        with s3_errors(name):
            client().upload_file(target, bucket(), key(name))
    finally:
        _unlink(target)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------------------------------
# Clean-up


def _delete_object(object_key: str) -> None:
    try:
        with s3_errors(object_key):
            client().delete_object(Bucket=bucket(), Key=object_key)
    except FileNotFoundError:
        pass


def delete(name: str) -> None:
    """The object, and an unfinished multipart upload with its incomplete part: aborted."""
    row = _multipart().objects.filter(name=name).first()
    if row is not None:
        try:
            with s3_errors(name):
                client().abort_multipart_upload(Bucket=bucket(), Key=key(name), UploadId=row.multipart_id)
        except FileNotFoundError:
            pass
        if row.pending_key:
            _delete_object(row.pending_key)
        row.delete()
    _delete_object(key(name))


def abort_orphans(older_than) -> int:
    """Abort the multipart uploads under the prefix started before `older_than` that no row
    owns (a crash between starting one and saving its row), and delete incomplete part objects
    no row names; returns how many were removed."""
    owned = set(_multipart().objects.values_list("multipart_id", flat=True))
    kept = set(_multipart().objects.exclude(pending_key="").values_list("pending_key", flat=True))
    prefix = key("")
    count = 0
    with s3_errors("clean-up"):
        pages = client().get_paginator("list_multipart_uploads").paginate(Bucket=bucket(), Prefix=prefix)
        for page in pages:
            for found in page.get("Uploads", []):
                if found["UploadId"] not in owned and found["Initiated"] < older_than:
                    client().abort_multipart_upload(Bucket=bucket(), Key=found["Key"], UploadId=found["UploadId"])
                    count += 1
        for page in client().get_paginator("list_objects_v2").paginate(Bucket=bucket(), Prefix=prefix):
            for found in page.get("Contents", []):
                if PENDING_INFIX in found["Key"] and found["Key"] not in kept and found["LastModified"] < older_than:
                    client().delete_object(Bucket=bucket(), Key=found["Key"])
                    count += 1
    return count
