"""What both benchmarks share: test files, a throwaway portal set-up, peak memory of a process
tree, the IMS simulator as a child process, and the one result line each benchmark ends with.

Benchmarks are scripts, not tests: run them with the project's venv from the repository root,
e.g. `.venv/bin/python bench/push.py`. See bench/README.md.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
MIB = 1024 * 1024
GIB = 1024 * MIB
# A Redis database of their own, so that benchmark messages never reach a running portal or
# the tests (db 15).
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
WRITE_CHUNK = 16 * MIB


def say(message: str) -> None:
    """Progress for the person watching; the result line is the only other output."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def print_result(figures: dict) -> None:
    """The benchmark's last line: `name=value` pairs separated by spaces."""
    print(" ".join(f"{name}={value}" for name, value in figures.items()), flush=True)


def workdir(prefix: str) -> Path:
    """A fresh folder under /tmp for everything a run writes; `cleanup` removes it."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("BENCH_TMP", "/tmp")))


def cleanup(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Test files


def make_random_file(path: Path, size: int) -> Path:
    """`size` bytes that no layer can compress or skip: an AES-CTR keystream under a key from
    os.urandom (as unpredictable as urandom itself, and ~20x faster to make: 4 GiB in ~2 s)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    stream = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(os.urandom(16))).encryptor()
    zeros = bytes(WRITE_CHUNK)
    with open(path, "wb") as out:
        left = size
        while left:
            step = min(left, WRITE_CHUNK)
            out.write(stream.update(zeros[:step]))
            left -= step
    return path


def warm_cache(path: Path) -> None:
    """Read a file once so that every timed run reads it from the page cache: the benchmarks
    compare programs, not cold and warm disk reads."""
    with open(path, "rb", buffering=0) as source:
        while source.read(WRITE_CHUNK):
            pass


def settle_disk() -> None:
    """Write back what earlier runs left dirty, so that no run pays for the one before it."""
    os.sync()


# ---------------------------------------------------------------------------------------------
# Memory


class PeakRss:
    """Peak resident memory of a process and all its descendants, sampled at ~20 Hz in a thread.

    `peak_tree` is the highest sum over the tree seen in one sample (pages shared after a fork
    count once per process, so for a forked tree it overstates the real footprint: 250 MB
    against 130 MB of PSS for a Celery worker). `peak_busiest` is the
    peak of the one process that used the most CPU meanwhile: in a Celery worker, the pool
    process that ran the task; in gunicorn, the worker that served the requests.

    `peak_tree_pss` (every 4th sample) is the highest sum of PSS over the tree: each page shared
    by n processes counts 1/n in each, so the sum is the memory the tree really holds, pages
    shared after a fork counted once.
    """

    PSS_EVERY = 4  # reading smaps_rollup costs more than the RSS: 5 Hz is enough

    def __init__(self, pid: int, interval: float = 0.05):
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_tree = 0
        self.peak_tree_pss = 0
        self._samples = 0
        self.peaks: dict[int, int] = {}  # pid -> peak RSS
        self._cpu_start: dict[int, float] = {}
        self._cpu_end: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _processes(self) -> list:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def sample(self) -> tuple[int, int]:
        """(sum of RSS over the tree, largest RSS of one process), in bytes; records peaks."""
        total = largest = pss = 0
        with_pss = self._samples % self.PSS_EVERY == 0
        self._samples += 1
        for process in self._processes():
            try:
                rss = process.memory_info().rss
                cpu = sum(process.cpu_times()[:2])
                pss += process.memory_full_info().pss if with_pss else 0
            except (psutil.NoSuchProcess, psutil.AccessDenied):  # a child that just ended (mid-read)
                continue
            self._cpu_start.setdefault(process.pid, cpu)
            self._cpu_end[process.pid] = cpu
            self.peaks[process.pid] = max(self.peaks.get(process.pid, 0), rss)
            total += rss
            largest = max(largest, rss)
        self.peak_tree = max(self.peak_tree, total)
        self.peak_tree_pss = max(self.peak_tree_pss, pss)
        return total, largest

    @property
    def busiest_pid(self) -> int | None:
        used = {pid: self._cpu_end[pid] - start for pid, start in self._cpu_start.items()}
        return max(used, key=used.get) if used else None

    @property
    def peak_busiest(self) -> int:
        return self.peaks.get(self.busiest_pid, 0)

    @property
    def cpu_seconds(self) -> float:
        """CPU the tree used between the first and the last sample."""
        return sum(self._cpu_end[pid] - start for pid, start in self._cpu_start.items())

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRss":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()  # one last look, after the work ended


# ---------------------------------------------------------------------------------------------
# The rest of the machine: benchmarks share 2 cores with whatever else runs


def _busy_cpu_seconds() -> float:
    """CPU time the machine spent in processes (and lost to other VMs), all cores together.
    Interrupt time is left out: it is mostly our own loopback traffic and disk writes."""
    times = psutil.cpu_times()
    return times.user + times.nice + times.system + times.steal


