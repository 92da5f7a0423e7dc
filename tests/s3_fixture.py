"""A real S3-compatible object store on loopback for the tests: OpenStack Swift with its s3api
middleware, installed from PyPI into a venv of its own (once; kept in SWIFT_VENV, by default
~/.cache/ims-portal/swift-venv) and started once per test session, everything under one
temporary folder (see shared/reference/object-store-peers.md for the settings and gotchas).

`swift_store` (session) is the running store, or a skip with the exact reason it cannot run.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests

SWIFT_VERSION = "2.38.3"
ACCESS_KEY, SECRET_KEY = "test:tester", "testing"
REGION = "us-east-1"
SERVERS = ("account", "container", "object")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def swift_venv() -> Path:
    """The venv with Swift, installed when missing (about 5 s); RuntimeError saying why not."""
    venv = Path(os.environ.get("SWIFT_VENV") or Path.home() / ".cache" / "ims-portal" / "swift-venv")
    if (venv / "bin" / "swift-proxy-server").exists():
        return venv
    python = shutil.which("python3") or sys.executable
    steps = [[python, "-m", "venv", str(venv)], [str(venv / "bin" / "pip"), "install", "-q", f"swift=={SWIFT_VERSION}"]]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=300)
        if done.returncode:
            raise RuntimeError(f"installing Swift failed ({' '.join(step[:3])}): {done.stderr.strip()[-500:]}")
    return venv


def _probe_xattrs(folder: Path) -> None:
    probe = folder / "xattr-probe"
    probe.touch()
    try:
        os.setxattr(probe, "user.probe", b"1")
    except OSError as exc:
        raise RuntimeError(f"Swift needs user xattrs, and {folder} does not allow them ({exc})") from None
    finally:
        probe.unlink()


PROXY_PIPELINE = (
    "catch_errors gatekeeper healthcheck proxy-logging cache listing_formats bulk tempurl ratelimit s3api "
    "tempauth copy container-quotas account-quotas slo dlo versioned_writes proxy-logging proxy-server"
)


# Swift moves an object in 64 KiB steps by default, each a round of Python in the proxy and the
# object server: 1 MiB steps take a quarter less of the CPU the store shares with the portal
# here (a 256 MiB GET: 6.5 -> 5.0 CPU s/GiB; bench/README.md).
CHUNKS = {
    "object": "network_chunk_size = 1048576\ndisk_chunk_size = 1048576\n",
    "proxy": "object_chunk_size = 1048576\nclient_chunk_size = 1048576\n",
}


class SwiftStore:
    """A single-node Swift (account, container, object servers and the proxy) in `folder`."""

    def __init__(self, venv: Path, folder: Path):
        self.venv, self.folder = venv, folder
        self.ports = {kind: _free_port() for kind in (*SERVERS, "proxy")}
        self.endpoint = f"http://127.0.0.1:{self.ports['proxy']}"
        self.bucket = "staging"
        self.processes: dict[str, subprocess.Popen] = {}
        self._configure()

    def _configure(self) -> None:
        devices = self.folder / "devices"
        (devices / "d1").mkdir(parents=True)
        _probe_xattrs(devices / "d1")
        (self.folder / "swift.conf").write_text(
            f"[swift-hash]\nswift_hash_path_prefix = {uuid.uuid4().hex}\nswift_hash_path_suffix = {uuid.uuid4().hex}\n"
            "[storage-policy:0]\nname = Policy-0\ndefault = yes\n"
        )
        common = (f"[DEFAULT]\nbind_ip = 127.0.0.1\nuser = {_user()}\n"
                  f"swift_dir = {self.folder}\ndevices = {devices}\nmount_check = false\nworkers = 1\n"
                  "log_level = WARNING\n")
        for kind in SERVERS:
            (self.folder / f"{kind}.conf").write_text(
                f"{common}bind_port = {self.ports[kind]}\n[pipeline:main]\npipeline = healthcheck {kind}-server\n"
                f"[app:{kind}-server]\nuse = egg:swift#{kind}\n{CHUNKS.get(kind, '')}"
                "[filter:healthcheck]\nuse = egg:swift#healthcheck\n"
            )
            builder = str(self.folder / f"{kind}.builder")
            for args in (["create", "8", "1", "1"], ["add", f"r1z1-127.0.0.1:{self.ports[kind]}/d1", "100"],
                         ["rebalance"]):
                subprocess.run([str(self.venv / "bin" / "swift-ring-builder"), builder, *args],
                               capture_output=True, check=args[0] != "rebalance", timeout=60)
        eggs = {"cache": "memcache"}  # the pipeline's name for a filter, and its entry point
        filters = {name: f"use = egg:swift#{eggs.get(name, name.replace('-', '_'))}"
                   for name in PROXY_PIPELINE.split()[:-1]}
        filters["s3api"] += f"\nlocation = {REGION}\nmax_upload_part_num = 10000"
        filters["tempauth"] += f"\nuser_test_tester = {SECRET_KEY} .admin"
        proxy_filters = "".join(f"[filter:{name}]\n{body}\n" for name, body in filters.items())
        (self.folder / "proxy.conf").write_text(
            f"{common}bind_port = {self.ports['proxy']}\n[pipeline:main]\npipeline = {PROXY_PIPELINE}\n"
            "[app:proxy-server]\nuse = egg:swift#proxy\naccount_autocreate = true\n" + CHUNKS["proxy"] + proxy_filters
        )

    def start(self, which=("account", "container", "object", "proxy")) -> None:
        for kind in which:
            program = "swift-proxy-server" if kind == "proxy" else f"swift-{kind}-server"
            log = open(self.folder / f"{kind}.log", "ab")
            self.processes[kind] = subprocess.Popen(
                [str(self.venv / "bin" / program), str(self.folder / f"{kind}.conf")],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        try:
            for kind in which:
                self._wait_healthy(kind)
        except RuntimeError:
            self.stop()  # none left running when one cannot start
            raise

    def _wait_healthy(self, kind: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.processes[kind].poll() is not None:
                raise RuntimeError(f"Swift's {kind} server exited: {self.log_tail(kind)}")
            try:
                if requests.get(f"http://127.0.0.1:{self.ports[kind]}/healthcheck", timeout=1).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"Swift's {kind} server did not answer within {timeout} s: {self.log_tail(kind)}")

    def log_tail(self, kind: str) -> str:
        path = self.folder / f"{kind}.log"
        return path.read_text(errors="replace")[-800:] if path.exists() else ""

    def stop(self, which=("proxy", "object", "container", "account")) -> None:
        """SIGTERM to each server's own process group (the server and its worker)."""
        for kind in which:
            process = self.processes.pop(kind, None)
            if process is None:
                continue
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def client(self, secret: str = SECRET_KEY):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=secret,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                          request_checksum_calculation="when_required", response_checksum_validation="when_required"),
        )

    def env(self, prefix: str = "staging/") -> dict[str, str]:
        """The portal's settings for staging in this store (as environment variables)."""
        return {
            "STAGING_S3_BUCKET": self.bucket, "STAGING_S3_PREFIX": prefix, "STAGING_S3_ENDPOINT_URL": self.endpoint,
            "STAGING_S3_REGION": REGION, "STAGING_S3_ACCESS_KEY": ACCESS_KEY, "STAGING_S3_SECRET_KEY": SECRET_KEY,
            "STAGING_S3_ADDRESSING_STYLE": "path",
        }

    def storage_options(self, prefix: str) -> dict:
        from botocore.config import Config

        return {
            "bucket_name": self.bucket, "location": prefix, "endpoint_url": self.endpoint, "region_name": REGION,
            "access_key": ACCESS_KEY, "secret_key": SECRET_KEY, "addressing_style": "path",
            "signature_version": "s3v4", "file_overwrite": True,
            "client_config": Config(request_checksum_calculation="when_required",
                                    response_checksum_validation="when_required", connect_timeout=2,
                                    read_timeout=20, retries={"max_attempts": 1, "mode": "standard"}),
        }


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


