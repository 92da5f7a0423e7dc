"""Following the image in IMS once it has the whole file, until it is Ready or failed."""

from datetime import timedelta

from django.conf import settings
from django.db.models import F
from django.utils import timezone

from uploads.ims import ImsClient, ImsError
from uploads.models import Status, Upload
from uploads.services import cloud, images
from uploads.services.state import error_fields, move, note, save

IMS_DONE_STATUSES = {"active"}
IMS_FAILED_STATUSES = {"killed", "deleted", "pending_delete"}


def uploads_due_for_poll() -> list[int]:
    """Lease the uploads whose next poll is due, so that a slow poll is not queued twice."""
    now = timezone.now()
    lease = now + timedelta(seconds=max(30, settings.UPLOAD_POLL_SECONDS * 6))
    due = []
    for upload_id, next_poll_at in Upload.objects.filter(
        status=Status.PROCESSING, next_poll_at__lte=now
    ).values_list("pk", "next_poll_at")[:500]:
        if Upload.objects.filter(pk=upload_id, next_poll_at=next_poll_at).update(next_poll_at=lease):
            due.append(upload_id)
    return due


def upload_poll(*, upload_id: int) -> None:
    """Ask IMS how the image is doing; finish the upload when IMS has decided."""
    upload = Upload.objects.filter(pk=upload_id).first()
    if upload is None or upload.status != Status.PROCESSING:
        return
    token = cloud.usable_token(upload.owner_id)
    if token is None:
        move(
            upload,
            Status.RECONNECT,
            "The cloud sign-in expired while IMS was processing the image",
            error_message="Your cloud sign-in has expired, so the portal cannot check on your image.",
            error_hint="Reconnect on the Cloud account page: checking then continues by itself.",
            error_code="token_expired",
        )
        return
    client = cloud.ims_client(token)
    try:
        image = client.get_image(upload.ims_image_id)
    except ImsError as exc:
        _poll_failed(upload, exc)
        return
    if image.status in IMS_DONE_STATUSES:
        _finish(upload, client, image)
    elif image.status in IMS_FAILED_STATUSES:
        failed = move(
            upload,
            Status.FAILED,
            f"IMS could not process the image (status {image.status})",
            detail=str(image.raw),
            ims_status=image.status,
            error_message="The cloud could not turn your file into an image "
            f"(it reports the image as {image.status}).",
            error_hint="Check that the file is a bootable disk in the format you chose, then press Retry "
            "or upload a corrected file.",
            error_code=f"ims_{image.status}",
        )
        if failed:  # a failed attempt leaves no image behind
            images.delete_quietly(upload, client)
    else:
        _schedule_poll(upload, image.status)


def _schedule_poll(upload: Upload, ims_status: str) -> None:
    delay = min(60.0, settings.UPLOAD_POLL_SECONDS * (1 + upload.poll_count // 10))
    if ims_status != upload.ims_status:
        note(upload, f"IMS reports the image as {ims_status}")
    Upload.objects.filter(pk=upload.pk, status=Status.PROCESSING).update(
        ims_status=ims_status,
        poll_count=F("poll_count") + 1,
        next_poll_at=timezone.now() + timedelta(seconds=delay),
    )


def _poll_failed(upload: Upload, exc: ImsError) -> None:
    if exc.kind == "auth":
        move(upload, Status.RECONNECT, exc.message, detail=exc.raw, **error_fields(exc))
    elif not exc.permanent:
        note(upload, f"Checking the image failed for now: {exc.message}", exc.raw)
        _schedule_poll(upload, upload.ims_status)
    else:
        move(upload, Status.FAILED, exc.message, detail=exc.raw, **error_fields(exc))


def _finish(upload: Upload, client: ImsClient, image) -> None:
    """The image is active: it becomes Ready only if it holds exactly the bytes of the file.
    Sums missing on the row (a worker died between IMS's last byte and writing them) are
    computed from the file."""
    if not (upload.md5 and upload.sha512):
        sums = images.sums_of_file_to_send(upload)
        if sums is None:
            images.delete_quietly(upload, client)
            move(upload, Status.FAILED, "The staged file is gone: what IMS stored cannot be compared with it",
                 detail=str(image.raw), error_code="unverifiable",
                 error_message="The portal's copy of your file is gone, so it could not check that the cloud "
                 "stored exactly your file; the unchecked image was deleted.",
                 error_hint="Upload the file again.")
            return
        save(upload, upload.attempt, **sums)
    mismatch = images.stored_differences(upload, image)
    if mismatch:
        images.delete_quietly(upload, client)
        move(
            upload,
            Status.FAILED,
            "IMS stored something other than the file that was sent: " + ", ".join(mismatch),
            detail=str(image.raw),
            error_message="The cloud stored something other than what you uploaded.",
            error_hint="The bad image was deleted. Press Retry to send the file again.",
            error_code="checksum_mismatch",
        )
        return
    move(upload, Status.READY, f"Image {image.id} is active in IMS", ims_status=image.status, next_poll_at=None)
