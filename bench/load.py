"""Many uploads at once: 20 uploads of 200 MiB from 5 users, through nginx, to the web/ingest split.

The portal runs in the production layout (docker-compose.yml, `make run-prod`) on this machine's
2 cores: Debian's nginx with deploy/nginx/'s config (TLS with a certificate made for the run) in
front of a *web* gunicorn and an *ingest* gunicorn (tools/prodserver.py's commands, gunicorn.conf.py:
2 processes x 32 threads each), two Celery workers (`celery -A portal worker -Q uploads,celery -c 1
-n wN@%h`) and beat, against the IMS simulator (`--processing-seconds 1`), with SECURE_HTTPS=1
behind the proxy, on a throwaway database (PostgreSQL by default: a database created on
127.0.0.1:5432, user postgres, and dropped at the end; `--db sqlite` for a file) and Redis db 14.

Five users, each with a cloud account connected to the simulator through its IAM (as
tests/conftest.py `connect_cloud` does) and a signed-in session (cookie + CSRF header, as
bench/ingest.py makes them), each upload 4 files of 200 MiB at the same time: one process per
user (a browser of its own), one thread and one keep-alive connection per upload, a creation POST
then PATCHes of 50 MiB as the upload page sends them. Two modes:

- `--mode paced` (default): each upload's body is sent at `--rate-mib-s` (default 10 MiB/s, a
  person on an office network), in 256 KiB writes on a steady clock; the goal is status p95 < 50 ms
  with all 20 READY and their checksums matching;
- `--mode flat`: as fast as the machine goes (the closed loop of the earlier references); aggregate
  MiB/s and p95 are reported, without a goal.

The files are raw disk images (first 512 bytes zero, then random bytes), each different.
Meanwhile one poller thread per user GETs `/uploads/<uid>/status` of each of its unfinished uploads
every 0.5 s through nginx (as the My uploads page does, but faster: the page waits 2 s), on a
keep-alive connection, and records each latency (request sent to JSON read), with the standard
library's http.client, as lean as a browser's fetch. The peak RSS samplers run in a process of
their own, so that their reads of /proc do not hold the GIL that the pollers wait for.

The run ends when all 20 are finished (READY, FAILED, ...) or at the deadline. Then each image in
the simulator (`GET /_sim/images`) must be active with the md5 of its source file, and there must be
exactly 20 images.

Figures: mode, load_wall_s (first tus creation to the last upload's READY, from its timeline),
ingest_mib_s (all bytes / time until the last tus upload ended), ready=N/20, checksums_ok, status
latency p50/p95 (all polls over the run; also printed per phase: while tus uploads run, and after),
peak RSS of each process tree, others_cores (cores other people's processes used during the run).

    .venv/bin/python bench/load.py [--mode paced|flat] [--rate-mib-s 10] [--users 5] [--files 4]
                                   [--size-mib 200] [--db postgres|sqlite]

The last line holds the figures, e.g.
    mode=paced rate_mib_s=10 load_wall_s=... ingest_mib_s=... ready=20/20 checksums_ok=20 status_p50_ms=... ...
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.client
import json
import multiprocessing
import os
import re
import secrets
import sys
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    MIB,
    PYTHON,
    WRITE_CHUNK,
    OthersLoad,
    PeakRss,
    cleanup,
    create_user,
    flush_redis,
    mb,
    migrate,
    portal_env,
    print_result,
    say,
    settle_disk,
    start_process,
    start_simulator,
    stop_process,
    use_portal_in_this_process,
    wait_for,
    wait_for_quiet,
    warm_cache,
    workdir,
)
from bench.front import behind_proxy_env, start_nginx, start_pool, unverified_tls  # noqa: E402
from bench.ingest import signed_in_headers  # noqa: E402

POLL_SECONDS = 0.5
PIECE = 256 * 1024  # one write of a PATCH body: a paced upload sends one every 25 ms at 10 MiB/s
CHUNK_MIB = 50  # static/js/upload.js: chunkSize 50 MiB
FINISHED = {"ready", "failed", "reconnect", "cancelled"}
PG_URL = "postgres://postgres@127.0.0.1:5432"


def worker_argv(n: int) -> list:
    return [PYTHON, "-m", "celery", "-A", "portal", "worker", "-Q", "uploads,celery", "-c", "1",
            "-l", "info", "-n", f"w{n}@%h"]


def make_disk_image(path: Path, size: int) -> str:
    """A raw disk image: 512 zero bytes (an empty boot sector), then random bytes; returns its md5."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    stream = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(os.urandom(16))).encryptor()
    md5 = hashlib.md5(usedforsecurity=False)
    zeros = bytes(WRITE_CHUNK)
    with open(path, "wb") as out:
        left, first = size, True
        while left:
            step = min(left, WRITE_CHUNK)
            data = stream.update(zeros[:step])
            if first:
                data, first = bytes(512) + data[512:], False
            out.write(data)
            md5.update(data)
            left -= step
    return md5.hexdigest()


