"""The tus server against `dd`: how fast a file reaches the staging disk, and the web's memory.

The portal's web server runs as production runs it (gunicorn with the repository's
gunicorn.conf.py; `manage.py runserver --noreload` only if that file is missing) on a throwaway
SQLite database and staging folder in /tmp. A user with a (made-up, future-dated) cloud account
and a signed-in session uploads a 1 GiB file of random bytes with tuspy in 64 MiB chunks
(creation POST + 16 PATCHes, CSRF header as the upload page sends it). The reference is
`dd if=FILE of=STAGING/dd-bench.img bs=4M` into the same staging folder.

Same durability for both, in two pairs: dd without conv=fsync against tus (page cache only, as
the tus server leaves its file), and dd conv=fsync against tus followed by an fsync of the staged
file. Both read the same source file from a warm page cache; before every run dirty pages are
written back (sync), the script waits for other processes on the machine to go quiet, and writes
and deletes a file of the same size (see recycle_memory: on this VM freed memory goes back to the
host after ~2 s). ratio = best dd time / best tus time (3 runs each, alternating which goes
first; runs during which others used more than 0.3 cores count only if no quiet one exists).
The web's peak RSS is sampled at 20 Hz over the gunicorn process tree during uploads.

    .venv/bin/python bench/ingest.py [--size-gib 1] [--chunk-mib 64] [--runs 3]

The last line holds the figures, e.g.
    ingest_vs_dd=0.16 ingest_vs_dd_fsync=0.27 ... web_rss_mb=206 web_rss_mb_worker=91 ...
"""

from __future__ import annotations

import argparse
import filecmp
import os
import secrets
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    GIB,
    MIB,
    PYTHON,
    ROOT,
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
    stop_process,
    use_portal_in_this_process,
    wait_for,
    wait_for_quiet,
    warm_cache,
    workdir,
)


# dd and tus with the same durability: page cache only (as the tus server leaves it), and
# on disk (dd conv=fsync; tus followed by an fsync of the staged file).
WAYS = ("dd", "tus", "tus_fsync", "dd_fsync")
# A run during which other processes kept more cores busy than this counts only when no quiet run
# of its kind exists; up to EXTRA_ROUNDS more rounds are run to get two quiet runs of each.
QUIET_CORES = 0.3
EXTRA_ROUNDS = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def web_argv(port: int, gunicorn_args: tuple = ()) -> tuple[list, str]:
    """The production web command when the repository has one, else Django's own server.
    `gunicorn_args` are added to the gunicorn command (bench/load.py: `--workers 1`)."""
    if (ROOT / "gunicorn.conf.py").exists():
        return ([PYTHON, "-m", "gunicorn", "-c", "gunicorn.conf.py", "--bind", f"127.0.0.1:{port}",
                 *gunicorn_args, "portal.wsgi:application"],
                " ".join(["gunicorn -c gunicorn.conf.py", *gunicorn_args]))
    return [PYTHON, "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}"], "manage.py runserver --noreload"


def start_web(env: dict, log: Path, gunicorn_args: tuple = ()) -> tuple[subprocess.Popen, str, str]:
    port = free_port()
    argv, how = web_argv(port, gunicorn_args)
    process = start_process(argv, log=log, env=env)
    url = f"http://127.0.0.1:{port}"

    def answers():
        request = urllib.request.Request(f"{url}/tus/", method="OPTIONS")
        try:
            with urllib.request.urlopen(request, timeout=2) as reply:
                return reply.status == 204
        except (urllib.error.URLError, OSError):
            return False

    wait_for(answers, timeout=60, what=f"the web server ({how})", process=process, log=log, interval=0.2)
    return process, url, how


def signed_in_headers(user) -> dict:
    """Cookie and CSRF headers of a browser in which `user` is signed in (as tus_headers in
    tests/conftest.py builds them)."""
    from importlib import import_module

    from django.conf import settings
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY

    session = import_module(settings.SESSION_ENGINE).SessionStore()
    session[SESSION_KEY] = str(user.pk)
    session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session.create()
    csrf = secrets.token_hex(16)  # any 32-letter secret works as the cookie and the header
    return {
        "Cookie": f"{settings.SESSION_COOKIE_NAME}={session.session_key}; {settings.CSRF_COOKIE_NAME}={csrf}",
        "X-CSRFToken": csrf,
    }


