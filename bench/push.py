"""The worker's push against `curl -T`: throughput ratio and the worker's peak memory.

For each target (the IMS simulator; real Glance + Keystone from tools/openstack_peers, skipped
with a note when they cannot start) and each file size (1 GiB and 4 GiB of random bytes, raw),
this sends the same file to a fresh image in two ways, alternating which goes first:

- curl: `curl -sS -T FILE -X PUT -H 'Content-Type: application/octet-stream' -H 'Expect:'
  -H 'X-Auth-Token: ...' URL/v2/images/ID/file`; the time is curl's own time_total.
- the portal: a real Celery worker (the production command, on a throwaway SQLite database and
  Redis db 14) gets the upload as the tus server hands it over (`services.upload_receive`
  receiving the last byte enqueues `push_upload`); the time runs from that call until the row
  is READY, so it includes the task hand-over, checking the file, creating the image, the PUT
  (with its hashing and stream checks), progress writes and the final look at the image.

ratio = best curl time / best push time (the best of 3 runs for 1 GiB, 2 for 4 GiB). The push's
PUT alone (from the timeline: "Image record created" to "Sent ... bytes") is printed as
*_put_vs_curl_* for diagnosis. Before each run the script waits (at most 10 s) for the rest of
the machine to go quiet and prints how many cores other processes used during the run. Peak RSS
is sampled at 20 Hz over the worker's process tree while it pushes (rss_mb_*), and of the pool
process that ran the push (rss_mb_pusher_*). Every image is deleted after its run; the work
folder is removed at the end.

Before the pushes, the worker's file check alone (`uploads.diskimage.inspect_file`, as the CHECKING
step calls it) is timed on a 4 GiB raw file (the test file) and on a 4 GiB qcow2 made from it
with `qemu-img convert -f raw -O qcow2` (4 GiB virtual, 4 GiB of data), best of 3 each:
inspect_s_4g_raw, inspect_s_4g_qcow2 (goal: under 1 s each; it must not read the whole file).

    .venv/bin/python bench/push.py [--sizes 1,4] [--targets sim,glance] [--quick] [--no-inspect]

The last line holds the figures, e.g.
    sim_push_vs_curl_1g=0.91 sim_push_vs_curl_4g=0.62 glance_push_vs_curl_1g=0.95 ... rss_mb_1g=232 ...
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    GIB,
    MIB,
    PYTHON,
    OthersLoad,
    PeakRss,
    cleanup,
    create_user,
    flush_redis,
    make_random_file,
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
    listening_pid,
    tree_cpu_seconds,
    wait_for_quiet,
    warm_cache,
    workdir,
)

# The worker as docker-compose.yml runs it (its -n only names it in the log).
WORKER_ARGV = [PYTHON, "-m", "celery", "-A", "portal", "worker", "-Q", "uploads,celery", "-l", "info",
               "-n", "bench-push@%h"]
SLOWEST_RATE = 20 * MIB  # bytes/s below which a run counts as hung
# A run during which other processes kept more cores busy than this is repeated (1 GiB runs, while
# the time budget allows) and counts only when no quiet run of its kind exists.
QUIET_CORES = 0.3
EXTRA_PAIRS = 2  # at most this many extra curl+push pairs for a size up to 1 GiB, for noisy runs
EXTRAS_UNTIL = 420  # seconds into the benchmark after which no extra pair starts (total < 10 min)
# Where a push ends (any other status means a worker is still busy with it).
STOPPED = {"ready", "failed", "reconnect", "cancelled"}


def label(size: int) -> str:
    """1g, 4g; 256m for a size that is not whole GiB."""
    return f"{size // GIB}g" if size % GIB == 0 else f"{size // MIB}m"


@dataclass
class Target:
    name: str
    ims_url: str
    iam_url: str
    credentials: dict  # domain, user_name, password, project for services.cloud_account_connect
    stop: object  # callable


@dataclass
class Run:
    way: str  # "curl" or "push"
    seconds: float  # curl: its time_total; push: enqueue -> READY
    others: float  # cores other processes used meanwhile
    put: float | None = None  # push only: its PUT alone, from the timeline
    worker_cpu: float = 0.0  # push only: CPU seconds of the worker tree
    rss_tree: int = 0  # push only: peak bytes, whole worker tree
    rss_pusher: int = 0  # push only: peak bytes, the pool process that pushed
    pss_tree: int = 0  # push only: peak PSS summed over the worker tree (shared pages once)

    @property
    def quiet(self) -> bool:
        return self.others <= QUIET_CORES


def best(runs: list[Run], way: str) -> Run:
    """The fastest run of `way`, among the quiet ones when there are any: noise only adds time."""
    mine = [run for run in runs if run.way == way]
    return min([run for run in mine if run.quiet] or mine, key=lambda run: run.seconds)


# ---------------------------------------------------------------------------------------------
# Targets


def simulator_target(work: Path) -> Target:
    from imssim.server import DEMO_DOMAIN, DEMO_PASSWORD, DEMO_PROJECT_NAME, DEMO_USER

    process, url = start_simulator(work / "imssim-data", work / "imssim.log")
    return Target(
        "sim", url, f"{url}/v3",
        {"domain": DEMO_DOMAIN, "user_name": DEMO_USER, "password": DEMO_PASSWORD, "project": DEMO_PROJECT_NAME},
        lambda: stop_process(process),
    )


def glance_target(work: Path) -> Target | None:
    from tools.openstack_peers import PeersUnavailable, install, start

    try:
        install()
        peers = start(work / "openstack-peers")
    except PeersUnavailable as exc:
        say(f"NOTE: real Glance skipped: the OpenStack peers could not start: {exc.reason}")
        return None
    return Target(
        "glance", peers.glance_url, peers.keystone_url,
        {"domain": "Default", "user_name": "demo", "password": "demopw", "project": "demo"},
        peers.stop,
    )


# ---------------------------------------------------------------------------------------------
# One run each way


def curl_put(target: Target, client, header_file: Path, source: Path, size: int) -> float:
    image = client.create_image(name=f"bench-curl-{label(size)}", disk_format="raw")
    try:
        done = subprocess.run(
            ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{time_total}", "-T", str(source),
             "-X", "PUT", "-H", "Content-Type: application/octet-stream", "-H", "Expect:",
             "-H", f"@{header_file}", f"{target.ims_url}/v2/images/{image.id}/file"],
            capture_output=True, text=True, timeout=size / SLOWEST_RATE + 60,
        )
        code, seconds = (done.stdout.split() + ["", ""])[:2]
        if code != "204":
            raise RuntimeError(f"curl PUT answered {code!r}: {done.stderr.strip()}")
        stored = client.get_image(image.id)
        if stored.size != size:
            raise RuntimeError(f"curl PUT left image {image.id} with size {stored.size}, status {stored.status}")
        return float(seconds)
    finally:
        client.delete_image(image.id)


# How the staged file gets there (--staged): "received" through the tus receiving service, as a
# browser's upload does (MD5 and SHA-512 computed on the way in, the file sealed), or "linked", a
# hard link to the test file with no sums (the push hashes while sending: PATCHes that landed on
# several web processes, object staging, or the code before the sums on arrival).
STAGED = "received"
LAST_CHUNK = 1024 * 1024  # the tus chunk whose arrival starts the clock


def portal_push(worker_pid: int, owner, client, source: Path, size: int) -> tuple[float, float | None, PeakRss]:
    """Hand the file to the worker as the tus server does, wait for READY; (push s, PUT s, rss)."""
    from uploads import services, staging
    from uploads.models import Status, Upload

    upload = services.upload_create(
        owner=owner, size=size, filename=f"bench-{label(size)}.raw", name=f"bench-push-{label(size)}",
        disk_format="raw",
    )
    last = _stage(upload, source, size)
    deadline = time.monotonic() + size / SLOWEST_RATE + 120
    try:
        with PeakRss(worker_pid) as rss, open(source, "rb") as tail:
            tail.seek(size - last)
            started = time.perf_counter()
            # The last tus chunk: moves the row to RECEIVED and enqueues push_upload.
            services.upload_receive(upload=upload, offset=size - last, stream=tail, length=last)
            while True:
                status = Upload.objects.filter(pk=upload.pk).values_list("status", flat=True).get()
                if status in STOPPED:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the push of {size} bytes did not finish in time (status {status})")
                time.sleep(0.02)
            seconds = time.perf_counter() - started
        upload.refresh_from_db()
        if upload.status != Status.READY:
            raise RuntimeError(
                f"the push ended {upload.status}: {upload.error_message} "
                f"{[e.message for e in upload.events.all()]}")
        sealed = any("sealed since" in e.message for e in upload.events.all())
        if sealed != (STAGED == "received"):
            raise RuntimeError(f"staged {STAGED}, but the push {'did' if sealed else 'did not'} use the seal")
        return seconds, _put_seconds(upload), rss
    finally:
        upload.refresh_from_db()
        if upload.ims_image_id:
            client.delete_image(upload.ims_image_id)
        staging.delete(upload.staged_name)


def _stage(upload, source: Path, size: int) -> int:
    """Put all but the last chunk in staging (untimed); returns the size of the last chunk."""
    from uploads import services, staging
    from uploads.models import Upload

    if STAGED == "received":
        from uploads.staging import local

        last = min(LAST_CHUNK, size)
        # From the page cache the bytes come faster than any network brings them: here they wait
        # for the hashes (which a web process gives up on, so as not to slow an upload down).
        local.HASH_WAIT_SHARE = 1.0
        with open(source, "rb") as body:  # as the tus PATCHes do, hashing on the way in
            services.upload_receive(upload=upload, offset=0, stream=body, length=size - last)
        os.sync()  # the staged copy's dirty pages are not the push's to write back
        return last
    # The staged file is a hard link to the test file: every byte is there (as after the last
    # tus PATCH) without copying gigabytes, and curl and the worker read the same cached inode.
    staged = Path(staging.path(upload.staged_name))
    staged.unlink()
    os.link(source, staged)
    Upload.objects.filter(pk=upload.pk).update(received_bytes=size)
    return 0


def _put_seconds(upload) -> float | None:
    """From "Image record created in IMS" to "Sent N bytes to IMS" on the upload's timeline."""
    events = list(upload.events.all())
    created = next((e.at for e in events if e.message.startswith("Image record created")), None)
    sent = next((e.at for e in events if e.message.startswith("Sent ")), None)
    return (sent - created).total_seconds() if created and sent else None