# ---------------------------------------------------------------------------------------------
# A throwaway PostgreSQL database (--db postgres)


def pg_create() -> str:
    import psycopg

    name = f"bench_load_{secrets.token_hex(4)}"
    with psycopg.connect(f"{PG_URL}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def pg_drop(name: str) -> None:
    import psycopg

    with psycopg.connect(f"{PG_URL}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# ---------------------------------------------------------------------------------------------
# The users: uploads and pollers


@dataclass
class Poll:
    at: float  # seconds since the run started (request sent)
    ms: float
    code: int
    status: str
    uploading: bool  # whether any tus upload was still running when it was sent


@dataclass
class User:
    index: int
    headers: dict
    files: list  # [(path, md5, image name)]
    uids: dict = field(default_factory=dict)  # image name -> uid
    last: dict = field(default_factory=dict)  # uid -> last status seen
    polls: list = field(default_factory=list)
    errors: list = field(default_factory=list)


def connect(url: str) -> http.client.HTTPConnection:
    """A keep-alive connection to the front (nginx, https with the run's own certificate)."""
    address = urllib.parse.urlsplit(url)
    if address.scheme == "https":
        return http.client.HTTPSConnection(address.hostname, address.port, timeout=120, context=unverified_tls())
    return http.client.HTTPConnection(address.hostname, address.port, timeout=120)


def tus_create(connection, headers: dict, size: int, name: str) -> str:
    """The creation POST; returns the upload's path (/tus/<uid>/)."""
    metadata = {"filename": f"{name}.raw", "image_name": name, "disk_format": "raw"}
    connection.request("POST", "/tus/", headers={
        **headers, "Tus-Resumable": "1.0.0", "Upload-Length": str(size), "Content-Length": "0",
        "Upload-Metadata": ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in metadata.items())})
    reply = connection.getresponse()
    body = reply.read()
    if reply.status != 201:
        raise RuntimeError(f"creation answered {reply.status}: {body[:200]!r}")
    return urllib.parse.urlsplit(reply.getheader("Location")).path


def tus_patch(connection, headers: dict, path: str, source, offset: int, length: int, pace) -> int:
    """One PATCH of `length` bytes from `source`, each 256 KiB write when `pace(bytes sent so far
    in this PATCH)` says; returns the server's new offset."""
    connection.putrequest("PATCH", path)
    for name, value in {**headers, "Tus-Resumable": "1.0.0", "Upload-Offset": str(offset),
                        "Content-Type": "application/offset+octet-stream", "Content-Length": str(length)}.items():
        connection.putheader(name, value)
    connection.endheaders()
    sent = 0
    while sent < length:
        piece = source.read(min(PIECE, length - sent))
        pace(sent)
        connection.send(piece)
        sent += len(piece)
    reply = connection.getresponse()
    body = reply.read()
    if reply.status != 204:
        raise RuntimeError(f"PATCH at {offset} answered {reply.status}: {body[:200]!r}")
    return int(reply.getheader("Upload-Offset"))


def upload_file(url: str, headers: dict, path: str, name: str, chunk: int, rate: float, messages) -> None:
    """One upload as the upload page sends it (a creation POST, then PATCHes of `chunk` bytes), its
    body at `rate` bytes/s on a steady clock (0: as fast as it goes)."""
    size = os.path.getsize(path)
    connection = connect(url)
    try:
        upload_path = tus_create(connection, headers, size, name)
        messages.put(("uid", name, upload_path.rstrip("/").rsplit("/", 1)[-1]))
        started, offset = time.perf_counter(), 0

        def pace(sent_in_patch: int) -> None:
            if rate:
                time.sleep(max(0.0, started + (offset + sent_in_patch) / rate - time.perf_counter()))

        with open(path, "rb") as source:
            while offset < size:
                offset = tus_patch(connection, headers, upload_path, source, offset, min(chunk, size - offset), pace)
    finally:
        connection.close()


def browser(url: str, headers: dict, files: list, chunk: int, rate: float, go, messages) -> None:
    """One user's browser, in a process of its own (spawned, so no Django in it): once `go` is
    set, one upload per file in a thread of its own. Reports ("uid", name, uid) after the
    creation POST and ("done", name, time.time(), error or "") at the end, through `messages`."""

    def upload(path: str, name: str) -> None:
        error = ""
        try:
            upload_file(url, headers, path, name, chunk, rate, messages)
        except Exception as exc:  # noqa: BLE001 - reported in the figures
            error = repr(exc)
        messages.put(("done", name, time.time(), error))

    threads = [threading.Thread(target=upload, args=(path, name)) for path, name in files]
    go.wait()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


class Run:
    """The uploads run in one process per user (as in separate browsers: the tuspy threads must
    not take the GIL from the pollers); the pollers, one thread per user, run in this process."""

    def __init__(self, url: str, users: list[User], chunk: int, rate: float, deadline_seconds: float):
        self.url, self.users, self.chunk, self.deadline_seconds = url, users, chunk, deadline_seconds
        self.started = self.wall_start = self.deadline = 0.0
        self.tus_running = sum(len(user.files) for user in users)
        self.tus_done_at: list[float] = []
        self.lock = threading.Lock()
        context = multiprocessing.get_context("spawn")
        self.go_event = context.Event()
        self.queues = [context.Queue() for _ in users]
        self.browsers = [
            context.Process(target=browser, args=(url, user.headers, [(str(p), n) for p, _, n in user.files],
                                                  chunk, rate, self.go_event, queue), daemon=True)
            for user, queue in zip(users, self.queues)
        ]
        for process in self.browsers:
            process.start()

    def listen(self, user: User, queue) -> None:
        """What the user's browser process reports: the upload ids, and the end of each upload."""
        done = 0
        while done < len(user.files) and time.perf_counter() < self.deadline:
            try:
                message = queue.get(timeout=1)
            except Exception:  # noqa: BLE001 - queue.Empty
                continue
            with self.lock:
                if message[0] == "uid":
                    user.uids[message[1]] = message[2]
                    continue
                _, name, at, error = message
                done += 1
                self.tus_running -= 1
                self.tus_done_at.append(at - self.wall_start)
                if error:
                    user.errors.append(f"{name}: tus: {error}")
                    if name not in user.uids:  # never created: nothing to poll
                        user.uids[name] = f"none-{name}"
                        user.last[user.uids[name]] = "failed"

    def poll(self, user: User) -> None:
        """GET each unfinished upload's status every POLL_SECONDS on one keep-alive connection."""
        connection = connect(self.url)
        headers = {"Cookie": user.headers["Cookie"], "Accept": "application/json"}
        tick = time.perf_counter()
        while time.perf_counter() < self.deadline:
            with self.lock:
                uids = [uid for uid in user.uids.values() if user.last.get(uid) not in FINISHED]
                all_known = len(user.uids) == len(user.files)
            if all_known and not uids:
                return
            for uid in uids:
                uploading = self.tus_running > 0
                sent = time.perf_counter()
                try:
                    connection.request("GET", f"/uploads/{uid}/status", headers=headers)
                    reply = connection.getresponse()
                    body, code = reply.read(), reply.status
                    status = json.loads(body).get("status", "?") if code == 200 else "?"
                except Exception as exc:  # noqa: BLE001
                    user.errors.append(f"status {uid}: {exc!r}")
                    status, code = "?", 0
                    connection.close()  # http.client opens a new connection on the next request
                ms = (time.perf_counter() - sent) * 1000
                user.polls.append(Poll(sent - self.started, ms, code, status, uploading))
                if code == 200:
                    user.last[uid] = status
            tick += POLL_SECONDS
            time.sleep(max(0.0, tick - time.perf_counter()))
            tick = max(tick, time.perf_counter() - POLL_SECONDS)  # behind: poll again at once, no burst

    def go(self) -> None:
        threads = []
        for user, queue in zip(self.users, self.queues):
            threads.append(threading.Thread(target=self.listen, args=(user, queue), daemon=True))
            threads.append(threading.Thread(target=self.poll, args=(user,), daemon=True))
        self.wall_start = time.time()
        self.started = time.perf_counter()
        self.deadline = self.started + self.deadline_seconds
        for thread in threads:
            thread.start()
        self.go_event.set()
        for thread in threads:
            thread.join(max(0.0, self.deadline - time.perf_counter()) + 5)

    def close(self) -> None:
        for process in self.browsers:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join()


@dataclass
class Sampled:
    """What a PeakRss found, brought back from the watcher process."""
    peak_tree: int
    peaks: dict
    cpu_seconds: float


def watch(pids: dict, stop, results) -> None:
    """Sample the process trees (PeakRss, 20 Hz) in a process of their own: reading /proc for
    every tree 20 times a second takes the GIL for ~0.6 ms a tree, which the pollers in the
    script's process would otherwise wait for and count as status latency."""
    samplers = {name: PeakRss(pid) for name, pid in pids.items()}
    for sampler in samplers.values():
        sampler.__enter__()
    results.put("sampling")
    stop.wait()
    for sampler in samplers.values():
        sampler.__exit__(None, None, None)
    results.put({name: Sampled(s.peak_tree, dict(s.peaks), s.cpu_seconds) for name, s in samplers.items()})


class Watcher:
    def __init__(self, pids: dict):
        context = multiprocessing.get_context("spawn")
        self.stop_event, self.results = context.Event(), context.Queue()
        self.process = context.Process(target=watch, args=(pids, self.stop_event, self.results), daemon=True)
        self.process.start()
        if self.results.get(timeout=60) != "sampling":
            raise RuntimeError("the watcher process did not start")

    def stop(self) -> dict:
        self.stop_event.set()
        sampled = self.results.get(timeout=60)
        self.process.join(10)
        return sampled


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values) + 0.5) - 1))]


