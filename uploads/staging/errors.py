"""What staging raises, whichever backend holds the bytes."""


class StagingBusy(Exception):
    """Another request is writing to the same staged file right now; `retry_after` seconds from
    now it will have been silent for long enough to be taken over (if it is still silent)."""

    def __init__(self, name: str, retry_after: float = 1):
        super().__init__(name)
        self.retry_after = max(1, int(retry_after + 0.999))


class StagingFull(Exception):
    """The staging disk has no room left for the bytes being written; `written` bytes were
    written before it filled up."""

    def __init__(self, name: str, written: int = 0):
        super().__init__(name)
        self.written = written


class TakenOver(Exception):
    """Another request took this staged file over (this writer had been silent for too long):
    this one must neither write nor record anything more."""


class StagingUnavailable(OSError):
    """The object storage cannot be used just now (unreachable, or it refuses the portal's
    keys). `message` is for the person who sees it; `for_admin` says what an administrator
    has to do, when retrying alone cannot help."""

    def __init__(self, message: str, *, for_admin: str = "", written: int = 0):
        super().__init__(message)
        self.message = message
        self.for_admin = for_admin
        self.written = written  # of a chunk: the bytes the store confirmed before it went away


class ScratchNoRoom(Exception):
    """The local scratch folder has no room for a copy of a staged object."""


class StagedFileChanged(Exception):
    """The staged file is no longer the version that was checked (another size, modification
    time or ETag): what was checked must be what is sent, so it is not read."""
