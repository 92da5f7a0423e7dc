"""MD5 and SHA-512 of an upload as it arrives, kept from one tus PATCH to the next in this process.

The push needs both sums of the whole file (IMS reports them back: `checksum`, `os_hash_value`).
Computed while the browser sends, where the client's network is the limit, they cost the push
nothing. hashlib's state cannot be saved, so it lives here, in the web process that received the
bytes so far: `take(upload_id, offset)` hands out the sums of bytes [0, offset) (new ones at
offset 0) and forgets them, so that no two requests ever feed the same objects; the PATCH that
continued them gives them back with `keep()` under its new offset once that offset is recorded.
A PATCH that lands on another process, or after a restart, finds nothing: from there on this
upload is not hashed on arrival, and the worker hashes it while sending, as before.

Bytes below a recorded offset never change (tus only appends; a PATCH truncates the file to the
recorded offset before it writes), so sums kept for (upload, offset) stay right for as long as
the upload lives. The table is bounded (least recently kept go first); no Django here.
"""

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

# Uploads whose sums one process keeps at most: a few hundred bytes each.
MOST_KEPT = 1000


@dataclass
class RunningSums:
    """The sums of bytes [0, offset) of one upload."""

    offset: int
    md5: "hashlib._Hash" = field(default_factory=lambda: hashlib.md5(usedforsecurity=False))
    sha512: "hashlib._Hash" = field(default_factory=hashlib.sha512)

    def copy(self) -> "RunningSums":
        return RunningSums(self.offset, self.md5.copy(), self.sha512.copy())

    def hexdigests(self) -> tuple[str, str]:
        return self.md5.hexdigest(), self.sha512.hexdigest()


_kept: "OrderedDict[int, RunningSums]" = OrderedDict()
_lock = threading.Lock()


def take(upload_id: int, offset: int) -> RunningSums | None:
    """The sums of bytes [0, offset) of this upload, now the caller's alone; None when this
    process does not have them (they were made elsewhere, or evicted)."""
    with _lock:
        kept = _kept.pop(upload_id, None)
    if offset == 0:
        return RunningSums(0)
    if kept is not None and kept.offset == offset:
        return kept
    return None


def keep(upload_id: int, sums: RunningSums) -> None:
    """Keep the sums for the next PATCH of this upload (at `sums.offset`)."""
    with _lock:
        _kept[upload_id] = sums
        _kept.move_to_end(upload_id)
        while len(_kept) > MOST_KEPT:
            _kept.popitem(last=False)


def forget(upload_id: int) -> None:
    with _lock:
        _kept.pop(upload_id, None)
