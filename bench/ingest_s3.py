"""Ingest into object staging: the tus server writing into Swift (s3api) against a plain boto3
multipart upload of the same file to the same store, and the web's memory whatever the chunk.

A single-node Swift with s3api (tests/s3_fixture.py: installed once into its own venv, started
here in the work folder) is the store. The portal's ingest pool (the gunicorn
that serves /tus/) runs as `make run-prod` starts it, with STAGING_S3_* pointing at the store, on
a throwaway SQLite database.
Each round uploads the same 1 GiB file of random bytes:

- `boto3`: create_multipart_upload, upload_part of each 64 MiB part from the file, complete:
  the reference, what any S3 client does, in this process;
- `tuspy`: tuspy in 64 MiB chunks through /tus/ (the web spools each part and sends it from a
  thread while it receives the next);
- `curl`: `curl -T` PATCHes of `--curl-chunks-mib` chunks (by default 64 MiB, and 7 and 200 MiB,
  no multiples of the part size), to show the web's memory does not follow the chunk size.

ratio = best boto3 time / best tus time. The web's peak RSS (gunicorn tree and the serving
process) is sampled at 20 Hz during the tus runs.

    .venv/bin/python bench/ingest_s3.py [--size-gib 1] [--runs 3] [--curl-chunks-mib 64,7,200] [--keep]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    GIB,
    MIB,
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
    stop_process,
    use_portal_in_this_process,
    warm_cache,
    workdir,
)
from bench.front import start_pool  # noqa: E402
from bench.ingest import give_cloud_account, signed_in_headers  # noqa: E402

PART = 64 * MIB


def start_swift(work: Path):
    from tests.s3_fixture import SwiftStore, swift_venv

    store = SwiftStore(swift_venv(), work / "swift")
    store.start()
    store.client().create_bucket(Bucket=store.bucket)
    return store


def run_boto3(store, source: Path, size: int) -> float:
    """A plain multipart upload, parts read from the file one at a time."""
    client, key = store.client(), "bench/boto3.img"
    started = time.perf_counter()
    upload_id = client.create_multipart_upload(Bucket=store.bucket, Key=key)["UploadId"]
    parts = []
    with open(source, "rb") as file:
        for number, offset in enumerate(range(0, size, PART), start=1):
            body = file.read(PART)
            reply = client.upload_part(Bucket=store.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body)
            parts.append({"PartNumber": number, "ETag": reply["ETag"]})
    client.complete_multipart_upload(Bucket=store.bucket, Key=key, UploadId=upload_id,
                                     MultipartUpload={"Parts": parts})
    seconds = time.perf_counter() - started
    client.delete_object(Bucket=store.bucket, Key=key)
    return seconds


def run_tuspy(url: str, headers: dict, source: Path, chunk: int) -> float:
    from tusclient.client import TusClient

    uploader = TusClient(f"{url}/tus/", headers=headers).uploader(
        file_path=str(source), chunk_size=chunk, retries=0,
        metadata={"filename": "bench-ingest.raw", "image_name": "bench-ingest", "disk_format": "raw"},
    )
    started = time.perf_counter()
    uploader.upload()
    seconds = time.perf_counter() - started
    check_and_delete(uploader.url.rstrip("/").rsplit("/", 1)[-1], source)
    return seconds


def split_file(source: Path, chunk: int, folder: Path) -> list[Path]:
    """The file cut into pieces of `chunk` bytes (once, before any timing), for curl -T."""
    folder.mkdir(exist_ok=True)
    subprocess.run(["split", "-b", str(chunk), "-d", "-a", "4", str(source), f"{folder}/piece-"], check=True)
    return sorted(folder.iterdir())


def run_curl(url: str, headers: dict, source: Path, size: int, pieces: list[Path]) -> float:
    """A creation POST, then one curl PATCH per piece (curl -T streams the piece from disk)."""
    import requests

    tus = {**headers, "Tus-Resumable": "1.0.0"}
    created = requests.post(f"{url}/tus/", headers={**tus, "Upload-Length": str(size),
                                                    "Upload-Metadata": "filename YmVuY2gucmF3"})
    created.raise_for_status()
    location = created.headers["Location"]
    args = [f"-H{name}: {value}" for name, value in tus.items()]
    started = time.perf_counter()
    offset = 0
    for piece in pieces:
        subprocess.run(["curl", "-sf", "-o", "/dev/null", "-X", "PATCH", *args,
                        "-H", "Content-Type: application/offset+octet-stream", "-H", f"Upload-Offset: {offset}",
                        "-T", str(piece), location], check=True)
        offset += piece.stat().st_size
    seconds = time.perf_counter() - started
    check_and_delete(location.rstrip("/").rsplit("/", 1)[-1], source)
    return seconds


def check_and_delete(uid: str, source: Path) -> None:
    import hashlib

    from uploads import staging
    from uploads.models import Status, Upload

    upload = Upload.objects.get(uid=uid)
    try:
        if upload.status != Status.RECEIVED:
            raise RuntimeError(f"after the upload the row is {upload.status} with {upload.received_bytes} bytes")
        with staging.open_for_reading(upload.staged_name) as staged, open(source, "rb") as original:
            if hashlib.file_digest(staged, "md5").digest() != hashlib.file_digest(original, "md5").digest():
                raise RuntimeError("the staged object differs from the source")
    finally:
        staging.delete(upload.staged_name)
        upload.delete()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--curl-chunks-mib", default="64,7,200")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop Swift and the web on the way out
    size = int(args.size_gib * GIB)
    curl_chunks = [int(c) * MIB for c in args.curl_chunks_mib.split(",") if c]
    work = workdir("ims-bench-ingest-s3-")
    say(f"work folder {work}")
    times: dict[str, list[float]] = {}
    peaks: dict[str, list[tuple[int, int]]] = {}
    web = store = None
    try:
        store = start_swift(work)
        s3_env = {**store.env(prefix="bench-staging/"), "STAGING_S3_PART_SIZE": str(PART),
                  "STAGING_SCRATCH_DIR": str(work / "scratch")}
        env = portal_env(work, IMS_ENDPOINT="http://127.0.0.1:9", IAM_ENDPOINT="http://127.0.0.1:9/v3", **s3_env)
        os.environ.update(s3_env)  # this process reads the staged objects back to compare them
        migrate(env, work / "migrate.log")
        use_portal_in_this_process(env)
        flush_redis()
        user = create_user("bench")
        give_cloud_account(user)
        headers = signed_in_headers(user)
        source = make_random_file(work / "data.raw", size)
        web, address = start_pool("ingest", env, work / "web.log")  # as `make run-prod` starts /tus/'s pool
        url = f"http://{address}"
        say(f"Swift at {store.endpoint}; the ingest gunicorn at {url}")
        warm_cache(source)
        ways = {"boto3": lambda: run_boto3(store, source, size),
                "tuspy_64m": lambda: run_tuspy(url, headers, source, 64 * MIB),
                **{f"curl_{c // MIB}m": (lambda pieces=split_file(source, c, work / f"pieces-{c}"):
                                          run_curl(url, headers, source, size, pieces)) for c in curl_chunks}}
        for chunk in curl_chunks:
            for piece in sorted((work / f"pieces-{chunk}").iterdir()):
                warm_cache(piece)
        run_boto3(store, source, size)  # untimed: first writes into the store's fresh files
        for round_number in range(args.runs):
            for way, run in (ways.items() if round_number % 2 == 0 else list(ways.items())[::-1]):
                if way == "boto3":
                    seconds = run()
                    extra = ""
                else:
                    with PeakRss(web.pid) as rss:
                        seconds = run()
                    peaks.setdefault(way, []).append((rss.peak_tree, rss.peak_busiest))
                    extra = f"; web peak RSS {mb(rss.peak_tree)} MB tree, {mb(rss.peak_busiest)} MB serving process"
                times.setdefault(way, []).append(seconds)
                say(f"{way}: {seconds:.2f} s, {size / MIB / seconds:.0f} MiB/s{extra}")
    finally:
        if web is not None:
            stop_process(web)
        if store is not None:
            store.stop()
        try:
            flush_redis()
        finally:
            if args.keep:
                say(f"kept {work}")
            else:
                cleanup(work)
    best = {way: min(found) for way, found in times.items()}
    figures = {f"{way}_mib_s": round(size / MIB / seconds) for way, seconds in best.items()}
    if "boto3" in best:
        for way in best:
            if way != "boto3":
                figures[f"{way}_vs_boto3"] = f"{best['boto3'] / best[way]:.2f}"
    for way, found in peaks.items():
        figures[f"web_rss_mb_{way}"] = mb(max(tree for tree, _ in found))
        figures[f"web_rss_mb_worker_{way}"] = mb(max(busiest for _, busiest in found))
    print_result(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
