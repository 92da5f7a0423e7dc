"""The portal's tus server against the official tus Node.js server, with the same clients and file.

Two tus servers receive the same file (random bytes, 1 GiB by default) from the same clients:

- the portal's `/tus/` as production runs it: the *ingest* gunicorn (`gunicorn -c
  gunicorn.conf.py --name ims-portal-ingest`, tools/prodserver.py's command) on a throwaway SQLite
  database and staging folder in /tmp, doing all it does on the way in (session, CSRF, the
  upload row, its progress writes);
- the reference: `@tus/server` with `@tus/file-store` (npm, bench/tus_reference.mjs) on loopback,
  its file store in the same work folder (the same disk).

Clients: tuspy (`TusClient.uploader(..., chunk_size=64 MiB)`: creation POST + PATCHes, with the
session cookie and CSRF header as the upload page sends them), and curl sending the whole file in
one PATCH (`curl -T FILE -X PATCH`, after the creation POST). Routes: `direct` (the server's own
port, plain http) and `nginx` (Debian's nginx with deploy/nginx/'s config, TLS, the body streamed
to the backend: one nginx in front of the portal's ingest pool, one rendered from the same config
in front of the reference server). Each upload is checked afterwards (portal: row RECEIVED with
all bytes; both: stored file byte-identical to the source), then removed.

`dd if=FILE of=STAGING/dd-bench.img bs=4M` of the same file into the same folder is printed as the
machine's physical limit (a figure, not a goal). Nothing is fsync'ed: both tus servers leave their
file in the page cache.

Before every run: dirty pages are written back (sync), the script waits (at most --quiet-wait s)
for other processes to go quiet, and writes and deletes a file of the same size (recycle_memory:
on this VM freed memory goes back to the host after ~2 s). Ways alternate order per round; the
figure uses the best run of each way (runs during which others used more than 0.3 cores count
only if no quiet one exists). ratio = best reference time / best portal time: >= 1.0 means the
portal is at least as fast as the reference server (the goal, for each client).

    .venv/bin/python bench/ingest.py [--size-gib 1] [--chunk-mib 64] [--runs 3]
                                     [--clients tuspy,curl] [--routes direct,nginx]

The last line holds the figures, e.g.
    portal_vs_node_tuspy_direct=... portal_vs_node_curl_direct=... ... dd_mib_s=... others_cores_max=...
"""

from __future__ import annotations

import argparse
import base64
import filecmp
import secrets
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    GIB,
    MIB,
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
    stop_process,
    use_portal_in_this_process,
    wait_for_quiet,
    warm_cache,
    workdir,
)
from bench.front import (  # noqa: E402
    behind_proxy_env,
    node_version,
    start_nginx,
    start_pool,
    start_tus_reference,
    unverified_tls,
)


SERVERS = ("portal", "node", "simple")  # simple: the portal with bench/gunicorn_simple.conf.py
CLIENTS = ("tuspy", "curl")
ROUTES = ("direct", "nginx")
# A run during which other processes kept more cores busy than this counts only when no quiet run
# of its kind exists; up to EXTRA_ROUNDS more rounds are run to get two quiet runs of each.
QUIET_CORES = 0.3
EXTRA_ROUNDS = 2
CURL_HTTP_VERSIONS: dict[str, str] = {}  # route -> the HTTP version curl's PATCH went out with
METADATA = {"filename": "bench-ingest.raw", "image_name": "bench-ingest", "disk_format": "raw"}


@dataclass
class Server:
    """One tus server on one route: where clients send uploads, which process tree does the work
    (sampled for CPU and memory), and where its finished files are."""
    name: str  # portal, node or simple
    route: str  # direct or nginx
    url: str  # the tus endpoint, ending in /tus/
    pid: int  # the server's process tree (gunicorn master, node)
    front_pid: int | None  # nginx, when routed through it


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


def run_dd(source: Path, staging: Path) -> float:
    target = staging / "dd-bench.img"
    started = time.perf_counter()
    subprocess.run(["dd", f"if={source}", f"of={target}", "bs=4M", "status=none"], check=True)
    seconds = time.perf_counter() - started
    if target.stat().st_size != source.stat().st_size:
        raise RuntimeError("dd wrote a file of the wrong size")
    target.unlink()
    return seconds


def client_headers(server: Server, session: dict) -> dict:
    """What the upload page's browser sends: the session cookie and CSRF header, and over https the
    Referer of the page (Django's CSRF check wants one there). The reference server ignores them."""
    headers = dict(session)
    if server.url.startswith("https:"):
        parts = urlsplit(server.url)
        headers["Referer"] = f"{parts.scheme}://{parts.netloc}/upload/"
    return headers


