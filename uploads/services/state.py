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

from uploads import staging
from uploads.ims import ImsError
from uploads.models import Status, Upload, UploadEvent, can_move

log = logging.getLogger(__name__)

NO_ERROR = {"error_message": "", "error_hint": "", "error_code": ""}


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
        UploadEvent.objects.create(
            upload_id=upload.pk, from_status=old, to_status=to, message=message, detail=detail
        )
    for key, value in fields.items():
        setattr(upload, key, value)
    log.info("upload %s: %s -> %s: %s", upload.pk, old, to, message)
    return True


def note(upload: Upload, message: str, detail: str = "") -> None:
    """A timeline line that is not a change of status."""
    UploadEvent.objects.create(upload_id=upload.pk, message=message, detail=detail)


def error_fields(exc: ImsError) -> dict:
    return {"error_message": exc.message, "error_hint": exc.hint, "error_code": exc.code or exc.kind}


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
