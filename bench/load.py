"""Many uploads at once: 20 uploads of 200 MiB from 5 users into one web process and two workers.

The portal runs as in production, on this machine's 2 cores: one web process (gunicorn with the
repository's gunicorn.conf.py but `--workers 1`: one process of 32 threads), two Celery workers
(`celery -A portal worker -Q uploads,celery -c 1 -n wN@%h`) and beat, against the IMS simulator
(`--processing-seconds 1`), on a throwaway database (SQLite by default; `--db postgres` creates and
drops a PostgreSQL database on 127.0.0.1:5432, user postgres) and Redis db 14.

Five users, each with a cloud account connected to the simulator through its IAM (as
tests/conftest.py `connect_cloud` does) and a signed-in session (cookie + CSRF header, as
bench/ingest.py makes them), each upload 4 files of 200 MiB at the same time with tuspy: one
process per user (a browser of its own: 20 tuspy threads in the script's process would take the GIL
from the pollers and inflate the latencies measured), one thread per upload, 50 MiB chunks as the
upload page sends them. The files are raw disk images (first 512
bytes zero, then random bytes), each different. Meanwhile one poller thread per user GETs
`/uploads/<uid>/status` of each of its unfinished uploads every 0.5 s (as the My uploads page
does, but faster: the page waits 2 s), on a keep-alive connection, and records each latency
(request sent to JSON read). The pollers use the standard library's http.client, as lean as a
browser's fetch: with requests (about 1 ms of Python per GET) p95 read 10-17 ms higher on this
saturated machine, time spent in the client and not in the portal. The peak RSS samplers run
in a process of their own, so that their reads of /proc do not hold the GIL that the pollers
wait for.

The run ends when all 20 are finished (READY, FAILED, ...) or at the deadline. Then each image in
the simulator (`GET /_sim/images`) must be active with the md5 of its source file, and there must be
exactly 20 images.

Figures: load_wall_s (first tus creation to the last upload's READY, from its timeline), ready=N/20,
checksums_ok, status latency p50/p95 (all polls over the run; also printed per phase: while tus
uploads run, and after), peak RSS of each process tree (web = gunicorn master + its worker;
worker = Celery main + its one pool process), others_cores (cores other people's processes used
during the run; the script waits for a quiet machine first but cannot stop others).

    .venv/bin/python bench/load.py [--users 5] [--files 4] [--size-mib 200] [--db sqlite|postgres]

The last line holds the figures, e.g.
    load_wall_s=61.2 ready=20/20 checksums_ok=20 status_p50_ms=12 status_p95_ms=340 rss_mb_web=... ...
"""

from __future__ import annotations

import argparse
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
from bench.ingest import signed_in_headers, start_web  # noqa: E402

POLL_SECONDS = 0.5
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