# ---------------------------------------------------------------------------------------------


def _children_cpu_seconds() -> float:
    """CPU of this script's finished children (curl)."""
    times = os.times()
    return times.children_user + times.children_system


def start_worker(env: dict, log: Path):
    process = start_process(WORKER_ARGV, log=log, env=env)
    wait_for(lambda: b"ready." in log.read_bytes(), timeout=90, what="the Celery worker", process=process,
             log=log)
    return process


def bench_target(target: Target, work: Path, env: dict, owner, files: dict, repeats: dict, extras: dict,
                 began: float) -> dict[int, list[Run]]:
    from uploads import crypto, services
    from uploads.ims import ImsClient

    from django.conf import settings

    settings.IMS_ENDPOINT, settings.IAM_ENDPOINT = target.ims_url, target.iam_url
    account = services.cloud_account_connect(user=owner, **target.credentials)
    token = crypto.decrypt(account.token_encrypted)
    client = ImsClient(target.ims_url, token)
    header_file = work / "token-header"
    header_file.write_text(f"X-Auth-Token: {token}\n")  # keeps the token out of `ps`
    header_file.chmod(0o600)

    log = work / f"worker-{target.name}.log"
    worker = start_worker({**env, "IMS_ENDPOINT": target.ims_url, "IAM_ENDPOINT": target.iam_url}, log)
    server_pid = listening_pid(urlsplit(target.ims_url).port)
    results = {}
    try:
        idle = PeakRss(worker.pid)
        idle.sample()
        say(f"{target.name}: worker ready, idle RSS {mb(idle.peak_tree)} MB (tree of {len(idle.peaks)} "
            f"processes: {sorted(mb(v) for v in idle.peaks.values())} MB)")
        smallest = min(files)
        warm_cache(files[smallest])
        curl_put(target, client, header_file, files[smallest], smallest)  # untimed: the server's first PUT
        for index, (size, source) in enumerate(files.items()):
            warm_cache(source)
            runs = results[size] = []
            pairs = 0
            while pairs < repeats[size] or (
                pairs < repeats[size] + extras[size]
                and time.monotonic() < began + EXTRAS_UNTIL
                and any(sum(run.quiet for run in runs if run.way == way) < 2 for way in ("curl", "push"))
            ):
                order = ("curl", "push") if (pairs + index) % 2 == 0 else ("push", "curl")
                for way in order:
                    runs.append(one_run(way, target, client, header_file, worker.pid, owner, server_pid, source, size))
                pairs += 1
    finally:
        stop_process(worker)
    return results


