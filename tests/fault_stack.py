"""The real processes behind the fault-injection tests (tests/test_faults.py).

A private Redis, the IMS simulator, gunicorn, Celery workers and Celery beat each run as a
process of their own (in a process group of their own, so that a test can kill one with a real
signal), with their output in a log file under a temporary folder. They start once per test
module, not per session: their beat polls and re-queues every upload in the test database, so a
stack that outlived its tests would act on other tests' uploads with the wrong simulator and
staging folder. `faults_stack` (per test) brings back whatever the previous test killed or
stopped and clears Redis, the simulator and the staging folder.

The staging folder is a small file system (tmpfs, else a loop-mounted ext4) where the machine
allows mounting one, so that a test can fill it up; elsewhere it is a plain folder and the
full-disk test is skipped with the reason.

With object staging (`s3_fault_stack`, `s3_faults_stack`: tests/test_faults_s3.py) the same
processes stage in the Swift store of tests/s3_fixture.py, under a prefix of their own.

Usage: `from tests.fault_stack import fault_stack, faults_stack  # noqa: F401` in a test module.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import requests
from django.conf import settings as django_settings

from tests.conftest import _database_url, _wait_for_worker_sessions_to_end
from tools.ensure_redis import find_redis_server

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
START_TIMEOUT = 60
STAGING_DISK_MB = 64
FILLER = "filler.bin"  # no upload's name: theirs are <uuid>.<suffix>

# How fast a stalled push is taken over and a lost message is sent again: the product's
# defaults (2 minutes, checked every minute) made short so that the tests finish.
RECONCILE_EVERY_SECONDS = 1
RECONCILE_GRACE_SECONDS = 5


def push_timing() -> dict[str, str]:
    """A heartbeat every second and stale after five: a dead worker shows within seconds."""
    return {"PUSH_HEARTBEAT_SECONDS": "1", "PUSH_STALE_SECONDS": "5"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


class Process:
    """One server process: started, killed with a signal, started again, its log kept."""

    def __init__(self, name: str, argv: list[str], env: dict, log_path: Path, ready: Callable[[Process], bool]):
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self._ready = ready
        self.process: subprocess.Popen | None = None
        self.log_start = 0  # where this run's output starts in the log

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> Process:
        assert not self.running, f"{self.name} is already running"
        with open(self.log_path, "ab") as log:
            self.log_start = log.tell()
            log.write(f"\n===== {self.name} started: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.argv, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT) -> Process:
        deadline = time.monotonic() + timeout
        while not self._ready(self):
            if not self.running:
                raise AssertionError(f"{self.name} ended while starting:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} not ready after {timeout}s:\n{self.output()[-3000:]}")
            time.sleep(0.1)
        return self

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 30) -> None:
        """Send `sig` to the whole process group (a Celery worker and its pool, gunicorn and its
        workers) and wait for the leader to end."""
        if not self.running:
            return
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        if sig == signal.SIGKILL:
            # Children that outlived the leader (a pool process between two polls) go too.
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def output(self) -> str:
        """This run's output."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self.log_start)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def full_output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class SimClient:
    """The simulator process, driven over its /_sim/ API."""

    def __init__(self, url: str):
        self.url = url

    def _call(self, method: str, path: str, **kwargs):
        response = requests.request(method, f"{self.url}/_sim/{path}", timeout=10, **kwargs)
        response.raise_for_status()
        return response.json()

    def set_faults(self, **faults) -> dict:
        return self._call("POST", "faults", json=faults)

    def reset(self) -> None:
        self._call("POST", "reset")

    def images(self) -> list[dict]:
        return self._call("GET", "images")["images"]

    def requests_seen(self) -> list[dict]:
        return self._call("GET", "requests")["requests"]

    def set_image_status(self, image_id: str, status: str) -> dict:
        return self._call("POST", f"images/{image_id}/status", json={"status": status})


def portal_process_env(*, database_url: str, redis_url: str, staging: Path, sim_url: str, **extra: str) -> dict:
    """The environment of the portal's own processes (gunicorn, workers, beat) in a test stack:
    the test database, a private Redis, a staging folder and the simulator, production-like
    (DEBUG off), with the test client's keys so that its sessions are valid; `extra` adds or
    overrides settings (object staging, TLS behind a proxy, timings)."""
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "DJANGO_SETTINGS_MODULE": "portal.settings",
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "STAGING_DIR": str(staging),
        "IMS_ENDPOINT": sim_url,
        "IAM_ENDPOINT": f"{sim_url}/v3",
        "SECRET_KEY": django_settings.SECRET_KEY,  # the test client's sessions must be valid
        "TOKEN_ENCRYPTION_KEY": django_settings.TOKEN_ENCRYPTION_KEY,
        "DEBUG": "0",
        "ALLOWED_HOSTS": "127.0.0.1",
        "UPLOAD_POLL_SECONDS": "0.5",
        "LOG_LEVEL": "INFO",
        **extra,
    }


