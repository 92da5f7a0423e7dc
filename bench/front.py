"""The production front for the benchmarks: gunicorn pools, nginx with the repository's config,
and the reference tus server (Node.js).

The pools and nginx start as tools/prodserver.py (`make run-prod`) and tests/nginx_fixture.py
start them: the same gunicorn command per pool, deploy/nginx/nginx.conf.template rendered with
free ports and a self-signed certificate made for the run.
"""

from __future__ import annotations

import re
import shutil
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from bench.common import ROOT, start_process, stop_process, wait_for

NODE = shutil.which("node") or "/usr/bin/node"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_or_stop(process, condition, **how):
    """wait_for(), but a process that never got ready is stopped before the error goes up: the
    caller only learns of processes that run."""
    try:
        return wait_for(condition, process=process, **how)
    except BaseException:
        stop_process(process)
        raise


def unverified_tls() -> ssl.SSLContext:
    """The run's certificate is self-signed: the clients trust it without checking."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _answers(url: str) -> bool:
    """Any HTTP answer counts (a redirect, a 404, a 405)."""
    request = urllib.request.Request(url, method="OPTIONS")
    try:
        with urllib.request.urlopen(request, timeout=2, context=unverified_tls()):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


def behind_proxy_env(env: dict, *, secure: bool) -> dict:
    """The portal's settings behind nginx ending TLS (as docker-compose.yml sets them).
    bench/ingest.py also talks to the ingest pool directly over http, which SECURE_HTTPS=1 would
    redirect: it passes secure=False. Clients send a Referer of the front's own origin, which
    Django's CSRF check accepts over https without CSRF_TRUSTED_ORIGINS."""
    return {**env, "SECURE_BEHIND_PROXY": "1", "SECURE_HTTPS": "1" if secure else "0",
            "SECURE_HSTS_SECONDS": "0", "ALLOWED_HOSTS": "127.0.0.1"}


SIMPLE_CONFIG = ROOT / "bench" / "gunicorn_simple.conf.py"


def start_pool(pool: str, env: dict, log: Path, *, workers: int | None = None,
               threads: int | None = None, simple: bool = False):
    """One gunicorn of the `web` or `ingest` pool, as `make run-prod` starts it (gunicorn.conf.py's
    counts unless given). `simple`: with bench/gunicorn_simple.conf.py instead (no socket-level
    body read, no staging writer lock), for comparison. Returns (process, "127.0.0.1:port")."""
    from tools.prodserver import gunicorn_argv  # imports portal.settings: only after django.setup()

    port = free_port()
    address = f"127.0.0.1:{port}"
    argv = gunicorn_argv(pool, address, workers=workers, threads=threads)
    if simple:
        argv[argv.index("gunicorn.conf.py")] = str(SIMPLE_CONFIG)
    process = start_process(argv, log=log, env=env)
    _wait_or_stop(process, lambda: _answers(f"http://{address}/tus/"), timeout=60, what=f"the {pool} gunicorn",
                  log=log, interval=0.2)
    return process, address


def start_nginx(folder: Path, web: list[str], ingest: list[str], log: Path, static_root: Path | None = None):
    """Debian's nginx with deploy/nginx/nginx.conf.template in front of the given backends, on
    free ports with a certificate made for the run. Returns (process, "https://127.0.0.1:port")."""
    from deploy.nginx import render

    folder.mkdir(parents=True, exist_ok=True)
    certificate, key = render.make_certificate(folder)
    http_port, https_port = free_port(), free_port()
    config = render.write_config(folder / "nginx", {
        "HTTP_PORT": str(http_port),
        "HTTPS_PORT": str(https_port),
        "TLS_CERTIFICATE": str(certificate),
        "TLS_CERTIFICATE_KEY": str(key),
        "WEB_SERVERS": render.server_lines(web),
        "INGEST_SERVERS": render.server_lines(ingest),
        "STATIC_ROOT": str(static_root or ROOT / "staticfiles"),
        "HSTS_SECONDS": "0",
    })
    process = start_process(render.nginx_argv(config), log=log)
    url = f"https://127.0.0.1:{https_port}"
    _wait_or_stop(process, lambda: _answers(f"{url}/tus/"), timeout=30, what="nginx", log=log, interval=0.2)
    return process, url


def start_tus_reference(store: Path, log: Path):
    """The official tus Node.js server (bench/tus_reference.mjs: @tus/server + @tus/file-store,
    installed by `make setup` from package.json) with its files in `store`.
    Returns (process, "http://127.0.0.1:port")."""
    if not (ROOT / "node_modules" / "@tus" / "server").is_dir():
        raise RuntimeError("@tus/server is not installed: run `make setup` (npm install)")
    store.mkdir(parents=True, exist_ok=True)
    process = start_process([NODE, ROOT / "bench" / "tus_reference.mjs", 0, store], log=log)

    def url():
        found = re.search(r"listening on (http://\S+)", log.read_text(errors="replace"))
        return found and found.group(1)

    return process, _wait_or_stop(process, url, timeout=30, what="the tus reference server", log=log)


def node_version() -> str:
    done = subprocess.run([NODE, "--version"], capture_output=True, text=True, check=False)
    return done.stdout.strip()
