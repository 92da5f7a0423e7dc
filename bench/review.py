"""The reviewers' pages with many uploads: p95 response time of each against 10,000 uploads.

A throwaway PostgreSQL database (created on 127.0.0.1:5432, user postgres, dropped at the end;
`--db sqlite` for a file) is migrated and filled by this script: `--users` people (50) in
`--projects` cloud projects (8), each with a cloud account, and `--uploads` uploads (10,000) in
every state, spread over 60 days, each with the timeline its state implies (4-7 lines: the moves
that led there, failures and refusals with their code, the push's end for what reached IMS), plus
one upload with a timeline of 200 lines for the review page. One reviewer (permission
uploads.review_upload) asks for the pages.

The portal's web pool runs as in production (tools/prodserver.py's gunicorn command,
gunicorn.conf.py: 2 processes x 32 threads, DEBUG off) and the script asks it over plain HTTP on
loopback, one request at a time on a keep-alive connection (http.client), signed in as the
reviewer, `--requests` times per page (after 3 unmeasured ones), and records each latency
(request sent to the whole body read: for the CSV, the whole file). Pages:

- review_queue      /review/ (uploads awaiting review, oldest first, page 1)
- all_plain         /review/all/
- all_filtered      /review/all/?state=failed&owner=<one user>&disk_format=qcow2
- all_reason        /review/all/?reason=server&created_from=<30 days ago>
- all_searched      /review/all/?q=<a name fragment>
- all_late_page     /review/all/?page=<the last page>
- csv_filtered      /review/all.csv?state=failed (about 800 rows)
- csv_all           /review/all.csv (every upload: 10,000 rows)
- dashboard         /review/dashboard/
- review_page       /review/<uid>/ (the upload with 200 timeline lines)
- dashboard_workers /review/dashboard/workers (no worker runs: it waits the whole ping timeout,
                    1 s; measured only 5 times, no goal)

    .venv/bin/python bench/review.py [--uploads 10000] [--users 50] [--projects 8] [--requests 40]
                                     [--db postgres|sqlite] [--keep]

The last line holds the figures: each page's p95 in ms (`<page>_p95_ms`; for the CSVs also to the
first byte, `csv_*_first_byte_p95_ms`, as the download starts), the CPU each request
cost the server (`<page>_cpu_ms`: the web pool's process tree plus PostgreSQL's backends for the
database, per request; it does not grow when others load the machine, the latency does),
`goal_met=N/M` (p95 < 300 ms), the database, the counts of rows, and others_cores (cores other
people's processes used while the pages were measured).
"""

from __future__ import annotations

import argparse
import http.client
import random
import secrets
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    OthersLoad,
    cleanup,
    flush_redis,
    migrate,
    portal_env,
    print_result,
    say,
    stop_process,
    use_portal_in_this_process,
    wait_for_quiet,
    workdir,
)
from bench.front import start_pool  # noqa: E402
from bench.ingest import signed_in_headers  # noqa: E402

PG_URL = "postgres://postgres@127.0.0.1:5432"
GOAL_MS = 300
GIB = 1024**3

# How the uploads are spread over the states (weights), roughly as a busy portal's table looks.
STATE_WEIGHTS = {
    "ready": 50, "failed": 8, "refused": 5, "rejected": 3, "cancelled": 8, "awaiting_review": 5, "received": 4,
    "receiving": 4, "checking": 2, "converting": 1, "pushing": 3, "processing": 3, "reconnect": 4,
}
FAIL_CODES = ["server", "network", "forbidden", "checksum_mismatch", "timed_out", "conflict"]
REFUSE_CODES = ["corrupt", "truncated", "backing_file", "unsafe", "format_mismatch"]
FORMATS = ["qcow2", "vmdk", "vhd", "raw", "vhdx"]
# The moves each end state took, in order (from the start): the timeline lines an upload gets.
PATHS = {
    "receiving": [],
    "received": ["received"],
    "checking": ["received", "checking"],
    "converting": ["received", "checking", "converting"],
    "pushing": ["received", "checking", "pushing"],
    "processing": ["received", "checking", "pushing", "processing"],
    "ready": ["received", "checking", "pushing", "processing", "ready"],
    "failed": ["received", "checking", "pushing", "failed"],
    "reconnect": ["received", "checking", "pushing", "reconnect"],
    "refused": ["received", "checking", "refused"],
    "awaiting_review": ["received", "checking", "awaiting_review"],
    "rejected": ["received", "checking", "awaiting_review", "rejected"],
    "cancelled": ["received", "cancelled"],
}


# ---------------------------------------------------------------------------------------------
# The database