def mount_small_disk(folder: Path, size_mb: int) -> tuple[str | None, str]:
    """Mount a small file system on `folder`: (what was mounted or None, why not)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmpfs = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(folder)],
                           capture_output=True, text=True)
    if tmpfs.returncode == 0:
        return "tmpfs", ""
    image = folder.parent / f"{folder.name}.ext4"
    try:
        subprocess.run(["truncate", "-s", f"{size_mb}M", str(image)], check=True, capture_output=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True, capture_output=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(folder)], check=True,
                       capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        why = getattr(exc, "stderr", "") or str(exc)
        return None, f"neither a tmpfs ({tmpfs.stderr.strip()}) nor a loop-mounted ext4 ({str(why).strip()}) " \
                     "could be mounted for the staging folder"
    return "loop-mounted ext4", ""


def unmount(folder: Path) -> None:
    if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


class FaultStack:
    """Redis, the simulator, gunicorn, workers and beat as separate processes on the test database."""

    def __init__(self, folder: Path, database_url: str, redis_server: str = "redis-server",
                 staging_env: dict[str, str] | None = None):
        """`staging_env`: settings that put staging elsewhere (object staging: STAGING_S3_*)."""
        self.folder = folder
        self.logs = folder / "logs"
        self.logs.mkdir()
        self.staging = folder / "staging"
        self.small_disk, self.small_disk_missing = mount_small_disk(self.staging, STAGING_DISK_MB)
        self.redis_port, sim_port, web_port = free_port(), free_port(), free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.sim = SimClient(f"http://127.0.0.1:{sim_port}")
        self.web_url = f"http://127.0.0.1:{web_port}"
        self.env = portal_process_env(
            database_url=database_url, redis_url=self.redis_url, staging=self.staging, sim_url=self.sim.url,
            STAGING_FREE_RESERVE_BYTES="0",  # the small staging disk is all for the tests
            RECONCILE_EVERY_SECONDS=str(RECONCILE_EVERY_SECONDS),
            RECONCILE_GRACE_SECONDS=str(RECONCILE_GRACE_SECONDS),
            **push_timing(),
            **(staging_env or {}),
        )
        self.redis = Process(
            "redis",
            [redis_server, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(folder)],
            self.env, self.logs / "redis.log", lambda p: self._redis_answers(),
        )
        sim_data = folder / "imssim"
        self.simulator = Process(
            "imssim",
            [PYTHON, "-m", "imssim", "--port", str(sim_port), "--data-dir", str(sim_data),
             "--processing-seconds", "0.3"],
            self.env, self.logs / "imssim.log", lambda p: http_ok(f"{self.sim.url}/_sim/faults"),
        )
        self.web = Process(
            "web",
            [PYTHON, "-m", "gunicorn", "-c", "gunicorn.conf.py", "--bind", f"127.0.0.1:{web_port}",
             "portal.wsgi:application"],
            self.env, self.logs / "web.log", lambda p: http_ok(f"{self.web_url}/accounts/login/"),
        )
        self.beat = Process(
            "beat",
            [PYTHON, "-m", "celery", "-A", "portal", "beat", "-l", "info", "-s", str(folder / "beat-schedule")],
            self.env, self.logs / "beat.log", lambda p: "beat: Starting..." in p.output(),
        )
        self.workers: dict[str, Process] = {}
        self.worker("w1")

    # ---- processes ----
    def worker(self, name: str, *, like_make_run: bool = False) -> Process:
        """The Celery worker `name` (made on first use; not started): one pool process, or with
        `like_make_run` the options of `make run` (two pool processes, gossip and mingle on), so
        that the worker waits for more messages while a push runs."""
        if name not in self.workers:
            options = (["-c", "2"] if like_make_run
                       else ["-c", "1", "--without-gossip", "--without-mingle"])
            self.workers[name] = Process(
                name,
                [PYTHON, "-m", "celery", "-A", "portal", "worker", "-Q", "uploads,celery", *options,
                 "-n", f"{name}@%h", "-l", "info"],
                self.env, self.logs / f"{name}.log", lambda p: " ready." in p.output(),
            )
        return self.workers[name]

    def standard(self) -> list[Process]:
        return [self.redis, self.simulator, self.web, self.workers["w1"], self.beat]

    def start(self) -> FaultStack:
        self.start_all(self.standard())
        return self

    @staticmethod
    def start_all(processes: list[Process]) -> None:
        """Start several processes at once, then wait until each is ready."""
        for process in processes:
            if not process.running:
                process.start()
        for process in processes:
            process.wait_ready()

    def stop(self) -> None:
        # Everything but Redis first: the workers still talk to it while shutting down.
        for process in [self.web, self.beat, *self.workers.values(), self.simulator]:
            process.stop()
        self.redis.stop()
        if self.small_disk:
            unmount(self.staging)

    def reset(self) -> None:
        """Between tests: the session's processes running, extra workers stopped, no leftovers."""
        for name, worker in self.workers.items():
            if name != "w1":
                worker.stop()
        self.start_all(self.standard())
        self.redis_client().flushall()
        self.sim.reset()
        for path in self.staging.iterdir():
            if path.is_file():
                path.unlink()

    # ---- Redis ----
    def redis_client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.redis_port, socket_timeout=5)

    def _redis_answers(self) -> bool:
        try:
            return bool(self.redis_client().ping())
        except redis.RedisError:
            return False

    # ---- staging ----
    def staged_path(self, upload) -> Path:
        return self.staging / upload.staged_name

    def fill_staging(self, *, leave_free: int) -> None:
        """Fill the staging file system until only `leave_free` bytes are left."""
        stats = os.statvfs(self.staging)
        filler = stats.f_bavail * stats.f_frsize - leave_free
        assert filler > 0, "the staging file system is already fuller than wanted"
        with open(self.staging / FILLER, "wb") as out:
            block = b"\0" * (1024 * 1024)
            while filler > 0:
                filler -= out.write(block[: min(len(block), filler)])

    def free_staging(self) -> None:
        (self.staging / FILLER).unlink(missing_ok=True)

    def logs_text(self) -> str:
        """The last lines of every log, for a failing assertion's message."""
        parts = []
        for process in [*self.workers.values(), self.beat, self.web]:
            parts.append(f"--- {process.name} ---\n{process.full_output()[-2500:]}")
        return "\n".join(parts)


