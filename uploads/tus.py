"""The resumable upload protocol (tus 1.0.0) at /tus/: core, creation, termination, expiration.

Written here rather than taken from drf-tus: that library reads each chunk whole into memory
(`request.body`) and copies through temporary files, and it needs Django REST framework and
django-fsm 2. This module streams each PATCH body into the staged file one buffer at a time.

Only the signed-in owner may see or touch an upload: anyone else gets 404, as for a missing one.
CSRF protection applies as on every other state-changing request (the upload page sends the
X-CSRFToken header).
"""

import base64
import hashlib
import threading

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.urls import reverse
from django.utils.http import http_date
from django.utils.translation import gettext

from uploads import limits, request_body, services, staging
from uploads.forms import UploadMetadataForm
from uploads.i18n import stored_text
from uploads.models import RECEIVING_STATES, ErrorCode, Status, Upload

TUS_VERSION = "1.0.0"
EXTENSIONS = "creation,termination,expiration,checksum"
REASONS = {460: "Checksum Mismatch"}  # tus's own status code, unknown to Django
# Upload-Checksum algorithms (the tus checksum extension; sha1 is the one every server must know).
CHECKSUM_ALGORITHMS = ("sha1", "md5", "sha256")


def _response(status: int, text: str = "", **headers) -> HttpResponse:
    response = HttpResponse(text, status=status, content_type="text/plain; charset=utf-8",
                            reason=REASONS.get(status))
    response["Tus-Resumable"] = TUS_VERSION
    response["Cache-Control"] = "no-store"
    for name, value in headers.items():
        response[name.replace("_", "-")] = value
    return response


def _expires(upload: Upload) -> dict:
    if upload.receive_expires_at is None or upload.status not in RECEIVING_STATES:
        return {}
    return {"Upload_Expires": http_date(upload.receive_expires_at.timestamp())}


def parse_metadata(header: str) -> dict[str, str]:
    """Upload-Metadata: comma-separated `key base64(value)` pairs; a key may have no value."""
    metadata = {}
    for pair in header.split(","):
        pair = pair.strip()
        if not pair:
            continue
        key, _, encoded = pair.partition(" ")
        try:
            # A str with non-ASCII characters raises ValueError, not binascii.Error (its subclass).
            metadata[key] = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            raise ValueError(gettext("Upload-Metadata value of “%(key)s” is not valid base64 UTF-8.") % {"key": key}) from None
    return metadata


def parse_checksum(header: str) -> tuple[str, bytes] | None:
    """Upload-Checksum: `<algorithm> <base64 digest>`; None when the client sent none."""
    if not header:
        return None
    algorithm, _, encoded = header.strip().partition(" ")
    if algorithm not in CHECKSUM_ALGORITHMS:
        raise ValueError(gettext("Upload-Checksum algorithm must be one of %(algorithms)s.") % {
            "algorithms": ", ".join(CHECKSUM_ALGORITHMS)})
    try:
        digest = base64.b64decode(encoded.strip(), validate=True)
    except ValueError:  # binascii.Error, or non-ASCII characters
        raise ValueError("Upload-Checksum digest is not valid base64.") from None
    if len(digest) != hashlib.new(algorithm).digest_size:
        raise ValueError(gettext("Upload-Checksum digest is not a %(algorithm)s digest (wrong length).") % {
            "algorithm": algorithm})
    return algorithm, digest


class BadHeader(ValueError):
    """A header the server parses holds something else than it must; the message says what."""


# More digits than any size the portal takes (UPLOAD_MAX_BYTES has 12): refused before int() sees them.
MAX_DIGITS = 15


def parse_count(name: str, value: str) -> int:
    """A byte count or offset: ASCII digits only (no sign, space, other scripts' digits, hex)."""
    if not value:
        raise BadHeader(gettext("%(header)s is empty; it must be a number of bytes.") % {"header": name})
    # str.isdigit() alone is also true for "²" (which int() refuses) and "١٢" (which it reads).
    if not value.isascii() or not value.isdigit():
        raise BadHeader(gettext("%(header)s must be a whole number of bytes written with the digits 0-9 only.") % {
            "header": name})
    if len(value) > MAX_DIGITS:
        raise BadHeader(gettext("%(header)s is larger than any file the portal takes (under %(size)s).") % {
            "header": name, "size": limits.max_file_size()})
    return int(value)