def upload_tuspy(server: Server, headers: dict, source: Path, chunk: int) -> str:
    """One tuspy upload; returns the upload's URL."""
    from tusclient.client import TusClient

    uploader = TusClient(server.url, headers=headers).uploader(
        file_path=str(source), chunk_size=chunk, retries=0, metadata=METADATA,
        verify_tls_cert=False,
    )
    uploader.upload()
    return uploader.url


CURL_HTTP = {"auto": [], "1.1": ["--http1.1"]}


def upload_curl(server: Server, headers: dict, source: Path, header_file: Path, http: str) -> str:
    """A creation POST, then the whole file in one PATCH by curl (streamed from the file, the
    cookie read from a file so that it does not show in `ps`); returns the upload's URL."""
    metadata = ",".join(f"{key} {base64.b64encode(value.encode()).decode()}" for key, value in METADATA.items())
    size = source.stat().st_size
    create = urllib.request.Request(server.url, method="POST", headers={
        **headers, "Tus-Resumable": "1.0.0", "Upload-Length": str(size), "Upload-Metadata": metadata})
    with urllib.request.urlopen(create, timeout=30, context=unverified_tls()) as reply:
        location = reply.headers["Location"]
    url = urllib.parse.urljoin(server.url, location)
    header_file.write_text("".join(f"{name}: {value}\n" for name, value in headers.items()))
    done = subprocess.run(
        ["curl", *CURL_HTTP[http], "-sS", "-k", "-o", "/dev/null", "-w", "%{http_code} %{http_version}", "-T", str(source), "-X", "PATCH",
         "-H", "Tus-Resumable: 1.0.0", "-H", "Upload-Offset: 0", "-H", "Expect:",
         "-H", "Content-Type: application/offset+octet-stream", "-H", f"@{header_file}", url],
        capture_output=True, text=True, check=False,
    )
    code, version = (done.stdout.split() + ["", ""])[:2]
    if code != "204":
        raise RuntimeError(f"curl PATCH to {server.name} answered {code!r}: {done.stderr.strip()}")
    CURL_HTTP_VERSIONS[server.route] = version  # nginx negotiates HTTP/2 over TLS, as with a browser
    return url


def check_and_remove(server: Server, upload_url: str, source: Path, node_store: Path) -> None:
    """The server holds all the bytes, identical to the source; then the upload is removed."""
    from uploads import staging
    from uploads.models import Status, Upload

    uid = upload_url.rstrip("/").rsplit("/", 1)[-1]
    size = source.stat().st_size
    if server.name == "node":
        stored = node_store / uid
        try:
            if not filecmp.cmp(source, stored, shallow=False):
                raise RuntimeError("the reference server's file differs from the source")
        finally:
            stored.unlink(missing_ok=True)
            (node_store / f"{uid}.json").unlink(missing_ok=True)
        return
    upload = Upload.objects.get(uid=uid)
    staged = Path(staging.path(upload.staged_name))
    try:
        if upload.status != Status.RECEIVED or upload.received_bytes != size:
            raise RuntimeError(f"after the upload the row is {upload.status} with {upload.received_bytes} bytes")
        if not filecmp.cmp(source, staged, shallow=False):
            raise RuntimeError("the staged file differs from the source")
    finally:
        staging.delete(upload.staged_name)
        upload.delete()


def run_tus(server: Server, client: str, session: dict, source: Path, chunk: int, work: Path,
            curl_http: str = "auto") -> float:
    """One upload by `client` to `server`, timed from the creation POST to the last answer."""
    headers = client_headers(server, session)
    started = time.perf_counter()
    if client == "tuspy":
        url = upload_tuspy(server, headers, source, chunk)
    else:
        url = upload_curl(server, headers, source, work / "curl-headers", curl_http)
    seconds = time.perf_counter() - started
    check_and_remove(server, url, source, work / "node-store")
    return seconds


def start_servers(work: Path, env: dict, names: tuple, routes: tuple, processes: list) -> list[Server]:
    """The portal's ingest pool and the reference server (and the portal's simple variant when
    asked for), each direct and/or behind an nginx of its own rendered from deploy/nginx/.
    Every process goes into `processes` as soon as it runs, for the caller to stop."""
    started = []
    for name in names:
        if name == "node":
            process, url = start_tus_reference(work / "node-store", work / "node.log")
            address = urlsplit(url).netloc
        else:
            process, address = start_pool("ingest", env, work / f"ingest-{name}.log", simple=name == "simple")
        processes.append(process)
        started.append((name, process.pid, address))
    ingest_address = started[0][2]
    servers = []
    for name, pid, address in started:
        if "direct" in routes:
            servers.append(Server(name, "direct", f"http://{address}/tus/", pid, None))
        if "nginx" in routes:
            # The same config for both; the web pool is unused here (the portal's, for both).
            front, front_url = start_nginx(work / f"nginx-{name}", [ingest_address], [address],
                                           work / f"nginx-{name}.log")
            processes.append(front)
            servers.append(Server(name, "nginx", f"{front_url}/tus/", pid, front.pid))
    return servers