def give_cloud_account(user) -> None:
    """A made-up token that is valid for hours: the tus server checks it exists, never uses it."""
    from django.utils import timezone

    from uploads import crypto
    from uploads.models import CloudAccount

    CloudAccount.objects.create(
        user=user, domain_name="bench", user_name="bench", project_name="eu-de",
        token_encrypted=crypto.encrypt("made-up-token"), expires_at=timezone.now() + timedelta(hours=12),
    )


def recycle_memory(source: Path, staging: Path) -> None:
    """Write and delete a file as large as the run's, just before the run.

    This VM (Firecracker) hands free memory back to its host about 2 s after it is freed
    (virtio-balloon free page reporting), and writing into such memory again costs ~2 s of
    kernel time per GiB: dd then measures the host, not dd. Right after this, the timed run
    writes into memory the VM still holds, for dd and tus alike."""
    primer = staging / "primer.tmp"
    subprocess.run(["dd", f"if={source}", f"of={primer}", "bs=4M", "status=none"], check=True)
    primer.unlink()


def run_dd(source: Path, staging: Path, *, durable: bool) -> float:
    target = staging / "dd-bench.img"
    started = time.perf_counter()
    subprocess.run(["dd", f"if={source}", f"of={target}", "bs=4M", "status=none",
                    *(["conv=fsync"] if durable else [])], check=True)
    seconds = time.perf_counter() - started
    if target.stat().st_size != source.stat().st_size:
        raise RuntimeError("dd wrote a file of the wrong size")
    target.unlink()
    return seconds


