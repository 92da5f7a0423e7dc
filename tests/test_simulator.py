"""Behaviour of the local IMS + IAM simulator (imssim), over real HTTP. Independent of Django."""
import concurrent.futures
import hashlib
import http.client
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from imssim.server import (DEMO_DOMAIN, DEMO_PASSWORD, DEMO_PROJECT_ID, DEMO_PROJECT_NAME,
                           DEMO_USER, MAX_IMAGE_BYTES, Account, Simulator)

REPO_ROOT = Path(__file__).resolve().parents[1]
OTHER = Account("other-domain", "alice-cloud", "alice-pw", "eu-nl", "9f8e7d6c5b4a39281706f5e4d3c2b1a0")
OCTET = {"Content-Type": "application/octet-stream"}


@pytest.fixture(autouse=True)
def staging_dir():
    """Overrides the suite's Django-based autouse fixture: the simulator needs no Django."""


@pytest.fixture(scope="session", autouse=True)
def test_broker():
    """Overrides the suite's Celery broker fixture, for the same reason."""


@pytest.fixture
def sim(tmp_path):
    simulator = Simulator(tmp_path / "images", accounts=[OTHER]).start()
    yield simulator
    simulator.stop()


def auth_body(user=DEMO_USER, password=DEMO_PASSWORD, domain=DEMO_DOMAIN, project=DEMO_PROJECT_NAME):
    body = {"auth": {"identity": {"methods": ["password"], "password": {
        "user": {"name": user, "password": password, "domain": {"name": domain}}}}}}
    if project is not None:
        body["auth"]["scope"] = {"project": {"name": project}}
    return body


def get_token(sim, **account) -> str:
    reply = requests.post(f"{sim.url}/v3/auth/tokens?nocatalog=true", json=auth_body(**account), timeout=5)
    assert reply.status_code == 201, reply.text
    return reply.headers["X-Subject-Token"]


@pytest.fixture
def token(sim):
    return get_token(sim)


def create_image(sim, token, **fields) -> dict:
    body = {"name": "web-server", "disk_format": "qcow2", **fields}
    reply = requests.post(f"{sim.url}/v2/images", json=body, headers={"X-Auth-Token": token}, timeout=5)
    assert reply.status_code == 201, reply.text
    return reply.json()


def put_file(sim, token, image_id, data, headers=OCTET, **kwargs) -> requests.Response:
    return requests.put(f"{sim.url}/v2/images/{image_id}/file", data=data,
                        headers={"X-Auth-Token": token, **headers}, timeout=10, **kwargs)


def get_image(sim, token, image_id) -> requests.Response:
    return requests.get(f"{sim.url}/v2/images/{image_id}", headers={"X-Auth-Token": token}, timeout=5)


