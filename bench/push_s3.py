"""The worker's push from object staging (Swift) against its push from local staging: the same
file, to the same IMS simulator, in the same run; and the worker's memory in both.

A single-node Swift with s3api (tests/s3_fixture.py) is the store. For each backend a Celery
worker runs as `make run` runs it, with that backend configured; the file (1 GiB of random bytes
behind an empty boot sector, so it checks as raw) is staged before the clock starts (a hard link
into the staging folder; an object put with boto3), the upload is marked received and its push
queued, and the clock stops when the upload is Ready. Both pushes include the check, the stream
check and MD5 + SHA-512; from object staging the check reads the head and tail by ranged GETs
(qemu-img, when the format needs it, reads the object over NBD: uploads/nbd.py) and the push one
streaming GET. ratio = best local time / best object time. Each run also prints the CPU seconds
per GiB of the worker, the simulator and the store (Swift's proxy and object server share the two
cores with everything else: its CPU is this machine's, not the portal's), and the cores other
people's processes used meanwhile.

    .venv/bin/python bench/push_s3.py [--size-gib 1] [--runs 3] [--keep]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    GIB,
    MIB,
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
    start_simulator,
    stop_process,
    tree_cpu_seconds,
    use_portal_in_this_process,
    wait_for_quiet,
    warm_cache,
    workdir,
)
from bench.ingest_s3 import PART, start_swift  # noqa: E402
from bench.push import STOPPED, start_worker  # noqa: E402


def make_raw_disk(path: Path, size: int) -> Path:
    with open(path, "wb") as out:
        out.write(bytes(512))
        left = size - 512
        while left:
            step = min(16 * MIB, left)
            out.write(os.urandom(step))
            left -= step
    return path


def stage(backend: str, owner, source: Path, size: int, store):
    """An upload whose staged copy is `source`, marked received (not yet queued)."""
    from django.test import override_settings

    from uploads import services, staging
    from uploads.models import Upload

    with override_settings(**BACKENDS[backend]):
        upload = services.upload_create(owner=owner, size=size, filename="bench.raw", name="bench-push",
                                        disk_format="raw", min_disk=1)
        staging.delete(upload.staged_name)  # the empty file, or the multipart upload just started
        if backend == "local":
            os.link(source, staging.path(upload.staged_name))
        else:
            bucket, key = staging.object_location(upload.staged_name)
            store.client().upload_file(str(source), bucket, key)
    Upload.objects.filter(pk=upload.pk).update(status="received", received_bytes=size)
    return upload


def cpu_of(pids: list[int]) -> float:
    return sum(tree_cpu_seconds(pid) for pid in pids)


def push(upload, worker_pid: int, size: int, peers: dict[str, list[int]]) -> tuple[float, PeakRss, dict, float]:
    """Queue the push and wait for Ready: seconds, the worker's memory and CPU, the CPU seconds
    of each peer (the simulator, the store), the cores others' processes used meanwhile."""
    from uploads import services
    from uploads.models import Upload

    before = {name: cpu_of(pids) for name, pids in peers.items()}
    with OthersLoad() as others, PeakRss(worker_pid) as rss:
        started = time.perf_counter()
        services.dispatch.enqueue_push(upload.pk)
        deadline = time.monotonic() + size / (10 * MIB) + 120
        while (status := Upload.objects.filter(pk=upload.pk).values_list("status", flat=True).get()) not in STOPPED:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the push did not finish in time ({status})")
            time.sleep(0.02)
        seconds = time.perf_counter() - started
    used = {name: cpu_of(pids) - before[name] for name, pids in peers.items()}
    upload.refresh_from_db()
    if upload.status != "ready":
        raise RuntimeError(f"the push ended {upload.status}: {upload.error_message}")
    return seconds, rss, used, others.cores


def clean_up(upload, backend: str, client) -> None:
    from django.test import override_settings

    from uploads import staging

    with override_settings(**BACKENDS[backend]):
        staging.delete(upload.staged_name)
    if upload.ims_image_id:
        client.delete_image(upload.ims_image_id)


