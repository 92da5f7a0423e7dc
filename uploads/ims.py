"""A small client for the two cloud services the portal talks to: IAM (tokens) and IMS (images).

No Django here: it takes a base URL, a token and a file-like object, and raises one error type,
`CloudError` (uploads/errors.py's PortalError: a message a non-technical person can act on, a
hint, a `code` the portal acts on, whether retrying can help (`permanent`), and the reply for
admins in `detail`). Tokens never appear in an error or a log.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import BinaryIO

import requests

from uploads import httpput
from uploads.errors import ErrorCode, PortalError, gettext_noop
from uploads.filebody import FileBody, Sealed, SealedBody
from uploads.sizes import human_size

CONNECT_TIMEOUT = 10
# How long to wait for a reply to a call without a body to stream (sign in, create, get, delete).
REPLY_TIMEOUT = 60
CALL_TIMEOUT = (CONNECT_TIMEOUT, REPLY_TIMEOUT)
# How long to wait for a reply once the body is sent: IMS may take a while to answer a big PUT.
READ_TIMEOUT = 600
# How much of a reply an error keeps for admins: enough for any error body, never a whole page.
DETAIL_REPLY_CHARS = 4000
SIGN_IN_REPLY_CHARS = 2000  # a sign-in reply: its token is in a header, never in these
BAD_REQUEST_DETAIL_CHARS = 300  # the cloud's own words quoted to the person
BUFFER_SIZE = 1024 * 1024  # bytes read from disk and sent per step while streaming a file

HINT_RECONNECT = gettext_noop("Reconnect on the Cloud account page: the upload then continues by itself.")
HINT_RETRY_LATER = gettext_noop(
    "This is usually temporary: the portal retries by itself; if it keeps failing, press Retry later."
)
HINT_CONTACT_ADMIN = gettext_noop("Ask an administrator to look at this upload's details.")


class CloudError(PortalError):
    """Any failure of a call to IAM or IMS. `status`: the HTTP status, when there was a reply.

    code: a short word the portal acts on: "auth" (sign in again), "forbidden", "not_found",
    "conflict", "too_large", "bad_request", "unsupported", "server", "network", "aborted".
    The cloud's own error code (IMG.0057 ...) is in `detail`, with the reply.
    """

    def __init__(
        self, message: str, *, code: str, permanent: bool, hint: str = "", status: int | None = None, detail: str = ""
    ):
        super().__init__(message, hint=hint, code=code, detail=detail, permanent=permanent)
        self.status = status


@dataclass
class Token:
    value: str = field(repr=False)
    expires_at: datetime
    user_name: str
    domain_name: str
    project_name: str
    project_id: str


@dataclass
class Image:
    id: str
    status: str
    size: int | None
    checksum: str | None
    os_hash_value: str | None
    raw: dict


@dataclass
class SendResult:
    sent_bytes: int
    md5: str
    sha512: str


def parse_time(value: str) -> datetime:
    """IAM writes times like 2026-11-28T14:00:00.000000Z."""
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def image_create_body(
    *,
    name: str,
    disk_format: str,
    os_version: str = "",
    min_disk: int = 0,
    min_ram: int = 0,
    tags: list[str] | None = None,
) -> dict:
    """The JSON body of POST /v2/images: what ImsClient.create_image sends, and what a reviewer is
    shown before approving (uploads/review.py)."""
    body = {
        "name": name,
        "container_format": "bare",
        "disk_format": disk_format,
        "min_disk": min_disk,
        "min_ram": min_ram,
        "visibility": "private",
        "protected": False,
        "tags": tags or [],
    }
    if os_version:
        body["__os_version"] = os_version
    return body


def _error_text(response: requests.Response) -> tuple[str, str]:
    """The (code, message) of an error reply: IMS JSON, Keystone JSON, Glance JSON or HTML/text."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            return str(error.get("code", "")), str(error.get("message", ""))
        if "error_code" in body:  # API gateway shape
            return str(body["error_code"]), str(body.get("error_msg", ""))
        if "message" in body:  # Glance JSON shape
            return "", _strip_glance(str(body["message"]))
    return "", _strip_glance(_html_to_text(response.text))


def _html_to_text(text: str) -> str:
    """Glance's HTML error pages: the sentence sits after the <h1> line."""
    if "<h1>" not in text:
        return text
    after = text.split("</h1>", 1)[-1]
    for tag in ("</body>", "</html>"):
        after = after.replace(tag, "")
    return after


