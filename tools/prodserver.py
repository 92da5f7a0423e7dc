"""`make run-prod`: the production layout on this machine, in one terminal.

What `make run` starts (tools/devserver.py, whose pieces this reuses), but laid out as in
production (docker-compose.yml): Debian's nginx in front, ending TLS with a self-signed
certificate (made once, in var/prod/), sending /tus/ to an *ingest* gunicorn and everything
else to a *web* gunicorn, and serving the collected static files itself. The portal runs with
SECURE_HTTPS=1 behind it. https://127.0.0.1:$HTTPS_PORT (default 8443; plain http on $HTTP_PORT,
default 8080, only redirects). The browser warns about the certificate once: it is this
machine's own.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python tools/prodserver.py` puts tools/, not the root, on the path

from deploy.nginx import render  # noqa: E402
from tools import devserver  # noqa: E402
from tools.devserver import BIN, PYTHON, VAR, Devserver, Failed, port_in_use, say  # noqa: E402

PROD = VAR / "prod"


def gunicorn_argv(pool: str, bind: str, *, workers: int | None = None, threads: int | None = None) -> list[str]:
    """One gunicorn of the `web` or `ingest` pool: the same project and config, its own name
    (shown by ps) and address. Without `workers` and `threads`, gunicorn.conf.py's counts."""
    argv = [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "--name", f"ims-portal-{pool}", "--bind", bind]
    if workers is not None:
        argv += ["--workers", str(workers)]
    if threads is not None:
        argv += ["--threads", str(threads)]
    return [*argv, "portal.wsgi:application"]


def portal_environment(https_port: int) -> None:
    """The portal's settings behind a TLS-ending proxy, unless the caller set them otherwise."""
    os.environ.setdefault("SECURE_HTTPS", "1")
    os.environ.setdefault("SECURE_BEHIND_PROXY", "1")
    # No HSTS by default: a browser would then refuse plain http on this host for `make run` too.
    os.environ.setdefault("SECURE_HSTS_SECONDS", "0")
    os.environ.setdefault("CSRF_TRUSTED_ORIGINS", f"https://127.0.0.1:{https_port},https://localhost:{https_port}")
    os.environ.setdefault("PORTAL_BASE_URL", f"https://127.0.0.1:{https_port}")  # the links in mails


def nginx_config(http_port: int, https_port: int, web: str, ingest: str) -> Path:
    certificate, key = PROD / "tls.crt", PROD / "tls.key"
    if not (certificate.exists() and key.exists()):
        PROD.mkdir(parents=True, exist_ok=True)
        render.make_certificate(PROD)
    return render.write_config(PROD / "nginx", {
        "HTTP_PORT": str(http_port),
        "HTTPS_PORT": str(https_port),
        "TLS_CERTIFICATE": str(certificate),
        "TLS_CERTIFICATE_KEY": str(key),
        "WEB_SERVERS": render.server_lines([web]),
        "INGEST_SERVERS": render.server_lines([ingest]),
        "STATIC_ROOT": str(ROOT / "staticfiles"),
        "HSTS_SECONDS": os.environ["SECURE_HSTS_SECONDS"],
    })


def run(server: Devserver) -> int:
    https_port = int(os.environ.get("HTTPS_PORT", "8443"))
    http_port = int(os.environ.get("HTTP_PORT", "8080"))
    web, ingest = "127.0.0.1:8001", "127.0.0.1:8002"
    for port in (https_port, http_port, 8001, 8002):
        if port_in_use("127.0.0.1", port):
            raise Failed(f"port {port} is in use: stop what listens there (or set HTTPS_PORT/HTTP_PORT)")
    try:
        render.find_nginx()
    except render.NginxMissing as error:
        raise Failed(str(error)) from None
    portal_environment(https_port)
    config = nginx_config(http_port, https_port, web, ingest)

    server.manage("migrate", "--noinput")
    server.manage("seed_demo")
    devserver.start_redis(server, devserver.settings.REDIS_URL)
    start_simulator = "IMS_ENDPOINT" not in os.environ
    if start_simulator:
        sim = urlsplit(devserver.settings.IMS_ENDPOINT)
        server.start("imssim", [PYTHON, "-m", "imssim", "--host", sim.hostname, "--port", str(sim.port),
                                "--data-dir", str(VAR / "imssim")], ready_line="IMS simulator listening on")
    server.start("worker", [str(BIN / "celery"), "-A", "portal", "worker", "-Q", "uploads,celery",
                            "--concurrency", "2", "-l", "info"], ready_line=" ready.")
    server.start("beat", [str(BIN / "celery"), "-A", "portal", "beat", "-l", "info",
                          "--schedule", str(VAR / "celerybeat-schedule")], ready_line="beat: Starting")
    for pool, address in (("web", web), ("ingest", ingest)):
        server.start(pool, gunicorn_argv(pool, address), probe=lambda port=int(address.rsplit(":", 1)[1]):
                     port_in_use("127.0.0.1", port))
    server.start("nginx", render.nginx_argv(config), probe=lambda: port_in_use("127.0.0.1", https_port))
    say("devserver", f"nginx config: {config} (from deploy/nginx/nginx.conf.template)")
    devserver.print_box(f"https://127.0.0.1:{https_port}/  (self-signed certificate: accept it once)",
                        devserver.settings.IMS_ENDPOINT if start_simulator else None)
    return server.watch()


def main() -> int:
    return devserver.main(layout=run)


if __name__ == "__main__":
    sys.exit(main())