BACKENDS: dict[str, dict] = {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    size = int(args.size_gib * GIB)
    work = workdir("ims-bench-push-s3-")
    say(f"work folder {work}")
    times: dict[str, list[float]] = {"local": [], "s3": []}
    peaks: dict[str, list[int]] = {"local": [], "s3": []}
    cpu: dict[str, list[float]] = {"local": [], "s3": [], "store": []}
    others_max = 0.0
    processes = []
    store = None
    try:
        store = start_swift(work)
        sim, sim_url = start_simulator(work / "sim", work / "sim.log")
        processes.append(sim)
        s3_env = {**store.env(prefix="bench-staging/"), "STAGING_S3_PART_SIZE": str(PART),
                  "STAGING_SCRATCH_DIR": str(work / "scratch"), "STAGING_FREE_RESERVE_BYTES": "0"}
        env = portal_env(work, IMS_ENDPOINT=sim_url, IAM_ENDPOINT=f"{sim_url}/v3", UPLOAD_POLL_SECONDS="0.2",
                         STAGING_FREE_RESERVE_BYTES="0")
        os.environ.update({"IMS_ENDPOINT": sim_url, "IAM_ENDPOINT": f"{sim_url}/v3", "STAGING_FREE_RESERVE_BYTES": "0"})
        migrate(env, work / "migrate.log")
        use_portal_in_this_process(env)
        from django.conf import settings

        from tests.conftest import connect_cloud
        from uploads import services
        from uploads.ims import ImsClient

        BACKENDS["local"] = {"STORAGES": settings.STORAGES}
        BACKENDS["s3"] = {"STORAGES": {**settings.STORAGES, "staging": {
            "BACKEND": "storages.backends.s3.S3Storage", "OPTIONS": store.storage_options("bench-staging/")}}}
        flush_redis()
        owner = create_user("bench")
        connect_cloud(owner)
        client = ImsClient(sim_url, services.cloud.owner_token(owner.pk).value)
        source = make_raw_disk(work / "data.raw", size)
        warm_cache(source)
        for round_number in range(args.runs + 1):  # the first round is untimed: it warms both
            for backend in (("local", "s3") if round_number % 2 == 0 else ("s3", "local")):
                worker = start_worker({**env, **(s3_env if backend == "s3" else {})}, work / f"worker-{backend}.log")
                peers = {"simulator": [sim.pid], "store": [p.pid for p in store.processes.values()]}
                try:
                    upload = stage(backend, owner, source, size, store)
                    wait_for_quiet(longest=10)
                    seconds, rss, used, others = push(upload, worker.pid, size, peers)
                    clean_up(upload, backend, client)
                finally:
                    stop_process(worker)
                gib = size / GIB
                if round_number:
                    times[backend].append(seconds)
                    peaks[backend].append(rss.peak_busiest)
                    cpu[backend].append(rss.cpu_seconds / gib)
                    if backend == "s3":
                        cpu["store"].append(used["store"] / gib)
                    others_max = max(others_max, others)
                say(f"{backend}: {seconds:.2f} s, {size / MIB / seconds:.0f} MiB/s; worker peak RSS "
                    f"{mb(rss.peak_tree)} MB tree, {mb(rss.peak_busiest)} MB pushing process; CPU s/GiB: worker "
                    f"{rss.cpu_seconds / gib:.1f}, simulator {used['simulator'] / gib:.1f}, store "
                    f"{used['store'] / gib:.1f}; others {others:.1f} cores" + ("" if round_number else " (untimed)"))
    finally:
        for process in processes:
            stop_process(process)
        if store is not None:
            store.stop()
        try:
            flush_redis()
        finally:
            if args.keep:
                say(f"kept {work}")
            else:
                cleanup(work)
    figures = {}
    if times["local"] and times["s3"]:
        best = {backend: min(found) for backend, found in times.items()}
        figures.update(push_s3_vs_local=f"{best['local'] / best['s3']:.2f}",
                       local_mib_s=round(size / MIB / best["local"]), s3_mib_s=round(size / MIB / best["s3"]))
    for backend, found in peaks.items():
        if found:
            figures[f"worker_rss_mb_{backend}"] = mb(max(found))
    for side, found in cpu.items():
        if found:
            figures[f"{'store' if side == 'store' else 'worker_' + side}_cpu_s_per_gib"] = f"{min(found):.1f}"
    figures["others_cores_max"] = f"{others_max:.1f}"
    print_result(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