def _strip_glance(text: str) -> str:
    return " ".join(text.replace("<br />", " ").split())


# What each error status means, in words a person can act on: (code, permanent, message, hint).
# A 400's message comes from the reply (_bad_request_message).
STATUS_ERRORS = {
    401: (ErrorCode.AUTH, True, gettext_noop("Your cloud sign-in has expired or was not accepted."), HINT_RECONNECT),
    403: (
        "forbidden", True, gettext_noop("Your cloud account is not allowed to do this in the selected project."),
        gettext_noop("Ask your cloud administrator for image rights in this project, or connect a different project."),
    ),
    404: (
        ErrorCode.NOT_FOUND, True,
        gettext_noop("The image no longer exists in the cloud (it may have been deleted there)."),
        gettext_noop("Press Retry to create it again."),
    ),
    409: (
        "conflict", True, gettext_noop("The cloud refused the file because this image already has data or is busy."),
        gettext_noop("Press Retry: the portal will create a fresh image and send the file again."),
    ),
    413: (
        "too_large", True, gettext_noop("The file is too large for the cloud (images must be under 128 GB)."),
        gettext_noop("Shrink or compress the disk image (for example convert it to QCOW2), then upload it again."),
    ),
    415: (
        "unsupported", True, gettext_noop("The cloud says the file's contents do not match the disk format you chose."),
        gettext_noop("Check the file's real format, upload it again with the right disk format."),
    ),
    400: (
        "bad_request", True, "",
        gettext_noop("Correct the image details and upload again; an administrator can see the full reply."),
    ),
    429: ("server", False, gettext_noop("The cloud's image service had a temporary problem."), HINT_RETRY_LATER),
}
SERVER_ERROR = STATUS_ERRORS[429]  # every 5xx: temporary


def explain(response: requests.Response) -> CloudError:
    """Turn an error reply into words a person can act on (and keep the reply for admins)."""
    status = response.status_code
    ims_code, ims_message = _error_text(response)
    fallback = (
        "server", True, gettext_noop("The cloud answered with an unexpected error (%(status)s).") % {"status": status},
        HINT_CONTACT_ADMIN,
    )
    code, permanent, message, hint = STATUS_ERRORS.get(status) or (SERVER_ERROR if status >= 500 else fallback)
    if status == 400:
        message = _bad_request_message(ims_code, ims_message)
    detail = f"HTTP {status} {response.reason}\n{response.text[:DETAIL_REPLY_CHARS]}"
    return CloudError(message, code=code, permanent=permanent, hint=hint, status=status, detail=detail)


# IMS error codes whose meaning is worth saying in plain words.
IMS_CODES = {
    "IMG.0015": gettext_noop("You have reached your project's limit of private images."),
    "IMG.0057": gettext_noop("The image file is empty, missing, or not in the format you chose."),
    "IMG.0059": gettext_noop("The file is too large for the cloud (images must be under 128 GB)."),
    "IMG.0072": gettext_noop("The cloud does not accept this disk format for direct uploads."),
}


def _bad_request_message(code: str, detail: str) -> str:
    if code in IMS_CODES:
        return IMS_CODES[code]
    if detail:
        return gettext_noop("The cloud refused the image details: %(reply)s") % {"reply": detail[:BAD_REQUEST_DETAIL_CHARS]}
    return gettext_noop("The cloud refused the image details.")


def _network_error(exc: Exception, what: str) -> CloudError:
    return CloudError(
        # `what` is one of the phrases below (WHILE), translated on its own where it is shown.
        gettext_noop("Could not reach the cloud while %(what)s.") % {"what": what},
        code="network", permanent=False, hint=HINT_RETRY_LATER, detail=f"{type(exc).__name__}: {exc}",
    )


