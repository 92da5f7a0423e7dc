"""The production layout on loopback, for tests/test_nginx.py: Debian's nginx with the
repository's config (deploy/nginx/, ports picked free, a self-signed certificate made for the
run) in front of two *web* and two *ingest* gunicorn processes, with a Celery worker (and beat),
a private Redis and the IMS simulator, all on the test database.

The portal runs as in production: SECURE_HTTPS=1 behind a proxy that ends TLS
(SECURE_BEHIND_PROXY=1). nginx cuts a silent client after CLIENT_BODY_TIMEOUT (short here, so
that the slow-client test is quick).

The stack starts once per test module, for the reason tests/fault_stack.py gives: its beat acts
on every upload in the test database, so it must not outlive the tests that drive it. Only
tests/test_nginx.py uses it, so it starts once per test session.

Usage: `from tests.nginx_fixture import nginx_stack  # noqa: F401` in a test module.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import requests
from django.conf import settings as django_settings

from deploy.nginx import render
from tests.conftest import _database_url, _wait_for_worker_sessions_to_end
from tests.fault_stack import Process, SimClient, free_port, http_ok, portal_process_env
from tools.ensure_redis import find_redis_server
from tools.prodserver import gunicorn_argv

PYTHON = sys.executable
CLIENT_BODY_TIMEOUT_SECONDS = 2
THREADS_PER_PROCESS = 4


def answers(url: str) -> bool:
    """Any HTTP answer counts (a backend asked over plain http redirects to https)."""
    try:
        requests.get(url, timeout=2, allow_redirects=False)
        return True
    except requests.RequestException:
        return False


class NginxStack:
    def __init__(self, folder: Path, database_url: str, redis_server: str):
        self.logs = folder / "logs"
        self.logs.mkdir()
        self.staging = folder / "staging"
        self.staging.mkdir()
        # A copy of the collected static files, which a test may add to.
        self.static_root = folder / "static"
        shutil.copytree(django_settings.STATIC_ROOT, self.static_root)
        http_port, https_port, redis_port, sim_port = (free_port() for _ in range(4))
        self.url = f"https://127.0.0.1:{https_port}"
        self.http_url = f"http://127.0.0.1:{http_port}"
        self.certificate, key = render.make_certificate(folder)
        self.sim = SimClient(f"http://127.0.0.1:{sim_port}")
        self.redis_url = f"redis://127.0.0.1:{redis_port}/0"
        self.env = portal_process_env(
            database_url=database_url, redis_url=self.redis_url, staging=self.staging, sim_url=self.sim.url,
            CSRF_TRUSTED_ORIGINS=self.url, SECURE_HTTPS="1", SECURE_BEHIND_PROXY="1", SECURE_HSTS_SECONDS="3600",
        )
        self.redis = Process(
            "redis", [redis_server, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                      "--appendonly", "no", "--dir", str(folder)],
            self.env, self.logs / "redis.log", lambda p: self._redis_answers(),
        )
        self.simulator = Process(
            "imssim", [PYTHON, "-m", "imssim", "--port", str(sim_port), "--data-dir", str(folder / "imssim"),
                       "--processing-seconds", "0.3"],
            self.env, self.logs / "imssim.log", lambda p: http_ok(f"{self.sim.url}/_sim/faults"),
        )
        self.web = [self._gunicorn("web", n) for n in (1, 2)]
        self.ingest = [self._gunicorn("ingest", n) for n in (1, 2)]
        self.worker = Process(
            "worker", [PYTHON, "-m", "celery", "-A", "portal", "worker", "-B", "-Q", "uploads,celery", "-c", "1",
                       "-l", "info", "--without-gossip", "--without-mingle", "-s", str(folder / "beat-schedule")],
            self.env, self.logs / "worker.log", lambda p: " ready." in p.output(),
        )
        config = render.write_config(folder / "nginx", {
            "LISTEN_ADDRESS": "127.0.0.1",
            "HTTP_PORT": str(http_port),
            "HTTPS_PORT": str(https_port),
            "TLS_CERTIFICATE": str(self.certificate),
            "TLS_CERTIFICATE_KEY": str(key),
            "WEB_SERVERS": render.server_lines([process.address for process in self.web]),
            "INGEST_SERVERS": render.server_lines([process.address for process in self.ingest]),
            "STATIC_ROOT": str(self.static_root),
            "CLIENT_BODY_TIMEOUT": f"{CLIENT_BODY_TIMEOUT_SECONDS}s",
            "HSTS_SECONDS": "3600",
        })
        self.nginx = Process("nginx", render.nginx_argv(config), self.env, self.logs / "nginx.log",
                             lambda p: answers(f"{self.http_url}/"))

    def _gunicorn(self, pool: str, number: int) -> Process:
        """One process of a pool: a gunicorn with one worker, so that requests that nginx sends to
        `web` or `ingest` in turn are served by two processes that share nothing but the database
        and the staging folder; with a few threads, so that a few slow uploads fill the pool."""
        port = free_port()
        argv = gunicorn_argv(pool, f"127.0.0.1:{port}", workers=1, threads=THREADS_PER_PROCESS)
        process = Process(f"{pool}{number}", argv, self.env, self.logs / f"{pool}{number}.log",
                          lambda p: answers(f"http://127.0.0.1:{port}/accounts/login/"))
        process.address = f"127.0.0.1:{port}"
        return process

    @property
    def processes(self) -> list[Process]:
        return [self.redis, self.simulator, *self.web, *self.ingest, self.worker, self.nginx]

    def start(self) -> NginxStack:
        backends = self.processes[:-1]
        for process in backends:
            process.start()
        for process in backends:
            process.wait_ready()
        self.nginx.start().wait_ready()
        return self

    def stop(self) -> None:
        for process in reversed(self.processes):  # Redis last: the worker talks to it while stopping
            process.stop()

    def reset(self) -> None:
        """Between tests: every process running, Redis, the simulator and staging empty."""
        for process in self.processes:
            if not process.running:
                process.start().wait_ready()
        self.redis_client().flushall()
        self.sim.reset()
        for path in self.staging.iterdir():
            path.unlink()

    def redis_client(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, socket_timeout=5)

    def _redis_answers(self) -> bool:
        try:
            return bool(self.redis_client().ping())
        except redis.RedisError:
            return False

    def logs_text(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.full_output()[-2500:]}" for p in self.processes[2:])


@pytest.fixture(scope="module")
def nginx_stack(django_db_setup, django_db_blocker, tmp_path_factory):
    """The stack, once per test module, on the test database; skipped where nginx or Redis
    cannot be had (tools/apt_ensure.sh installs nginx when root)."""
    try:
        render.find_nginx()
        redis_server = find_redis_server()
    except (render.NginxMissing, OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"the nginx tests need nginx and redis-server: {exc}")
    from django.db import connection

    stack = NginxStack(tmp_path_factory.mktemp("nginx"), _database_url(connection.settings_dict), redis_server)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        with django_db_blocker.unblock():
            _wait_for_worker_sessions_to_end()
