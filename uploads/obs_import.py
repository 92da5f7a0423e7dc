"""The other way of sending a file to IMS: its import from OBS (IMS_IMPORT_FROM_OBS).

With staging in OBS, IMS reads the staged object itself: `POST /v2/cloudimages/action` with
`image_url` = `bucket:object` registers it, and `GET /v1/{project_id}/jobs/{job_id}` follows
the job until IMS names the image (or says why not). No byte passes through the worker; the
image is then checked as after a PUT (uploads/services.py, upload_poll).

Called from one place in the push (services.upload_push), instead of creating the image and
PUTting the file.
"""

import time

from django.conf import settings

from uploads import ims, staging
from uploads.errors import gettext_noop
from uploads.ims import CloudError, ImsClient
from uploads.models import Status, Upload

IMPORTING = "importing"  # ims_status while the job runs: the pages say "IMS is importing the file from OBS"
MESSAGE = gettext_noop("IMS is importing the file from OBS")
# IMS's import takes every format of its upload page as it is (IMS-API.md: QCOW2, VMDK, VHD,
# RAW, VHDX, QED, VDI, QCOW, ZVHD2, ZVHD) and reads the format from the object's extension: the
# staged object is named so (staged_suffix), and the portal converts nothing IMS converts itself.
IMPORT_EXTENSIONS = {
    "raw": "img", "qcow2": "qcow2", "vhd": "vhd", "vmdk": "vmdk", "vhdx": "vhdx", "qed": "qed",
    "vdi": "vdi", "qcow": "qcow", "zvhd2": "zvhd2", "zvhd": "zvhd",
}
EXTENSION_FORMATS = {f".{ext}": fmt for fmt, ext in IMPORT_EXTENSIONS.items()}
NO_ACCESS_WORDS = ("access", "authoriz", "permission", "forbidden", "denied")


def possible() -> bool:
    """The import is switched on, and staging is object storage (OBS) that IMS can read."""
    return bool(settings.IMS_IMPORT_FROM_OBS) and staging.is_object_storage()


def staged_suffix(disk_format: str) -> str:
    """The extension of a new upload's staged object: the one IMS reads `disk_format` from when
    the import is possible, else "img" (the name says nothing then)."""
    return IMPORT_EXTENSIONS.get(disk_format, "img") if possible() else "img"


def _format_named_by(name: str) -> str | None:
    return next((fmt for ext, fmt in EXTENSION_FORMATS.items() if name.endswith(ext)), None)


def takes_as_is(upload: Upload, detected_format: str | None) -> bool:
    """IMS will import the staged object in the format the check found, without a conversion
    by the portal: its name tells IMS that format. (A file sent as another format than the one
    declared at its start, after "Upload it as ...", has a name that says otherwise: it goes by
    PUT, converted first where IMS_DISK_FORMATS needs it.)"""
    return possible() and detected_format is not None and _format_named_by(upload.staged_name) == detected_format


def applies(upload: Upload) -> bool:
    """Import from OBS when it is switched on, staging is object storage, and the object's name
    tells IMS the format the file is sent as."""
    return possible() and _format_named_by(upload.converted_name or upload.staged_name) == upload.send_format


def import_image(upload: Upload, client: ImsClient, attempt: int) -> bool:
    """Have IMS import the staged object and wait for its job; True when IMS made the image
    (its id is saved), False when the upload was cancelled or taken over meanwhile. CloudError
    when IMS refuses or the job fails."""
    from uploads.services.state import note as _note, save as _save  # the push calls this module

    bucket, key = staging.object_location(upload.converted_name or upload.staged_name)
    if upload.ims_image_id and not upload.ims_job_id:  # an earlier attempt's image: one upload, one image
        client.delete_image(upload.ims_image_id)
        _note(upload, gettext_noop("Deleted IMS image %(image)s of an earlier attempt before importing again")
              % {"image": upload.ims_image_id})
        _save(upload, attempt, ims_image_id="")
    if not upload.ims_job_id:
        job_id = ims.start_obs_import(
            client, name=upload.name, bucket=bucket, key=key, min_disk=max(upload.min_disk, 1),
            os_version=upload.os_version, min_ram=upload.min_ram, tags=upload.tags,
        )
        _save(upload, attempt, ims_job_id=job_id, ims_status=IMPORTING)
        _note(upload, gettext_noop("IMS is importing the file from OBS (job %(job)s)") % {"job": job_id})
    job = _wait_for_job(upload, client, attempt)
    if job is None:
        return False
    _save(upload, attempt, ims_image_id=job.image_id, ims_job_id="")
    _note(upload, gettext_noop("IMS imported the file from OBS as image %(image)s") % {"image": job.image_id},
          detail=str(job.raw))
    return True


def _wait_for_job(upload: Upload, client: ImsClient, attempt: int) -> ims.ImportJob | None:
    project_id = upload.owner.cloud_account.project_id
    deadline = time.monotonic() + settings.IMS_IMPORT_TIMEOUT_SECONDS
    while True:
        job = ims.get_import_job(client, project_id, upload.ims_job_id)
        if job.status == "SUCCESS":
            return job
        if job.status == "FAIL":
            _forget_job(upload, attempt)
            raise _job_failed(job)
        if not Upload.objects.filter(pk=upload.pk, status=Status.PUSHING, attempt=attempt).exists():
            return None  # cancelled or taken over: the job's image is deleted by whoever did that
        if time.monotonic() > deadline:
            raise CloudError(gettext_noop("IMS is taking too long to import the file from OBS."), code="server", permanent=False,
                             hint=ims.HINT_RETRY_LATER, detail=str(job.raw))
        time.sleep(settings.IMS_IMPORT_POLL_SECONDS)


def _forget_job(upload: Upload, attempt: int) -> None:
    from uploads.services.state import save as _save

    _save(upload, attempt, ims_job_id="")


def _job_failed(job: ims.ImportJob) -> CloudError:
    reason = job.fail_reason or job.error_code or gettext_noop("no reason given")
    if any(word in reason.lower() for word in NO_ACCESS_WORDS):
        return CloudError(
            gettext_noop("IMS may not read the file from the portal's OBS bucket."),
            code="forbidden", permanent=True, detail=f"{job.error_code} {job.raw}",
            hint=gettext_noop("An administrator has to authorize IMS to access OBS once (in the console), "
                              "and the bucket must be in the same region as IMS; then press Retry."),
        )
    return CloudError(gettext_noop("IMS could not import the file from OBS: %(reason)s.") % {"reason": reason},
                      code="server", permanent=False,
                      hint=ims.HINT_RETRY_LATER, detail=f"{job.error_code} {job.raw}")
