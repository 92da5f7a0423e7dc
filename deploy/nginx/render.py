"""nginx on this machine with the repository's config: for the tests and `make run-prod`.

docker-compose.yml has the nginx image fill in nginx.conf.template (envsubst); `render()` fills
in the same ${PLACEHOLDERS} here, so both run the same file. Also: a self-signed certificate
for loopback, where to find Debian's nginx, and the command line that runs it in the foreground
without root (pid file, temporary files and logs where we say).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

TEMPLATE = Path(__file__).with_name("nginx.conf.template")
# Upper case only: nginx's own variables ($host, ${scheme}) are lower case and stay as they are.
PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")

# What a single machine wants unless told otherwise; docker-compose.yml sets every one itself.
DEFAULTS = {
    "LISTEN_ADDRESS": "127.0.0.1",
    "CLIENT_HEADER_TIMEOUT": "30s",
    "CLIENT_BODY_TIMEOUT": "60s",
    "SEND_TIMEOUT": "60s",
    "HSTS_SECONDS": "31536000",
    "RESOLVER": "127.0.0.1",
    "FLOWER_ADDRESS": "127.0.0.1:5555",
}


class NginxMissing(Exception):
    """nginx is not installed here; the message says how to get it."""


def placeholders(text: str | None = None) -> set[str]:
    """The names the template needs."""
    return set(PLACEHOLDER.findall(TEMPLATE.read_text() if text is None else text))


def server_lines(addresses: list[str]) -> str:
    """An upstream's `server` lines for host:port addresses (WEB_SERVERS, INGEST_SERVERS)."""
    return " ".join(f"server {address};" for address in addresses)


def render(values: dict[str, str], text: str | None = None) -> str:
    """The template with every placeholder filled in; a missing value is an error, not a blank."""
    text = TEMPLATE.read_text() if text is None else text
    values = {**DEFAULTS, **values}
    missing = placeholders(text) - set(values)
    if missing:
        raise KeyError(f"nginx.conf.template needs values for {', '.join(sorted(missing))}")
    return PLACEHOLDER.sub(lambda match: str(values[match.group(1)]), text)


def find_nginx() -> str:
    """Debian's nginx binary (in /usr/sbin, which a normal user's PATH may lack)."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if not found:
        raise NginxMissing("nginx is not installed (as root: apt-get install nginx, "
                           "or tools/apt_ensure.sh nginx:nginx)")
    return found


def make_certificate(folder: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate and its key for `host` (an IP address), valid for a week."""
    certificate, key = folder / "tls.crt", folder / "tls.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "7",
         "-subj", f"/CN={host}", "-addext", f"subjectAltName=IP:{host}",
         "-keyout", str(key), "-out", str(certificate)],
        check=True, capture_output=True,
    )
    return certificate, key


def write_config(run_dir: Path, values: dict[str, str]) -> Path:
    """Render the config into `run_dir` (which also gets nginx's pid and temporary files)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config = run_dir / "nginx.conf"
    config.write_text(render({"NGINX_RUN_DIR": str(run_dir), **values}))
    return config


def nginx_argv(config: Path, *, test: bool = False) -> list[str]:
    """nginx in the foreground on `config` (or `nginx -t` of it), as root or not.

    As root, nginx's workers would run as `nobody`, who cannot enter a private temporary folder
    (pytest's are 0700): they run as root then, which only a test or a one-machine set-up does.
    """
    directives = "daemon off;" + (" user root;" if os.geteuid() == 0 else "")
    argv = [find_nginx(), "-e", "stderr", "-p", str(config.parent), "-c", str(config), "-g", directives]
    return [*argv, "-t"] if test else argv