def _kernel_thread_cpu_seconds() -> float:
    """CPU of kernel threads (children of kthreadd, pid 2), e.g. the writeback of our files."""
    total = 0.0
    for process in psutil.process_iter(["ppid", "cpu_times"]):
        if process.pid == 2 or process.info["ppid"] == 2:
            times = process.info["cpu_times"]
            if times is not None:
                total += times.user + times.system
    return total


def _own_cpu_seconds() -> float:
    """CPU used by this script and every process it started (servers, workers, curl, dd)."""
    me = psutil.Process()
    times = me.cpu_times()
    total = times.user + times.system + times.children_user + times.children_system
    for child in me.children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


def tree_cpu_seconds(pid: int) -> float:
    """CPU used so far by a process and its live descendants."""
    try:
        processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def listening_pid(port: int) -> int | None:
    """The process that listens on 127.0.0.1:`port` (the oldest, for a pre-forking server)."""
    pids = {c.pid for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid}
    return min(pids, key=lambda pid: psutil.Process(pid).create_time()) if pids else None


class OthersLoad:
    """How many cores other people's processes kept busy while a run took place (what is left
    of the machine's busy time after our processes and the kernel's own threads)."""

    def _used(self) -> tuple[float, float]:
        return _busy_cpu_seconds(), _own_cpu_seconds() + _kernel_thread_cpu_seconds()

    def __enter__(self) -> "OthersLoad":
        (self._busy, self._own), self._wall = self._used(), time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        busy, own = self._used()
        wall = max(time.monotonic() - self._wall, 1e-6)
        self.cores = max(0.0, (busy - self._busy) - (own - self._own)) / wall


def wait_for_quiet(*, below: float = 0.3, longest: float = 30.0) -> float:
    """Wait (at most `longest` seconds) until other processes use less than `below` cores over
    one second, so that a run does not measure someone else's test suite. Returns the last load."""
    deadline = time.monotonic() + longest
    while True:
        with OthersLoad() as load:
            time.sleep(1.0)
        if load.cores < below or time.monotonic() > deadline:
            return load.cores


def mb(size: int) -> int:
    return round(size / MIB)


# ---------------------------------------------------------------------------------------------
# Child processes


def start_process(argv: list, *, log: Path, env: dict | None = None) -> subprocess.Popen:
    """A child in a process group of its own (so that stopping it stops its children too),
    its output going to `log` (a fresh file: callers wait for lines in it)."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [str(arg) for arg in argv], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )


def stop_process(process: subprocess.Popen, timeout: float = 20) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_for(condition, *, timeout: float, what: str, process: subprocess.Popen | None = None,
             log: Path | None = None, interval: float = 0.05):
    """Wait until condition() is truthy; fail early when `process` ends, and show its log."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        ended = process is not None and process.poll() is not None
        if ended or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            reason = f"exited with {process.returncode}" if ended else f"not after {timeout:.0f} s"
            raise RuntimeError(f"waiting for {what}: {reason}\n{tail}")
        time.sleep(interval)


def start_simulator(data_dir: Path, log: Path, *, processing_seconds: float = 0) -> tuple[subprocess.Popen, str]:
    """The IMS simulator (`python -m imssim`) on a free port; returns the process and its URL.
    `processing_seconds`: how long an image stays "saving" after its PUT (IMS's own checks)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    process = start_process(
        [PYTHON, "-m", "imssim", "--host", "127.0.0.1", "--port", "0", "--data-dir", data_dir,
         "--processing-seconds", processing_seconds, "--quiet"],
        log=log,
    )

    def url():
        found = re.search(r"listening on (http://\S+)", log.read_text(errors="replace"))
        return found and found.group(1)

    return process, wait_for(url, timeout=30, what="the IMS simulator", process=process, log=log)


# ---------------------------------------------------------------------------------------------
# A throwaway portal: its own SQLite database, staging folder and Redis database


def portal_env(folder: Path, **overrides: str) -> dict:
    """The environment of a portal process (web or worker) that touches nothing but `folder`."""
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{folder / 'portal.sqlite3'}",
        "REDIS_URL": REDIS_URL,
        "STAGING_DIR": str(folder / "staging"),
        "DEBUG": "0",
        "LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    }
    env.update(overrides)
    (folder / "staging").mkdir(exist_ok=True)
    return env


def migrate(env: dict, log: Path) -> None:
    with open(log, "ab") as out:
        subprocess.run([PYTHON, "manage.py", "migrate", "--noinput"], cwd=ROOT, env=env, check=True,
                       stdout=out, stderr=subprocess.STDOUT)


def use_portal_in_this_process(env: dict) -> None:
    """Let this script use the portal's models and services against the throwaway database
    (set-up and polling only: the measured work runs in the portal's own processes)."""
    for name in ("DATABASE_URL", "REDIS_URL", "STAGING_DIR", "DEBUG"):
        os.environ[name] = env[name]
    os.environ["LOG_LEVEL"] = "WARNING"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import django

    django.setup()


def flush_redis() -> None:
    """Drop whatever messages a run left in the benchmark's Redis database."""
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()


def create_user(username: str):
    from django.contrib.auth import get_user_model

    return get_user_model().objects.create_user(username, f"{username}@example.com", "bench-pw-1234")
