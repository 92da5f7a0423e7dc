"""`make run`: the whole portal on this machine, in one terminal.

Migrates, creates the demo log-ins (manage.py seed_demo), then starts what is missing and waits
for each piece to answer: Redis (when nothing answers at REDIS_URL), the IMS simulator (unless
IMS_ENDPOINT is set), a Celery worker, Celery beat and gunicorn (127.0.0.1, port $PORT or 8000).
Every child's output is shown with its name in front. A child that dies on its own is started
again after a pause that grows while it keeps dying (1, 2, 4 ... 30 s), with a message; the others
go on. Ctrl-C or SIGTERM stops all of them and exits 0.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python tools/devserver.py` puts tools/, not the root, on the path

from imssim import DEMO_DOMAIN, DEMO_PASSWORD, DEMO_PROJECT_NAME, DEMO_USER  # noqa: E402
from portal import settings  # noqa: E402  (plain module: only for its defaults)
from tools.ensure_redis import can_start_locally, redis_answers, redis_server_argv, stop  # noqa: E402
from uploads.management.commands.seed_demo import DEMO_LOGINS  # noqa: E402

VAR = ROOT / "var"
PYTHON = sys.executable
BIN = Path(PYTHON).parent
START_DEADLINE = 90.0  # seconds for one piece to answer; generous for a busy laptop
STOP_GRACE = 10.0  # seconds a child gets after SIGTERM before SIGKILL
# A child that died is started again after RESTART_FIRST_PAUSE seconds, doubled each time it dies
# again soon, up to RESTART_LONGEST_PAUSE; one that ran for RESTART_STABLE seconds starts afresh.
RESTART_FIRST_PAUSE = 1.0
RESTART_LONGEST_PAUSE = 30.0
RESTART_STABLE = 60.0

print_lock = threading.Lock()
COLOURS = {"devserver": "1", "redis": "31", "imssim": "35", "worker": "32", "beat": "36", "web": "34"}
use_colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def say(name: str, line: str) -> None:
    prefix = f"[{name}]".ljust(12)
    if use_colour:
        prefix = f"\033[{COLOURS.get(name, '0')}m{prefix}\033[0m"
    with print_lock:
        print(f"{prefix}{line}", flush=True)


class Failed(Exception):
    """Start-up cannot go on; the message says why."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM arrived during start-up."""


class Child:
    """One process in a process group of its own, its output copied line by line with a prefix."""

    def __init__(self, name: str, argv: list[str], ready_line: str | None = None):
        self.name = name
        self.argv = argv
        self.ready_line = ready_line
        self.ready = threading.Event()
        self.pause = 0.0  # before the last restart
        self.restart_at: float | None = None  # when it died: when to start it again
        self.starts = 0
        self.launch()

    def launch(self) -> None:
        self.starts += 1
        self.started_at = time.monotonic()
        self.restart_at = None
        self.process = subprocess.Popen(
            self.argv, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches only us; we stop the children in order
        )
        self.pump = threading.Thread(target=self._copy_output, daemon=True)
        self.pump.start()

    def next_pause(self) -> float:
        """How long to wait before starting it again: longer each time it dies soon after a start."""
        if time.monotonic() - self.started_at >= RESTART_STABLE or not self.pause:
            self.pause = RESTART_FIRST_PAUSE
        else:
            self.pause = min(self.pause * 2, RESTART_LONGEST_PAUSE)
        return self.pause

    def _copy_output(self) -> None:
        for raw in self.process.stdout:
            line = raw.decode(errors="replace").rstrip()
            say(self.name, line)
            if self.ready_line and self.ready_line in line:
                self.ready.set()

    def exited(self) -> bool:
        if self.process.poll() is None:
            return False
        self.pump.join(timeout=2)  # let its last words print before ours
        return True


class Devserver:
    def __init__(self):
        self.children: list[Child] = []
        self.stopping = threading.Event()

    def start(self, name, argv, *, ready_line=None, probe=None) -> Child:
        """Start a child and wait until it prints `ready_line` or `probe()` is true."""
        self.check_interrupted()
        say("devserver", f"starting {name}: {shlex.join(argv)}")
        child = Child(name, argv, ready_line)
        self.children.append(child)
        deadline = time.monotonic() + START_DEADLINE
        while not (child.ready.is_set() or (probe is not None and probe())):
            self.check_interrupted()
            if child.exited():
                raise Failed(f"{name} {how_it_ended(child.process.returncode)} while starting")
            if time.monotonic() > deadline:
                raise Failed(f"{name} did not come up within {START_DEADLINE:.0f} s")
            self.stopping.wait(0.2)
        return child

    def check_interrupted(self) -> None:
        if self.stopping.is_set():
            raise Interrupted

    def manage(self, *args: str) -> None:
        """A manage.py step before the servers start; its output is shown like a child's."""
        self.check_interrupted()
        result = subprocess.run([PYTHON, "manage.py", *args], cwd=ROOT, capture_output=True, text=True,
                                start_new_session=True)  # a Ctrl-C now lets the step finish
        for line in (result.stdout + result.stderr).splitlines():
            say("setup", line)
        if result.returncode != 0:
            raise Failed(f"manage.py {' '.join(args)} failed with status {result.returncode}")

    def watch(self) -> int:
        """Until Ctrl-C/SIGTERM (then 0), start again each child that died on its own: a worker
        that died must not leave the portal without one, nor stop the rest."""
        while not self.stopping.wait(0.2):
            for child in self.children:
                if child.restart_at is None and child.exited():
                    pause = child.next_pause()
                    child.restart_at = time.monotonic() + pause
                    say("devserver", f"{child.name} {how_it_ended(child.process.returncode)}: "
                                     f"starting it again in {pause:g} s")
                elif child.restart_at is not None and time.monotonic() >= child.restart_at:
                    say("devserver", f"starting {child.name} again: {shlex.join(child.argv)}")
                    child.launch()
        return 0

    def stop_all(self) -> None:
        """Everything but Redis at once (the worker still talks to it while shutting down), then Redis."""
        running = [c for c in self.children if c.process.poll() is None]
        if running:
            say("devserver", "stopping " + ", ".join(c.name for c in running))
        apps = [c for c in running if c.name != "redis"]
        for child in apps:
            try:
                os.killpg(child.process.pid, signal.SIGTERM)
            except ProcessLookupError:  # it has just gone by itself
                pass
        deadline = time.monotonic() + STOP_GRACE
        for child in apps:
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                note = " (its running task will be delivered again)" if child.name == "worker" else ""
                say("devserver", f"{child.name} did not stop within {STOP_GRACE:.0f} s: killing it{note}")
                stop(child.process, grace_seconds=0)
        for child in running:
            if child.name == "redis":
                stop(child.process)
            child.pump.join(timeout=2)