def way_name(server: Server, client: str) -> str:
    return f"{server.name}_{client}_{server.route}"


def timed_run(way: str, servers: dict, session: dict, source: Path, chunk: int, work: Path,
              staging_dir: Path, samples: dict, curl_http: str) -> tuple[float, float]:
    """One run of `way`: (seconds, cores other processes used meanwhile); CPU and peak RSS of the
    server (and nginx) go to `samples`."""
    if way == "dd":
        with OthersLoad() as load:
            seconds = run_dd(source, staging_dir)
        return seconds, load.cores
    server, client = servers[way]
    client_before = sum(psutil.Process().cpu_times()[:2])
    front = PeakRss(server.front_pid) if server.front_pid else None
    if front:
        front.__enter__()
    try:
        with PeakRss(server.pid) as rss, OthersLoad() as load:
            seconds = run_tus(server, client, session, source, chunk, work, curl_http)
    finally:
        if front:
            front.__exit__(None, None, None)
    gib = source.stat().st_size / GIB
    sample = {"server_cpu": rss.cpu_seconds / gib, "rss": rss.peak_tree, "rss_busiest": rss.peak_busiest,
              "nginx_cpu": front.cpu_seconds / gib if front else None,
              # tuspy runs in this process; curl is a child that has ended (its CPU is in children_*)
              "client_cpu": (sum(psutil.Process().cpu_times()[:2]) - client_before) / gib if client == "tuspy" else None}
    samples.setdefault(way, []).append(sample)
    say(f"{way}: CPU per GiB {sample['server_cpu']:.2f} s server"
        + (f", {sample['nginx_cpu']:.2f} s nginx" if front else "")
        + (f", {sample['client_cpu']:.2f} s tuspy" if sample["client_cpu"] is not None else "")
        + f"; server peak RSS {mb(rss.peak_tree)} MB tree, {mb(rss.peak_busiest)} MB busiest process")
    return seconds, load.cores


def measure(ways: list[str], servers: dict, session: dict, source: Path, chunk: int, work: Path,
            staging_dir: Path, args) -> tuple[dict, dict]:
    """Rounds of every way (alternating order), plus extra rounds until two quiet runs of each."""
    times = {way: [] for way in ways}  # way -> [(seconds, cores other processes used meanwhile)]
    samples: dict = {}
    size = source.stat().st_size
    rounds = 0
    while rounds < args.runs or (
        rounds < args.runs + EXTRA_ROUNDS
        and any(sum(quiet <= QUIET_CORES for _, quiet in times[way]) < 2 for way in ways)
    ):
        for way in (ways if rounds % 2 == 0 else ways[::-1]):
            settle_disk()
            wait_for_quiet(longest=args.quiet_wait, below=QUIET_CORES)
            recycle_memory(source, staging_dir)
            seconds, others = timed_run(way, servers, session, source, chunk, work, staging_dir, samples,
                                        args.curl_http)
            times[way].append((seconds, others))
            say(f"{way}: {seconds:.2f} s, {size / MIB / seconds:.0f} MiB/s; others used {others:.2f} cores")
        rounds += 1
    return times, samples


def figures_for(times: dict, samples: dict, size: int, clients: tuple, routes: tuple) -> dict:
    # The fastest run of each way, among the quiet ones when there are any: noise only adds time.
    best = {way: min([run for run in found if run[1] <= QUIET_CORES] or found) for way, found in times.items() if found}
    figures = {}
    for route in routes:
        for client in clients:
            node = best.get(f"node_{client}_{route}")
            for portal in ("portal", "simple"):
                mine = best.get(f"{portal}_{client}_{route}")
                if mine and node:
                    figures[f"{portal}_vs_node_{client}_{route}"] = f"{node[0] / mine[0]:.2f}"
    figures.update({f"{way}_mib_s": round(size / MIB / run[0]) for way, run in best.items()})

    def median(way_prefix: str, key: str) -> str | None:
        values = [s[key] for way, found in samples.items() if way.startswith(way_prefix) for s in found
                  if s[key] is not None]
        return f"{statistics.median(values):.2f}" if values else None

    for name, prefix, key in (("portal_cpu_s_per_gib", "portal_", "server_cpu"),
                              ("simple_cpu_s_per_gib", "simple_", "server_cpu"),
                              ("node_cpu_s_per_gib", "node_", "server_cpu"),
                              ("nginx_cpu_s_per_gib", "", "nginx_cpu"),
                              ("tuspy_cpu_s_per_gib", "", "client_cpu")):
        value = median(prefix, key)
        if value is not None:
            figures[name] = value
    portal = [s for way, found in samples.items() if way.startswith(("portal_", "simple_")) for s in found]
    node = [s for way, found in samples.items() if way.startswith("node_") for s in found]
    if portal:
        figures.update(ingest_rss_mb=mb(max(s["rss"] for s in portal)),
                       ingest_rss_mb_worker=mb(max(s["rss_busiest"] for s in portal)))
    if node:
        figures["node_rss_mb"] = mb(max(s["rss"] for s in node))
    if best:
        figures["others_cores_max"] = f"{max(load for _, load in best.values()):.2f}"
    return figures