def _integer_header(request: HttpRequest, name: str) -> int | None:
    """The header's value as a count of bytes; None when it is missing (BadHeader when wrong)."""
    value = request.headers.get(name)
    return None if value is None else parse_count(name, value)


def _refuse_unsupported_version(request: HttpRequest) -> HttpResponse | None:
    if request.method != "OPTIONS" and request.headers.get("Tus-Resumable") != TUS_VERSION:
        return _response(412, gettext("Only tus 1.0.0 is supported."), Tus_Version=TUS_VERSION)
    return None


def tus_collection(request: HttpRequest) -> HttpResponse:
    """/tus/: OPTIONS (what this server can do) and POST (create an upload)."""
    if request.method == "OPTIONS":
        return _response(
            204,
            Tus_Version=TUS_VERSION,
            Tus_Extension=EXTENSIONS,
            Tus_Max_Size=str(settings.UPLOAD_MAX_BYTES),
            Tus_Checksum_Algorithm=",".join(CHECKSUM_ALGORITHMS),
        )
    if request.method != "POST":
        return _response(405, gettext("Method not allowed."), Allow="OPTIONS, POST")
    if not request.user.is_authenticated:
        return _response(403, gettext("Sign in to the portal first."))
    refused = _refuse_unsupported_version(request)
    if refused:
        return refused
    try:
        return _create(request)
    except BadHeader as exc:
        return _response(400, str(exc))


def _create(request: HttpRequest) -> HttpResponse:
    length = _integer_header(request, "Upload-Length")
    if length is None:
        return _response(400, gettext("Upload-Length is required (deferred lengths are not supported)."))
    if length > settings.UPLOAD_MAX_BYTES:
        return _response(413, limits.too_large())
    account = getattr(request.user, "cloud_account", None)
    if not services.cloud_account_usable(account):
        return _response(
            403,
            gettext("Connect your cloud account first (Cloud account page: %(url)s); your cloud sign-in is missing "
                    "or has expired.") % {"url": reverse("cloud_account")},
        )
    try:
        metadata = parse_metadata(request.headers.get("Upload-Metadata", ""))
    except ValueError as exc:
        return _response(400, str(exc))
    form = UploadMetadataForm({**metadata, "size": length})
    if not form.is_valid():
        return _response(400, form.error_text())
    data = form.cleaned_data
    try:
        upload = services.upload_create(
            owner=request.user,
            size=length,
            filename=data["filename"],
            name=data["image_name"],
            disk_format=data["disk_format"],
            os_version=data["os_version"],
            min_disk=data["min_disk"],
            min_ram=data["min_ram"],
            tags=data["tags"],
        )
    except services.UploadLimitReached as exc:
        # 403, not 5xx: tus clients try a 5xx again, and only the person can change this one.
        return _response(403, str(exc))
    except services.StagingNoRoom as exc:
        return _response(507, str(exc))
    except staging.StagingUnavailable as exc:  # object storage unreachable, or refusing the keys
        return _response(503, stored_text(exc.message), Retry_After=str(STAGING_RETRY_SECONDS))
    location = request.build_absolute_uri(reverse("tus_resource", args=[upload.uid]))
    return _response(201, Location=location, Upload_Offset="0", **_expires(upload))


def tus_resource(request: HttpRequest, uid) -> HttpResponse:
    """/tus/<uid>: HEAD (where are we), PATCH (more bytes), DELETE (give up)."""
    response = _resource(request, uid)
    if request.method == "HEAD":  # a reply to HEAD carries headers only
        response.content = b""
    return response


def _resource(request: HttpRequest, uid) -> HttpResponse:
    if request.method == "OPTIONS":
        return tus_collection(request)
    if not request.user.is_authenticated:
        return _response(404, gettext("No such upload."))
    refused = _refuse_unsupported_version(request)
    if refused:
        return refused
    upload = Upload.objects.filter(uid=uid, owner=request.user).first()
    if upload is None:
        return _response(404, gettext("No such upload."))
    if request.method in {"HEAD", "PATCH"} and upload.is_expired:
        services.upload_expire(upload=upload)
        return _response(410, gettext("This upload expired; upload the file again."))
    if request.method == "HEAD":
        return _head(upload)
    if request.method == "PATCH":
        try:
            response = _patch(request, upload)
        except BadHeader as exc:
            response = _response(400, str(exc))
        # A body refused, or cut short by a silent client, is not waited for.
        request_body.close_if_unread(request)
        return response
    if request.method == "DELETE":
        return _delete(request, upload)
    return _response(405, gettext("Method not allowed."), Allow="HEAD, PATCH, DELETE, OPTIONS")