def latency_line(polls: list[Poll]) -> str:
    ms = [p.ms for p in polls]
    if not ms:
        return "no polls"
    return (f"{len(ms)} polls, p50 {percentile(ms, 50):.0f} ms, p95 {percentile(ms, 95):.0f} ms, "
            f"p99 {percentile(ms, 99):.0f} ms, max {max(ms):.0f} ms")


def server_times(log: Path) -> list[float]:
    """Request times gunicorn logged for the status GETs (access log `%(L)s`, seconds): the time
    inside the web process once a thread took the request, without the wait for a thread."""
    found = re.findall(r'"GET /uploads/[0-9a-f-]+/status" 200 \d+ ([0-9.]+)s', log.read_text(errors="replace"))
    return [float(s) * 1000 for s in found]


# ---------------------------------------------------------------------------------------------


def start_portal(work: Path, env: dict, processes: dict, simple: bool) -> str:
    """Web and ingest pools, nginx in front of them, two workers and beat; returns nginx's URL.
    `simple`: the ingest pool with bench/gunicorn_simple.conf.py, for comparison."""
    processes["web"], web_address = start_pool("web", env, work / "web.log")
    processes["ingest"], ingest_address = start_pool("ingest", env, work / "ingest.log", simple=simple)
    processes["nginx"], url = start_nginx(work / "nginx", [web_address], [ingest_address], work / "nginx.log")
    for n in (1, 2):
        processes[f"worker{n}"] = start_process(worker_argv(n), log=work / f"worker{n}.log", env=env)
    processes["beat"] = start_process(
        [PYTHON, "-m", "celery", "-A", "portal", "beat", "-l", "info", "--schedule", work / "celerybeat-schedule"],
        log=work / "beat.log", env=env)
    for n in (1, 2):
        log = work / f"worker{n}.log"
        wait_for(lambda: b"ready." in log.read_bytes(), timeout=90, what=f"Celery worker {n}",
                 process=processes[f"worker{n}"], log=log)
    wait_for(lambda: b"beat: Starting" in (work / "beat.log").read_bytes(), timeout=60, what="Celery beat",
             process=processes["beat"], log=work / "beat.log")
    return url