@pytest.fixture(scope="module")
def fault_stack(django_db_setup, django_db_blocker, tmp_path_factory):
    """The processes, once per test module, on the test database."""
    try:
        redis_server = find_redis_server()
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"no redis-server for the fault-injection tests: {exc}")
    from django.db import connection

    stack = FaultStack(tmp_path_factory.mktemp("faults"), _database_url(connection.settings_dict), redis_server)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        with django_db_blocker.unblock():
            _wait_for_worker_sessions_to_end()


@pytest.fixture
def faults_stack(fault_stack, transactional_db, settings, monkeypatch):
    """The stack, reset for this test. This test process acts as the browser and looks at the
    database; every task comes from the stack's own processes (over HTTP), so the test process
    must never send one itself (it would go to another broker)."""
    from uploads import services

    fault_stack.reset()
    settings.IMS_ENDPOINT = fault_stack.sim.url
    settings.IAM_ENDPOINT = f"{fault_stack.sim.url}/v3"
    settings.STORAGES = {
        **settings.STORAGES,
        "staging": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": str(fault_stack.staging)},
        },
    }

    def refuse(*args, **kwargs):
        raise AssertionError("the test process sent a task: drive the portal over HTTP instead")

    monkeypatch.setattr(services.dispatch, "enqueue_push", refuse)
    monkeypatch.setattr(services.dispatch, "enqueue_discard", refuse)
    monkeypatch.setattr(services.dispatch, "enqueue_early_push", refuse)
    return fault_stack


@pytest.fixture(scope="module")
def s3_fault_stack(swift_store, django_db_setup, django_db_blocker, tmp_path_factory):
    """The processes, once per test module, staging in the Swift store (5 MiB parts)."""
    import uuid

    from tests.s3_fixture import PART

    try:
        redis_server = find_redis_server()
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"no redis-server for the fault-injection tests: {exc}")
    from django.db import connection

    prefix = f"faults-{uuid.uuid4().hex[:8]}/"
    folder = tmp_path_factory.mktemp("faults-s3")
    staging_env = {**swift_store.env(prefix=prefix), "STAGING_S3_PART_SIZE": str(PART),
                   "STAGING_SCRATCH_DIR": str(folder / "scratch")}
    stack = FaultStack(folder, _database_url(connection.settings_dict), redis_server, staging_env=staging_env)
    stack.store, stack.prefix = swift_store, prefix
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        if "proxy" not in swift_store.processes:
            swift_store.start(["proxy"])
        with django_db_blocker.unblock():
            _wait_for_worker_sessions_to_end()


@pytest.fixture
def s3_faults_stack(s3_fault_stack, transactional_db, settings, monkeypatch):
    """As faults_stack, with this test process looking into the same store and prefix."""
    from tests.s3_fixture import PART
    from uploads import services

    stack = s3_fault_stack
    if "proxy" not in stack.store.processes:  # a test that failed while the store was away
        stack.store.start(["proxy"])
    stack.reset()
    settings.IMS_ENDPOINT = stack.sim.url
    settings.IAM_ENDPOINT = f"{stack.sim.url}/v3"
    settings.STORAGES = {**settings.STORAGES, "staging": {
        "BACKEND": "storages.backends.s3.S3Storage", "OPTIONS": stack.store.storage_options(stack.prefix)}}
    settings.STAGING_S3_PART_SIZE = PART

    def refuse(*args, **kwargs):
        raise AssertionError("the test process sent a task: drive the portal over HTTP instead")

    monkeypatch.setattr(services.dispatch, "enqueue_push", refuse)
    monkeypatch.setattr(services.dispatch, "enqueue_discard", refuse)
    return stack
