"""Checking the staged file before it is sent: what it really is, and converting it when
IMS does not take its format."""

import hashlib
import time

from django.conf import settings
from django.utils.translation import gettext_noop

from uploads import diskimage, obs_import, qemu, staging
from uploads.errors import StagedFileMissing
from uploads.models import Status, Upload
from uploads.services.state import PROGRESS_WRITE_SECONDS, move, note, save
from uploads.sizes import human_size


class Stopped(Exception):
    """The upload was cancelled (or taken over) while this worker was busy with it."""


def check_file(upload: Upload, attempt: int) -> None:
    """Inspect the staged file; convert it when IMS does not take its format. Afterwards the
    upload knows what to send: `send_format` and `send_size` of the staged or converted file,
    and `checked_file` the versions that were checked, which the push sends and nothing else.

    From object staging, nothing is copied to the local disk to check a file: the Python
    inspectors read the head, the tail and the tables they need by ranged GETs, and qemu-img
    (info, check) reads the object through a read-only NBD export on a private socket
    (uploads/nbd.py explains why that and not a presigned URL or a sparse copy). Only a
    conversion copies the object to the scratch folder, because qemu-img convert writes a new
    file anyway and reads every byte of the old one."""
    image, result = inspect_and_record(upload, attempt)
    accepted = list(settings.IMS_DISK_FORMATS)
    if obs_import.takes_as_is(upload, result.detected_format):  # IMS's import converts it itself
        accepted.append(result.detected_format)
    if result.needs_conversion(accepted):
        with staging.local_copy(upload.staged_name, image.version) as source:  # object staging: a scratch copy
            _convert(upload, attempt, result, source)
        save(upload, attempt, send_format="qcow2", send_size=staging.size(upload.converted_name),
             checked_file={upload.staged_name: image.version,
                           upload.converted_name: staging.version(upload.converted_name)})
    else:
        staging.delete(upload.converted_name)
        save(upload, attempt, send_format=result.upload_format(accepted), send_size=upload.size,
             converted_name="")


def inspect_and_record(upload: Upload, attempt: int) -> tuple[diskimage.Image, diskimage.Inspection]:
    """Inspect the staged file, pinned to the version seen (`checked_file`), and write down what
    was found (raising min_disk to hold the disk inside); a file that may not be sent as it is
    raises its Problem."""
    try:
        image = staging.image(upload.staged_name)  # pinned: its size and ETag (or mtime and inode)
    except FileNotFoundError:
        raise StagedFileMissing() from None
    result = diskimage.inspect_file(image, declared_format=upload.disk_format)
    save(upload, attempt, detected_format=result.detected_format or "", virtual_size=result.virtual_size,
         inspection=_inspection_record(result), checked_file={upload.staged_name: image.version})
    if result.problem:
        raise result.problem  # the file may not be sent as it is: the push refuses it
    note(upload, _described(result), _checks_text(result))
    needed_gb = result.suggested_min_disk_gb or 0
    if needed_gb > upload.min_disk:
        note(upload, _min_disk_raised(upload.min_disk, needed_gb, result.virtual_size))
        save(upload, attempt, min_disk=needed_gb)
    return image, result


def _convert(upload: Upload, attempt: int, result: diskimage.Inspection, source: str) -> None:
    label = diskimage.LABELS[result.detected_format]
    if not move(upload, Status.CONVERTING,
                gettext_noop("Converting the %(format)s file to QCOW2: IMS does not take %(format)s files directly")
                % {"format": label},
                on_attempt=attempt, convert_percent=0):
        raise Stopped()
    # The file as uploaded is never sent: its SHA-512 is taken here, for the owner to compare
    # (from the local copy qemu-img converts: the same bytes, pinned, without another GET).
    with open(source, "rb") as staged:
        save(upload, attempt, staged_sha512=hashlib.file_digest(staged, "sha512").hexdigest())
    name = staging.name_for(upload.uid, "qcow2")
    staging.delete(name)  # what an earlier, interrupted attempt left
    save(upload, attempt, converted_name=name)
    last_write = 0.0

    def progress(percent: float) -> None:
        nonlocal last_write
        if time.monotonic() - last_write >= PROGRESS_WRITE_SECONDS:
            last_write = time.monotonic()
            if not Upload.objects.filter(pk=upload.pk, status=Status.CONVERTING, attempt=attempt).update(
                convert_percent=int(percent)
            ):
                raise Stopped()  # cancelled or taken over: convert_to_qcow2 stops qemu-img

    with staging.local_output(name) as target:  # object staging: stored when qemu-img is done
        qemu.convert_to_qcow2(
            source, target, src_format=result.detected_format, virtual_size=result.virtual_size,
            on_progress=progress,
        )
        converted = diskimage.inspect_file(target, declared_format="qcow2")
        if converted.problem:  # qemu-img wrote something unexpected: never send it
            raise converted.problem
    note(upload, gettext_noop("Converted to QCOW2 (%(size)s)") % {"size": human_size(staging.size(name))})


def _inspection_record(result: diskimage.Inspection) -> dict:
    record = {"checks": result.checks, "actual_size": result.actual_size}
    if result.problem:
        record["problem"] = {"code": result.problem.code, "detail": result.problem.detail,
                             "suggested_format": result.problem.suggested_format}
    return record


def _described(result: diskimage.Inspection) -> str:
    fmt = diskimage.LABELS.get(result.detected_format, result.detected_format)
    if result.virtual_size:
        return gettext_noop("Checked the file: a %(format)s disk of %(size)s") % {
            "format": fmt, "size": human_size(result.virtual_size)}
    return gettext_noop("Checked the file: a %(format)s disk") % {"format": fmt}


def _min_disk_raised(old_gb: int, new_gb: int, virtual_size: int) -> str:
    """What happened to min_disk, in words: IMS counts it in whole GB, 1 at the least."""
    values = {"new": new_gb, "old": old_gb, "size": human_size(virtual_size)}
    if virtual_size < 1024**3:
        if old_gb:
            return gettext_noop("Min disk raised to %(new)s GB from %(old)s GB, the smallest the cloud takes: the "
                                "disk inside the file is %(size)s") % values
        return gettext_noop("Min disk raised to %(new)s GB, the smallest the cloud takes: the disk inside the file "
                            "is %(size)s") % values
    if old_gb:
        return gettext_noop("Min disk raised to %(new)s GB from %(old)s GB to hold the disk inside the file "
                            "(%(size)s)") % values
    return gettext_noop("Min disk raised to %(new)s GB to hold the disk inside the file (%(size)s)") % values


def _checks_text(result: diskimage.Inspection) -> str:
    return "\n".join(f"{name}: {outcome}" for name, outcome in result.checks.items())