def one_run(way, target, client, header_file, worker_pid, owner, server_pid, source, size) -> Run:
    settle_disk()
    wait_for_quiet(longest=10, below=QUIET_CORES)
    server_cpu = tree_cpu_seconds(server_pid)
    with OthersLoad() as others:
        if way == "curl":
            curl_cpu = _children_cpu_seconds()
            run = Run("curl", curl_put(target, client, header_file, source, size), 0.0)
            client_cpu = _children_cpu_seconds() - curl_cpu
        else:
            seconds, put, rss = portal_push(worker_pid, owner, client, source, size)
            run = Run("push", seconds, 0.0, put, rss.cpu_seconds, rss.peak_tree, rss.peak_busiest, rss.peak_tree_pss)
            client_cpu = rss.cpu_seconds
    run.others = others.cores
    server_cpu = tree_cpu_seconds(server_pid) - server_cpu
    line = (f"{target.name} {label(size)} {way}: {run.seconds:.2f} s, {size / MIB / run.seconds:.0f} MiB/s; "
            f"CPU {client_cpu:.1f} s {way}, {server_cpu:.1f} s server; others used {others.cores:.2f} cores")
    if way == "push":
        line += (f"; PUT {put or 0:.2f} s; worker peak RSS {mb(rss.peak_tree)} MB tree, "
                 f"{mb(rss.peak_busiest)} MB pushing process; peak PSS {mb(rss.peak_tree_pss)} MB tree")
    say(line)
    return run