def browser(url: str, headers: dict, files: list, chunk: int, go, messages) -> None:
    """One user's browser, in a process of its own (spawned, so no Django in it): once `go` is
    set, one tuspy upload per file in a thread of its own. Reports ("uid", name, uid) after the
    creation POST and ("done", name, time.time(), error or "") at the end, through `messages`."""
    from tusclient.client import TusClient

    def upload(path: str, name: str) -> None:
        error = ""
        try:
            uploader = TusClient(f"{url}/tus/", headers=headers).uploader(
                file_path=path, chunk_size=chunk, retries=0,
                metadata={"filename": f"{name}.raw", "image_name": name, "disk_format": "raw"},
            )
            uploader.set_url(uploader.create_url())
            messages.put(("uid", name, uploader.url.rstrip("/").rsplit("/", 1)[-1]))
            uploader.upload()
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

    def __init__(self, url: str, users: list[User], chunk: int, deadline_seconds: float, status_url: str):
        self.url, self.users, self.chunk, self.deadline_seconds = url, users, chunk, deadline_seconds
        self.status_url = status_url
        self.started = self.wall_start = self.deadline = 0.0
        self.tus_running = sum(len(user.files) for user in users)
        self.tus_done_at: list[float] = []
        self.lock = threading.Lock()
        context = multiprocessing.get_context("spawn")
        self.go_event = context.Event()
        self.queues = [context.Queue() for _ in users]
        self.browsers = [
            context.Process(target=browser, args=(url, user.headers, [(str(p), n) for p, _, n in user.files],
                                                  chunk, self.go_event, queue), daemon=True)
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
        address = urllib.parse.urlsplit(self.status_url)
        connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=5)
    parser.add_argument("--files", type=int, default=4, help="uploads per user (default 4)")
    parser.add_argument("--size-mib", type=int, default=200)
    parser.add_argument("--chunk-mib", type=int, default=CHUNK_MIB)
    parser.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--deadline", type=float, default=600, help="seconds for all uploads to finish")
    parser.add_argument("--status-web", choices=("same", "separate"), default="same",
                        help="diagnosis: 'separate' serves the status GETs from a second web process "
                        "(same command and database), so that they never share one with the tus PATCHes")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs) for a look")
    args = parser.parse_args()
    size, total = args.size_mib * MIB, args.users * args.files

    work = workdir("ims-bench-load-")
    say(f"work folder {work}")
    began = time.monotonic()
    processes: dict[str, object] = {}
    pg_name = None
    figures: dict = {}
    try:
        sim, sim_url = start_simulator(work / "imssim-data", work / "imssim.log", processing_seconds=1)
        processes["sim"] = sim
        overrides = {"IMS_ENDPOINT": sim_url, "IAM_ENDPOINT": f"{sim_url}/v3"}
        if args.db == "postgres":
            pg_name = pg_create()
            overrides["DATABASE_URL"] = f"{PG_URL}/{pg_name}"
        env = portal_env(work, **overrides)
        migrate(env, work / "migrate.log")
        use_portal_in_this_process(env)
        flush_redis()

        from django.conf import settings
        from imssim.server import DEMO_DOMAIN, DEMO_PASSWORD, DEMO_PROJECT_NAME, DEMO_USER

        from uploads import services
        from uploads.models import Status, Upload, UploadEvent

        settings.IMS_ENDPOINT, settings.IAM_ENDPOINT = sim_url, f"{sim_url}/v3"
        users = []
        t0 = time.monotonic()
        for i in range(args.users):
            user = create_user(f"load{i}")
            services.cloud_account_connect(user=user, domain=DEMO_DOMAIN, user_name=DEMO_USER,
                                           password=DEMO_PASSWORD, project=DEMO_PROJECT_NAME)
            files = []
            for j in range(args.files):
                name = f"load-u{i}-f{j}"
                path = work / f"{name}.raw"
                files.append((path, make_disk_image(path, size), name))
            users.append(User(i, signed_in_headers(user), files))
        say(f"{args.users} users connected to the simulator; {total} files of {args.size_mib} MiB made "
            f"in {time.monotonic() - t0:.1f} s ({args.db} database)")

        web, url, how = start_web(env, work / "web.log", ("--workers", "1"))
        processes["web"] = web
        status_url, status_log = url, work / "web.log"
        if args.status_web == "separate":
            status_log = work / "web-status.log"
            processes["web_status"], status_url, _ = start_web(env, status_log, ("--workers", "1"))
        for n in (1, 2):
            log = work / f"worker{n}.log"
            processes[f"worker{n}"] = start_process(worker_argv(n), log=log, env=env)
        processes["beat"] = start_process(
            [PYTHON, "-m", "celery", "-A", "portal", "beat", "-l", "info", "--schedule", work / "celerybeat-schedule"],
            log=work / "beat.log", env=env)
        for n in (1, 2):
            log = work / f"worker{n}.log"
            wait_for(lambda: b"ready." in log.read_bytes(), timeout=90, what=f"Celery worker {n}",
                     process=processes[f"worker{n}"], log=log)
        wait_for(lambda: b"beat: Starting" in (work / "beat.log").read_bytes(), timeout=60, what="Celery beat",
                 process=processes["beat"], log=work / "beat.log")
        say(f"web ({how}) at {url}, 2 workers (-c 1) and beat ready; simulator at {sim_url}")

        for user in users:
            for path, _, _ in user.files:
                warm_cache(path)
        run = Run(url, users, args.chunk_mib * MIB, args.deadline, status_url)  # starts the users' browser processes
        settle_disk()
        others_before = wait_for_quiet(longest=15)
        say(f"others used {others_before:.2f} cores before the run; starting {total} uploads")
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
        run_seconds = time.perf_counter() - run.started
        say(f"run over after {run_seconds:.1f} s; last tus upload done at "
            f"{max(run.tus_done_at or [0]):.1f} s; others used {others.cores:.2f} cores meanwhile")
        say("CPU seconds during the run: " + ", ".join(f"{name} {s.cpu_seconds:.1f}" for name, s in samplers.items()))

        # Results: the rows, the timelines and the simulator's images.
        rows = list(Upload.objects.filter(owner__username__startswith="load").values_list("name", "status", "uid"))
        ready = [name for name, status, _ in rows if status == Status.READY]
        for name, status, _ in rows:
            if status != Status.READY:
                say(f"NOT READY: {name} {status}")
        last_ready = max((e.at.timestamp() for e in UploadEvent.objects.filter(to_status=Status.READY)), default=None)
        wall = (last_ready - run.wall_start) if last_ready else float("nan")
        with urllib.request.urlopen(f"{sim_url}/_sim/images", timeout=30) as reply:
            images = json.load(reply)["images"]
        sources = {name: md5 for user in users for _, md5, name in user.files}
        checksums_ok = sum(1 for image in images
                           if image["status"] == "active" and sources.get(image["name"]) == image["checksum"]
                           and image["size"] == size)
        names = [image["name"] for image in images]
        say(f"simulator holds {len(images)} images ({len(set(names))} names); {checksums_ok} active with the "
            f"source's md5 and size")
        errors = [e for user in users for e in user.errors]
        for error in errors[:10]:
            say(f"ERROR {error}")

        polls = [p for user in users for p in user.polls]
        bad = [p for p in polls if p.code != 200]
        say(f"status polls, all: {latency_line(polls)}; not 200: {len(bad)}")
        say(f"  while tus uploads ran: {latency_line([p for p in polls if p.uploading])}")
        say(f"  after the last tus upload: {latency_line([p for p in polls if not p.uploading])}")
        for lo, hi in ((0, 5), (5, 10), (10, 20), (20, 40), (40, 80), (80, 1e9)):
            part = [p for p in polls if lo <= p.at < hi]
            if part:
                say(f"  polls sent {lo}-{hi if hi < 1e9 else 'end'} s: {latency_line(part)}")
        inside = server_times(status_log)
        if inside:
            say(f"gunicorn's own time for those GETs (access log, no queueing): {len(inside)} requests, "
                f"p50 {percentile(inside, 50):.0f} ms, p95 {percentile(inside, 95):.0f} ms, max {max(inside):.0f} ms")
        for name, sampler in samplers.items():
            say(f"peak RSS {name}: {mb(sampler.peak_tree)} MB tree ("
                + ", ".join(f"{mb(v)}" for v in sampler.peaks.values()) + " MB per process)")

        ms = [p.ms for p in polls]
        figures = {
            "load_wall_s": f"{wall:.1f}",
            "ready": f"{len(ready)}/{total}",
            "checksums_ok": checksums_ok if len(images) == total else f"{checksums_ok}({len(images)}_images)",
            "status_p50_ms": f"{percentile(ms, 50):.0f}",
            "status_p95_ms": f"{percentile(ms, 95):.0f}",
            **{f"rss_mb_{name}": mb(sampler.peak_tree) for name, sampler in samplers.items()},
            "db": args.db,
            "others_cores": f"{others.cores:.2f}",
        }
        figures = {k: figures[k] for k in ("load_wall_s", "ready", "checksums_ok", "status_p50_ms", "status_p95_ms",
                                           "rss_mb_web", "rss_mb_worker1", "rss_mb_worker2", "rss_mb_beat",
                                           "rss_mb_sim", "db", "others_cores") if k in figures}
        if args.status_web == "separate":
            figures.update(status_web="separate", rss_mb_web_status=mb(samplers["web_status"].peak_tree))
        say(f"done in {time.monotonic() - began:.0f} s")
    finally:
        for name in ("web", "web_status", "worker1", "worker2", "beat", "sim"):
            if name in processes:
                stop_process(processes[name])
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
