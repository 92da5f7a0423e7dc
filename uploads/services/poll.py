"""Following the image in IMS once it has the whole file, until it is Ready or failed."""

from datetime import timedelta

from django.conf import settings
from django.db.models import F
from django.utils import timezone
from django.utils.translation import gettext_noop

from uploads.errors import PortalError
from uploads.ims import ImsClient
from uploads.models import ErrorCode, Status, Upload
from uploads.services import cloud, images
from uploads.services.state import end_with, move, note, save

IMS_DONE_STATUSES = {"active"}
IMS_FAILED_STATUSES = {"killed", "deleted", "pending_delete"}
# How many due polls one run of beat hands out at the most.
POLL_BATCH = 500
# A handed-out poll is leased for POLL_LEASE_INTERVALS poll intervals (MIN_POLL_LEASE seconds at
# the least): long enough for a slow poll to finish before beat could hand it out again.
POLL_LEASE_INTERVALS = 6
MIN_POLL_LEASE = 30
# Polls slow down as IMS takes longer: one interval more every POLL_SLOWDOWN_EVERY polls, up to
# MAX_POLL_DELAY seconds apart.
POLL_SLOWDOWN_EVERY = 10
MAX_POLL_DELAY = 60.0


def uploads_due_for_poll() -> list[int]:
    """Lease the uploads whose next poll is due, so that a slow poll is not queued twice."""
    now = timezone.now()
    lease = now + timedelta(seconds=max(MIN_POLL_LEASE, settings.UPLOAD_POLL_SECONDS * POLL_LEASE_INTERVALS))
    due = []
    for upload_id, next_poll_at in Upload.objects.filter(
        status=Status.PROCESSING, next_poll_at__lte=now
    ).values_list("pk", "next_poll_at")[:POLL_BATCH]:
        if Upload.objects.filter(pk=upload_id, next_poll_at=next_poll_at).update(next_poll_at=lease):
            due.append(upload_id)
    return due


def upload_poll(*, upload_id: int) -> None:
    """Ask IMS how the image is doing; finish the upload when IMS has decided."""
    upload = Upload.objects.filter(pk=upload_id).first()
    if upload is None or upload.status != Status.PROCESSING:
        return
    token = cloud.owner_token(upload.owner_id)
    if token.value is None:
        error = PortalError(gettext_noop("%(why)s Until then the portal cannot check on your image.")
                            % {"why": token.why_not},
                            hint=gettext_noop("Reconnect on the Cloud account page: checking then continues by itself."),
                            code=ErrorCode.TOKEN_EXPIRED)
        end_with(upload, error, event=gettext_noop("The cloud sign-in expired while IMS was processing the image"))
        return
    client = cloud.ims_client(token.value)
    try:
        image = client.get_image(upload.ims_image_id)
    except PortalError as exc:
        _poll_failed(upload, exc)
        return
    if image.status in IMS_DONE_STATUSES:
        _finish(upload, client, image)
    elif image.status in IMS_FAILED_STATUSES:
        error = PortalError(
            gettext_noop("The cloud could not turn your file into an image (it reports the image as %(status)s).")
            % {"status": image.status},
            hint=gettext_noop("Check that the file is a bootable disk in the format you chose, then press Retry "
                              "or upload a corrected file."),
            code=f"ims_{image.status}", detail=str(image.raw), permanent=True,
        )
        if end_with(upload, error, event=gettext_noop("IMS could not process the image (status %(status)s)")
                    % {"status": image.status},
                    ims_status=image.status):
            images.delete_quietly(upload, client)  # a failed attempt leaves no image behind
    else:
        _schedule_poll(upload, image.status)


def _schedule_poll(upload: Upload, ims_status: str) -> None:
    delay = min(MAX_POLL_DELAY, settings.UPLOAD_POLL_SECONDS * (1 + upload.poll_count // POLL_SLOWDOWN_EVERY))
    if ims_status != upload.ims_status:
        note(upload, gettext_noop("IMS reports the image as %(status)s") % {"status": ims_status})
    Upload.objects.filter(pk=upload.pk, status=Status.PROCESSING).update(
        ims_status=ims_status,
        poll_count=F("poll_count") + 1,
        next_poll_at=timezone.now() + timedelta(seconds=delay),
    )


def _poll_failed(upload: Upload, error: PortalError) -> None:
    """A poll that met an error: ask again later when that can help, else stop the upload."""
    if error.permanent or error.code in ErrorCode.CURED_BY_RECONNECT:
        end_with(upload, error)
    else:
        note(upload, gettext_noop("Checking the image failed for now: %(error)s") % {"error": error.message}, error.detail)
        _schedule_poll(upload, upload.ims_status)


def _finish(upload: Upload, client: ImsClient, image) -> None:
    """The image is active: it becomes Ready only if it holds exactly the bytes of the file.
    Sums missing on the row (a worker died between IMS's last byte and writing them) are
    computed from the file."""
    if not (upload.md5 and upload.sha512):
        sums = images.sums_of_file_to_send(upload)
        if sums is None:
            images.delete_quietly(upload, client)
            error = PortalError(gettext_noop("The portal's copy of your file is gone, so it could not check that the "
                                             "cloud stored exactly your file; the unchecked image was deleted."),
                                hint=gettext_noop("Upload the file again."), code=ErrorCode.UNVERIFIABLE,
                                detail=str(image.raw))
            end_with(upload, error,
                     event=gettext_noop("The staged file is gone: what IMS stored cannot be compared with it"))
            return
        save(upload, upload.attempt, **sums)
    mismatch = images.stored_differences(upload, image)
    if mismatch:
        images.delete_quietly(upload, client)
        error = PortalError(gettext_noop("The cloud stored something other than what you uploaded."),
                            hint=gettext_noop("The bad image was deleted. Press Retry to send the file again."),
                            code=ErrorCode.CHECKSUM_MISMATCH, detail=str(image.raw))
        end_with(upload, error, event=gettext_noop("IMS stored something other than the file that was sent: "
                                                   "%(differences)s") % {"differences": ", ".join(mismatch)})
        return
    move(upload, Status.READY, gettext_noop("Image %(image)s is active in IMS") % {"image": image.id}, ims_status=image.status, next_poll_at=None)
