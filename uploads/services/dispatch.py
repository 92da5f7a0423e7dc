"""Queueing work for the Celery workers, once the database change that asks for it is committed.

Services import this module; tasks import services only inside their functions, so that the two
never import each other at load time.
"""

from django.db import transaction

from uploads import tasks
from uploads.services.state import NO_ERROR, move
from uploads.models import Status, Upload


def enqueue_push(upload_id: int) -> None:
    # robust: with Redis away the message is lost, not the request; the reconciler queues it later.
    transaction.on_commit(lambda: tasks.push_upload.delay(upload_id), robust=True)


def enqueue_early_push(upload_id: int) -> None:
    """Send a receiving upload on to IMS while it arrives (services/early_push.py)."""
    transaction.on_commit(lambda: tasks.early_push_upload.delay(upload_id), robust=True)


def enqueue_discard(upload_id: int) -> None:
    transaction.on_commit(lambda: tasks.discard_upload.delay(upload_id), robust=True)


def requeue(upload: Upload, message: str, **fields) -> bool:
    """Send it again because a person acted: automatic retries count afresh from here."""
    if not move(upload, Status.RECEIVED, message, requeued_at_attempt=upload.attempt, **NO_ERROR, **fields):
        return False
    enqueue_push(upload.pk)
    return True