def run_tus(url: str, headers: dict, source: Path, chunk: int, *, durable: bool) -> float:
    """One tuspy upload; with `durable`, the clock stops once the staged file is fsync'ed (which
    the benchmark does after the last PATCH: the server does not)."""
    from tusclient.client import TusClient

    from uploads import staging
    from uploads.models import Status, Upload

    uploader = TusClient(f"{url}/tus/", headers=headers).uploader(
        file_path=str(source), chunk_size=chunk, retries=0,
        metadata={"filename": "bench-ingest.raw", "image_name": "bench-ingest", "disk_format": "raw"},
    )
    started = time.perf_counter()
    uploader.upload()
    upload = Upload.objects.get(uid=uploader.url.rstrip("/").rsplit("/", 1)[-1])
    staged = Path(staging.path(upload.staged_name))
    if durable:
        with open(staged, "rb") as written:
            os.fsync(written.fileno())
    seconds = time.perf_counter() - started
    size = source.stat().st_size
    try:
        if upload.status != Status.RECEIVED or upload.received_bytes != size:
            raise RuntimeError(f"after the upload the row is {upload.status} with {upload.received_bytes} bytes")
        if not filecmp.cmp(source, staged, shallow=False):
            raise RuntimeError("the staged file differs from the source")
    finally:
        staging.delete(upload.staged_name)
        upload.delete()
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--chunk-mib", type=int, default=64, help="tus chunk size (default 64)")
    parser.add_argument("--runs", type=int, default=3, help="runs each way (default 3)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs) for a look")
    args = parser.parse_args()
    size, chunk = int(args.size_gib * GIB), args.chunk_mib * MIB

    work = workdir("ims-bench-ingest-")
    say(f"work folder {work}")
    began = time.monotonic()
    times = {way: [] for way in WAYS}  # way -> [(seconds, cores other processes used meanwhile)]
    tree_peaks, worker_peaks, web_cpu, client_cpu_all = [], [], [], []
    web = None
    try:
        env = portal_env(work, IMS_ENDPOINT="http://127.0.0.1:9", IAM_ENDPOINT="http://127.0.0.1:9/v3")
        staging_dir = Path(env["STAGING_DIR"])
        migrate(env, work / "migrate.log")
        use_portal_in_this_process(env)
        flush_redis()
        user = create_user("bench")
        give_cloud_account(user)
        headers = signed_in_headers(user)
        source = make_random_file(work / "data.raw", size)
        web, url, how = start_web(env, work / "web.log")
        idle = PeakRss(web.pid)
        idle.sample()
        say(f"web server ({how}) at {url}, idle RSS {mb(idle.peak_tree)} MB "
            f"(tree of {len(idle.peaks)} processes: {sorted(mb(v) for v in idle.peaks.values())} MB)")
        warm_cache(source)
        # One untimed round first: the first write into memory the VM never touched costs far
        # more (on this machine ~2 s of kernel time per GiB) than a write into reused memory.
        run_dd(source, staging_dir, durable=False)
        run_tus(url, headers, source, chunk, durable=False)
        rounds = 0
        while rounds < args.runs or (
            rounds < args.runs + EXTRA_ROUNDS
            and any(sum(quiet <= QUIET_CORES for _, quiet in times[way]) < 2 for way in WAYS)
        ):
            for way in (WAYS if rounds % 2 == 0 else WAYS[::-1]):
                settle_disk()
                wait_for_quiet(longest=15, below=QUIET_CORES)
                recycle_memory(source, staging_dir)
                durable = way.endswith("_fsync")
                client_cpu = psutil.Process().cpu_times()
                if way.startswith("dd"):
                    with OthersLoad() as load:
                        seconds = run_dd(source, staging_dir, durable=durable)
                    extra = ""
                else:
                    with PeakRss(web.pid) as rss, OthersLoad() as load:
                        seconds = run_tus(url, headers, source, chunk, durable=durable)
                    client_cpu = sum(psutil.Process().cpu_times()[:2]) - sum(client_cpu[:2])
                    tree_peaks.append(rss.peak_tree)
                    worker_peaks.append(rss.peak_busiest)
                    web_cpu.append(rss.cpu_seconds / (size / GIB))
                    client_cpu_all.append(client_cpu / (size / GIB))
                    extra = (f"; CPU {rss.cpu_seconds:.1f} s web, {client_cpu:.1f} s tuspy; web peak RSS "
                             f"{mb(rss.peak_tree)} MB tree, {mb(rss.peak_busiest)} MB serving process")
                times[way].append((seconds, load.cores))
                say(f"{way}: {seconds:.2f} s, {size / MIB / seconds:.0f} MiB/s; "
                    f"others used {load.cores:.2f} cores{extra}")
            rounds += 1
        for way in WAYS:
            say(f"{way}: " + ", ".join(f"{seconds:.2f} s" + ("" if load <= QUIET_CORES else f" (others {load:.1f} cores)")
                                       for seconds, load in times[way]))
        say(f"done in {time.monotonic() - began:.0f} s")
    finally:
        if web is not None:
            stop_process(web)
        try:
            flush_redis()  # the pushes that the finished uploads enqueued
        finally:
            if args.keep:
                say(f"kept {work}")
            else:
                cleanup(work)
    # The fastest run of each way, among the quiet ones when there are any: noise only adds time.
    best = {way: min([run for run in found if run[1] <= QUIET_CORES] or found) for way, found in times.items() if found}
    figures = {}
    if len(best) == len(WAYS):
        figures.update(
            ingest_vs_dd=f"{best['dd'][0] / best['tus'][0]:.2f}",
            ingest_vs_dd_fsync=f"{best['dd_fsync'][0] / best['tus_fsync'][0]:.2f}",
            **{f"{way}_mib_s": round(size / MIB / best[way][0]) for way in WAYS},
        )
    if tree_peaks:
        figures.update(web_rss_mb=mb(max(tree_peaks)), web_rss_mb_worker=mb(max(worker_peaks)),
                       web_cpu_s_per_gib=f"{statistics.median(web_cpu):.2f}",
                       tuspy_cpu_s_per_gib=f"{statistics.median(client_cpu_all):.2f}")
    if best:
        figures["others_cores_max"] = f"{max(load for _, load in best.values()):.2f}"
    print_result(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