def make_users(args, work: Path, sim_url: str, front_url: str) -> list[User]:
    """Users connected to the simulator, each with its files and a signed-in browser's headers
    (over https, Django's CSRF check also wants the page's Referer)."""
    from imssim.server import DEMO_DOMAIN, DEMO_PASSWORD, DEMO_PROJECT_NAME, DEMO_USER

    from uploads import services

    users = []
    for i in range(args.users):
        user = create_user(f"load{i}")
        services.cloud_account_connect(user=user, domain=DEMO_DOMAIN, user_name=DEMO_USER,
                                       password=DEMO_PASSWORD, project=DEMO_PROJECT_NAME)
        files = []
        for j in range(args.files):
            name = f"load-u{i}-f{j}"
            path = work / f"{name}.raw"
            files.append((path, make_disk_image(path, args.size_mib * MIB), name))
        users.append(User(i, {**signed_in_headers(user), "Referer": f"{front_url}/upload/"}, files))
    return users


def report(args, run: Run, users: list[User], samplers: dict, sim_url: str, work: Path, others) -> dict:
    """Checks the rows and the simulator's images, prints the details; returns the figures."""
    from uploads.models import Status, Upload, UploadEvent

    size, total = args.size_mib * MIB, args.users * args.files
    rows = list(Upload.objects.filter(owner__username__startswith="load").values_list("name", "status", "uid"))
    ready = [name for name, status, _ in rows if status == Status.READY]
    for name, status, _ in rows:
        if status != Status.READY:
            say(f"NOT READY: {name} {status}")
    last_ready = max((e.at.timestamp() for e in UploadEvent.objects.filter(to_status=Status.READY)), default=None)
    wall = (last_ready - run.wall_start) if last_ready else float("nan")
    tus_seconds = max(run.tus_done_at or [float("nan")])
    with urllib.request.urlopen(f"{sim_url}/_sim/images", timeout=30) as reply:
        images = json.load(reply)["images"]
    sources = {name: md5 for user in users for _, md5, name in user.files}
    checksums_ok = sum(1 for image in images
                       if image["status"] == "active" and sources.get(image["name"]) == image["checksum"]
                       and image["size"] == size)
    names = [image["name"] for image in images]
    say(f"simulator holds {len(images)} images ({len(set(names))} names); {checksums_ok} active with the "
        f"source's md5 and size")
    for error in [e for user in users for e in user.errors][:10]:
        say(f"ERROR {error}")

    polls = [p for user in users for p in user.polls]
    say(f"status polls, all: {latency_line(polls)}; not 200: {len([p for p in polls if p.code != 200])}")
    say(f"  while tus uploads ran: {latency_line([p for p in polls if p.uploading])}")
    say(f"  after the last tus upload: {latency_line([p for p in polls if not p.uploading])}")
    for lo, hi in ((0, 5), (5, 10), (10, 20), (20, 40), (40, 80), (80, 1e9)):
        part = [p for p in polls if lo <= p.at < hi]
        if part:
            say(f"  polls sent {lo}-{hi if hi < 1e9 else 'end'} s: {latency_line(part)}")
    inside = server_times(work / "web.log")
    if inside:
        say(f"the web pool's own time for those GETs (access log, no queueing): {len(inside)} requests, "
            f"p50 {percentile(inside, 50):.0f} ms, p95 {percentile(inside, 95):.0f} ms, max {max(inside):.0f} ms")
    for name, sampler in samplers.items():
        say(f"peak RSS {name}: {mb(sampler.peak_tree)} MB tree ("
            + ", ".join(f"{mb(v)}" for v in sampler.peaks.values()) + " MB per process)")
    ms = [p.ms for p in polls]
    figures = {"mode": args.mode, **({"ingest": "simple"} if args.ingest == "simple" else {})}
    if args.mode == "paced":
        figures["rate_mib_s"] = f"{args.rate_mib_s:g}"
    figures.update({
        "load_wall_s": f"{wall:.1f}",
        "ingest_mib_s": f"{total * size / MIB / tus_seconds:.0f}",
        "ready": f"{len(ready)}/{total}",
        "checksums_ok": checksums_ok if len(images) == total else f"{checksums_ok}({len(images)}_images)",
        "status_p50_ms": f"{percentile(ms, 50):.0f}",
        "status_p95_ms": f"{percentile(ms, 95):.0f}",
        **{f"rss_mb_{name}": mb(sampler.peak_tree) for name, sampler in samplers.items()},
        "db": args.db,
        "others_cores": f"{others.cores:.2f}",
    })
    return figures