def wait_for(predicate, timeout=5.0):
    """Poll until predicate() is truthy; return its value or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    pytest.fail("condition not reached before the deadline")


def sim_status(sim, image_id) -> str:
    return next(i["status"] for i in sim.images() if i["id"] == image_id)


def error_code(reply) -> str:
    return reply.json()["error"]["code"]


# ---- IAM ----
def test_token_with_right_password_is_201_with_project_scope(sim):
    reply = requests.post(f"{sim.url}/v3/auth/tokens?nocatalog=true", json=auth_body(), timeout=5)
    assert reply.status_code == 201
    assert len(reply.headers["X-Subject-Token"]) >= 32
    body = reply.json()["token"]
    assert body["project"]["id"] == DEMO_PROJECT_ID and body["project"]["name"] == DEMO_PROJECT_NAME
    assert body["user"]["name"] == DEMO_USER and body["methods"] == ["password"]
    assert body["expires_at"].endswith("Z") and len(body["expires_at"]) == len("2026-11-28T14:00:00.000000Z")
    assert body["catalog"] == [] and body["roles"][0]["name"] == "te_admin"


def test_token_scoped_by_project_id_works(sim):
    body = auth_body()
    body["auth"]["scope"] = {"project": {"id": DEMO_PROJECT_ID}}
    assert requests.post(f"{sim.url}/v3/auth/tokens", json=body, timeout=5).status_code == 201


@pytest.mark.parametrize("account", [{"password": "wrong"}, {"user": "nobody"}, {"domain": "other-domain"}])
def test_token_with_wrong_credentials_is_401(sim, account):
    reply = requests.post(f"{sim.url}/v3/auth/tokens", json=auth_body(**account), timeout=5)
    assert reply.status_code == 401
    assert reply.json() == {"error": {"code": 401, "title": "Unauthorized",
                                      "message": "The request you have made requires authentication."}}
    assert "X-Subject-Token" not in reply.headers


@pytest.mark.parametrize("project", ["eu-nl", None])
def test_token_for_unknown_or_missing_project_is_401(sim, project):
    reply = requests.post(f"{sim.url}/v3/auth/tokens", json=auth_body(project=project), timeout=5)
    assert reply.status_code == 401
    assert "not accessible" in reply.json()["error"]["message"]


def test_token_with_malformed_json_is_400(sim):
    reply = requests.post(f"{sim.url}/v3/auth/tokens", data=b"{not json", timeout=5,
                          headers={"Content-Type": "application/json"})
    assert reply.status_code == 400
    assert reply.json()["error"]["title"] == "Bad Request"


# ---- IMS: create, upload, follow ----
def test_create_put_get_gives_active_with_md5_and_sha512(sim, token):
    image = create_image(sim, token, __os_version="Ubuntu 22.04 server 64bit", tags=["env=prod"],
                         min_disk=40, os_distro="ubuntu")
    assert image["status"] == "queued" and image["size"] is None and image["owner"] == DEMO_PROJECT_ID
    assert image["file"] == f"/v2/images/{image['id']}/file" and image["os_distro"] == "ubuntu"
    data = os.urandom(3 * 1024 * 1024 + 17)
    reply = put_file(sim, token, image["id"], data)
    assert reply.status_code == 204 and reply.content == b""
    got = get_image(sim, token, image["id"]).json()
    assert got["status"] == "active" and got["size"] == len(data) and got["__image_size"] == str(len(data))
    assert got["checksum"] == hashlib.md5(data).hexdigest()
    assert got["os_hash_algo"] == "sha512" and got["os_hash_value"] == hashlib.sha512(data).hexdigest()
    assert got["__os_version"] == "Ubuntu 22.04 server 64bit" and got["tags"] == ["env=prod"]
    assert Path(sim.images()[0]["path"]).read_bytes() == data


def test_create_replies_with_location_and_list_shows_the_image(sim, token):
    reply = requests.post(f"{sim.url}/v2/images", json={"name": "a", "disk_format": "raw"},
                          headers={"X-Auth-Token": token}, timeout=5)
    image_id = reply.json()["id"]
    assert reply.headers["Location"] == f"{sim.url}/v2/images/{image_id}"
    listed = requests.get(f"{sim.url}/v2/images", headers={"X-Auth-Token": token}, timeout=5).json()
    assert [i["id"] for i in listed["images"]] == [image_id]


@pytest.mark.parametrize("fields, code", [
    ({"disk_format": "vmdk"}, "IMG.0072"),
    ({"visibility": "public"}, "IMG.0001"),
    ({"container_format": "ovf"}, "IMG.0001"),
    ({"min_disk": 2000}, "IMG.0001"),
    ({"min_ram": "1024"}, "IMG.0001"),
    ({"tags": "env=prod"}, "IMG.0001"),
    ({"name": ""}, "IMG.0001"),
    ({"os_distro": 5}, "IMG.0001"),
    ({"status": "active"}, "IMG.0001"),
])
def test_create_with_invalid_fields_is_400(sim, token, fields, code):
    body = {"name": "x", "disk_format": "qcow2", **fields}
    reply = requests.post(f"{sim.url}/v2/images", json=body, headers={"X-Auth-Token": token}, timeout=5)
    assert reply.status_code == 400 and error_code(reply) == code


def test_create_with_malformed_json_is_400(sim, token):
    reply = requests.post(f"{sim.url}/v2/images", data=b"[1,", timeout=5,
                          headers={"X-Auth-Token": token, "Content-Type": "application/json"})
    assert reply.status_code == 400 and error_code(reply) == "IMG.0001"
    assert reply.json()["error"]["message"].startswith("The request is malformed: ")


def test_processing_shows_saving_then_active(sim, token):
    sim.set_faults(processing_seconds=0.4)
    image = create_image(sim, token)
    assert put_file(sim, token, image["id"], b"x" * 1000).status_code == 204
    first = get_image(sim, token, image["id"]).json()
    assert first["status"] == "saving" and first["size"] is None
    done = wait_for(lambda: (g := get_image(sim, token, image["id"]).json())["status"] == "active" and g)
    assert done["size"] == 1000 and done["checksum"] == hashlib.md5(b"x" * 1000).hexdigest()


def test_put_twice_is_409(sim, token):
    image = create_image(sim, token)
    assert put_file(sim, token, image["id"], b"first").status_code == 204
    reply = put_file(sim, token, image["id"], os.urandom(4 * 1024 * 1024))
    assert reply.status_code == 409 and error_code(reply) == "IMG.0021"
    assert reply.json()["error"]["message"] == "Image status transition from active to saving is not allowed"
    assert get_image(sim, token, image["id"]).json()["size"] == 5


def test_put_while_another_put_streams_is_409(sim, token):
    sim.set_faults(put_bytes_per_second=200_000)
    image = create_image(sim, token)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(put_file, sim, token, image["id"], b"a" * 100_000)
        wait_for(lambda: sim_status(sim, image["id"]) == "saving")
        second = put_file(sim, token, image["id"], b"b" * 10)
        assert second.status_code == 409
        assert "from saving to saving" in second.json()["error"]["message"]
        assert first.result(timeout=10).status_code == 204


@pytest.mark.parametrize("method", ["GET", "DELETE", "PUT"])
@pytest.mark.parametrize("image_id", ["8d5b2c7e-1f3a-4b6c-9d0e-2a4b6c8d0e1f", "not-a-uuid"])
def test_unknown_image_is_404(sim, token, method, image_id):
    suffix = "/file" if method == "PUT" else ""
    reply = requests.request(method, f"{sim.url}/v2/images/{image_id}{suffix}", data=b"x" * 1000,
                             headers={"X-Auth-Token": token, **OCTET}, timeout=5)
    assert reply.status_code == 404
    assert reply.json() == {"error": {"code": "IMG.0027", "message": "The image ID does not exist."}}


def test_other_project_gets_404_and_an_empty_list(sim, token):
    image = create_image(sim, token)
    alice = get_token(sim, user="alice-cloud", password="alice-pw", domain="other-domain", project="eu-nl")
    assert get_image(sim, alice, image["id"]).status_code == 404
    assert put_file(sim, alice, image["id"], b"data").status_code == 404
    assert requests.delete(f"{sim.url}/v2/images/{image['id']}", headers={"X-Auth-Token": alice},
                           timeout=5).status_code == 404
    assert requests.get(f"{sim.url}/v2/images", headers={"X-Auth-Token": alice}, timeout=5).json() == {"images": []}
    assert sim_status(sim, image["id"]) == "queued"


def test_content_length_of_128_gib_is_413_before_any_body(sim, token):
    image = create_image(sim, token)
    address = urlsplit(sim.url)
    conn = http.client.HTTPConnection(address.hostname, address.port, timeout=5)
    conn.putrequest("PUT", f"/v2/images/{image['id']}/file")
    for name, value in [("X-Auth-Token", token), ("Content-Length", str(MAX_IMAGE_BYTES)), *OCTET.items()]:
        conn.putheader(name, value)
    conn.endheaders(b"tiny start of a huge body")
    reply = conn.getresponse()
    assert reply.status == 413
    assert b"IMG.0059" in reply.read() and reply.getheader("Connection") == "close"
    conn.close()
    assert sim_status(sim, image["id"]) == "queued"


@pytest.mark.parametrize("content_type", ["application/json", None])
def test_wrong_content_type_is_415(sim, token, content_type):
    image = create_image(sim, token)
    headers = {"Content-Type": content_type} if content_type else {}
    reply = put_file(sim, token, image["id"], b"data", headers=headers)
    assert reply.status_code == 415 and error_code(reply) == "IMG.0001"


@pytest.mark.parametrize("headers", [{}, {"X-Auth-Token": "made-up"}])
def test_missing_or_unknown_token_is_401(sim, headers):
    reply = requests.get(f"{sim.url}/v2/images", headers=headers, timeout=5)
    assert reply.status_code == 401
    assert reply.json() == {"error": {"code": "APIGW.0301",
                                      "message": "Incorrect IAM authentication information: token is invalid."}}


def test_expired_tokens_are_401_apigw_0307_and_a_new_token_works(sim, token):
    image = create_image(sim, token)
    sim.set_faults(expire_tokens=True)
    reply = get_image(sim, token, image["id"])
    assert reply.status_code == 401 and reply.json() == {"error": {
        "code": "APIGW.0307", "message": "The token has expired. Obtain a new token and try again."}}
    assert put_file(sim, token, image["id"], b"x" * 100_000).status_code == 401
    assert get_image(sim, get_token(sim), image["id"]).status_code == 200


def test_token_expires_after_its_ttl(tmp_path):
    with Simulator(tmp_path, token_ttl=0) as short_lived:
        reply = requests.get(f"{short_lived.url}/v2/images", timeout=5,
                             headers={"X-Auth-Token": get_token(short_lived)})
        assert reply.status_code == 401 and error_code(reply) == "APIGW.0307"


def test_chunked_body_works(sim, token):
    image = create_image(sim, token)
    pieces = [os.urandom(size) for size in (70_000, 1, 2 * 1024 * 1024 + 3)]
    reply = put_file(sim, token, image["id"], iter(pieces))   # a generator: requests sends it chunked
    assert reply.status_code == 204
    got = get_image(sim, token, image["id"]).json()
    assert got["size"] == sum(map(len, pieces))
    assert got["os_hash_value"] == hashlib.sha512(b"".join(pieces)).hexdigest()


def test_empty_body_is_400_and_image_stays_queued(sim, token):
    image = create_image(sim, token)
    for body in (b"", iter([])):
        reply = put_file(sim, token, image["id"], body)
        assert reply.status_code == 400 and error_code(reply) == "IMG.0057"
        assert get_image(sim, token, image["id"]).json()["status"] == "queued"
    assert not Path(sim.images()[0]["path"]).exists()


# ---- faults ----
def test_fail_puts_2_gives_500_500_then_204(sim, token):
    image = create_image(sim, token)
    requests.post(f"{sim.url}/_sim/faults", json={"fail_puts": 2}, timeout=5).raise_for_status()
    statuses = [put_file(sim, token, image["id"], b"x" * 300_000) for _ in range(3)]
    assert [r.status_code for r in statuses] == [500, 500, 204]
    assert statuses[0].json() == {"error": {"code": "IMG.0010", "message": "System error."}}


def test_fail_gets_gives_503_once(sim, token):
    image = create_image(sim, token)
    state = requests.post(f"{sim.url}/_sim/faults", json={"fail_gets": 1}, timeout=5).json()
    assert state["fail_gets"] == 1 and state["fail_get_status"] == 503
    first, second = get_image(sim, token, image["id"]), get_image(sim, token, image["id"])
    assert first.status_code == 503 and error_code(first) == "APIGW.0503"
    assert second.status_code == 200


def test_cut_put_after_bytes_leaves_image_queued_and_a_later_put_succeeds(sim, token):
    image = create_image(sim, token)
    sim.set_faults(cut_put_after_bytes=64 * 1024)
    data = os.urandom(2 * 1024 * 1024)
    with pytest.raises(requests.ConnectionError):
        put_file(sim, token, image["id"], data)
    wait_for(lambda: sim_status(sim, image["id"]) == "queued")
    state = sim.images()[0]
    assert state["size"] is None and state["checksum"] is None and not Path(state["path"]).exists()
    assert put_file(sim, token, image["id"], data).status_code == 204
    assert get_image(sim, token, image["id"]).json()["checksum"] == hashlib.md5(data).hexdigest()


def test_client_disconnect_mid_body_returns_image_to_queued(sim, token):
    image = create_image(sim, token)
    address = urlsplit(sim.url)
    with socket.create_connection((address.hostname, address.port), timeout=5) as raw:
        raw.sendall((f"PUT /v2/images/{image['id']}/file HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {token}\r\n"
                     "Content-Type: application/octet-stream\r\nContent-Length: 1000000\r\n\r\n").encode()
                    + b"x" * 5000)
        wait_for(lambda: sim_status(sim, image["id"]) == "saving")
    wait_for(lambda: sim_status(sim, image["id"]) == "queued")
    assert not Path(sim.images()[0]["path"]).exists()
    assert sim.requests_seen()[-1] == {"method": "PUT", "path": f"/v2/images/{image['id']}/file", "status": None}


def test_broken_chunked_encoding_is_400_and_image_stays_queued(sim, token):
    image = create_image(sim, token)
    address = urlsplit(sim.url)
    with socket.create_connection((address.hostname, address.port), timeout=5) as raw:
        raw.sendall((f"PUT /v2/images/{image['id']}/file HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {token}\r\n"
                     "Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                     "4\r\nabcd\r\nnot-hex\r\n").encode())
        raw.shutdown(socket.SHUT_WR)             # nothing more to send: the server's drain ends
        reply = raw.makefile("rb").read()        # and it closes after a broken body
    assert reply.startswith(b"HTTP/1.1 400 ") and b"IMG.0001" in reply
    assert sim_status(sim, image["id"]) == "queued"


def test_delete_during_put_is_410_and_removes_the_partial_file(sim, token):
    image = create_image(sim, token)
    sim.set_faults(put_bytes_per_second=100_000)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        upload = pool.submit(put_file, sim, token, image["id"], os.urandom(500_000))
        wait_for(lambda: sim_status(sim, image["id"]) == "saving")
        deleted = requests.delete(f"{sim.url}/v2/images/{image['id']}", headers={"X-Auth-Token": token}, timeout=5)
        assert deleted.status_code == 204
        reply = upload.result(timeout=10)
    assert reply.status_code == 410 and error_code(reply) == "IMG.0027"
    assert not (sim.data_dir / image["id"]).exists() and sim.images() == []


def test_forced_status_is_reported(sim, token):
    image = create_image(sim, token)
    reply = requests.post(f"{sim.url}/_sim/images/{image['id']}/status", json={"status": "killed"}, timeout=5)
    assert reply.status_code == 200
    assert get_image(sim, token, image["id"]).json()["status"] == "killed"
    assert put_file(sim, token, image["id"], b"x").status_code == 409


def test_reset_clears_images_files_faults_and_log(sim, token):
    image = create_image(sim, token)
    put_file(sim, token, image["id"], b"data")
    sim.set_faults(fail_puts=3, processing_seconds=9)
    assert requests.post(f"{sim.url}/_sim/reset", timeout=5).status_code == 200
    assert requests.get(f"{sim.url}/_sim/images", timeout=5).json() == {"images": []}
    assert not (sim.data_dir / image["id"]).exists()
    assert sim.faults()["fail_puts"] == 0 and sim.faults()["processing_seconds"] == 0.0
    assert sim.requests_seen() == []


def test_bad_fault_values_are_400(sim):
    for body in ({"fail_puts": -1}, {"nonsense": 1}, {"fail_put_status": 200}):
        assert requests.post(f"{sim.url}/_sim/faults", json=body, timeout=5).status_code == 400


def test_requests_log_has_method_path_status_but_no_secrets(sim, token):
    image = create_image(sim, token)
    requests.get(f"{sim.url}/_sim/images", timeout=5)
    get_image(sim, "bad-token", image["id"])
    log = requests.get(f"{sim.url}/_sim/requests", timeout=5).json()["requests"]
    assert log == [
        {"method": "POST", "path": "/v3/auth/tokens", "status": 201},
        {"method": "POST", "path": "/v2/images", "status": 201},
        {"method": "GET", "path": f"/v2/images/{image['id']}", "status": 401},
    ]
    assert token not in str(log) and DEMO_PASSWORD not in str(log)


# ---- HTTP behaviour ----
def test_keep_alive_serves_several_requests_on_one_connection(sim, token):
    address = urlsplit(sim.url)
    conn = http.client.HTTPConnection(address.hostname, address.port, timeout=5)
    conn.request("POST", "/v2/images", body=b'{"name": "k", "disk_format": "raw"}',
                 headers={"X-Auth-Token": token, "Content-Type": "application/json"})
    image_id = conn.getresponse().read() and sim.images()[0]["id"]
    first_socket = conn.sock
    for method, path, body, expected in [("PUT", f"/v2/images/{image_id}/file", b"abc", 204),
                                         ("GET", f"/v2/images/{image_id}", None, 200),
                                         ("GET", "/v2/images/00000000-0000-0000-0000-000000000000", None, 404)]:
        conn.request(method, path, body=body, headers={"X-Auth-Token": token, **OCTET})
        reply = conn.getresponse()
        reply.read()
        assert reply.status == expected and conn.sock is first_socket
    conn.close()


def test_early_rejection_reaches_requests_despite_a_large_body(sim, token):
    image = create_image(sim, token)
    put_file(sim, token, image["id"], b"done")
    big = b"\0" * (16 * 1024 * 1024)
    assert put_file(sim, token, image["id"], big).status_code == 409
    assert put_file(sim, "bad", image["id"], iter([big])).status_code == 401


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_upload_and_early_409(sim, token, tmp_path):
    image = create_image(sim, token)
    source = tmp_path / "disk.img"
    source.write_bytes(os.urandom(3 * 1024 * 1024))
    command = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-T", str(source),
               "-H", f"X-Auth-Token: {token}", "-H", "Content-Type: application/octet-stream",
               f"{sim.url}/v2/images/{image['id']}/file"]
    for expected in ("204", "409"):     # the second time with Expect: 100-continue unanswered
        done = subprocess.run(command, capture_output=True, text=True, timeout=10)
        assert done.stdout == expected, done.stderr
    assert sim.images()[0]["checksum"] == hashlib.md5(source.read_bytes()).hexdigest()


def test_cli_starts_prints_its_line_and_exits_0_on_sigterm(tmp_path):
    command = [sys.executable, "-m", "imssim", "--port", "0", "--data-dir", str(tmp_path)]
    with subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as process:
        try:
            assert select.select([process.stdout], [], [], 10)[0], "no startup line"
            line = process.stdout.readline()
            assert line.startswith("IMS simulator listening on http://127.0.0.1:")
            url = line.split(" on ", 1)[1].strip()
            reply = requests.post(f"{url}/v3/auth/tokens", json=auth_body(), timeout=5)
            assert reply.status_code == 201
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=10) == 0
            assert process.stdout.read() == ""        # exactly one line on stdout
            stderr = process.stderr.read()
            assert "POST /v3/auth/tokens 201" in stderr      # the access log: method, path, status
            assert reply.headers["X-Subject-Token"] not in stderr and DEMO_PASSWORD not in stderr
        finally:
            if process.poll() is None:
                process.kill()
