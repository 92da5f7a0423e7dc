"""A local stand-in for Open Telekom Cloud IAM (Keystone v3) and IMS (Glance v2), stdlib only.

One HTTP/1.1 server answers IAM at /v3/... and IMS at /v2/..., with the status codes and error
bodies described in the shared references IMS-API.md and openstack-peers.md. Test-only switches
live under /_sim/ (no token needed) and as methods of Simulator.

Never log a token or a password: the access log and the request log hold method, path and
status only, because test output and CI logs are kept and shared.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import http.server
import json
import socket
import struct
import secrets
import sys
import threading
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from imssim import obs_import

DEMO_DOMAIN = "demo-domain"
DEMO_USER = "demo"
DEMO_PASSWORD = "demo-cloud-pw"
DEMO_PROJECT_NAME = "eu-de"
DEMO_PROJECT_ID = "0a6c3e1f9b7d4e2a8c5b1d3f7e9a2c4b"

DEFAULT_DISK_FORMATS = ("qcow2", "vhd", "raw", "zvhd2")
MAX_IMAGE_BYTES = 128 * 1024**3          # IMS: "The image file exceeds 128 GB."
READ_SIZE = 1024 * 1024                  # body reads of 1 MiB: never the whole image in memory
MAX_JSON_BYTES = 1024 * 1024
DRAIN_SECONDS = 2.0                      # how long an early rejection keeps reading the body
DRAIN_BYTES = 64 * 1024 * 1024
IDLE_TIMEOUT = 120                       # a stalled client must not pin a thread forever
TIMESTAMP = "%Y-%m-%dT%H:%M:%SZ"
READ_ONLY_FIELDS = {"id", "status", "owner", "size", "checksum", "os_hash_algo", "os_hash_value",
                    "virtual_size", "created_at", "updated_at", "self", "file", "schema",
                    "locations", "direct_url", "__image_size"}


@dataclass(frozen=True)
class Account:
    """One IAM user with one project (a user with two projects is two Accounts)."""
    domain: str
    user: str
    password: str = field(repr=False)    # keep it out of reprs, tracebacks and logs
    project_name: str
    project_id: str

    @property
    def domain_id(self) -> str:
        return uuid.uuid5(uuid.NAMESPACE_URL, "imssim-domain:" + self.domain).hex

    @property
    def user_id(self) -> str:
        return uuid.uuid5(uuid.NAMESPACE_URL, f"imssim-user:{self.domain}/{self.user}").hex


DEMO_ACCOUNT = Account(DEMO_DOMAIN, DEMO_USER, DEMO_PASSWORD, DEMO_PROJECT_NAME, DEMO_PROJECT_ID)


class ApiError(Exception):
    """An error reply: HTTP status and JSON body."""

    def __init__(self, status: int, body: dict):
        super().__init__(status)
        self.status, self.body = status, body


class ClientGone(Exception):
    """The client closed the connection or stopped sending in the middle of a body."""


class BadChunk(Exception):
    """A chunked body that breaks the chunked encoding."""


class ImageGone(Exception):
    """The image was deleted while its data was arriving."""


class CutConnection(Exception):
    """The cut_put_after_bytes fault fired."""


def ims_error(status: int, code: str, message: str) -> ApiError:
    return ApiError(status, {"error": {"code": code, "message": message}})


def malformed(detail: str) -> ApiError:
    return ims_error(400, "IMG.0001", f"The request is malformed: {detail}")


def keystone_error(status: int, title: str, message: str) -> ApiError:
    return ApiError(status, {"error": {"code": status, "message": message, "title": title}})


def not_found() -> ApiError:
    return ims_error(404, "IMG.0027", "The image ID does not exist.")


def keystone_malformed(detail: str) -> ApiError:
    return keystone_error(400, "Bad Request", f"The request you have made is malformed: {detail}")


def sim_bad_request(detail: str) -> ApiError:
    return ApiError(400, {"error": {"code": "SIM.400", "message": detail}})


def gone(image_id: str) -> ApiError:
    return ims_error(410, "IMG.0027", f"Image {image_id} could not be found after upload. The image "
                     "may have been deleted during the upload, cleaning up the chunks uploaded.")


def injected_error(status: int) -> ApiError:
    """The body a real IMS or its API gateway sends with this status."""
    known = {500: ("IMG.0010", "System error."),
             502: ("APIGW.0502", "Bad gateway."),
             503: ("APIGW.0503", "Service temporarily unavailable."),
             504: ("APIGW.0504", "Gateway timeout.")}
    code, message = known.get(status, (f"SIM.{status}", "Injected failure."))
    return ims_error(status, code, message)


def now_stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime(TIMESTAMP)


def is_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text.lower()
    except ValueError:
        return False


def _int_field(props: dict, name: str, default: int, highest: int | None) -> int:
    value = props.pop(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 \
            or (highest is not None and value > highest):
        limit = f"0 to {highest}" if highest is not None else "0 or more"
        raise malformed(f"{name} must be an integer from {limit}")
    return value


def build_image_fields(body, disk_formats, owner: str) -> dict:
    """Validate a POST /v2/images body the way IMS does and return the new image's fields."""
    if not isinstance(body, dict):
        raise malformed("the body must be a JSON object")
    props = dict(body)
    name = props.pop("name", None)
    if not isinstance(name, str) or not 1 <= len(name) <= 255:
        raise malformed("name must be a string of 1 to 255 characters")
    disk_format = props.pop("disk_format", None)
    if not isinstance(disk_format, str):
        raise malformed("disk_format is required")
    if disk_format not in disk_formats:
        raise ims_error(400, "IMG.0072", "The image format is not supported.")
    if props.pop("container_format", "bare") != "bare":
        raise malformed("container_format must be 'bare'")
    if props.pop("visibility", "private") != "private":
        raise malformed("visibility must be 'private'")
    min_disk = _int_field(props, "min_disk", 0, 1024)
    min_ram = _int_field(props, "min_ram", 0, None)
    tags = props.pop("tags", [])
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
        raise malformed("tags must be a list of strings")
    protected = props.pop("protected", False)
    if not isinstance(protected, bool):
        raise malformed("protected must be true or false")
    for key, value in props.items():
        if key in READ_ONLY_FIELDS:
            raise malformed(f"attribute '{key}' is read-only")
        if not isinstance(value, str):
            raise malformed(f"{value!r} is not of type 'string' ({key})")
    image_id, stamp = str(uuid.uuid4()), now_stamp()
    return {
        "id": image_id, "name": name, "status": "queued", "disk_format": disk_format,
        "container_format": "bare", "visibility": "private", "protected": protected,
        "min_disk": min_disk, "min_ram": min_ram, "tags": tags, "size": None, "checksum": None,
        "os_hash_algo": None, "os_hash_value": None, "virtual_size": None, "owner": owner,
        "created_at": stamp, "updated_at": stamp, "self": f"/v2/images/{image_id}",
        "file": f"/v2/images/{image_id}/file", "schema": "/v2/schemas/image",
        "__os_version": "Other Linux(64 bit)", "__imagetype": "private", "__isregistered": "true",
        "__platform": "Other", "__os_type": "Linux", **props,
    }