def pg_create() -> str:
    import psycopg

    name = f"bench_review_{secrets.token_hex(4)}"
    with psycopg.connect(f"{PG_URL}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def pg_drop(name: str) -> None:
    import psycopg

    with psycopg.connect(f"{PG_URL}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def fill(args) -> dict:
    """Users, cloud accounts, uploads and their timelines; returns what the pages are asked with."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.hashers import make_password
    from django.contrib.auth.models import Permission
    from django.utils import timezone

    from uploads import crypto
    from uploads.models import CloudAccount, Upload, UploadEvent

    # The rows carry the times a real history gave them: the creation times are set here, not now.
    for model, name in ((Upload, "created_at"), (Upload, "status_changed_at"), (UploadEvent, "at")):
        model._meta.get_field(name).auto_now_add = False
    rng = random.Random(10)
    now = timezone.now()
    token = crypto.encrypt("bench-token")
    # No password: hashing 50 of them would take longer than the rest (the reviewer's session
    # needs none: bench/ingest.py signed_in_headers).
    User = get_user_model()
    User.objects.bulk_create([User(username=f"user{n:02}", password=make_password(None)) for n in range(args.users + 1)])
    users = list(User.objects.filter(username__startswith="user").order_by("username"))
    reviewer = users.pop()
    CloudAccount.objects.bulk_create([
        CloudAccount(user=user, domain_name="bench", user_name=user.username,
                     project_name=f"eu-de-project-{n % args.projects}", project_id=f"{n % args.projects:032x}",
                     token_encrypted=token, expires_at=now + timedelta(hours=12))
        for n, user in enumerate(users)
    ])
    reviewer.user_permissions.add(Permission.objects.get(codename="review_upload"))
    states, weights = zip(*STATE_WEIGHTS.items())
    uploads, plans = [], []
    for n in range(args.uploads):
        status = rng.choices(states, weights)[0]
        created = now - timedelta(seconds=rng.uniform(0, 60 * 86400))
        size = rng.randint(50 * 1024**2, 40 * GIB)
        steps = PATHS[status]
        step = timedelta(minutes=rng.uniform(1, 20))
        changed = min(now, created + step * len(steps))
        code = (rng.choice(FAIL_CODES) if status == "failed" else rng.choice(REFUSE_CODES) if status == "refused"
                else "rejected" if status == "rejected" else "token_expired" if status == "reconnect" else "")
        sent = {"ready": size, "processing": size, "pushing": size // 3, "failed": size // 2}.get(status, 0)
        fmt = rng.choice(FORMATS)
        uploads.append(Upload(
            owner=users[n % len(users)], name=f"image-{n:05}-{fmt}", filename=f"disk-{n:05}.{fmt}", disk_format=fmt,
            size=size, received_bytes=size if status != "receiving" else size // 2, status=status,
            staged_name=f"bench-{n:05}", created_at=created, status_changed_at=changed,
            sent_bytes=sent, send_size=size, send_rate=rng.uniform(20, 120) * 1024**2 if status == "pushing" else 0,
            heartbeat_at=now - timedelta(seconds=rng.uniform(0, 200)) if status == "pushing" else None,
            push_started_at=changed if status == "pushing" else None,
            error_code=code, error_message=f"Why it stopped ({code})." if code else "",
            ims_image_id=f"{n:08x}-0000-4000-8000-{n:012x}" if status in {"ready", "processing"} else "",
            detected_format=fmt if len(steps) >= 2 else "", inspection={"checks": {"backing file": "none"}},
        ))
        plans.append((steps, created, step, code))
    Upload.objects.bulk_create(uploads, batch_size=2000)
    events = []
    for upload, (steps, created, step, code) in zip(uploads, plans):
        previous = "receiving"
        for number, to in enumerate(steps, start=1):
            stops = to in {"failed", "refused", "rejected", "reconnect"}
            events.append(UploadEvent(
                upload=upload, at=min(now, created + step * number), from_status=previous, to_status=to,
                message=f"{previous} -> {to}", error_code=code if stops else "",
                detail="HTTP 500 Internal Server Error\n{}" if stops else "",
            ))
            previous = to
    long_story = uploads[0]
    for number in range(200):
        events.append(UploadEvent(upload=long_story, at=now - timedelta(minutes=200 - number),
                                  message=f"line {number}", detail="HTTP 200 OK\n{}"))
    UploadEvent.objects.bulk_create(events, batch_size=5000)
    fragment = uploads[len(uploads) // 2].name[:10]  # e.g. "image-0500": about 10 uploads
    return {"reviewer": reviewer, "owner": users[1], "review_uid": str(long_story.uid), "fragment": fragment,
            "from": (now - timedelta(days=30)).date().isoformat(), "events": len(events)}


def analyze() -> None:
    """Fresh planner statistics, as autovacuum would have them for a table this old."""
    from django.db import connection

    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE")


# ---------------------------------------------------------------------------------------------
# Asking for the pages


def measure(address: str, headers: dict, path: str, times: int) -> tuple[list[float], list[float]]:
    """Latencies (ms) of `times` GETs of `path`, one after the other on one keep-alive connection:
    to the whole body read, and to its first byte (what a streamed CSV shows first)."""
    host, port = address.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    latencies, first_bytes = [], []
    try:
        for number in range(times + 3):
            started = time.perf_counter()
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
            body = response.read(1)
            first = (time.perf_counter() - started) * 1000
            body += response.read()
            elapsed = (time.perf_counter() - started) * 1000
            if response.status != 200:
                raise RuntimeError(f"GET {path}: {response.status} {body[:300]!r}")
            if number >= 3:  # the first ones warm the process's caches
                latencies.append(elapsed)
                first_bytes.append(first)
    finally:
        connection.close()
    return latencies, first_bytes


class ServerCpu:
    """CPU used by the web pool's process tree and PostgreSQL's backends for the benchmark's
    database while it is open: what the pages cost the machine, whatever else runs on it.
    Sampled every 0.1 s in a thread, since a backend may end (and take its figures with it)
    before the end: each process counts from its first sample (from 0 if it began meanwhile)
    to its last."""

    def __init__(self, web_pid: int, pg_name: str | None):
        self.web_pid, self.pg_name = web_pid, pg_name
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _processes(self) -> list:
        try:
            found = [psutil.Process(self.web_pid), *psutil.Process(self.web_pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            found = []
        if self.pg_name:
            found += [p for p in psutil.process_iter(["cmdline"]) if f" {self.pg_name} " in " ".join(p.info["cmdline"] or [])]
        return found

    def sample(self, *, starting: bool = False) -> None:
        for process in self._processes():
            try:
                cpu = sum(process.cpu_times()[:2])
            except psutil.NoSuchProcess:
                continue
            self.first.setdefault(process.pid, cpu if starting else 0.0)
            self.last[process.pid] = cpu

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.sample()

    def __enter__(self) -> "ServerCpu":
        self.sample(starting=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
        self.seconds = sum(self.last[pid] - self.first[pid] for pid in self.last)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def pages(data: dict, args) -> dict[str, str]:
    from urllib.parse import urlencode

    last_page = -(-args.uploads // 50)
    return {
        "review_queue": "/review/",
        "all_plain": "/review/all/",
        "all_filtered": "/review/all/?" + urlencode({"state": "failed", "owner": data["owner"].pk,
                                                     "disk_format": "qcow2"}),
        "all_reason": "/review/all/?" + urlencode({"reason": "server", "created_from": data["from"]}),
        "all_searched": "/review/all/?" + urlencode({"q": data["fragment"]}),
        "all_late_page": f"/review/all/?page={last_page}",
        "csv_filtered": "/review/all.csv?state=failed",
        "csv_all": "/review/all.csv",
        "dashboard": "/review/dashboard/",
        "review_page": f"/review/{data['review_uid']}/",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--uploads", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--projects", type=int, default=8)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--db", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    args = parser.parse_args()

    work = workdir("ims-bench-review-")
    pg_name = pg_create() if args.db == "postgres" else None
    overrides = {"DATABASE_URL": f"{PG_URL}/{pg_name}"} if pg_name else {}
    env = portal_env(work, **overrides)
    web = None
    try:
        flush_redis()
        say(f"migrating the {args.db} database")
        migrate(env, work / "migrate.log")
        use_portal_in_this_process(env)
        started = time.monotonic()
        data = fill(args)
        analyze()
        say(f"{args.uploads} uploads and {data['events']} timeline lines in {time.monotonic() - started:.0f} s")
        web, address = start_pool("web", env, work / "web.log")
        headers = signed_in_headers(data["reviewer"])
        figures, cpu_figures, met = {}, {}, 0
        wait_for_quiet(longest=15)
        with OthersLoad() as others:
            for name, path in pages(data, args).items():
                with ServerCpu(web.pid, pg_name) as cpu:
                    latencies, first_bytes = measure(address, headers, path, args.requests)
                # Per request, the 3 warm-up requests included (they cost the same).
                cpu_ms = cpu.seconds * 1000 / (args.requests + 3)
                p50, p95 = percentile(latencies, 50), percentile(latencies, 95)
                met += p95 < GOAL_MS
                say(f"{name:14} {path[:60]:60} p50 {p50:6.0f} ms  p95 {p95:6.0f} ms  max {max(latencies):6.0f} ms"
                    f"  server CPU {cpu_ms:5.0f} ms")
                figures[f"{name}_p95_ms"] = round(p95)
                cpu_figures[f"{name}_cpu_ms"] = round(cpu_ms)
                if name.startswith("csv"):
                    figures[f"{name}_first_byte_p95_ms"] = round(percentile(first_bytes, 95))
            workers, _ = measure(address, headers, "/review/dashboard/workers", 5)
            say(f"dashboard_workers (no worker runs: the whole ping timeout) p95 {percentile(workers, 95):.0f} ms")
        figures["dashboard_workers_p95_ms"] = round(percentile(workers, 95))
        figures.update(cpu_figures)
        figures.update({
            "goal_met": f"{met}/{len(pages(data, args))}", "uploads": args.uploads, "events": data["events"],
            "users": args.users, "db": args.db, "others_cores": f"{others.cores:.2f}",
        })
        print_result(figures)
        return 0
    finally:
        if web is not None:
            stop_process(web)
        if pg_name:
            from django.db import connections

            connections.close_all()
            pg_drop(pg_name)
        flush_redis()
        if args.keep:
            say(f"kept {work}")
        else:
            cleanup(work)


if __name__ == "__main__":
    sys.exit(main())