INSPECT_RUNS = 3


def time_inspection(work: Path, raw: Path) -> dict:
    """inspect_file() as the worker's CHECKING step calls it, on the 4 GiB raw file and on a
    4 GiB qcow2 made from it; best of INSPECT_RUNS each. Also prints how many bytes it read and
    how long the two qemu-img runs inside it take alone."""
    from django.conf import settings

    from uploads import diskimage, qemu

    qcow2 = work / "data-4g.qcow2"
    t0 = time.monotonic()
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)], check=True)
    info = qemu.qemu_img_info(qcow2, "qcow2")
    say(f"made {qcow2.name} with qemu-img convert in {time.monotonic() - t0:.1f} s: virtual "
        f"{info['virtual-size'] / GIB:.2f} GiB, file {qcow2.stat().st_size / GIB:.2f} GiB, "
        f"{qcow2.stat().st_blocks * 512 / GIB:.2f} GiB allocated")
    figures = {}
    try:
        for fmt, path in (("raw", raw), ("qcow2", qcow2)):
            warm_cache(path)  # all runs alike; inspect_file reads only the head and the tail
            settle_disk()
            wait_for_quiet(longest=10, below=QUIET_CORES)
            times = []
            for _ in range(INSPECT_RUNS):
                started = time.perf_counter()
                result = diskimage.inspect_file(path, declared_format=fmt, max_bytes=settings.UPLOAD_MAX_BYTES + 1)
                times.append(time.perf_counter() - started)
                if not result.ok or result.detected_format != fmt:
                    raise RuntimeError(f"inspect_file refused the {fmt} test file: {result.problem} {result.checks}")
            # Where the time goes: qemu-img alone (inspect_file runs info, then check for qcow2).
            parts = []
            for what in ("info", "check"):
                if what == "check" and fmt not in qemu.QEMU_CHECKABLE:
                    continue
                started = time.perf_counter()
                subprocess.run(["qemu-img", what, "-f", fmt, "--force-share", "--output=json", str(path)],
                               check=True, capture_output=True)
                parts.append(f"qemu-img {what} {time.perf_counter() - started:.3f} s")
            say(f"inspect_file 4g {fmt}: " + ", ".join(f"{t:.3f} s" for t in times)
                + f"; read {result.bytes_read} bytes of {path.stat().st_size}; {'; '.join(parts)}; "
                f"virtual size {result.virtual_size}; checks {result.checks}")
            figures[f"inspect_s_4g_{fmt}"] = f"{min(times):.3f}"
    finally:
        qcow2.unlink(missing_ok=True)
    return figures


