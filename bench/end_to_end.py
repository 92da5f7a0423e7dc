"""End to end: a browser's tus upload into the portal and on to real Glance, against `curl -T`.

A QCOW2 file (random data converted with `qemu-img convert -O qcow2`: as big as its disk, 4 GiB
by default) goes three ways to the same Glance (tools/openstack_peers: Keystone + Glance on
loopback, as bench/push.py starts them), each into a fresh image:

- curl: `curl -sS -T FILE -X PUT ... /v2/images/ID/file` straight to Glance, the seed's own client;
  the time is curl's time_total.
- paced: tuspy (`TusClient.uploader`, CHUNK_MIB chunks) sends the file to the portal's `/tus/` at
  a paced 100 MiB/s (its file reads are held back to that rate: a browser on a fast line), the
  portal as production runs it (the ingest gunicorn, a Celery worker with the production command,
  local staging, early push on: uploads/services/early_push.py). The figure is the time from the
  browser's last byte (the last PATCH answered) to the row being READY: what a person waits
  after their browser reached 100 %.
- unpaced: the same, with tuspy as fast as it goes; the time from the first byte at `/tus/` (the
  creation POST) to READY.

paced_tail_vs_curl = paced tail / curl (goal <= 0.10); unpaced_vs_curl = unpaced / curl (goal
<= 1.2). Best of --runs runs each (alternating order); every image is deleted after its run. With
--compare-usual the paced way runs once more with EARLY_PUSH=0 (the push after the last byte,
as before) for reference.

    .venv/bin/python bench/end_to_end.py [--size-gib 4] [--runs 2] [--rate-mib 100] [--compare-usual]

The last line holds the figures, e.g.
    size_gib=4 curl_s=21.8 paced_tail_s=1.4 paced_tail_vs_curl=0.06 unpaced_s=24.0 unpaced_vs_curl=1.10 ...
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    GIB,
    MIB,
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
    tree_cpu_seconds,
    stop_process,
    use_portal_in_this_process,
    wait_for,
    wait_for_quiet,
    warm_cache,
    OthersLoad,
    workdir,
)
from bench.push import WORKER_ARGV, glance_target  # noqa: E402

CHUNK_MIB = 64  # tuspy's PATCH size (bench/ingest.py uses the same)
PACE_STEP = 4 * MIB  # the paced reader releases this much at a time
SLOWEST_RATE = 20 * MIB


class PacedFile:
    """A file whose reads are held back to `rate` bytes per second from the first read on."""

    def __init__(self, path: Path, rate: float):
        self.file = open(path, "rb")
        self.rate = rate
        self.started = None
        self.done = 0

    def read(self, size: int = -1) -> bytes:
        if self.started is None:
            self.started = time.perf_counter()
        parts = []
        while size < 0 or sum(map(len, parts)) < size:
            want = PACE_STEP if size < 0 else min(PACE_STEP, size - sum(map(len, parts)))
            data = self.file.read(want)
            if not data:
                break
            self.done += len(data)
            delay = self.started + self.done / self.rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            parts.append(data)
        return b"".join(parts)

    def seek(self, *args):
        return self.file.seek(*args)

    def tell(self):
        return self.file.tell()

    def close(self):
        self.file.close()


def make_qcow2(work: Path, size: int) -> Path:
    raw = make_random_file(work / "data.raw", size)
    qcow2 = work / "data.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)], check=True)
    raw.unlink()
    return qcow2


def curl_put(target, client, header_file: Path, source: Path) -> float:
    size = source.stat().st_size
    image = client.create_image(name="bench-e2e-curl", disk_format="qcow2", min_disk=1)
    try:
        done = subprocess.run(
            ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{time_total}", "-T", str(source),
             "-X", "PUT", "-H", "Content-Type: application/octet-stream", "-H", "Expect:",
             "-H", f"@{header_file}", f"{target.ims_url}/v2/images/{image.id}/file"],
            capture_output=True, text=True, timeout=size / SLOWEST_RATE + 60,
        )
        code, seconds = (done.stdout.split() + ["", ""])[:2]
        if code != "204" or client.get_image(image.id).size != size:
            raise RuntimeError(f"curl PUT answered {code!r}: {done.stderr.strip()}")
        return float(seconds)
    finally:
        client.delete_image(image.id)


def tus_to_ready(tus_url: str, headers: dict, source: Path, client, rate: float | None) -> tuple[float, float, str]:
    """One browser upload through the portal; (first byte -> READY, last byte -> READY, how it went)."""
    from tusclient.client import TusClient

    from uploads.models import Status, Upload

    size = source.stat().st_size
    stream = PacedFile(source, rate) if rate else open(source, "rb")
    started = time.perf_counter()
    try:
        uploader = TusClient(tus_url, headers=headers).uploader(
            file_stream=stream, chunk_size=CHUNK_MIB * MIB, retries=0,
            metadata={"filename": "bench-e2e.qcow2", "image_name": "bench-e2e", "disk_format": "qcow2"})
        uploader.upload()
    finally:
        stream.close()
    last_byte = time.perf_counter()
    upload = Upload.objects.get(uid=uploader.url.rstrip("/").rsplit("/", 1)[-1])
    deadline = time.monotonic() + size / SLOWEST_RATE + 120
    try:
        while (status := Upload.objects.filter(pk=upload.pk).values_list("status", flat=True).get()) not in (
            Status.READY, Status.FAILED, Status.REFUSED, Status.RECONNECT, Status.CANCELLED
        ):
            if time.monotonic() > deadline:
                raise RuntimeError(f"upload {upload.pk} did not end in time ({status})")
            time.sleep(0.01)
        ready = time.perf_counter()
        upload.refresh_from_db()
        if upload.status != Status.READY:
            raise RuntimeError(f"the upload ended {upload.status}: {upload.error_message} "
                               f"{[e.message for e in upload.events.all()]}")
        early = upload.events.filter(to_status=Status.SENDING_EARLY).exists()
        return ready - started, ready - last_byte, "early push" if early else "usual push"
    finally:
        upload.refresh_from_db()
        if upload.ims_image_id:
            client.delete_image(upload.ims_image_id)
        from uploads import staging

        staging.delete(upload.staged_name)


def start_portal(work: Path, env: dict, name: str):
    """The ingest gunicorn and a Celery worker, as production runs them; (processes, tus URL)."""
    from bench.front import start_pool

    ingest, address = start_pool("ingest", env, work / f"ingest-{name}.log")
    log = work / f"worker-{name}.log"
    worker = start_process(WORKER_ARGV, log=log, env=env)
    wait_for(lambda: b"ready." in log.read_bytes(), timeout=90, what="the Celery worker", process=worker, log=log)
    return [ingest, worker], f"http://{address}/tus/"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gib", type=float, default=4)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--rate-mib", type=float, default=100, help="the paced browser's rate (MiB/s)")
    parser.add_argument("--compare-usual", action="store_true", help="also the paced way without early push")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    args = parser.parse_args()
    size = int(args.size_gib * GIB)
    work = workdir("ims-bench-e2e-")
    say(f"work folder {work}")
    began = time.monotonic()
    processes = []  # portal processes, stopped at the end
    target = None
    figures = {"size_gib": f"{args.size_gib:g}"}
    try:
        env = portal_env(work, STAGING_FREE_RESERVE_BYTES="0", UPLOAD_POLL_SECONDS="0.2")
        migrate(env, work / "migrate.log")
        use_portal_in_this_process(env)
        flush_redis()
        from bench.ingest import signed_in_headers
        from django.conf import settings

        from uploads import crypto, services
        from uploads.ims import ImsClient

        owner = create_user("bench")
        headers = signed_in_headers(owner)
        t0 = time.monotonic()
        source = make_qcow2(work, size)
        say(f"made {source.name} ({source.stat().st_size} bytes of QCOW2) in {time.monotonic() - t0:.1f} s")
        target = glance_target(work)
        if target is None:
            print_result({**figures, "paced_tail_vs_curl": "skipped", "unpaced_vs_curl": "skipped"})
            return 0
        settings.IMS_ENDPOINT, settings.IAM_ENDPOINT = target.ims_url, target.iam_url
        account = services.cloud_account_connect(user=owner, **target.credentials)
        token = crypto.decrypt(account.token_encrypted)
        client = ImsClient(target.ims_url, token)
        header_file = work / "token-header"
        header_file.write_text(f"X-Auth-Token: {token}\n")  # keeps the token out of `ps`
        header_file.chmod(0o600)
        portal_env_ = {**env, "IMS_ENDPOINT": target.ims_url, "IAM_ENDPOINT": target.iam_url}
        portal, tus_url = start_portal(work, portal_env_, "early")
        processes += portal
        warm_cache(source)
        curl_put(target, client, header_file, source)  # untimed: Glance's first PUT
        times = {"curl": [], "paced": [], "unpaced": []}
        cpu_figures = {}
        for run in range(args.runs):
            order = ["curl", "paced", "unpaced"] if run % 2 == 0 else ["unpaced", "paced", "curl"]
            for way in order:
                settle_disk()
                wait_for_quiet(longest=10, below=0.3)
                if way == "curl":
                    with OthersLoad() as others:
                        seconds = curl_put(target, client, header_file, source)
                    times["curl"].append(seconds)
                    say(f"curl -T: {seconds:.2f} s ({size / MIB / seconds:.0f} MiB/s); "
                        f"others used {others.cores:.2f} cores")
                else:
                    rate = args.rate_mib * MIB if way == "paced" else None
                    cpu = [tree_cpu_seconds(process.pid) for process in portal]
                    with OthersLoad() as others:
                        whole, tail, how = tus_to_ready(tus_url, headers, source, client, rate)
                    ingest_cpu, worker_cpu = (tree_cpu_seconds(p.pid) - c for p, c in zip(portal, cpu))
                    times[way].append(tail if way == "paced" else whole)
                    cpu_figures.setdefault(way, []).append((ingest_cpu, worker_cpu))
                    say(f"{way}: first byte -> ready {whole:.2f} s, last byte -> ready {tail:.2f} s ({how}); "
                        f"CPU {ingest_cpu:.1f} s ingest, {worker_cpu:.1f} s worker; "
                        f"others used {others.cores:.2f} cores")
        curl = min(times["curl"])
        figures.update(curl_s=f"{curl:.2f}", paced_tail_s=f"{min(times['paced']):.2f}",
                       paced_tail_vs_curl=f"{min(times['paced']) / curl:.3f}",
                       unpaced_s=f"{min(times['unpaced']):.2f}", unpaced_vs_curl=f"{min(times['unpaced']) / curl:.2f}")
        gib = size / GIB
        worker_cpu = [worker for runs in cpu_figures.values() for _, worker in runs]
        ingest_cpu = [ingest for runs in cpu_figures.values() for ingest, _ in runs]
        figures.update(worker_cpu_s_per_gib=f"{min(worker_cpu) / gib:.2f}",
                       ingest_cpu_s_per_gib=f"{min(ingest_cpu) / gib:.2f}")
        if args.compare_usual:
            for process in portal:
                stop_process(process)
                processes.remove(process)
            portal, tus_url = start_portal(work, {**portal_env_, "EARLY_PUSH": "0"}, "usual")
            processes += portal
            whole, tail, how = tus_to_ready(tus_url, headers, source, client, args.rate_mib * MIB)
            say(f"paced without early push: first byte -> ready {whole:.2f} s, last byte -> ready {tail:.2f} s ({how})")
            figures.update(usual_paced_tail_s=f"{tail:.2f}", usual_paced_tail_vs_curl=f"{tail / curl:.3f}")
        say(f"done in {time.monotonic() - began:.0f} s")
    finally:
        for process in processes:
            stop_process(process)
        if target is not None:
            target.stop()
        try:
            flush_redis()
        finally:
            if args.keep:
                say(f"kept {work}")
            else:
                cleanup(work)
    print_result(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