class IamClient:
    """Gets project-scoped tokens from IAM (Keystone v3 compatible)."""

    def __init__(self, base_url: str, *, session: requests.Session | None = None):
        self.base_url = base_url.rstrip("/")
        self.session = session or requests.Session()

    def get_token(self, *, domain: str, user: str, password: str, project: str) -> Token:
        scope = {"id": project} if _looks_like_id(project) else {"name": project, "domain": {"name": domain}}
        body = {
            "auth": {
                "identity": {
                    "methods": ["password"],
                    "password": {"user": {"name": user, "password": password, "domain": {"name": domain}}},
                },
                "scope": {"project": scope},
            }
        }
        try:
            response = self.session.post(
                f"{self.base_url}/auth/tokens?nocatalog=true",
                json=body,
                timeout=CALL_TIMEOUT,
            )
        except requests.RequestException as exc:
            raise _network_error(exc, gettext_noop("signing in")) from None
        if response.status_code == 401:
            raise CloudError(
                gettext_noop("The cloud did not accept these details: check the domain, user name, password and project."),
                code=ErrorCode.AUTH, permanent=True,
                hint=gettext_noop("Use the IAM user of your cloud account (not your portal sign-in)."),
                status=401, detail=f"HTTP 401\n{response.text[:SIGN_IN_REPLY_CHARS]}",
            )
        if response.status_code != 201 or not response.headers.get("X-Subject-Token"):
            raise explain(response)
        try:
            return _token(response, user, domain)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CloudError(
                gettext_noop("The cloud's sign-in service gave an answer the portal does not understand."),
                code="server", permanent=True,
                hint=gettext_noop("Check the IAM address the portal uses, or ask an administrator."),
                status=response.status_code, detail=f"HTTP 201\n{response.text[:SIGN_IN_REPLY_CHARS]}",
            ) from None


def _token(response: requests.Response, user: str, domain: str) -> Token:
    token = response.json()["token"]
    project_info = token.get("project") or {}
    return Token(
        value=response.headers["X-Subject-Token"],
        expires_at=parse_time(token["expires_at"]),
        user_name=(token.get("user") or {}).get("name", user),
        domain_name=((token.get("user") or {}).get("domain") or {}).get("name", domain),
        project_name=project_info.get("name", ""),
        project_id=project_info.get("id", ""),
    )


def _looks_like_id(project: str) -> bool:
    """Project ids are 32 hex digits; names (such as eu-de) are not."""
    return len(project) == 32 and all(c in "0123456789abcdef" for c in project.lower())


class ImsClient:
    """The native OpenStack image API of IMS (Glance v2): create, upload, follow, delete."""

    def __init__(self, base_url: str, token: str, *, session: requests.Session | None = None):
        self.base_url = base_url.rstrip("/")
        self.session = session or requests.Session()
        self.session.headers["X-Auth-Token"] = token
        # JSON error bodies from Glance too (it answers HTML to */*).
        self.session.headers["Accept"] = "application/json"

    def _call(self, method: str, path: str, what: str, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", CALL_TIMEOUT)
        try:
            response = self.session.request(method, f"{self.base_url}{path}", **kwargs)
        except requests.RequestException as exc:
            raise _network_error(exc, what) from None
        if response.status_code >= 400:
            raise explain(response)
        return response

    def create_image(
        self, *, name: str, disk_format: str, os_version: str = "", min_disk: int = 0, min_ram: int = 0,
        tags: list[str] | None = None,
    ) -> Image:
        body = image_create_body(name=name, disk_format=disk_format, os_version=os_version, min_disk=min_disk,
                                 min_ram=min_ram, tags=tags)
        response = self._call("POST", "/v2/images", gettext_noop("creating the image"), json=body)
        return _image(response.json())

    def get_image(self, image_id: str) -> Image:
        return _image(self._call("GET", f"/v2/images/{image_id}", gettext_noop("checking the image")).json())

    def delete_image(self, image_id: str) -> None:
        """Delete an image; one that is already gone counts as deleted."""
        try:
            self._call("DELETE", f"/v2/images/{image_id}", gettext_noop("deleting the image"))
        except CloudError as exc:
            if exc.code != ErrorCode.NOT_FOUND:
                raise

    def upload_file(
        self,
        image_id: str,
        fileobj: BinaryIO,
        size: int,
        *,
        on_progress: Callable[[int], bool] | None = None,
        buffer_size: int = BUFFER_SIZE,
        sealed: Sealed | None = None,
    ) -> SendResult:
        """Stream `size` bytes of `fileobj` to the image with a Content-Length, one buffer at a time.

        on_progress(sent_bytes) is called after each buffer (each slice, for a sealed file);
        returning False aborts the upload (CloudError code "aborted"). Without `sealed`, MD5 and
        SHA-512 of exactly the bytes sent are computed in the same pass. With `sealed` (a file
        whose sums were computed as it arrived, see filebody.py) nothing is hashed: the result
        carries the sealed sums, the last bytes go only after `sealed.confirm` accepted them,
        and on plain http the kernel sends the file (httpput.py; `fileobj` must then be a real
        file); whatever `confirm` raises ends the PUT before its last byte and is raised here.
        """
        url = f"{self.base_url}/v2/images/{image_id}/file"
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        if sealed is None:
            body = FileBody(fileobj, size, buffer_size, on_progress)
        else:
            body = SealedBody(fileobj, size, buffer_size, on_progress, sealed)
        try:
            if sealed is not None and httpput.applies(self.session, url):
                self._put_by_sendfile(url, headers, body)
            elif body.hashing is not None:
                with body.hashing:
                    self._put_streamed(image_id, headers, body)
            else:
                self._put_streamed(image_id, headers, body)
        except CloudError as exc:
            if body.aborted:
                raise CloudError(gettext_noop("The upload was stopped."), code=ErrorCode.ABORTED, permanent=True) from None
            if exc.code == "network" and body.sent < size:
                exc.message = gettext_noop("The connection to the cloud broke after %(sent)s of %(size)s.") % {
                    "sent": human_size(body.sent), "size": human_size(size)}
            raise
        if body.sent != size:
            raise CloudError(
                gettext_noop("The staged file is shorter than expected: it changed while being sent."),
                code="server", permanent=True, hint=HINT_CONTACT_ADMIN,
            )
        if sealed is not None:
            return SendResult(body.sent, sealed.md5, sealed.sha512)
        return SendResult(body.sent, body.hashing.md5.hexdigest(), body.hashing.sha512.hexdigest())

    def _put_streamed(self, image_id: str, headers: dict, body: FileBody) -> None:
        self._call("PUT", f"/v2/images/{image_id}/file", gettext_noop("sending the file"), data=body, headers=headers,
                   timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))

    def _put_by_sendfile(self, url: str, headers: dict, body: SealedBody) -> None:
        """The same PUT as _put_streamed, with the session's token and Accept, by httpput."""
        own = {name: self.session.headers[name] for name in ("X-Auth-Token", "Accept") if name in self.session.headers}
        try:
            response = httpput.put(url, {**own, **headers}, body, connect_timeout=CONNECT_TIMEOUT,
                                   read_timeout=READ_TIMEOUT)
        except requests.RequestException as exc:
            raise _network_error(exc, gettext_noop("sending the file")) from None
        if response.status_code >= 400:
            raise explain(response)


