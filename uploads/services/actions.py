"""What the owner (or an admin) asks for: retry, send as another format, cancel or remove;
and the clean-up that follows (the discard after a cancel, staged copies nobody needs)."""

from datetime import timedelta

from django.conf import settings
from django.db.models import Q
from django.utils import timezone
from django.utils.translation import gettext, gettext_noop

from uploads import staging
from uploads.i18n import stored_text
from uploads.models import RECEIVING_STATES, RETRYABLE, DiskFormat, Status, Upload
from uploads.services import cloud, dispatch, images
from uploads.services.receive import upload_expire
from uploads.services.state import NO_ERROR, ServiceError, delete_staged, move, note


def upload_retry(*, upload: Upload, by) -> None:
    if upload.status == Status.REFUSED:
        why = gettext("This file was refused by the check, and sending the same file again would be refused the "
                      "same way.")
        raise ServiceError(f"{why} {stored_text(upload.error_hint)}".strip())
    if upload.status not in RETRYABLE:
        raise ServiceError(gettext("Only a failed upload, or one waiting for a new cloud sign-in, can be retried."))
    if upload.status == Status.RECONNECT and cloud.why_token_cannot_push(cloud.owner_token(upload.owner_id), upload):
        raise ServiceError(gettext(
            "The cloud sign-in of this upload's owner has expired: reconnect on the Cloud account page, "
            "and the upload continues by itself."
        ))
    _requeue_for_person(upload, gettext_noop("Retry requested by %(who)s") % {"who": by})


def _requeue_for_person(upload: Upload, message: str, **fields) -> None:
    """dispatch.requeue for a button press: say why it cannot be done."""
    if not staging.exists(upload.staged_name):
        raise ServiceError(gettext("The staged copy of this file is gone: please upload the file again."))
    if not dispatch.requeue(upload, message, **fields):
        raise ServiceError(gettext("This upload changed in the meantime; reload the page and try again."))


def upload_use_format(*, upload: Upload, disk_format: str, by) -> None:
    """The one-click fix for a refused file: check and send the staged file again as the format
    the check found in it (Upload.suggested_format)."""
    if not disk_format or disk_format != upload.suggested_format:
        if upload.status == Status.REFUSED and not upload.has_staged_copy:
            raise ServiceError(gettext("The portal no longer keeps this file: upload it again, choosing the right "
                                       "format."))
        raise ServiceError(gettext("This upload can no longer be changed that way; reload the page."))
    label = DiskFormat(disk_format).label
    _requeue_for_person(upload, gettext_noop("%(who)s chose to send the file as %(format)s") % {
        "who": by, "format": label}, disk_format=disk_format)


def upload_cancel(*, upload: Upload, by) -> str:
    """Cancel an upload, or remove a failed or refused one; returns what gets deleted, in words."""
    deletes = upload.what_stopping_deletes()
    event = gettext_noop("Removed by %(who)s") if upload.is_stopped else gettext_noop("Cancelled by %(who)s")
    if not move(upload, Status.CANCELLED, event % {"who": by}, next_poll_at=None, **NO_ERROR):
        raise ServiceError(gettext("This upload has finished or changed and can no longer be cancelled."))
    dispatch.enqueue_discard(upload.pk)
    return deletes


def upload_discard(*, upload_id: int) -> None:
    """After a cancel: delete the staged file and the image in IMS (with the owner's token)."""
    upload = Upload.objects.filter(pk=upload_id, status=Status.CANCELLED).first()
    if upload is None:
        return
    delete_staged(upload, gettext_noop("Deleted the staged copy of the cancelled upload"))
    if upload.ims_image_id:
        token = cloud.owner_token(upload.owner_id)
        if token.value is None:
            note(upload, gettext_noop("IMS image %(image)s was not deleted: %(why)s") % {
                "image": upload.ims_image_id, "why": token.why_not})
            return
        images.delete_quietly(upload, cloud.ims_client(token.value))


def staging_cleanup() -> int:
    """Delete staged copies that no upload needs any more; returns how many.

    Ready uploads keep theirs for STAGING_RETENTION_HOURS (to compare or send again), refused and
    rejected ones as long (time to choose the format fix, or to look again), cancelled ones lose
    it at once (should their clean-up task have been lost), unfinished browser uploads when they
    expire. Failed uploads and those waiting for a reconnect keep it for Retry.
    """
    now = timezone.now()
    count = 0
    started_before = now - timedelta(seconds=settings.TUS_UPLOAD_EXPIRY_SECONDS)
    expired = Q(receive_expires_at__lte=now) | Q(created_at__lte=started_before)  # see Upload.receive_deadline
    for upload in Upload.objects.filter(expired, status__in=RECEIVING_STATES):
        upload_expire(upload=upload)
        count += 1
    kept_until = now - timedelta(hours=settings.STAGING_RETENTION_HOURS)
    finished = Q(status=Status.READY, finished_at__lte=kept_until) | Q(status=Status.CANCELLED)
    finished |= Q(status__in=[Status.REFUSED, Status.REJECTED], status_changed_at__lte=kept_until)
    for upload in Upload.objects.filter(finished, staged_deleted_at__isnull=True):
        delete_staged(upload, gettext_noop("Deleted the staged copy: no longer needed"))
        count += 1
    # A cancel whose clean-up message was lost (Redis away) still has its image in IMS; only an
    # owner with a usable sign-in can have it deleted.
    signed_in = Q(owner__cloud_account__expires_at__gt=now + cloud.TOKEN_MARGIN)
    lost_discards = Upload.objects.filter(signed_in, status=Status.CANCELLED).exclude(ims_image_id="")
    count += staging.abort_orphans(started_before)  # object staging: multipart uploads no row owns
    for upload_id in lost_discards.values_list("pk", flat=True):
        upload_discard(upload_id=upload_id)
    return count