def how_it_ended(returncode: int) -> str:
    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with status {returncode}"


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def http_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return reply.status < 500
    except urllib.error.HTTPError as error:  # it answered, with an error: it is up
        return error.code < 500
    except OSError:
        return False


def print_box(web_url: str, sim_url: str | None) -> None:
    lines = [f"IMS upload portal: {web_url}", ""]
    for i, (username, (password, is_superuser)) in enumerate(DEMO_LOGINS.items()):
        what = "can also open /admin/" if is_superuser else "uploads images"
        lines.append(f"{'Log in as' if i == 0 else '       or'} {username} / {password}   ({what})")
    lines.append("")
    if sim_url:
        lines += [f"Cloud account page (IMS simulator at {sim_url}):",
                  f"  domain {DEMO_DOMAIN}   user {DEMO_USER}   password {DEMO_PASSWORD}"
                  f"   project {DEMO_PROJECT_NAME}"]
    else:
        lines += [f"IMS at {settings.IMS_ENDPOINT}, IAM at {settings.IAM_ENDPOINT}:",
                  "  enter your cloud account on the Cloud account page"]
    lines += ["", "Ctrl-C stops everything."]
    width = max(len(line) for line in lines)
    box = ["+" + "-" * (width + 2) + "+", *(f"| {line.ljust(width)} |" for line in lines),
           "+" + "-" * (width + 2) + "+"]
    with print_lock:
        print("\n" + "\n".join(box) + "\n", flush=True)


def start_redis(server: Devserver, url: str) -> None:
    if redis_answers(url):
        say("devserver", f"using the Redis that answers at {url}")
        return
    if not can_start_locally(url):
        raise Failed(f"nothing answers at REDIS_URL {url}, and it is not on this machine")
    try:
        argv = redis_server_argv(url, VAR / f"redis-{urlsplit(url).port or 6379}")
    except (OSError, subprocess.CalledProcessError) as error:
        raise Failed(f"no redis-server to start, and none could be installed: {error}") from None
    server.start("redis", argv, probe=lambda: redis_answers(url, timeout=0.5))


def run(server: Devserver) -> int:
    port = int(os.environ.get("PORT", "8000"))
    web_url = f"http://127.0.0.1:{port}/"
    if port_in_use("127.0.0.1", port):
        raise Failed(f"port {port} is in use: stop what listens there, or set PORT")
    start_simulator = "IMS_ENDPOINT" not in os.environ
    sim = urlsplit(settings.IMS_ENDPOINT)
    if start_simulator and port_in_use(sim.hostname, sim.port):
        raise Failed(f"port {sim.port} (the IMS simulator's) is in use: stop what listens there, "
                     "or set IMS_ENDPOINT and IAM_ENDPOINT to use it")
    VAR.mkdir(exist_ok=True)
    # Mails (printed by the worker: no EMAIL_HOST, so the console backend) link to this server.
    os.environ.setdefault("PORTAL_BASE_URL", web_url.rstrip("/"))

    server.manage("migrate", "--noinput")
    server.manage("seed_demo")

    start_redis(server, settings.REDIS_URL)
    if start_simulator:
        server.start("imssim", [PYTHON, "-m", "imssim", "--host", sim.hostname, "--port", str(sim.port),
                                "--data-dir", str(VAR / "imssim")],
                     ready_line="IMS simulator listening on")
    server.start("worker", [str(BIN / "celery"), "-A", "portal", "worker", "-Q", "uploads,celery",
                            "--concurrency", "2", "-l", "info"], ready_line=" ready.")
    server.start("beat", [str(BIN / "celery"), "-A", "portal", "beat", "-l", "info",
                          "--schedule", str(VAR / "celerybeat-schedule")], ready_line="beat: Starting")
    server.start("web", [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "portal.wsgi:application"],
                 probe=lambda: http_answers(f"{web_url}accounts/login/"))
    print_box(web_url, settings.IMS_ENDPOINT if start_simulator else None)
    return server.watch()


def main(layout=None) -> int:
    """Start `layout` (this file's run: the simple one), watch it, stop everything on Ctrl-C."""
    server = Devserver()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: server.stopping.set())
    try:
        status = (layout or run)(server)
    except Interrupted:
        status = 0
    except Failed as error:
        say("devserver", f"error: {error}")
        status = 1
    finally:
        server.stop_all()
    say("devserver", "stopped")
    return status


if __name__ == "__main__":
    sys.exit(main())