def _image(data: dict) -> Image:
    return Image(
        id=data["id"],
        status=data.get("status", ""),
        size=data.get("size"),
        checksum=data.get("checksum"),
        os_hash_value=data.get("os_hash_value"),
        raw=data,
    )


# ---------------------------------------------------------------------------------------------
# IMS's import from OBS: IMS reads the file from object storage itself (uploads/obs_import.py).


@dataclass
class ImportJob:
    """An IMS job (`GET /v1/{project_id}/jobs/{job_id}`): INIT, RUNNING, SUCCESS or FAIL."""

    id: str
    status: str
    image_id: str = ""
    fail_reason: str = ""
    error_code: str = ""
    raw: dict = field(default_factory=dict, repr=False)


def start_obs_import(
    client: ImsClient, *, name: str, bucket: str, key: str, min_disk: int, os_version: str = "",
    min_ram: int = 0, tags: list[str] | None = None,
) -> str:
    """`POST /v2/cloudimages/action`: register the object `bucket:key` as a new image; returns
    the job id to follow."""
    body = {"name": name, "image_url": f"{bucket}:{key}", "min_disk": min_disk, "is_config": False}
    if os_version:
        body["os_version"] = os_version
    if min_ram:
        body["min_ram"] = min_ram
    if tags:
        body["image_tags"] = [dict(zip(("key", "value"), tag.split("=", 1) + [""])) for tag in tags]
    reply = client._call("POST", "/v2/cloudimages/action", gettext_noop("asking IMS to import the file from OBS"), json=body)
    job_id = (reply.json() or {}).get("job_id")
    if not job_id:
        raise CloudError(gettext_noop("IMS did not say how to follow the import of the file."), code="server", permanent=False,
                         hint=HINT_RETRY_LATER, detail=reply.text[:4000])
    return job_id


def get_import_job(client: ImsClient, project_id: str, job_id: str) -> ImportJob:
    data = client._call("GET", f"/v1/{project_id}/jobs/{job_id}", gettext_noop("checking the import from OBS")).json()
    return ImportJob(
        id=data.get("job_id") or job_id,
        status=data.get("status", ""),
        image_id=(data.get("entities") or {}).get("image_id") or "",
        fail_reason=data.get("fail_reason") or "",
        error_code=data.get("error_code") or "",
        raw=data,
    )