def prepare(work: Path, size: int, names: tuple, routes: tuple, processes: list):
    """The throwaway portal, a signed-in session, the test file and the servers (appended to
    `processes` for main() to stop); (session headers, test file, staging folder, servers)."""
    env = portal_env(work, IMS_ENDPOINT="http://127.0.0.1:9", IAM_ENDPOINT="http://127.0.0.1:9/v3")
    env = behind_proxy_env(env, secure=False)
    migrate(env, work / "migrate.log")
    use_portal_in_this_process(env)
    flush_redis()
    user = create_user("bench")
    give_cloud_account(user)
    source = make_random_file(work / "data.raw", size)
    server_list = start_servers(work, env, names, routes, processes)
    say(f"tus servers ready (portal: gunicorn -c gunicorn.conf.py; node: @tus/server on node {node_version()}): "
        + ", ".join(f"{s.name} {s.route} {s.url}" for s in server_list))
    return signed_in_headers(user), source, Path(env["STAGING_DIR"]), server_list


def parse_list(text: str, allowed: tuple) -> tuple:
    chosen = tuple(item.strip() for item in text.split(",") if item.strip())
    unknown = set(chosen) - set(allowed)
    if unknown or not chosen:
        raise SystemExit(f"choose from {', '.join(allowed)} (got {text!r})")
    return chosen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--chunk-mib", type=int, default=64, help="tuspy's chunk size (default 64)")
    parser.add_argument("--runs", type=int, default=3, help="runs each way (default 3)")
    parser.add_argument("--servers", default="portal,node",
                        help="portal, node (the reference), simple (the portal without the socket-level "
                        "body read and the staging writer lock: bench/gunicorn_simple.conf.py)")
    parser.add_argument("--clients", default="tuspy,curl", help="tuspy, curl or both (default)")
    parser.add_argument("--routes", default="direct,nginx", help="direct, nginx or both (default)")
    parser.add_argument("--curl-http", choices=tuple(CURL_HTTP), default="auto",
                        help="auto: what curl and the server agree (HTTP/2 through nginx, as a browser); "
                        "1.1: HTTP/1.1 everywhere")
    parser.add_argument("--quiet-wait", type=float, default=15,
                        help="longest wait (s) for other processes to go quiet before each run")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs) for a look")
    args = parser.parse_args()
    size, chunk = int(args.size_gib * GIB), args.chunk_mib * MIB
    clients, routes = parse_list(args.clients, CLIENTS), parse_list(args.routes, ROUTES)
    names = parse_list(args.servers, SERVERS)
    warnings.filterwarnings("ignore", message="Unverified HTTPS request")  # the run's own certificate

    work = workdir("ims-bench-ingest-")
    say(f"work folder {work}")
    began = time.monotonic()
    processes, times, samples = [], {}, {}
    try:
        session, source, staging_dir, server_list = prepare(work, size, names, routes, processes)
        servers = {way_name(s, client): (s, client) for s in server_list for client in clients}
        warm_cache(source)
        # One untimed round first: the first write into memory the VM never touched costs far
        # more (on this machine ~2 s of kernel time per GiB) than a write into reused memory.
        run_dd(source, staging_dir)
        for way, (server, client) in servers.items():
            run_tus(server, client, session, source, chunk, work, args.curl_http)
        times, samples = measure(["dd", *servers], servers, session, source, chunk, work, staging_dir, args)
        for way, found in times.items():
            say(f"{way}: " + ", ".join(f"{seconds:.2f} s" + ("" if load <= QUIET_CORES else f" (others {load:.1f} cores)")
                                       for seconds, load in found))
        if CURL_HTTP_VERSIONS:
            say("curl's PATCH went out as " + ", ".join(f"HTTP/{v} ({route})" for route, v in CURL_HTTP_VERSIONS.items()))
        say(f"done in {time.monotonic() - began:.0f} s")
    finally:
        for process in reversed(processes):
            stop_process(process)
        try:
            flush_redis()  # the pushes that the finished uploads enqueued
        finally:
            if args.keep:
                say(f"kept {work}")
            else:
                cleanup(work)
    figures = figures_for(times, samples, size, clients, routes)
    if "curl" in clients and args.curl_http != "auto":
        figures["curl_http"] = args.curl_http
    print_result(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
