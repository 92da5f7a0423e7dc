"""Where uploaded bytes wait between the browser and IMS: the storage named "staging".

One small interface over two backends, chosen by STORAGES["staging"]: a local folder
(`local.py`, FileSystemStorage) or S3-compatible object storage (`s3.py`, django-storages'
S3Storage). Nothing outside this package knows which one holds the bytes:

- `create(name, size)`, then `locked_for_writing(name, idle)` + `write_at(...)` + the writer's
  `record(...)` for each tus chunk;
- `image(name)`: what the check reads (diskimage's Image), pinned to the file's `version()`: a
  local file, or an object read by ranged GETs (qemu-img reads it over NBD, uploads/nbd.py);
- `open_for_reading(name, version)`: one stream, read in fixed buffers (the push, the
  checksums), of the checked version only (StagedFileChanged otherwise);
- `local_copy(name, version)`: a local path for a program that needs a file (qemu-img convert):
  the file itself, or a scratch copy of the object, deleted afterwards; `local_output(name)`
  the other way round;
- `size`, `exists`, `delete`, `free_bytes`, and `abort_orphans` for the clean-up.
"""

from django.core.files.storage import storages

from uploads.staging import checks, local, s3  # noqa: F401  (checks: registers the deploy check)
from uploads.staging.errors import (
    ScratchNoRoom, StagedFileChanged, StagingBusy, StagingFull, StagingUnavailable, TakenOver,
)

__all__ = [
    "ScratchNoRoom", "StagedFileChanged", "StagingBusy", "StagingFull", "StagingUnavailable", "TakenOver", "Writer", "abort_orphans",
    "create",
    "delete", "exists", "free_bytes", "image", "is_object_storage", "local_copy", "local_output", "locked_for_writing",
    "name_for", "object_location", "open_for_reading", "path", "size", "version", "write_at",
]


# What locked_for_writing() gives: the writer of either backend.
Writer = local.Writer | s3.Writer


def _backend():
    return s3 if is_object_storage() else local


def is_object_storage() -> bool:
    return s3.is_s3(storages["staging"])


def name_for(upload_uid, suffix: str = "img") -> str:
    return f"{upload_uid}.{suffix}"


def free_bytes() -> int:
    return _backend().free_bytes()


def create(name: str, size: int) -> None:
    """Make an empty staged file of `size` bytes to come."""
    _backend().create(name, size)


def locked_for_writing(name: str, idle_seconds: float = 60):
    """The staged file, opened for writing by this request alone (StagingBusy when another
    request is writing and has not been silent for `idle_seconds`); a context manager."""
    return _backend().locked_for_writing(name, idle_seconds)


def write_at(staged, offset: int, body, length: int, hasher=None, progress=None, hashing=None) -> int:
    """Copy up to `length` bytes of `body` into the staged file at `offset`; see local.write_at.
    `hashing` (the sums computed on arrival) is for a local file only: object staging gets None."""
    if isinstance(staged, s3.Writer):
        return staged.write_at(offset, body, length, hasher, progress)
    return local.write_at(staged, offset, body, length, hasher, progress, hashing)


def size(name: str) -> int | None:
    return _backend().size(name)


def exists(name: str) -> bool:
    return size(name) is not None


def version(name: str) -> list | None:
    """What changes whenever the staged file is written or replaced (None when it is gone): a
    file's size, modification time and inode; an object's size and ETag."""
    return _backend().version(name)


def image(name: str):
    """The staged file as the check reads it (uploads/diskimage.py's Image), with `.version`:
    the version() it is pinned to (FileNotFoundError when it is gone or not whole)."""
    return _backend().image(name)


def open_for_reading(name: str, version: list | None = None):
    """A binary stream of the staged file (FileNotFoundError when it is gone); with `version`,
    of that version only (StagedFileChanged when the file is another one now)."""
    return _backend().open_for_reading(name, version)


def local_copy(name: str, version: list | None = None):
    """A context manager yielding a local path of the staged file (ScratchNoRoom,
    FileNotFoundError; StagedFileChanged when `version` is given and the file is another one)."""
    return _backend().local_copy(name, version)


def local_output(name: str):
    """A context manager yielding a local path to write a new staged file `name` into; it is
    staged when the block ends without an error."""
    return _backend().local_output(name)


def delete(name: str) -> None:
    if name:
        _backend().delete(name)


def abort_orphans(older_than) -> int:
    """Abort unfinished multipart uploads started before `older_than` that no upload owns."""
    return _backend().abort_orphans(older_than)


def path(name: str) -> str:
    """The local path of a staged file: local staging only (tests and tools that look at it)."""
    return local.path(name)


def object_location(name: str) -> tuple[str, str]:
    """(bucket, object key) of a staged file in object storage, for IMS's import from OBS."""
    return s3.location_of(name)
