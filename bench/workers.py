"""How pushes scale with worker processes: 8 concurrent pushes to the IMS simulator with 1, 2 and 4.

For each count N (`--workers 1,2,4`), N Celery workers run as production runs one, each with a
single pool process (`celery -A portal worker -Q uploads,celery -c 1 -n wK@%h`, as bench/load.py;
`docker compose up --scale worker=N` with `--concurrency 1`), against the IMS simulator on the same
machine, a throwaway SQLite database and Redis db 14. Eight uploads, one per user (so that no
per-user cap applies), are handed to the workers at once, as the tus server hands over a finished
upload (`services.upload_receive` of the last, empty chunk: RECEIVED, push_upload enqueued); each
staged file is a hard link to the same test file (all bytes there, read from the page cache).
The clock runs from the first hand-over to the last READY. Each push does all it does in
production: the file check, the image record, the PUT with md5 + sha512 and the stream's format
check, progress writes, the final look at the image. The images are deleted after each count.

Figures: for each N, `pushes_mib_s_wN` (8 x size / wall time) and `speedup_wN` (against N=1 when
measured), the CPU seconds per GiB of the workers and of the simulator, and `others_cores_max`.
On 2 cores, the worker and the simulator both hash every byte (md5 + sha512): expect the aggregate
to stop growing once the two cores are full.

    .venv/bin/python bench/workers.py [--workers 1,2,4] [--pushes 8] [--size-mib 1024]

The last line holds the figures, e.g.
    pushes_mib_s_w1=... pushes_mib_s_w2=... speedup_w2=... pushes_mib_s_w4=... speedup_w4=... others_cores_max=...
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    GIB,
    MIB,
    PYTHON,
    OthersLoad,
    cleanup,
    create_user,
    flush_redis,
    make_random_file,
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

FINISHED = {"ready", "failed", "reconnect", "cancelled"}
SLOWEST_RATE = 2 * MIB  # bytes/s per push below which a run counts as hung


def worker_argv(n: int) -> list:
    return [PYTHON, "-m", "celery", "-A", "portal", "worker", "-Q", "uploads,celery", "-c", "1",
            "-l", "info", "-n", f"w{n}@%h"]


def tree_cpu_seconds(pid: int) -> float:
    """CPU used so far by a process tree, with the children it has reaped (the file check's
    qemu-img runs, a pool process replaced)."""
    try:
        processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for process in processes:
        try:
            total += sum(process.cpu_times()[:4])
        except psutil.NoSuchProcess:
            continue
    return total


def start_workers(count: int, env: dict, work: Path) -> list:
    workers = []
    for n in range(1, count + 1):
        log = work / f"worker{count}-{n}.log"
        workers.append((start_process(worker_argv(n), log=log, env=env), log))
    for process, log in workers:
        wait_for(lambda: b"ready." in log.read_bytes(), timeout=120, what="a Celery worker", process=process, log=log)
    return [process for process, _ in workers]


def owners(count: int, sim_url: str) -> list:
    """One user per push, each with a cloud account connected to the simulator."""
    from imssim.server import DEMO_DOMAIN, DEMO_PASSWORD, DEMO_PROJECT_NAME, DEMO_USER

    from uploads import services

    users = []
    for i in range(count):
        user = create_user(f"pusher{i}")
        services.cloud_account_connect(user=user, domain=DEMO_DOMAIN, user_name=DEMO_USER,
                                       password=DEMO_PASSWORD, project=DEMO_PROJECT_NAME)
        users.append(user)
    return users


def received_upload(owner, source: Path, index: int):
    """An upload row as the tus server leaves it before its last chunk, its staged file a hard
    link to `source` (every byte there, no copy)."""
    from uploads import services, staging
    from uploads.models import Upload

    size = source.stat().st_size
    upload = services.upload_create(owner=owner, size=size, filename=f"push-{index}.raw",
                                    name=f"bench-workers-{index}", disk_format="raw")
    staged = Path(staging.path(upload.staged_name))
    staged.unlink()
    os.link(source, staged)
    Upload.objects.filter(pk=upload.pk).update(received_bytes=size)
    upload.refresh_from_db()
    return upload


def push_all(users: list, source: Path, deadline_seconds: float) -> tuple[float, list]:
    """Hand all uploads over at once; (seconds from the first hand-over to the last finish, rows)."""
    from uploads import services
    from uploads.models import Upload

    size = source.stat().st_size
    uploads = [received_upload(owner, source, i) for i, owner in enumerate(users)]
    started = time.perf_counter()
    for upload in uploads:
        services.upload_receive(upload=upload, offset=size, stream=io.BytesIO(), length=0)
    ids = [upload.pk for upload in uploads]
    deadline = time.monotonic() + deadline_seconds
    while True:
        statuses = list(Upload.objects.filter(pk__in=ids).values_list("status", flat=True))
        if all(status in FINISHED for status in statuses):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"the pushes did not finish in {deadline_seconds:.0f} s: {statuses}")
        time.sleep(0.05)
    seconds = time.perf_counter() - started
    return seconds, list(Upload.objects.filter(pk__in=ids))


def clean_up_pushes(rows: list, sim_url: str) -> None:
    """Delete the images in the simulator and the staged files and rows."""
    from uploads import crypto, staging
    from uploads.ims import ImsClient
    from uploads.models import CloudAccount

    for row in rows:
        if row.ims_image_id:
            account = CloudAccount.objects.get(user=row.owner)
            ImsClient(sim_url, crypto.decrypt(account.token_encrypted)).delete_image(row.ims_image_id)
        staging.delete(row.staged_name)
        row.delete()


def run_count(count: int, env: dict, work: Path, users: list, source: Path, sim, sim_url: str) -> dict:
    workers = start_workers(count, env, work)
    try:
        settle_disk()
        wait_for_quiet(longest=15)
        cpu_before = {"workers": sum(tree_cpu_seconds(w.pid) for w in workers), "sim": tree_cpu_seconds(sim.pid)}
        size = source.stat().st_size
        with OthersLoad() as others:
            seconds, rows = push_all(users, source, len(users) * size / SLOWEST_RATE + 120)
        cpu = {"workers": sum(tree_cpu_seconds(w.pid) for w in workers) - cpu_before["workers"],
               "sim": tree_cpu_seconds(sim.pid) - cpu_before["sim"]}
    finally:
        for worker in workers:
            stop_process(worker)
    try:
        bad = [f"{row.name} {row.status}: {row.error_message}" for row in rows if row.status != "ready"]
        if bad:
            raise RuntimeError("pushes did not end READY: " + "; ".join(bad))
    finally:
        clean_up_pushes(rows, sim_url)
    gib = len(users) * size / GIB
    result = {"mib_s": len(users) * size / MIB / seconds, "seconds": seconds, "others": others.cores,
              "workers_cpu": cpu["workers"] / gib, "sim_cpu": cpu["sim"] / gib}
    say(f"{count} worker(s): {len(users)} pushes of {size // MIB} MiB in {seconds:.1f} s, {result['mib_s']:.0f} MiB/s; "
        f"CPU per GiB {result['workers_cpu']:.2f} s workers, {result['sim_cpu']:.2f} s simulator; "
        f"others used {others.cores:.2f} cores")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", default="1,2,4", help="worker process counts (default 1,2,4)")
    parser.add_argument("--pushes", type=int, default=8, help="concurrent pushes (default 8)")
    parser.add_argument("--size-mib", type=int, default=1024, help="size of each pushed file (default 1024)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs) for a look")
    args = parser.parse_args()
    counts = [int(c) for c in args.workers.split(",") if c.strip()]

    work = workdir("ims-bench-workers-")
    say(f"work folder {work}")
    began = time.monotonic()
    results, sim = {}, None
    try:
        sim, sim_url = start_simulator(work / "imssim-data", work / "imssim.log")
        env = portal_env(work, IMS_ENDPOINT=sim_url, IAM_ENDPOINT=f"{sim_url}/v3",
                         PUSH_CONCURRENCY_PER_USER=str(args.pushes))
        migrate(env, work / "migrate.log")
        use_portal_in_this_process(env)
        flush_redis()
        from django.conf import settings

        settings.IMS_ENDPOINT, settings.IAM_ENDPOINT = sim_url, f"{sim_url}/v3"
        users = owners(args.pushes, sim_url)
        source = make_random_file(work / "data.raw", args.size_mib * MIB)
        warm_cache(source)
        for count in counts:
            results[count] = run_count(count, env, work, users, source, sim, sim_url)
        say(f"done in {time.monotonic() - began:.0f} s")
    finally:
        if sim is not None:
            stop_process(sim)
        try:
            flush_redis()
        finally:
            if args.keep:
                say(f"kept {work}")
            else:
                cleanup(work)
    figures = {}
    for count, result in results.items():
        figures[f"pushes_mib_s_w{count}"] = f"{result['mib_s']:.0f}"
        if 1 in results and count != 1:
            figures[f"speedup_w{count}"] = f"{result['mib_s'] / results[1]['mib_s']:.2f}"
        figures[f"workers_cpu_s_per_gib_w{count}"] = f"{result['workers_cpu']:.2f}"
        figures[f"sim_cpu_s_per_gib_w{count}"] = f"{result['sim_cpu']:.2f}"
    if results:
        figures["others_cores_max"] = f"{max(r['others'] for r in results.values()):.2f}"
    print_result(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
