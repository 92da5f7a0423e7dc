"""The one way an upload changes status, and what every stage writes with it.

Each move is a guarded UPDATE (`filter(pk=…, status=old).update(status=new)`): when nothing got
updated, another request or worker got there first and this one does nothing. Every move is
written to the timeline as an UploadEvent in the same transaction.
"""

import logging
from dataclasses import dataclass
from datetime import timedelta

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from uploads import notifications, staging
from uploads.errors import PortalError
from uploads.ims import HINT_CONTACT_ADMIN
from uploads.models import ErrorCode, Status, Upload, UploadEvent, can_move

log = logging.getLogger(__name__)

NO_ERROR = {"error_message": "", "error_hint": "", "error_code": ""}
# Progress (bytes sent, percent converted) is written to the row at most this often: often
# enough for the live page, seldom enough for the database.
PROGRESS_WRITE_SECONDS = 1.0


class ServiceError(Exception):
    """A request that cannot be done now; the message is for the person who asked."""


@dataclass
class PushOutcome:
    """What the task should do next: nothing, or try again after `retry_in` seconds."""

    retry_in: float | None = None


def move(
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
        event = UploadEvent.objects.create(
            upload_id=upload.pk, from_status=old, to_status=to, message=message, detail=detail
        )
        # Mails about the move (ready, failed ..., awaiting review) are queued for when it is committed.
        notifications.upload_moved(to, event.pk)
    for key, value in fields.items():
        setattr(upload, key, value)
    log.info("upload %s: %s -> %s: %s", upload.pk, old, to, message)
    return True


def note(upload: Upload, message: str, detail: str = "") -> None:
    """A timeline line that is not a change of status."""
    UploadEvent.objects.create(upload_id=upload.pk, message=message, detail=detail)


# ---------------------------------------------------------------------------------------------
# What ends an attempt: one error type (uploads.errors.PortalError), one way to record it


def error_fields(error: PortalError) -> dict:
    """The row's error fields for `error`; every error the person sees comes with a hint."""
    return {"error_message": error.message, "error_hint": error.hint or HINT_CONTACT_ADMIN,
            "error_code": error.code}


def end_with(upload: Upload, error: PortalError, *, event: str = "", on_attempt: int | None = None, **fields) -> bool:
    """The one way an error stops an upload: it waits for a new sign-in when one cures the
    error (ErrorCode.CURED_BY_RECONNECT), else it fails. `event`: the timeline's words, when
    they are not the error's message."""
    to = Status.RECONNECT if error.code in ErrorCode.CURED_BY_RECONNECT else Status.FAILED
    return move(upload, to, event or error.message, detail=error.detail, on_attempt=on_attempt,
                **error_fields(error), **fields)


def save(upload: Upload, attempt: int, **fields) -> None:
    """Write fields of the upload this worker holds (same attempt), and keep the copy in step."""
    Upload.objects.filter(pk=upload.pk, attempt=attempt).update(**fields)
    for key, value in fields.items():
        setattr(upload, key, value)


def delete_staged(upload: Upload, message: str) -> None:
    staging.delete(upload.staged_name)
    staging.delete(upload.converted_name)
    now = timezone.now()
    if Upload.objects.filter(pk=upload.pk, staged_deleted_at__isnull=True).update(staged_deleted_at=now):
        upload.staged_deleted_at = now
        note(upload, message)


def duration(delta: timedelta) -> str:
    minutes = max(1, int(delta.total_seconds() // 60))
    return f"{minutes} minutes" if minutes < 120 else f"{minutes // 60} hours"