def _head(upload: Upload) -> HttpResponse:
    if upload.status == Status.CANCELLED or (upload.status == Status.FAILED and upload.error_code == ErrorCode.EXPIRED):
        return _response(410, gettext("This upload was cancelled or expired."))
    return _response(
        200,
        Upload_Offset=str(upload.received_bytes),
        Upload_Length=str(upload.size),
        **_expires(upload),
    )


def _patch(request: HttpRequest, upload: Upload) -> HttpResponse:
    if request.content_type != "application/offset+octet-stream":
        return _response(415, gettext("Content-Type must be application/offset+octet-stream."))
    offset = _integer_header(request, "Upload-Offset")
    if offset is None:
        return _response(400, gettext("Upload-Offset is required."))
    if upload.status not in RECEIVING_STATES:
        return _response(409, gettext("This upload is not receiving bytes any more."), Upload_Offset=str(upload.received_bytes))
    if offset != upload.received_bytes:
        return _response(409, gettext("Wrong offset: the server has %(count)s bytes.") % {"count": upload.received_bytes},
                         Upload_Offset=str(upload.received_bytes))
    length = _integer_header(request, "Content-Length")
    if length is None:
        return _response(411, gettext("Content-Length is required."))
    if offset + length > upload.size:
        return _response(413, gettext("This chunk goes past the end of the file (Upload-Length)."))
    try:
        checksum = parse_checksum(request.headers.get("Upload-Checksum", ""))
    except ValueError as exc:
        return _response(400, str(exc))
    if not RECEIVING_THREADS.acquire(blocking=False):
        return _response(503, gettext("The portal is receiving many uploads at once; this one continues in a moment."),
                         Retry_After="2")
    try:
        new_offset = services.upload_receive(
            upload=upload, offset=offset, stream=request_body.body_of(request, length), length=length,
            checksum=checksum,
        )
    except services.ChecksumMismatch:
        return _response(460, gettext("Checksum mismatch: this chunk arrived damaged and was not kept; send it again."),
                         Upload_Offset=str(offset))
    except services.OffsetConflict as exc:
        return _response(409, gettext("Wrong offset: the server has %(count)s bytes.") % {"count": exc.received_bytes},
                         Upload_Offset=str(exc.received_bytes))
    except services.UploadStopped:
        return _response(409, gettext("This upload was cancelled or has expired while this chunk was arriving."))
    except staging.TakenOver:
        return _response(409, gettext("This request was silent for too long and another one has taken over the upload."))
    except staging.StagingBusy as exc:
        return _response(423, gettext("Another request is writing to this upload; try again."),
                         Retry_After=str(exc.retry_after))
    except staging.StagingFull:
        return _response(
            507,
            gettext("The portal's staging disk is full. Your upload is kept and can resume later; an administrator "
                    "has to free space."),
        )
    except staging.StagingUnavailable as exc:  # what arrived before is kept: the client resumes
        return _response(503, stored_text(exc.message), Retry_After=str(STAGING_RETRY_SECONDS))
    finally:
        RECEIVING_THREADS.release()
    return _response(204, Upload_Offset=str(new_offset), **_expires(upload))


# When a client whose chunk met unreachable object storage should try again.
STAGING_RETRY_SECONDS = 5
# The request threads of this process that may stream upload chunks (each may wait on its client
# for up to the idle timeout); the others stay free for pages and status requests.
RECEIVING_THREADS = threading.BoundedSemaphore(settings.UPLOAD_RECEIVING_THREADS)


def _delete(request: HttpRequest, upload: Upload) -> HttpResponse:
    try:
        services.upload_cancel(upload=upload, by=request.user.get_username())
    except services.ServiceError as exc:
        return _response(409, str(exc))
    return _response(204)