def figures_for(all_results: dict, sizes: list[int], target_names: list[str]) -> dict:
    figures, chosen = {}, []
    for name in target_names:
        for size in sizes:
            runs = all_results.get(name, {}).get(size)
            if not runs:
                figures[f"{name}_push_vs_curl_{label(size)}"] = "skipped"
                continue
            curl, push = best(runs, "curl"), best(runs, "push")
            chosen += [curl, push]
            figures[f"{name}_push_vs_curl_{label(size)}"] = f"{curl.seconds / push.seconds:.2f}"
    for name in target_names:
        for size in sizes:
            runs = all_results.get(name, {}).get(size)
            puts = [run for run in runs or [] if run.way == "push" and run.put]
            if puts:
                quiet = [run for run in puts if run.quiet] or puts
                figures[f"{name}_put_vs_curl_{label(size)}"] = (
                    f"{best(runs, 'curl').seconds / min(run.put for run in quiet):.2f}")
    pushes = [run for results in all_results.values() for runs in results.values() for run in runs
              if run.way == "push"]
    for size in sizes:
        mine = [run for results in all_results.values() for run in results.get(size, []) if run.way == "push"]
        if mine:
            figures[f"rss_mb_{label(size)}"] = mb(max(run.rss_tree for run in mine))
            figures[f"rss_mb_pusher_{label(size)}"] = mb(max(run.rss_pusher for run in mine))
            figures[f"pss_mb_{label(size)}"] = mb(max(run.pss_tree for run in mine))
    if pushes:
        sizes_of = {id(run): size for results in all_results.values() for size, runs in results.items() for run in runs}
        figures["worker_cpu_s_per_gib"] = (
            f"{statistics.median(run.worker_cpu / (sizes_of[id(run)] / GIB) for run in pushes):.2f}")
    if chosen:
        figures["others_cores_max"] = f"{max(run.others for run in chosen):.2f}"
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1,4", help="file sizes in GiB (default 1,4)")
    parser.add_argument("--targets", default="sim,glance", help="sim, glance or both (default)")
    parser.add_argument("--quick", action="store_true", help="one run each way (for trying the script)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs) for a look")
    parser.add_argument("--no-inspect", action="store_true", help="skip timing inspect_file on 4 GiB files")
    parser.add_argument("--staged", choices=("received", "linked"), default="received",
                        help="received: through the tus receiving service, sums computed on arrival (default); "
                             "linked: a hard link without sums, hashed while sending")
    args = parser.parse_args()
    global STAGED
    STAGED = args.staged
    sizes = [int(float(s) * GIB) for s in args.sizes.split(",")]
    target_names = [t.strip() for t in args.targets.split(",") if t.strip()]
    repeats = {size: 1 if args.quick else (3 if size <= GIB else 2) for size in sizes}
    extras = {size: 0 if args.quick or size > GIB else EXTRA_PAIRS for size in sizes}

    work = workdir("ims-bench-push-")
    say(f"work folder {work}")
    began = time.monotonic()
    all_results = {}
    inspect_figures = {}
    try:
        # The push after the last byte is what this measures: no early push while the file is
        # staged (bench/end_to_end.py measures that one), here or in the worker.
        env = portal_env(work, EARLY_PUSH="0")
        migrate(env, work / "migrate.log")
        os.environ["EARLY_PUSH"] = "0"
        use_portal_in_this_process(env)
        flush_redis()
        owner = create_user("bench")
        files = {}
        for size in sizes:
            t0 = time.monotonic()
            files[size] = make_random_file(work / f"data-{label(size)}.raw", size)
            say(f"made {files[size].name} ({size} random bytes) in {time.monotonic() - t0:.1f} s")
        if not args.no_inspect:
            raw4 = files.get(4 * GIB) or make_random_file(work / "inspect-4g.raw", 4 * GIB)
            inspect_figures = time_inspection(work, raw4)
            if raw4 not in files.values():
                raw4.unlink()
        for name in target_names:
            target = simulator_target(work) if name == "sim" else glance_target(work)
            if target is None:
                continue
            try:
                all_results[name] = bench_target(target, work, env, owner, files, repeats, extras, began)
            finally:
                target.stop()
        for name, results in all_results.items():
            for size, runs in results.items():
                for way in ("curl", "push"):
                    say(f"{name} {label(size)} {way}: " + ", ".join(
                        f"{run.seconds:.2f} s" + ("" if run.quiet else f" (others {run.others:.1f} cores)")
                        for run in runs if run.way == way))
        say(f"done in {time.monotonic() - began:.0f} s")
    finally:
        try:
            flush_redis()
        finally:
            if args.keep:
                say(f"kept {work}")
            else:
                cleanup(work)
    print_result({**figures_for(all_results, sizes, target_names), **inspect_figures, "staged": STAGED})
    return 0


if __name__ == "__main__":
    sys.exit(main())