def parse_auth_request(body) -> tuple[str, str, dict | None, dict]:
    """(user, password, user's domain ref, project ref) from a keystone password-auth body."""
    try:
        auth = body["auth"]
        user = auth["identity"]["password"]["user"]
        name, password, domain = user["name"], user["password"], user.get("domain")
        project = (auth.get("scope") or {}).get("project") or {}
        project_domain = project.get("domain") or {}
    except (KeyError, TypeError, AttributeError) as problem:
        raise keystone_malformed(f"expecting auth.identity.password.user ({problem!r})") from None
    if not (isinstance(name, str) and isinstance(password, str)
            and isinstance(domain or {}, dict) and isinstance(project_domain, dict)):
        raise keystone_malformed("invalid identity or scope")
    return name, password, domain, project


def token_body(account: Account, issued: float, expires: float) -> dict:
    def stamp(moment):
        return dt.datetime.fromtimestamp(moment, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    domain = {"id": account.domain_id, "name": account.domain}
    return {"token": {
        "expires_at": stamp(expires), "issued_at": stamp(issued), "methods": ["password"],
        "user": {"id": account.user_id, "name": account.user, "domain": domain},
        "project": {"id": account.project_id, "name": account.project_name, "domain": domain},
        "roles": [{"id": "0b1e6d4f3a2c4e5b8d7f9a1c3e5b7d9f", "name": "te_admin"}], "catalog": []}}


@dataclass
class ImageRecord:
    fields: dict
    pending: dict | None = None      # size and hashes to publish once processing ends
    ready_at: float | None = None    # time.monotonic() at which "saving" turns "active"

    def settle(self) -> None:
        """Finish processing lazily: whoever looks after ready_at sees the image active."""
        if self.ready_at is not None and time.monotonic() >= self.ready_at:
            if self.fields["status"] == "saving":
                self.fields.update(self.pending, status="active", updated_at=now_stamp())
            self.pending = self.ready_at = None

    def to_json(self) -> dict:
        result = dict(self.fields)
        if result["size"] is not None:
            result["__image_size"] = str(result["size"])
        return result


@dataclass
class Faults:
    fail_puts: int = 0
    fail_put_status: int = 500
    fail_gets: int = 0
    fail_get_status: int = 503
    cut_put_after_bytes: int | None = None
    put_bytes_per_second: int | None = None
    # The image is stored (active after processing) before the 204 is sent this much later:
    # a client that dies in that window never hears that its PUT succeeded.
    put_reply_delay_seconds: float = 0.0
    # That many import-from-OBS jobs FAIL with this reason (IMS's words when it may not read OBS).
    fail_imports: int = 0
    import_fail_reason: str = obs_import.NO_ACCESS


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_seconds(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


# What each fault switch accepts (see Simulator.set_faults).
FAULT_CHECKS = {
    "fail_puts": _is_count, "fail_gets": _is_count,
    "fail_put_status": lambda v: _is_count(v) and 400 <= v <= 599,
    "fail_get_status": lambda v: _is_count(v) and 400 <= v <= 599,
    "cut_put_after_bytes": lambda v: v is None or _is_count(v),
    "put_bytes_per_second": lambda v: v is None or _is_count(v),
    "put_reply_delay_seconds": _is_seconds,
    "processing_seconds": _is_seconds,
    "expire_tokens": lambda v: isinstance(v, bool),
    "fail_imports": _is_count,
    "import_fail_reason": lambda v: isinstance(v, str) and bool(v),
}


@dataclass
class TokenRecord:
    account: Account
    expires_at: float                # time.time()


class BodyReader:
    """Reads a request body given by Content-Length or by chunked transfer encoding."""

    def __init__(self, rfile, length: int | None):
        self.rfile, self.left, self.chunked = rfile, length or 0, length is None
        self.done = False

    def read(self, size: int) -> bytes:
        if self.done:
            return b""
        if self.chunked and self.left == 0:
            self._start_chunk()
            if self.done:
                return b""
        if not self.chunked and self.left == 0:
            self.done = True
            return b""
        # What has arrived, as a server does: a client that holds back the end of a body (the
        # portal's early push) finds every byte it sent already taken and stored.
        data = self.rfile.read1(min(size, self.left))
        if not data:
            raise ClientGone()
        self.left -= len(data)
        if self.chunked and self.left == 0:
            self._end_chunk()
        return data

    def _end_chunk(self) -> None:
        end = self.rfile.readline(64)
        if end not in (b"\r\n", b"\n"):
            raise BadChunk() if end else ClientGone()

    def _start_chunk(self) -> None:
        line = self.rfile.readline(1024)
        if not line.endswith(b"\n"):
            raise ClientGone() if not line else BadChunk()
        try:
            self.left = int(line.split(b";")[0].strip(), 16)
        except ValueError:
            raise BadChunk() from None
        if self.left < 0:
            raise BadChunk()
        if self.left == 0:           # last chunk: skip trailers up to the empty line
            while (line := self.rfile.readline(1024)) not in (b"\r\n", b"\n"):
                if not line:
                    raise ClientGone()
            self.done = True


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64


class Simulator:
    """The simulator's state (one lock for all of it) and its server thread."""

    def __init__(self, data_dir, host="127.0.0.1", port=0, token_ttl=86400,
                 processing_seconds=0.0, disk_formats=DEFAULT_DISK_FORMATS, accounts=(),
                 quiet=True):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.host, self.port, self.token_ttl, self.quiet = host, port, token_ttl, quiet
        self.disk_formats = tuple(disk_formats)
        self.accounts = [DEMO_ACCOUNT, *accounts]
        self._initial_processing = self.processing_seconds = float(processing_seconds)
        self._lock = threading.Lock()
        self._tokens: dict[str, TokenRecord] = {}
        self._images: dict[str, ImageRecord] = {}
        self._faults = Faults()
        self._jobs: dict[str, dict] = {}
        # The S3-compatible store the import from OBS reads (set_obs); None: no OBS access.
        self.obs: dict | None = None
        self._log: list[dict] = []
        self._connections: set[socket.socket] = set()
        self._server: _Server | None = None
        self.url = ""

    # ---- lifecycle ----
    def start(self) -> "Simulator":
        self._server = _Server((self.host, self.port), Handler)
        self._server.sim = self
        self.port = self._server.server_address[1]
        self.url = f"http://{self.host}:{self.port}"
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                         name="imssim", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        with self._lock:     # wake threads parked on keep-alive connections
            for conn in self._connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._server.server_close()
        self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    def track_connection(self, conn: socket.socket, is_open: bool) -> None:
        with self._lock:
            (self._connections.add if is_open else self._connections.discard)(conn)

    def image_path(self, image_id: str) -> Path:
        return self.data_dir / image_id

    # ---- IAM ----
    def issue_token(self, account: Account = DEMO_ACCOUNT) -> tuple[str, float, float]:
        """A new token for account: (token, issued_at, expires_at) as time.time() values."""
        token, issued = secrets.token_urlsafe(32), time.time()
        with self._lock:
            self._tokens[token] = TokenRecord(account, issued + self.token_ttl)
        return token, issued, issued + self.token_ttl

    def find_account(self, user, password, domain, project) -> Account:
        """Match credentials and project scope; raise the keystone 401 on failure."""
        def domain_ok(account, ref):
            return ref is None or ref.get("name") == account.domain or ref.get("id") == account.domain_id
        known = [a for a in self.accounts if a.user == user and a.password == password
                 and domain_ok(a, domain)]
        if not known:
            raise keystone_error(401, "Unauthorized", "The request you have made requires authentication.")
        for account in known:
            if project.get("id") == account.project_id or (
                    project.get("name") == account.project_name and domain_ok(account, project.get("domain"))):
                return account
        wanted = project.get("name") or project.get("id") or "(none)"
        raise keystone_error(401, "Unauthorized",
                             f"The project is not accessible: {wanted}. IMS needs a project-scoped token.")

    def account_for_token(self, token: str | None) -> Account:
        with self._lock:
            record = self._tokens.get(token or "")
        if record is None:
            raise ims_error(401, "APIGW.0301", "Incorrect IAM authentication information: token is invalid.")
        if time.time() >= record.expires_at:
            raise ims_error(401, "APIGW.0307", "The token has expired. Obtain a new token and try again.")
        return record.account

    def expire_tokens(self) -> None:
        with self._lock:
            for record in self._tokens.values():
                record.expires_at = min(record.expires_at, time.time())

    # ---- IMS images ----
    def create_image(self, account: Account, body, disk_formats=None) -> dict:
        """`disk_formats`: what the route takes (the native POST: self.disk_formats; the import
        from OBS: every format IMS imports)."""
        fields = build_image_fields(body, disk_formats or self.disk_formats, account.project_id)
        with self._lock:
            self._images[fields["id"]] = ImageRecord(fields)
        return dict(fields)

    def _visible(self, account: Account, image_id: str) -> ImageRecord:
        """The caller's image, settled; another project's image is as unknown as a missing one."""
        record = self._images.get(image_id)
        if record is None or record.fields["owner"] != account.project_id:
            raise not_found()
        record.settle()
        return record

    def list_images(self, account: Account) -> list[dict]:
        with self._lock:
            mine = [r for r in self._images.values() if r.fields["owner"] == account.project_id]
            for record in mine:
                record.settle()
            return [record.to_json() for record in mine]

    def get_image(self, account: Account, image_id: str) -> dict:
        with self._lock:
            return self._visible(account, image_id).to_json()

    def delete_image(self, account: Account, image_id: str) -> None:
        with self._lock:
            self._visible(account, image_id)
            del self._images[image_id]
            self.image_path(image_id).unlink(missing_ok=True)

    def begin_upload(self, account: Account, image_id: str, length: int | None) -> Path:
        """Check and switch the image to saving atomically, so two PUTs cannot both stream."""
        with self._lock:
            record = self._visible(account, image_id)
            if length is not None and length >= MAX_IMAGE_BYTES:
                raise ims_error(413, "IMG.0059", "The image file exceeds 128 GB.")
            status = record.fields["status"]
            if status != "queued":
                raise ims_error(409, "IMG.0021",
                                f"Image status transition from {status} to saving is not allowed")
            if length == 0:
                raise ims_error(400, "IMG.0057", "The image file is empty.")
            record.fields.update(status="saving", updated_at=now_stamp())
        return self.image_path(image_id)

    def upload_wanted(self, image_id: str) -> bool:
        with self._lock:
            return image_id in self._images

    def abort_upload(self, image_id: str) -> None:
        """Glance's behaviour after a failed upload: back to queued, partial data removed."""
        with self._lock:
            record = self._images.get(image_id)
            if record is not None and record.fields["status"] == "saving":
                record.fields.update(status="queued", updated_at=now_stamp())
            self.image_path(image_id).unlink(missing_ok=True)

    def finish_upload(self, image_id: str, size: int, md5: str, sha512: str) -> None:
        with self._lock:
            record = self._images.get(image_id)
            if record is None:
                self.image_path(image_id).unlink(missing_ok=True)
                raise ImageGone()
            record.pending = {"size": size, "checksum": md5, "os_hash_algo": "sha512",
                              "os_hash_value": sha512}
            record.ready_at = time.monotonic() + self.processing_seconds
            record.settle()

    # ---- faults and inspection (HTTP /_sim/ and tests) ----
    def faults(self) -> dict:
        with self._lock:
            return {**asdict(self._faults), "processing_seconds": self.processing_seconds}

    def set_faults(self, **changes) -> dict:
        """Change any fault switch (see FAULT_CHECKS); return the fault state."""
        for name, value in changes.items():
            if name not in FAULT_CHECKS:
                raise ValueError(f"unknown fault {name!r}")
            if not FAULT_CHECKS[name](value):
                raise ValueError(f"invalid value for {name}: {value!r}")
        if changes.pop("expire_tokens", False):
            self.expire_tokens()
        with self._lock:
            self.processing_seconds = float(changes.pop("processing_seconds", self.processing_seconds))
            for name, value in changes.items():
                setattr(self._faults, name, value)
        return self.faults()

    def take_fault(self, kind: str) -> int | None:
        """Consume one injected failure for "put" or "get"; return its status or None."""
        with self._lock:
            left = getattr(self._faults, f"fail_{kind}s")
            if left <= 0:
                return None
            setattr(self._faults, f"fail_{kind}s", left - 1)
            return getattr(self._faults, f"fail_{kind}_status")

    def take_put_shaping(self) -> tuple[int | None, int | None]:
        """(cut_after_bytes, bytes_per_second) for a PUT that starts streaming; the cut is one-shot."""
        with self._lock:
            cut, self._faults.cut_put_after_bytes = self._faults.cut_put_after_bytes, None
            return cut, self._faults.put_bytes_per_second or None

    def reset(self) -> None:
        with self._lock:
            for image_id in self._images:
                self.image_path(image_id).unlink(missing_ok=True)
            self._images.clear()
            self._jobs.clear()
            self._log.clear()
            self._faults = Faults()
            self.processing_seconds = self._initial_processing

    # ---- import from OBS (imssim/obs_import.py) ----
    def set_obs(self, *, endpoint_url: str, access_key: str, secret_key: str, region: str = "") -> None:
        """Where the import from OBS reads objects (IMS's own access to OBS)."""
        self.obs = {"endpoint_url": endpoint_url, "access_key": access_key, "secret_key": secret_key,
                    "region": region or None}

    def get_job(self, account: Account, job_id: str) -> dict:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job["owner"] != account.project_id:
                raise ims_error(404, "IMS.0171", "The job does not exist.")
            return obs_import.job_body(job)

    def images(self) -> list[dict]:
        with self._lock:
            result = []
            for image_id, record in self._images.items():
                record.settle()
                f = record.fields
                result.append({"id": image_id, "name": f["name"], "owner": f["owner"],
                               "status": f["status"], "size": f["size"], "checksum": f["checksum"],
                               "os_hash_value": f["os_hash_value"], "disk_format": f.get("disk_format"),
                               "path": str(self.image_path(image_id))})
            return result

    def set_image_status(self, image_id: str, status: str) -> dict:
        with self._lock:
            record = self._images.get(image_id)
            if record is None:
                raise KeyError(image_id)
            if status == "active" and record.pending:
                record.fields.update(record.pending)
            record.pending = record.ready_at = None    # a forced status is final
            record.fields.update(status=status, updated_at=now_stamp())
            return record.to_json()

    def record_request(self, method: str, path: str, status: int | None) -> None:
        with self._lock:
            self._log.append({"method": method, "path": path, "status": status})

    def requests_seen(self) -> list[dict]:
        with self._lock:
            return [dict(entry) for entry in self._log]


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"        # keep-alive: every reply states its length
    server_version = "imssim/1.0"
    timeout = IDLE_TIMEOUT
    disable_nagle_algorithm = True       # headers and body are two writes: avoid 40 ms stalls
    _expect_continue = False

    @property
    def sim(self) -> Simulator:
        return self.server.sim

    def setup(self):
        super().setup()
        self.sim.track_connection(self.connection, True)

    def finish(self):
        self.sim.track_connection(self.connection, False)
        super().finish()

    def handle_expect_100(self):
        # curl waits for "100 Continue" before sending a body. Send it only once we want the
        # body, so an early rejection reaches curl before it sends any image bytes.
        self._expect_continue = True
        return True

    def log_request(self, code="-", size="-"):
        pass                             # _log writes method, path and status only

    def log_message(self, format, *args):
        if not self.sim.quiet:
            sys.stderr.write("imssim: " + (format % args) + "\n")

    def do_GET(self):
        self._handle()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    # ---- plumbing ----
    def _handle(self):
        self._path = urlsplit(self.path).path     # query strings (?nocatalog=true) play no part
        self._logged = self._replied = False
        self._length, self._body_pending = None, True   # until the headers say otherwise
        try:
            try:
                self._length = self._content_length()
                self._body_pending = self._length != 0
                self._route()
            except ApiError as error:
                self._reply(error.status, error.body)
        except (ClientGone, ConnectionError, TimeoutError):
            self.close_connection = True          # the client went away: nobody to answer
            self._log(None)
        except Exception:
            self.close_connection = True
            self.log_message("internal error on %s %s", self.command, self._path)
            traceback.print_exc()
            if not self._replied:
                try:
                    self._reply(500, injected_error(500).body)
                except OSError:
                    pass
        finally:
            self._expect_continue = False

    def _content_length(self) -> int | None:
        """The declared body length; None for a chunked body."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return None
        raw = self.headers.get("Content-Length", "0").strip()
        if not raw.isdigit():
            raise malformed("invalid Content-Length")
        return int(raw)

    def _send_continue(self):
        if self._expect_continue:
            self._expect_continue = False
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _read_json(self, bad_request):
        """The request body parsed as JSON (None when empty), read in full."""
        self._send_continue()
        reader, data = BodyReader(self.rfile, self._length), bytearray()
        try:
            while chunk := reader.read(READ_SIZE):
                data += chunk
                if len(data) > MAX_JSON_BYTES:
                    raise bad_request("the body is too large")
        except BadChunk:
            raise bad_request("invalid chunked encoding") from None
        self._body_pending = False
        if not data.strip():
            return None
        try:
            return json.loads(data)
        except ValueError as problem:
            raise bad_request(f"invalid JSON: {problem}") from None

    def _reply(self, status: int, body=None, headers=None):
        payload = b"" if body is None else json.dumps(body).encode()
        closing = self._body_pending     # body left unread: answer, drain, then close
        self._log(status)                # before sending, so the log order is the reply order
        self.send_response(status)
        self.send_header("X-Openstack-Request-Id", f"req-{uuid.uuid4()}")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if status != 204:                # RFC 9110 forbids Content-Length on a 204 (length is 0)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
        if closing or self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)
        self._replied = True
        if closing:
            self._drain()

    def _drain(self):
        """Read and drop the unread body for a while (at most 2 s or 64 MiB) before closing.

        Closing a socket with unread data makes the kernel send a reset, and the client may
        lose the reply: python-requests and curl would report a broken pipe instead of our
        401/404/409/413. Glance under uWSGI reads the body in the same way."""
        self._body_pending = False
        budget = DRAIN_BYTES if self._length is None else min(self._length, DRAIN_BYTES)
        deadline = time.monotonic() + DRAIN_SECONDS
        try:
            while budget > 0 and (left := deadline - time.monotonic()) > 0:
                self.connection.settimeout(left)
                data = self.rfile.read1(min(READ_SIZE, budget))
                if not data:
                    break
                budget -= len(data)
        except OSError:
            pass

    def _drop_connection(self):
        """Act as a dead peer: no reply, and SO_LINGER 0 turns the coming close into a reset."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self._log(None)

    def _log(self, status: int | None):
        # Method, path and status only: headers carry tokens and bodies carry passwords.
        if self._logged:
            return
        self._logged = True
        if not self._path.startswith("/_sim/"):
            self.sim.record_request(self.command, self._path, status)
        self.log_message("%s %s %s", self.command, self._path, "-" if status is None else status)

    # ---- routing ----
    def _route(self):
        path, method = self._path.rstrip("/"), self.command
        if path.startswith("/_sim/"):
            return self._route_sim(method, path.split("/")[2:])
        if path == "/v3/auth/tokens":
            if method != "POST":
                raise keystone_error(405, "Method Not Allowed", f"{method} is not allowed here.")
            return self._post_token()
        if path.startswith("/v3/"):
            raise keystone_error(404, "Not Found", "The resource could not be found.")
        parts = path.split("/")[1:]
        if path == "/v2/cloudimages/action" or (parts[:1] == ["v1"] and "job" in path):
            return self._route_import(method, parts)
        if parts[:2] == ["v2", "images"] and (len(parts) <= 3 or parts[3:] == ["file"]):
            return self._route_ims(method, parts)
        raise ims_error(404, "APIGW.0101",
                        "The API does not exist or has not been published in the environment.")

    def _route_ims(self, method: str, parts: list[str]):
        account = self.sim.account_for_token(self.headers.get("X-Auth-Token"))
        routes = {("GET", 2): self._list, ("POST", 2): self._create, ("GET", 3): self._get,
                  ("DELETE", 3): self._delete, ("PUT", 4): self._put_file}
        action = routes.get((method, len(parts)))
        if action is None:
            raise ims_error(405, "IMG.0001", f"The request is malformed: {method} is not allowed.")
        if len(parts) == 2:
            return action(account)
        if not is_uuid(parts[2]):
            raise not_found()
        return action(account, parts[2])

    def _route_import(self, method: str, parts: list[str]):
        """POST /v2/cloudimages/action; GET /v1/{project_id}/jobs/{job_id} or /v1/cloudimages/job/{job_id}."""
        account = self.sim.account_for_token(self.headers.get("X-Auth-Token"))
        if parts == ["v2", "cloudimages", "action"] and method == "POST":
            bucket, key, _, fields = obs_import.validate(self._read_json(malformed), ims_error, malformed)
            job = obs_import.start_job(self.sim, account, bucket, key, fields, now_stamp)
            return self._reply(200, {"job_id": job["job_id"]})
        own_project = len(parts) == 4 and parts[2] == "jobs" and parts[1] == account.project_id
        if method == "GET" and (own_project or parts[1:3] == ["cloudimages", "job"]) and len(parts) == 4:
            return self._reply(200, self.sim.get_job(account, parts[3]))
        raise ims_error(404, "APIGW.0101", "The API does not exist or has not been published in the environment.")

    def _route_sim(self, method: str, parts: list[str]):
        body = self._read_json(sim_bad_request) if method == "POST" else None
        if parts == ["faults"] and method in ("GET", "POST"):
            if body is not None and not isinstance(body, dict):
                raise sim_bad_request("expected a JSON object")
            try:
                return self._reply(200, self.sim.set_faults(**(body or {})))
            except ValueError as problem:
                raise sim_bad_request(str(problem)) from None
        if parts == ["reset"] and method == "POST":
            self.sim.reset()
            return self._reply(200, {"reset": True})
        if parts == ["images"] and method == "GET":
            return self._reply(200, {"images": self.sim.images()})
        if parts == ["requests"] and method == "GET":
            return self._reply(200, {"requests": self.sim.requests_seen()})
        if len(parts) == 3 and parts[0] == "images" and parts[2] == "status" and method == "POST":
            if not isinstance(body, dict) or not isinstance(body.get("status"), str):
                raise sim_bad_request('expected {"status": "..."}')
            try:
                return self._reply(200, self.sim.set_image_status(parts[1], body["status"]))
            except KeyError:
                raise ApiError(404, {"error": {"code": "SIM.404", "message": "no such image"}}) from None
        raise ApiError(404, {"error": {"code": "SIM.404", "message": "no such simulator endpoint"}})

    # ---- IAM ----
    def _post_token(self):
        user, password, domain, project = parse_auth_request(self._read_json(keystone_malformed))
        account = self.sim.find_account(user, password, domain, project)
        token, issued, expires = self.sim.issue_token(account)
        self._reply(201, token_body(account, issued, expires), {"X-Subject-Token": token})

    # ---- IMS ----
    def _list(self, account: Account):
        self._reply(200, {"images": self.sim.list_images(account)})

    def _create(self, account: Account):
        image = self.sim.create_image(account, self._read_json(malformed))
        self._reply(201, image, {"Location": f"{self.sim.url}/v2/images/{image['id']}"})

    def _get(self, account: Account, image_id: str):
        status = self.sim.take_fault("get")
        if status:
            raise injected_error(status)
        self._reply(200, self.sim.get_image(account, image_id))

    def _delete(self, account: Account, image_id: str):
        self.sim.delete_image(account, image_id)
        self._reply(204)

    def _put_file(self, account: Account, image_id: str):
        status = self.sim.take_fault("put")
        if status:
            raise injected_error(status)
        media_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if media_type != "application/octet-stream":
            raise ims_error(415, "IMG.0001", f"The request media type {media_type or None} "
                            "is not supported by this server.")
        path = self.sim.begin_upload(account, image_id, self._length)
        self._send_continue()
        try:
            size, md5, sha512 = self._stream_to_file(path, image_id)
        except ImageGone:
            path.unlink(missing_ok=True)
            raise gone(image_id) from None
        except Exception as problem:
            self.sim.abort_upload(image_id)
            if isinstance(problem, CutConnection):
                return self._drop_connection()
            if isinstance(problem, BadChunk):
                raise malformed("invalid chunked encoding") from None
            raise
        if size == 0:                    # a chunked body without data
            self.sim.abort_upload(image_id)
            raise ims_error(400, "IMG.0057", "The image file is empty.")
        try:
            self.sim.finish_upload(image_id, size, md5, sha512)
        except ImageGone:
            raise gone(image_id) from None
        time.sleep(self.sim.faults()["put_reply_delay_seconds"])
        self._reply(204)

    def _stream_to_file(self, path: Path, image_id: str) -> tuple[int, str, str]:
        """Copy the body to path in bounded reads, hashing as it goes; honour the PUT faults."""
        cut_after, rate = self.sim.take_put_shaping()
        step = READ_SIZE if not rate else max(1, min(READ_SIZE, rate // 10))  # smooth throttle
        reader = BodyReader(self.rfile, self._length)
        md5, sha512 = hashlib.md5(usedforsecurity=False), hashlib.sha512()
        size, started = 0, time.monotonic()
        with open(path, "wb", buffering=0) as out:
            while True:
                if cut_after is not None and size >= cut_after:
                    raise CutConnection()
                data = reader.read(step if cut_after is None else min(step, cut_after - size))
                if not data:
                    break
                out.write(data)
                md5.update(data)
                sha512.update(data)
                size += len(data)
                if size >= MAX_IMAGE_BYTES:
                    raise ims_error(413, "IMG.0059", "The image file exceeds 128 GB.")
                if not self.sim.upload_wanted(image_id):
                    raise ImageGone()
                if rate:
                    time.sleep(max(0.0, size / rate - (time.monotonic() - started)))
        self._body_pending = False
        return size, md5.hexdigest(), sha512.hexdigest()
