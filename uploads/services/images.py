"""The image record in IMS: making one ready for the bytes, comparing what IMS stored with
the file, and deleting one a failure left behind."""

import hashlib

from django.utils.translation import gettext_noop

from uploads import staging
from uploads.ims import CloudError, ImsClient
from uploads.models import ErrorCode, Upload
from uploads.services.state import note, save

# Files are read for their sums this much at a time: never the whole file in memory.
READ_BUFFER_BYTES = 1024 * 1024


def prepare_image(upload: Upload, client: ImsClient, attempt: int) -> bool:
    """Make sure an image record that can take the bytes exists; True if it already holds them.

    An image from an earlier attempt is reused while it is still `queued` and empty (Glance
    leaves a `queued` image with a checksum after a 415, which never takes data again);
    one that holds exactly our file already is kept; any other is deleted, so that one upload
    never leaves two images behind.
    """
    if upload.ims_image_id:
        image = find_image(client, upload.ims_image_id)
        if image is not None:
            empty = image.status == "queued" and not image.checksum and not image.size
            if empty and image.raw.get("disk_format") == upload.send_format:
                return False
            if image.status == "active" and image.size == upload.send_size and holds_the_file(upload, image, attempt):
                note(upload, gettext_noop("IMS image %(image)s already holds the file (same size, MD5 and SHA-512)")
                     % {"image": image.id})
                return True
            client.delete_image(image.id)
            note(upload, gettext_noop("Deleted unusable IMS image %(image)s (status %(status)s) before starting again")
                 % {"image": image.id, "status": image.status})
    image = client.create_image(
        name=upload.name,
        disk_format=upload.send_format,
        os_version=upload.os_version,
        min_disk=upload.min_disk,
        min_ram=upload.min_ram,
        tags=upload.tags,
    )
    Upload.objects.filter(pk=upload.pk, attempt=attempt).update(ims_image_id=image.id, ims_status=image.status)
    upload.ims_image_id, upload.ims_status = image.id, image.status
    note(upload, gettext_noop("Image record created in IMS: %(image)s") % {"image": image.id})
    return False


def holds_the_file(upload: Upload, image, attempt: int) -> bool:
    """Whether an active image from an earlier attempt holds this attempt's file. Its worker may
    have died after IMS had the last byte but before it wrote the sums down, and sums from an
    older attempt may be of another file (converted again, sent as another format): this
    attempt's are computed from the file itself."""
    sums = sums_of_file_to_send(upload)
    if sums is None:
        return False
    save(upload, attempt, **sums)
    return not stored_differences(upload, image)


def sums_of_file_to_send(upload: Upload) -> dict | None:
    """MD5 and SHA-512 of the file IMS is given (the staged or the converted one, the version the
    check pinned), in one read with a fixed buffer; None when that file is gone or changed."""
    name = upload.converted_name or upload.staged_name
    try:  # the version that was checked, and no other: IMS must hold exactly that
        source = staging.open_for_reading(name, (upload.checked_file or {}).get(name))
    except (FileNotFoundError, staging.StagedFileChanged):
        return None
    md5, sha512 = hashlib.md5(usedforsecurity=False), hashlib.sha512()
    buffer = bytearray(READ_BUFFER_BYTES)
    with source:
        while read := source.readinto(buffer):
            md5.update(buffer[:read])
            sha512.update(buffer[:read])
    sums = {"md5": md5.hexdigest(), "sha512": sha512.hexdigest()}
    if not upload.converted_name:  # the file as uploaded
        sums["staged_sha512"] = sums["sha512"]
    return sums


def find_image(client: ImsClient, image_id: str):
    try:
        return client.get_image(image_id)
    except CloudError as exc:
        if exc.code == ErrorCode.NOT_FOUND:
            return None
        raise


def stored_differences(upload: Upload, image) -> list[str]:
    """How what IMS stored differs from the file: its size, MD5 (`checksum`) and SHA-512
    (`os_hash_value`) must all be reported and equal, since an image nobody compared is never
    Ready. Empty: the same."""
    differences = []
    stored_size = image.size if image.size is not None else image.raw.get("__image_size")
    if stored_size is None or int(stored_size) != upload.send_size:
        differences.append(f"size {stored_size} != {upload.send_size}")
    if image.checksum != upload.md5:
        differences.append(f"md5 {image.checksum} != {upload.md5}")
    if image.os_hash_value != upload.sha512:
        differences.append("sha512 differs")
    return differences


def delete_quietly(upload: Upload, client: ImsClient) -> None:
    """Remove a half-made image after a failure; a failure to do so is noted, not raised."""
    try:
        client.delete_image(upload.ims_image_id)
    except CloudError as exc:
        note(upload, gettext_noop("Could not delete IMS image %(image)s: %(error)s")
             % {"image": upload.ims_image_id, "error": exc.message}, exc.detail)
        return
    note(upload, gettext_noop("Deleted IMS image %(image)s") % {"image": upload.ims_image_id})
    Upload.objects.filter(pk=upload.pk).update(ims_image_id="", ims_status="")
    upload.ims_image_id = upload.ims_status = ""
