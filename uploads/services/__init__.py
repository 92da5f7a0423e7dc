"""Every change of an upload's state, and of a user's cloud connection, happens in this package:
one module per stage of the pipeline, in the order an upload meets them.

- state: the one guarded `move`, timeline notes, the fields every stage writes with them;
- dispatch: queueing a push or a discard once the change that asks for it is committed;
- cloud: the owner's cloud account, the token a push or a poll uses, and how long a push takes;
- receive: tus creation (within the owner's limits), chunks, expiry;
- check: what the staged file really is, converting it when IMS does not take its format;
- early_push: sending a file on to IMS while the browser still uploads it, its end held back
  until the whole file passed the check;
- push: claim, send, heartbeat, take-over of a dead worker, retry or fail;
- images: the image record in IMS (prepare, compare what it stored, delete);
- poll: following the image in IMS until it is Ready or failed;
- actions: retry, use another format, cancel or remove, the clean-up after them.

Tasks and views are thin: they call the public names below with ids and plain values.
"""

from uploads.services.actions import staging_cleanup, upload_cancel, upload_discard, upload_retry, upload_use_format
from uploads.services.cloud import (
    ASSUMED_SEND_RATE,
    LONGEST_TOKEN_WAIT,
    TOKEN_MARGIN,
    cloud_account_connect,
    cloud_account_disconnect,
    cloud_account_usable,
    expected_send_rate,
)
from uploads.services.early_push import upload_push_early
from uploads.services.poll import uploads_due_for_poll, upload_poll
from uploads.services.push import MAX_PUSH_ATTEMPTS, upload_push, uploads_to_reconcile
from uploads.services.receive import (
    ChecksumMismatch,
    OffsetConflict,
    StagingNoRoom,
    UploadLimitReached,
    UploadStopped,
    upload_create,
    upload_expire,
    upload_receive,
)
from uploads.services.state import PushOutcome, ServiceError

__all__ = [
    "ASSUMED_SEND_RATE",
    "LONGEST_TOKEN_WAIT",
    "MAX_PUSH_ATTEMPTS",
    "TOKEN_MARGIN",
    "ChecksumMismatch",
    "OffsetConflict",
    "PushOutcome",
    "ServiceError",
    "StagingNoRoom",
    "UploadLimitReached",
    "UploadStopped",
    "cloud_account_connect",
    "cloud_account_disconnect",
    "cloud_account_usable",
    "expected_send_rate",
    "staging_cleanup",
    "upload_cancel",
    "upload_create",
    "upload_discard",
    "upload_expire",
    "upload_poll",
    "upload_push",
    "upload_push_early",
    "upload_receive",
    "upload_retry",
    "upload_use_format",
    "uploads_due_for_poll",
    "uploads_to_reconcile",
]
