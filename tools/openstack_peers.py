"""Real OpenStack Keystone 30.0.0 + Glance 33.0.0 on loopback, for end-to-end tests and benchmarks.

Both services come straight from PyPI, each in its own virtualenv, and run under uWSGI 2.0.31 (Glance
has no standalone server any more). Everything listens on 127.0.0.1 and every byte of state
(configs, sqlite databases, fernet keys, image files, logs) lives under one state directory, so
parallel runs never collide. See /work/shared/reference/openstack-peers.md for the measured
behaviour of these servers.

Python API (stdlib only, any Python 3.11)::

    from tools.openstack_peers import install, start, get_token
    install()                                   # idempotent; ~70 s the very first time
    with start(Path("/tmp/peers")) as peers:    # Peers(keystone_url=.../v3, glance_url=...)
        token, expires_at = get_token(peers.keystone_url, "demo", "demopw", "demo")

CLI::

    python tools/openstack_peers.py install [--cache DIR]
    python tools/openstack_peers.py run --state DIR [--keystone-port 5000 --glance-port 9292]

Identities created by start() (domain Default):

    admin/adminpw in admin (admin)      demo/demopw in demo (member)
    demoreader/readerpw in demo (reader) alt/altpw in alt (member)
    glance/glancepw in service (service; keystonemiddleware's own user)

Timings measured on this machine (2 cores shared with other work, Python 3.11.7):

- install() from nothing (no venvs, empty pip cache; pip compiles uWSGI once and reuses the wheel
  for the second venv): 69 s. Any later call: instant (marker files).
- start() into an empty state dir (4 setup commands in parallel, bootstrap while both apps load,
  identities over HTTP, both servers answering): 9-10 s on a quiet machine, up to ~15 s when
  the cores are busy; the first start after install ~14 s (cold page cache, .pyc writes).
- start() on an existing state dir (same steps, all idempotent): 8-13 s.
- stop(): 1 s. get_token(): ~55 ms, because keystone.conf uses 4 bcrypt rounds instead of 12
  (the reference measured ~0.45 s per token with the default).

Client notes (reference gotchas): every reply carries `Connection: close`; curl must send
`-H 'Expect:'` or lose 1 s per upload (python-requests does not send Expect); uploads must match
their disk_format (use raw, or a real qcow2), a 415 leaves the image unusable.
"""
from __future__ import annotations

import argparse
import atexit
import fcntl
import grp
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

KEYSTONE_REQUIREMENTS = ("keystone==30.0.0", "uwsgi==2.0.31")
GLANCE_REQUIREMENTS = ("glance==33.0.0", "uwsgi==2.0.31")
VENVS = {"keystone-venv": KEYSTONE_REQUIREMENTS, "glance-venv": GLANCE_REQUIREMENTS}

ADMIN_PASSWORD = "adminpw"
# name -> (password, project, role). admin comes from `keystone-manage bootstrap`, the rest from
# _provision_identities(). Roles imply each other: admin > manager > member > reader.
USERS = {
    "admin": (ADMIN_PASSWORD, "admin", "admin"),
    "demo": ("demopw", "demo", "member"),
    "demoreader": ("readerpw", "demo", "reader"),
    "alt": ("altpw", "alt", "member"),
    "glance": ("glancepw", "service", "service"),
}

READY_TIMEOUT = 90.0  # seconds; generous because the machine may be busy running tests
STOP_TIMEOUT = 10.0


class PeersUnavailable(RuntimeError):
    """The peers could not be installed or started; `reason` is a one-line explanation."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------------------------
# Install
# --------------------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    # Outside the repository on purpose: fresh clones on the same machine reuse the venvs.
    env = os.environ.get("OPENSTACK_PEERS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ims-portal" / "openstack"


def _tail(path: Path, lines: int = 15) -> str:
    """Last non-empty lines of a log, joined into one line for exception messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(kept) or f"(empty log {path})"


def _base_python() -> str:
    found = shutil.which("python3.11")
    if found:
        return found
    if sys.version_info[:2] == (3, 11):
        return sys.executable
    raise PeersUnavailable("python3.11 not found on PATH")