def measure(args, url: str, users: list[User], processes: dict, rate: float):
    """The timed run: all uploads at once, the pollers, the samplers; (run, samplers, others)."""
    for user in users:
        for path, _, _ in user.files:
            warm_cache(path)
    run = Run(url, users, args.chunk_mib * MIB, rate, args.deadline)  # starts the users' browser processes
    settle_disk()
    others_before = wait_for_quiet(longest=15)
    say(f"others used {others_before:.2f} cores before the run; starting {run.tus_running} uploads")
    pids = {name: process.pid for name, process in processes.items()}
    idle = {name: PeakRss(pid).sample()[0] for name, pid in pids.items()}
    say("idle RSS: " + ", ".join(f"{name} {mb(rss)} MB" for name, rss in idle.items()))
    watcher = Watcher(pids)
    try:
        with OthersLoad() as others:
            run.go()
    finally:
        samplers = watcher.stop()
        run.close()
    say(f"run over after {time.perf_counter() - run.started:.1f} s; last tus upload done at "
        f"{max(run.tus_done_at or [0]):.1f} s; others used {others.cores:.2f} cores meanwhile")
    say("CPU seconds during the run: " + ", ".join(f"{name} {s.cpu_seconds:.1f}" for name, s in samplers.items()))
    return run, samplers, others