@pytest.fixture(scope="session")
def swift_store(tmp_path_factory):
    """Swift with s3api on loopback and a bucket "staging"; skips, with the exact reason, when
    Swift cannot be installed or started here."""
    try:
        store = SwiftStore(swift_venv(), tmp_path_factory.mktemp("swift"))
        store.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"object-staging tests need OpenStack Swift on loopback, which cannot run here: {exc}")
    try:
        store.client().create_bucket(Bucket=store.bucket)
        yield store
    finally:
        store.stop()


PART = 5 * 1024**2  # the smallest part S3 allows: the tests cross part boundaries cheaply


@pytest.fixture
def object_staging(swift_store, settings, tmp_path):
    """This test stages in the Swift store, under a prefix of its own, in parts of 5 MiB."""
    prefix = f"t-{uuid.uuid4().hex[:12]}/"
    settings.STORAGES = {
        **settings.STORAGES,
        "staging": {"BACKEND": "storages.backends.s3.S3Storage", "OPTIONS": swift_store.storage_options(prefix)},
    }
    settings.STAGING_S3_PART_SIZE = PART
    settings.STAGING_SCRATCH_DIR = str(tmp_path / "scratch")
    swift_store.prefix = prefix
    return swift_store


def objects_under(store, prefix: str) -> dict[str, int]:
    """Object keys (without the prefix) and sizes."""
    found = {}
    for page in store.client().get_paginator("list_objects_v2").paginate(Bucket=store.bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            found[item["Key"][len(prefix):]] = item["Size"]
    return found


def multipart_uploads_under(store, prefix: str) -> list[str]:
    reply = store.client().list_multipart_uploads(Bucket=store.bucket, Prefix=prefix)
    return [item["Key"] for item in reply.get("Uploads", [])]


@pytest.fixture(params=["local", "s3"])
def staging_backend(request):
    """Runs a test once with local staging and once with object staging (Swift). A test that
    looks into the local staging folder itself (it names `staging_dir`) runs locally only."""
    if request.param == "s3":
        if "staging_dir" in request.node.function.__code__.co_varnames[: request.node.function.__code__.co_argcount]:
            pytest.skip("looks into the local staging folder")
        request.getfixturevalue("object_staging")
    return request.param