def _clean_env() -> dict:
    """Our caller may run inside another venv; keep its Python settings away from the peers."""
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV")}


def _install_venv(cache_dir: Path, name: str, requirements: tuple) -> None:
    venv = cache_dir / name
    marker = cache_dir / f"{name}.installed"
    wanted = "\n".join(requirements) + "\n"
    if marker.exists() and marker.read_text() == wanted and (venv / "bin" / "uwsgi").exists():
        return
    # No marker means a previous attempt died half-way: start that venv from scratch.
    marker.unlink(missing_ok=True)
    shutil.rmtree(venv, ignore_errors=True)
    log = cache_dir / f"{name}-install.log"
    steps = [
        [_base_python(), "-m", "venv", str(venv)],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-input", *requirements],
    ]
    with open(log, "w") as out:
        for cmd in steps:
            out.write(f"$ {' '.join(cmd)}\n")
            out.flush()
            rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, env=_clean_env())
            if rc != 0:
                raise PeersUnavailable(
                    f"installing {name} failed (exit {rc}, full log {log}): {_tail(log, 4)}")
    marker.write_text(wanted)


def install(cache_dir: Path | None = None) -> None:
    """Create keystone-venv and glance-venv under cache_dir unless they are already complete."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PeersUnavailable(f"cannot create cache dir {cache_dir}: {exc}") from exc
    # A file lock, so that parallel test sessions wait for one install instead of racing.
    with open(cache_dir / "install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for name, requirements in VENVS.items():
            _install_venv(cache_dir, name, requirements)


# --------------------------------------------------------------------------------------------
# Config templates
# --------------------------------------------------------------------------------------------

KEYSTONE_CONF = """\
[DEFAULT]
log_file = {log}
use_stderr = false

[database]
connection = sqlite:///{db}

[token]
provider = fernet

[fernet_tokens]
key_repository = {fernet_keys}

[fernet_receipts]
key_repository = {fernet_keys}

[credential]
key_repository = {credential_keys}

[identity]
# Test-only: 4 bcrypt rounds instead of 12 make a token ~30 ms instead of ~0.45 s.
password_hash_rounds = 4
"""

GLANCE_API_CONF = """\
[DEFAULT]
log_file = {log}
use_stderr = false
enabled_backends = fs:file
{image_size_cap_line}
[database]
connection = sqlite:///{db}

[glance_store]
default_backend = fs

[fs]
filesystem_store_datadir = {images}/

# Reserved stores; kept in the state dir (not /tmp) so that parallel runs don't share them.
[os_glance_staging_store]
filesystem_store_datadir = {staging}/

[os_glance_tasks_store]
filesystem_store_datadir = {tasks}/

[oslo_concurrency]
lock_path = {locks}

[paste_deploy]
flavor = keystone
config_file = {paste_ini}

[keystone_authtoken]
www_authenticate_uri = {keystone_root}
auth_url = {keystone_root}
auth_type = password
user_domain_name = Default
project_domain_name = Default
project_name = service
username = glance
password = {glance_password}