def prepare(args, work: Path, processes: dict, pg_name: str | None) -> tuple[str, str, list[User]]:
    """The simulator, the portal behind nginx and the users; (simulator URL, nginx URL, users).
    Every process started goes into `processes` as soon as it runs, for main() to stop."""
    sim, sim_url = start_simulator(work / "imssim-data", work / "imssim.log", processing_seconds=1)
    processes["sim"] = sim
    overrides = {"IMS_ENDPOINT": sim_url, "IAM_ENDPOINT": f"{sim_url}/v3"}
    if pg_name:
        overrides["DATABASE_URL"] = f"{PG_URL}/{pg_name}"
    env = behind_proxy_env(portal_env(work, **overrides), secure=True)
    migrate(env, work / "migrate.log")
    use_portal_in_this_process(env)
    flush_redis()

    from django.conf import settings

    settings.IMS_ENDPOINT, settings.IAM_ENDPOINT = sim_url, f"{sim_url}/v3"
    url = start_portal(work, env, processes, args.ingest == "simple")
    t0 = time.monotonic()
    users = make_users(args, work, sim_url, url)
    say(f"{args.users} users connected to the simulator; {args.users * args.files} files of {args.size_mib} MiB "
        f"made in {time.monotonic() - t0:.1f} s ({args.db} database)")
    say(f"nginx at {url} in front of the web and ingest pools (gunicorn -c gunicorn.conf.py), "
        f"2 workers (-c 1) and beat ready; simulator at {sim_url}; mode {args.mode}"
        + (f", {args.rate_mib_s:g} MiB/s per upload" if args.mode == "paced" else ""))
    return sim_url, url, users


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("paced", "flat"), default="paced",
                        help="paced: each upload at --rate-mib-s (default); flat: as fast as it goes")
    parser.add_argument("--rate-mib-s", type=float, default=10, help="paced mode: MiB/s per upload (default 10)")
    parser.add_argument("--users", type=int, default=5)
    parser.add_argument("--files", type=int, default=4, help="uploads per user (default 4)")
    parser.add_argument("--size-mib", type=int, default=200)
    parser.add_argument("--chunk-mib", type=int, default=CHUNK_MIB)
    parser.add_argument("--db", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--deadline", type=float, default=600, help="seconds for all uploads to finish")
    parser.add_argument("--ingest", choices=("production", "simple"), default="production",
                        help="simple: the ingest pool without the socket-level body read and the staging "
                        "writer lock (bench/gunicorn_simple.conf.py), for comparison")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs) for a look")
    args = parser.parse_args()
    rate = args.rate_mib_s * MIB if args.mode == "paced" else 0

    work = workdir("ims-bench-load-")
    say(f"work folder {work}")
    began = time.monotonic()
    processes: dict[str, object] = {}
    pg_name = None
    figures: dict = {}
    try:
        pg_name = pg_create() if args.db == "postgres" else None
        sim_url, url, users = prepare(args, work, processes, pg_name)
        run, samplers, others = measure(args, url, users, processes, rate)
        figures = report(args, run, users, samplers, sim_url, work, others)
        say(f"done in {time.monotonic() - began:.0f} s")
    finally:
        for process in reversed(processes.values()):
            stop_process(process)
        try:
            flush_redis()
        finally:
            if pg_name:
                from django.db import connections

                connections.close_all()
                pg_drop(pg_name)
            if args.keep:
                say(f"kept {work}")
            else:
                cleanup(work)
    print_result(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