# [image_format] require_image_format_match stays at its default (true): uploads must match
# their disk_format or Glance answers 415.
"""

# Settings as devstack runs these services. The comments name the reference's gotchas.
UWSGI_INI = """\
[uwsgi]
http-socket = 127.0.0.1:{port}
virtualenv = {venv}
module = {module}
{env_line}
master = true
processes = 1
threads = 4
enable-threads = true
# Load the app in the worker, after fork: Glance starts thread pools at import.
lazy-apps = true
# Exit when the app cannot load, so start() reports it at once instead of timing out.
need-app = true
# SIGTERM means "stop" (uWSGI 2.0 would otherwise reload).
die-on-term = true
# http-socket silently closes after each reply; saying so stops pooled clients from
# hitting ConnectionResetError on reuse (gotcha 3).
add-header = Connection: close
# uWSGI's default of 4 s breaks uploads whose body pauses briefly (gotcha 4).
socket-timeout = 120
# Glance reads chunked bodies via uwsgi.chunked_read(); one chunk may be up to 64 MiB.
chunked-input-limit = 67108864
buffer-size = 65535
logto = {uwsgi_log}
"""


# --------------------------------------------------------------------------------------------
# Peers handle
# --------------------------------------------------------------------------------------------

_LIVE: set = set()  # started Peers, stopped at interpreter exit if the caller forgot


@dataclass(eq=False)
class Peers:
    keystone_url: str  # http://127.0.0.1:P/v3
    glance_url: str    # http://127.0.0.1:Q
    state_dir: Path
    keystone_log: Path
    glance_log: Path
    keystone_uwsgi_log: Path
    glance_uwsgi_log: Path
    project_ids: dict = field(default_factory=dict)  # project name -> id
    users: dict = field(default_factory=lambda: dict(USERS))  # name -> (password, project, role)
    _procs: list = field(default_factory=list, repr=False)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM both uWSGI process groups, then SIGKILL whatever is left after `timeout`."""
        _stop_processes(self._procs, timeout)
        self._procs = []
        _LIVE.discard(self)

    def __enter__(self) -> "Peers":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # each server has its own group (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass


def _stop_processes(procs: list, timeout: float) -> None:
    for proc in procs:
        _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            # Kill the whole group, not just the master: workers must not outlive it. Only
            # here, while the group surely still exists (its id cannot have been reused).
            _signal_group(proc, signal.SIGKILL)
            proc.wait()


@atexit.register
def _stop_forgotten_peers() -> None:
    for peers in list(_LIVE):
        peers.stop()


# --------------------------------------------------------------------------------------------
# Start
# --------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _check_port_free(port: int) -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            raise PeersUnavailable(f"port 127.0.0.1:{port} is not free: {exc}") from exc


def _run_parallel(commands: list[tuple[list[str], Path]], env: dict) -> None:
    """Run independent setup commands at once (they are mostly Python import time), each
    logging to its own file; raise PeersUnavailable naming the first one that failed."""
    running = []
    for cmd, log in commands:
        out = open(log, "w")
        running.append((cmd, log, out, subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)))
    failures = []
    for cmd, log, out, proc in running:
        rc = proc.wait()
        out.close()
        if rc != 0:
            failures.append(f"`{Path(cmd[0]).name} {' '.join(cmd[1:])}` exited {rc} "
                            f"(log {log}): {_tail(log, 6)}")
    if failures:
        raise PeersUnavailable(failures[0])


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _spawn_uwsgi(venv: Path, ini: Path, log: Path) -> subprocess.Popen:
    # Same file as the ini's `logto` (both append): catches errors from before logto is opened.
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        return subprocess.Popen(
            [str(venv / "bin" / "uwsgi"), "--ini", str(ini)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=_clean_env(), start_new_session=True)


def _wait_ready(name: str, url: str, proc: subprocess.Popen, logs: list[Path],
                deadline: float) -> None:
    """Poll `url` until it answers 200; fail early if the server exits."""
    while True:
        if proc.poll() is not None:
            raise PeersUnavailable(
                f"{name} exited with {proc.returncode} while starting (logs {logs[0].parent}): "
                + " || ".join(_tail(log, 8) for log in logs))
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass  # not listening yet / not ready yet
        if time.monotonic() > deadline:
            raise PeersUnavailable(
                f"{name} did not answer {url} in time (logs {logs[0].parent}): "
                + " || ".join(_tail(log, 8) for log in logs))
        time.sleep(0.2)


def start(state_dir: Path, *, keystone_port: int = 0, glance_port: int = 0,
          cache_dir: Path | None = None, image_size_cap: int | None = None,
          timeout: float = READY_TIMEOUT) -> Peers:
    """Configure and start Keystone and Glance with all state under state_dir; see module doc.

    An existing state_dir is reused (databases, keys, images survive); wipe it for a clean slate.
    """
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    kvenv, gvenv = cache_dir / "keystone-venv", cache_dir / "glance-venv"
    for venv in (kvenv, gvenv):
        if not (venv / "bin" / "uwsgi").exists():
            raise PeersUnavailable(f"{venv} is not installed; run install() first")
    for port in (keystone_port, glance_port):
        if port:
            _check_port_free(port)
    keystone_port = keystone_port or _free_port()
    glance_port = glance_port or _free_port()
    while glance_port == keystone_port:
        glance_port = _free_port()

    state_dir = Path(state_dir).resolve()
    kdir, gdir = state_dir / "keystone", state_dir / "glance"
    keystone_root = f"http://127.0.0.1:{keystone_port}"
    glance_url = f"http://127.0.0.1:{glance_port}"
    peers = Peers(
        keystone_url=f"{keystone_root}/v3", glance_url=glance_url, state_dir=state_dir,
        keystone_log=kdir / "keystone.log", glance_log=gdir / "glance-api.log",
        keystone_uwsgi_log=kdir / "uwsgi.log", glance_uwsgi_log=gdir / "uwsgi.log")

    kconf = _write_keystone_config(kdir, peers, keystone_port, kvenv)
    gconf = _write_glance_config(gdir, peers, glance_port, gvenv, keystone_root, image_size_cap)
    env = _clean_env()
    deadline = time.monotonic() + timeout
    try:
        # 1. Schema and keys, all at once: each command is ~2 s of imports.
        manage = [str(kvenv / "bin" / "keystone-manage"), "--config-file", str(kconf)]
        owner = ["--keystone-user", pwd.getpwuid(os.getuid()).pw_name,
                 "--keystone-group", grp.getgrgid(os.getgid()).gr_name]
        _run_parallel([
            (manage + ["db_sync"], kdir / "db_sync.log"),
            (manage + ["fernet_setup", *owner], kdir / "fernet_setup.log"),
            (manage + ["credential_setup", *owner], kdir / "credential_setup.log"),
            ([str(gvenv / "bin" / "glance-manage"), "--config-file", str(gconf), "db_sync"],
             gdir / "db_sync.log"),
        ], env)
        # 2. Both apps load (~2 s of imports each) while bootstrap fills the database: loading
        #    needs only the schema and keys, and Glance talks to Keystone only per request.
        peers._procs.append(_spawn_uwsgi(kvenv, kdir / "uwsgi.ini", peers.keystone_uwsgi_log))
        peers._procs.append(_spawn_uwsgi(gvenv, gdir / "uwsgi.ini", peers.glance_uwsgi_log))
        _LIVE.add(peers)
        _run_parallel([(manage + [
            "bootstrap", "--bootstrap-username", "admin",
            "--bootstrap-password", ADMIN_PASSWORD, "--bootstrap-project-name", "admin",
            "--bootstrap-role-name", "admin", "--bootstrap-service-name", "keystone",
            "--bootstrap-region-id", "RegionOne",
            "--bootstrap-public-url", keystone_root, "--bootstrap-internal-url", keystone_root,
            "--bootstrap-admin-url", keystone_root,
        ], kdir / "bootstrap.log")], env)
        # 3. Keystone answering, then the identities over its own API, then Glance answering.
        _wait_ready("keystone", peers.keystone_url, peers._procs[0],
                    [peers.keystone_uwsgi_log, peers.keystone_log], deadline)
        peers.project_ids = _provision_identities(peers.keystone_url, glance_url)
        _wait_ready("glance", f"{glance_url}/healthcheck", peers._procs[1],
                    [peers.glance_uwsgi_log, peers.glance_log], deadline)
    except BaseException:
        peers.stop()
        raise
    return peers


def _write_keystone_config(kdir: Path, peers: Peers, port: int, venv: Path) -> Path:
    for sub in ("fernet-keys", "credential-keys"):
        (kdir / sub).mkdir(parents=True, exist_ok=True)
    conf = _write(kdir / "etc" / "keystone.conf", KEYSTONE_CONF.format(
        log=peers.keystone_log, db=kdir / "keystone.sqlite",
        fernet_keys=kdir / "fernet-keys", credential_keys=kdir / "credential-keys"))
    _write(kdir / "uwsgi.ini", UWSGI_INI.format(
        port=port, venv=venv, module="keystone.wsgi.api:application",
        env_line=f"env = OS_KEYSTONE_CONFIG_DIR={conf.parent}",
        uwsgi_log=peers.keystone_uwsgi_log))
    return conf


def _write_glance_config(gdir: Path, peers: Peers, port: int, venv: Path, keystone_root: str,
                         image_size_cap: int | None) -> Path:
    for sub in ("images", "staging", "tasks", "locks"):
        (gdir / sub).mkdir(parents=True, exist_ok=True)
    conf = _write(gdir / "etc" / "glance-api.conf", GLANCE_API_CONF.format(
        log=peers.glance_log, db=gdir / "glance.sqlite",
        image_size_cap_line=f"image_size_cap = {int(image_size_cap)}\n" if image_size_cap else "",
        images=gdir / "images", staging=gdir / "staging", tasks=gdir / "tasks",
        locks=gdir / "locks", paste_ini=venv / "etc" / "glance" / "glance-api-paste.ini",
        keystone_root=keystone_root, glance_password=USERS["glance"][0]))
    _write(gdir / "uwsgi.ini", UWSGI_INI.format(
        port=port, venv=venv, module="glance.wsgi.api:application",
        # The app finds glance-api.conf only through this variable.
        env_line=f"env = OS_GLANCE_CONFIG_DIR={conf.parent}",
        uwsgi_log=peers.glance_uwsgi_log))
    return conf


# --------------------------------------------------------------------------------------------
# Keystone over HTTP
# --------------------------------------------------------------------------------------------

def _http(method: str, url: str, body: dict | None = None, token: str | None = None,
          timeout: float = 30) -> tuple[int, dict, dict]:
    """One JSON request; returns (status, headers, parsed body or {}). Never raises on 4xx/5xx."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Accept", "application/json")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("X-Auth-Token", token)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as reply:
            status, headers, raw = reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as err:
        status, headers, raw = err.code, dict(err.headers), err.read()
    try:
        parsed = json.loads(raw) if raw else {}
    except ValueError:
        parsed = {"raw": raw.decode(errors="replace")}
    return status, headers, parsed


def get_token(keystone_url: str, user: str, password: str, project: str,
              domain: str = "Default") -> tuple[str, datetime]:
    """Project-scoped password token: (X-Subject-Token, expires_at as an aware datetime)."""
    scope_domain = {"id": "default"} if domain.lower() == "default" else {"name": domain}
    body = {"auth": {
        "identity": {"methods": ["password"], "password": {"user": {
            "name": user, "domain": scope_domain, "password": password}}},
        "scope": {"project": {"name": project, "domain": scope_domain}},
    }}
    status, headers, reply = _http("POST", f"{keystone_url.rstrip('/')}/auth/tokens", body)
    token = headers.get("X-Subject-Token")
    if status != 201 or not token:
        raise PeersUnavailable(f"token for {user}/{project} failed: HTTP {status} {reply}")
    expires_at = datetime.fromisoformat(reply["token"]["expires_at"].replace("Z", "+00:00"))
    return token, expires_at


class _Admin:
    """Tiny admin client for the idempotent find-or-create calls of _provision_identities."""

    def __init__(self, keystone_url: str):
        self.url = keystone_url.rstrip("/")
        self.token, _ = get_token(self.url, "admin", ADMIN_PASSWORD, "admin")

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        status, _, reply = _http(method, self.url + path, body, self.token)
        if status >= 300:
            raise PeersUnavailable(f"keystone {method} {path} -> HTTP {status}: {reply}")
        return reply

    def find_or_create(self, kind: str, query: str, body: dict) -> dict:
        found = self.call("GET", f"/{kind}?{query}")[kind]
        if found:
            return found[0]
        return self.call("POST", f"/{kind}", {kind[:-1]: body})[kind[:-1]]


def _provision_identities(keystone_url: str, glance_url: str) -> dict:
    """Projects, users and role grants of USERS, plus Glance in the catalog. Idempotent."""
    admin = _Admin(keystone_url)
    roles = {r["name"]: r["id"] for r in admin.call("GET", "/roles")["roles"]}
    projects = {}
    for name, (password, project, role) in USERS.items():
        if project not in projects:
            projects[project] = admin.find_or_create(
                "projects", f"name={project}&domain_id=default",
                {"name": project, "domain_id": "default"})["id"]
        if name == "admin":
            continue  # bootstrap made it
        user = admin.find_or_create("users", f"name={name}&domain_id=default", {
            "name": name, "password": password, "domain_id": "default",
            "default_project_id": projects[project]})
        admin.call("PUT", f"/projects/{projects[project]}/users/{user['id']}/roles/{roles[role]}")

    # Catalog entry, so that clients which discover Glance through Keystone find it. Endpoint
    # URLs are updated because a reused state dir may have got new ports.
    service = admin.find_or_create("services", "type=image",
                                   {"type": "image", "name": "glance", "enabled": True})
    endpoints = admin.call("GET", f"/endpoints?service_id={service['id']}")["endpoints"]
    for interface in ("public", "internal"):
        existing = [e for e in endpoints if e["interface"] == interface]
        if not existing:
            admin.call("POST", "/endpoints", {"endpoint": {
                "service_id": service["id"], "interface": interface, "url": glance_url,
                "region_id": "RegionOne"}})
        elif existing[0]["url"] != glance_url:
            admin.call("PATCH", f"/endpoints/{existing[0]['id']}",
                       {"endpoint": {"url": glance_url}})
    return projects


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def _raise_keyboard_interrupt(*_):
    raise KeyboardInterrupt


def _cli_run(args: argparse.Namespace) -> int:
    # SIGTERM behaves like Ctrl-C, so `kill PID` also stops both servers cleanly.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    t0 = time.monotonic()
    install(args.cache)
    t1 = time.monotonic()
    peers = start(Path(args.state), keystone_port=args.keystone_port,
                  glance_port=args.glance_port, cache_dir=args.cache,
                  image_size_cap=args.image_size_cap)
    t2 = time.monotonic()
    print(f"install check {t1 - t0:.1f} s, start {t2 - t1:.1f} s", flush=True)
    print(f"OS_AUTH_URL={peers.keystone_url}")
    print(f"GLANCE_URL={peers.glance_url}")
    for name, (password, project, role) in USERS.items():
        print(f"  user {name:<10} password {password:<9} project {project:<8} role {role}")
    print(f"state and logs under {peers.state_dir}; Ctrl-C to stop", flush=True)
    try:
        while all(p.poll() is None for p in peers._procs):
            time.sleep(1)
        print("a server exited unexpectedly; see its log:", file=sys.stderr)
        print(_tail(peers.keystone_uwsgi_log), file=sys.stderr)
        print(_tail(peers.glance_uwsgi_log), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping...", flush=True)
        return 0
    finally:
        peers.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_install = sub.add_parser("install", help="create/refresh the two venvs (idempotent)")
    p_install.add_argument("--cache", type=Path, default=None,
                           help="default: $OPENSTACK_PEERS_CACHE or ~/.cache/ims-portal/openstack")
    p_run = sub.add_parser("run", help="start Keystone and Glance until Ctrl-C")
    p_run.add_argument("--state", required=True, help="state dir (configs, databases, logs)")
    p_run.add_argument("--keystone-port", type=int, default=0, help="default: a free port")
    p_run.add_argument("--glance-port", type=int, default=0, help="default: a free port")
    p_run.add_argument("--image-size-cap", type=int, default=None, help="Glance image_size_cap")
    p_run.add_argument("--cache", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "install":
            t0 = time.monotonic()
            install(args.cache)
            print(f"installed in {args.cache or default_cache_dir()} "
                  f"({time.monotonic() - t0:.1f} s)")
            return 0
        return _cli_run(args)
    except PeersUnavailable as exc:
        print(f"openstack peers unavailable: {exc.reason}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
