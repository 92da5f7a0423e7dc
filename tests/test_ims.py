"""The IAM/IMS client against the simulator over real HTTP, and its reading of error replies."""

import hashlib
import io
import os

import pytest
import requests

from imssim.server import DEMO_DOMAIN, DEMO_PASSWORD, DEMO_PROJECT_ID, DEMO_PROJECT_NAME, DEMO_USER
from tests.conftest import wait_for
from uploads import httpput
from uploads.diskimage import FileChanged
from uploads.filebody import Sealed, SealedBody
from uploads.ims import CloudError, IamClient, ImsClient, explain


@pytest.fixture
def token(session_sim):
    session_sim.reset()
    return IamClient(f"{session_sim.url}/v3").get_token(
        domain=DEMO_DOMAIN, user=DEMO_USER, password=DEMO_PASSWORD, project=DEMO_PROJECT_NAME
    )


@pytest.fixture
def ims(session_sim, token):
    return ImsClient(session_sim.url, token.value)


def test_it_gets_a_project_scoped_token(token):
    assert token.value
    assert token.project_name == DEMO_PROJECT_NAME and token.project_id == DEMO_PROJECT_ID
    assert token.expires_at.tzinfo is not None


def test_a_project_id_works_as_well_as_a_name(session_sim):
    token = IamClient(f"{session_sim.url}/v3").get_token(
        domain=DEMO_DOMAIN, user=DEMO_USER, password=DEMO_PASSWORD, project=DEMO_PROJECT_ID
    )
    assert token.project_name == DEMO_PROJECT_NAME


def test_the_token_never_shows_in_its_repr(token):
    assert token.value not in repr(token)


def test_wrong_credentials_say_what_to_check(session_sim):
    with pytest.raises(CloudError) as error:
        IamClient(f"{session_sim.url}/v3").get_token(
            domain=DEMO_DOMAIN, user=DEMO_USER, password="wrong", project=DEMO_PROJECT_NAME
        )
    assert error.value.code == "auth" and error.value.permanent
    assert "check the domain, user name, password and project" in error.value.message
    assert "wrong" not in error.value.detail


def test_unreachable_iam_is_a_network_error():
    with pytest.raises(CloudError) as error:
        IamClient("http://127.0.0.1:9/v3").get_token(domain="d", user="u", password="p", project="x")
    assert error.value.code == "network" and not error.value.permanent


def test_create_upload_and_follow_an_image(ims, session_sim, tmp_path):
    data = b"\x00" * 1000 + b"disk" * 3000
    image = ims.create_image(
        name="web", disk_format="raw", os_version="Ubuntu 22.04 server 64bit", min_disk=1, tags=["env=test"]
    )
    assert image.status == "queued"
    progress = []
    result = ims.upload_file(image.id, io.BytesIO(data), len(data), on_progress=progress.append, buffer_size=4096)
    assert result.sent_bytes == len(data)
    assert result.md5 == hashlib.md5(data).hexdigest()
    assert result.sha512 == hashlib.sha512(data).hexdigest()
    assert progress[-1] == len(data) and len(progress) == -(-len(data) // 4096)
    active = ims.get_image(image.id)
    assert active.status == "active"
    assert (active.size, active.checksum, active.os_hash_value) == (len(data), result.md5, result.sha512)
    assert active.raw["__os_version"] == "Ubuntu 22.04 server 64bit"
    ims.delete_image(image.id)
    with pytest.raises(CloudError) as error:
        ims.get_image(image.id)
    assert error.value.code == "not_found"


def test_the_put_carries_a_content_length_not_chunks(ims, session_sim, monkeypatch):
    sent_headers = {}
    original = requests.Session.send

    def spy(self, request, **kwargs):
        sent_headers.update(request.headers)
        return original(self, request, **kwargs)

    monkeypatch.setattr(requests.Session, "send", spy)
    image = ims.create_image(name="x", disk_format="raw")
    ims.upload_file(image.id, io.BytesIO(b"abc"), 3)
    assert sent_headers["Content-Length"] == "3"
    assert "Transfer-Encoding" not in sent_headers
    assert sent_headers["Content-Type"] == "application/octet-stream"


def test_a_second_put_is_an_explained_conflict(ims):
    image = ims.create_image(name="x", disk_format="raw")
    ims.upload_file(image.id, io.BytesIO(b"abc"), 3)
    with pytest.raises(CloudError) as error:
        ims.upload_file(image.id, io.BytesIO(b"abc"), 3)
    assert error.value.status == 409 and error.value.code == "conflict"
    assert "already has data" in error.value.message and "Retry" in error.value.hint


def test_returning_false_from_progress_aborts_the_put(ims):
    image = ims.create_image(name="x", disk_format="raw")
    with pytest.raises(CloudError) as error:
        ims.upload_file(image.id, io.BytesIO(b"a" * 100_000), 100_000, on_progress=lambda sent: False,
                        buffer_size=1000)
    assert error.value.code == "aborted"


def test_a_server_error_is_temporary(ims, session_sim):
    image = ims.create_image(name="x", disk_format="raw")
    session_sim.set_faults(fail_puts=1)
    with pytest.raises(CloudError) as error:
        ims.upload_file(image.id, io.BytesIO(b"abc"), 3)
    assert error.value.status == 500 and not error.value.permanent
    assert "IMG" in error.value.detail or "System error" in error.value.detail


def test_a_cut_connection_is_temporary(ims, session_sim):
    image = ims.create_image(name="x", disk_format="raw")
    session_sim.set_faults(cut_put_after_bytes=50_000)
    with pytest.raises(CloudError) as error:
        ims.upload_file(image.id, io.BytesIO(b"a" * 5_000_000), 5_000_000, buffer_size=10_000)
    assert error.value.code == "network" and not error.value.permanent


def test_an_expired_token_means_reconnect(ims, session_sim):
    session_sim.set_faults(expire_tokens=True)
    with pytest.raises(CloudError) as error:
        ims.create_image(name="x", disk_format="raw")
    assert error.value.code == "auth" and error.value.status == 401
    assert "Reconnect on the Cloud account page" in error.value.hint


def test_an_unsupported_format_is_explained(ims):
    with pytest.raises(CloudError) as error:
        ims.create_image(name="x", disk_format="vmdk")
    assert error.value.code == "bad_request"
    assert error.value.message == "The cloud does not accept this disk format for direct uploads."


def _reply(status: int, body: str, content_type: str) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response.reason = "Reason"
    response._content = body.encode()
    response.headers["Content-Type"] = content_type
    return response


@pytest.mark.parametrize(
    "status, body, content_type, kind, permanent",
    [
        (400, '{"error": {"code": "IMG.0001", "message": "bad"}}', "application/json", "bad_request", True),
        (401, '{"error": {"code": "APIGW.0307", "message": "expired"}}', "application/json", "auth", True),
        (403, '{"message": "You are not authorized", "code": "403 Forbidden"}', "application/json", "forbidden",
         True),
        (404, "<html><body><h1>404 Not Found</h1>No image found with ID x<br /><br /></body></html>",
         "text/html", "not_found", True),
        (409, '{"message": "Image status transition from active to saving is not allowed<br /><br />\\n"}',
         "application/json", "conflict", True),
        (413, '{"error": {"code": "IMG.0059", "message": "too big"}}', "application/json", "too_large", True),
        (415, "<h1>415</h1>Image disk_format qcow2 does not match stream data raw", "text/html", "unsupported",
         True),
        (500, '{"error": {"code": "IMG.0010", "message": "System error."}}', "application/json", "server", False),
        (503, "Service Unavailable", "text/plain", "server", False),
    ],
)
def test_every_error_reply_becomes_plain_words(status, body, content_type, kind, permanent):
    error = explain(_reply(status, body, content_type))
    assert (error.code, error.permanent, error.status) == (kind, permanent, status)
    assert error.message and error.hint
    assert body[:20] in error.detail  # the raw reply is kept for admins


def test_a_glance_schema_error_shows_its_sentence_without_markup():
    body = '{"message": "Provided object does not match schema \'image\'<br /><br />\\n\\n\\n", "code": "400"}'
    error = explain(_reply(400, body, "application/json"))
    assert error.message == "The cloud refused the image details: Provided object does not match schema 'image'"


def test_a_sign_in_reply_that_makes_no_sense_is_explained_without_the_password(monkeypatch):
    def html_201(self, url, **kwargs):
        reply = _reply(201, "<html>a proxy's page</html>", "text/html")
        reply.headers["X-Subject-Token"] = "t"
        return reply

    monkeypatch.setattr(requests.Session, "post", html_201)
    with pytest.raises(CloudError) as error:
        IamClient("http://iam.invalid/v3").get_token(domain="d", user="u", password="secret-pw", project="p")
    assert error.value.permanent and "does not understand" in error.value.message
    assert "secret-pw" not in error.value.detail


# A file sealed when it arrived (uploads/filebody.py Sealed): its sums are known, nothing is
# hashed while sending, and on plain http the kernel sends it (uploads/httpput.py).


def settled_status(ims, sim, image_id: str) -> str:
    """The image's status once the server has noticed the end of a body cut short: the
    simulator logs a request when it ends (answered, or the client gone)."""
    path = f"/v2/images/{image_id}/file"
    wait_for(lambda: any(r["method"] == "PUT" and r["path"] == path for r in sim.requests_seen()),
             timeout=10, what="the PUT to end")
    return ims.get_image(image_id).status


def sealed_file(tmp_path, data: bytes, confirm=None):
    path = tmp_path / "sealed.img"
    path.write_bytes(data)
    confirmed = []
    sealed = Sealed(md5=hashlib.md5(data).hexdigest(), sha512=hashlib.sha512(data).hexdigest(),
                    tail_size=min(1000, len(data)), confirm=confirm or confirmed.append)
    return path, sealed, confirmed


def test_a_sealed_file_is_sent_by_the_kernel_with_the_sums_it_arrived_with(ims, tmp_path, monkeypatch):
    data = os.urandom(3_000_000)
    path, sealed, confirmed = sealed_file(tmp_path, data)
    calls = []
    monkeypatch.setattr(os, "sendfile", lambda *args, _real=os.sendfile: calls.append(args) or _real(*args))
    monkeypatch.setattr(SealedBody, "SLICE_SIZE", 1_000_000)
    image = ims.create_image(name="sealed", disk_format="raw")
    progress = []
    with open(path, "rb") as f:
        result = ims.upload_file(image.id, f, len(data), on_progress=progress.append, sealed=sealed)
    assert (result.sent_bytes, result.md5, result.sha512) == (len(data), sealed.md5, sealed.sha512)
    assert calls and sum(args[3] for args in calls) >= len(data) - 1000
    assert confirmed == [data[-1000:]]  # the tail went after it was confirmed
    assert progress == [1_000_000, 2_000_000, 2_999_000, 3_000_000]
    stored = ims.get_image(image.id)
    assert stored.status == "active"
    assert (stored.size, stored.checksum, stored.os_hash_value) == (
        len(data), hashlib.md5(data).hexdigest(), hashlib.sha512(data).hexdigest())


def test_the_sendfile_put_carries_the_token_and_a_content_length(ims, session_sim, tmp_path):
    path, sealed, _ = sealed_file(tmp_path, b"abc" * 1000)
    image = ims.create_image(name="x", disk_format="raw")
    with open(path, "rb") as f:
        ims.upload_file(image.id, f, 3000, sealed=sealed)
    assert ims.get_image(image.id).status == "active"  # the simulator wants X-Auth-Token on every call
    [put] = [r for r in session_sim.requests_seen() if r["method"] == "PUT"]
    assert put["status"] == 204


def test_a_sealed_file_goes_through_requests_where_sendfile_does_not_apply(ims, tmp_path):
    class OwnTransport(requests.adapters.HTTPAdapter):
        pass

    ims.session.mount("http://", OwnTransport())  # as over TLS or a proxy: requests sends it
    data = os.urandom(100_000)
    path, sealed, confirmed = sealed_file(tmp_path, data)
    image = ims.create_image(name="x", disk_format="raw")
    with open(path, "rb") as f:
        result = ims.upload_file(image.id, f, len(data), sealed=sealed, buffer_size=30_000)
    assert result.md5 == hashlib.md5(data).hexdigest() and confirmed == [data[-1000:]]
    assert ims.get_image(image.id).checksum == result.md5


@pytest.mark.parametrize("transport", ["sendfile", "requests"])
def test_a_seal_that_breaks_stops_the_put_before_its_last_byte(ims, session_sim, tmp_path, transport):
    if transport == "requests":
        ims.session.mount("http://", type("OwnTransport", (requests.adapters.HTTPAdapter,), {})())

    def confirm(tail):
        raise FileChanged("the seal broke")

    path, sealed, _ = sealed_file(tmp_path, os.urandom(2_000_000), confirm=confirm)
    image = ims.create_image(name="x", disk_format="raw")
    with pytest.raises(FileChanged), open(path, "rb") as f:
        ims.upload_file(image.id, f, 2_000_000, sealed=sealed)
    assert settled_status(ims, session_sim, image.id) == "queued"  # IMS never got a whole file


def test_returning_false_from_progress_aborts_a_sealed_put(ims, session_sim, tmp_path, monkeypatch):
    monkeypatch.setattr(SealedBody, "SLICE_SIZE", 100_000)
    path, sealed, confirmed = sealed_file(tmp_path, os.urandom(1_000_000))
    image = ims.create_image(name="x", disk_format="raw")
    with pytest.raises(CloudError) as error, open(path, "rb") as f:
        ims.upload_file(image.id, f, 1_000_000, on_progress=lambda sent: False, sealed=sealed)
    assert error.value.code == "aborted" and confirmed == []
    assert settled_status(ims, session_sim, image.id) == "queued"


def test_a_sealed_put_that_the_server_refuses_early_is_explained(ims, tmp_path):
    path, sealed, _ = sealed_file(tmp_path, os.urandom(5_000_000))
    image = ims.create_image(name="x", disk_format="raw")
    ims.upload_file(image.id, io.BytesIO(b"abc"), 3)
    with pytest.raises(CloudError) as error, open(path, "rb") as f:
        ims.upload_file(image.id, f, 5_000_000, sealed=sealed)
    assert error.value.status == 409 and error.value.code == "conflict"


def test_a_server_error_on_a_sealed_put_is_temporary(ims, session_sim, tmp_path):
    path, sealed, _ = sealed_file(tmp_path, b"abc")
    image = ims.create_image(name="x", disk_format="raw")
    session_sim.set_faults(fail_puts=1)
    with pytest.raises(CloudError) as error, open(path, "rb") as f:
        ims.upload_file(image.id, f, 3, sealed=sealed)
    assert error.value.status == 500 and not error.value.permanent


def test_a_cut_connection_during_a_sealed_put_is_temporary(ims, session_sim, tmp_path):
    path, sealed, _ = sealed_file(tmp_path, os.urandom(5_000_000))
    image = ims.create_image(name="x", disk_format="raw")
    session_sim.set_faults(cut_put_after_bytes=50_000)
    with pytest.raises(CloudError) as error, open(path, "rb") as f:
        ims.upload_file(image.id, f, 5_000_000, sealed=sealed)
    assert error.value.code == "network" and not error.value.permanent
    assert "broke after" in error.value.message


def test_an_unreachable_ims_is_a_network_error_for_a_sealed_put(tmp_path):
    path, sealed, _ = sealed_file(tmp_path, b"abc")
    with pytest.raises(CloudError) as error, open(path, "rb") as f:
        ImsClient("http://127.0.0.1:9", "t").upload_file("x", f, 3, sealed=sealed)
    assert error.value.code == "network" and not error.value.permanent


def test_sendfile_is_not_used_over_https_or_through_a_proxy(monkeypatch):
    session = requests.Session()
    assert httpput.applies(session, "http://ims.example/v2/images/x/file")
    assert not httpput.applies(session, "https://ims.example/v2/images/x/file")
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    assert not httpput.applies(session, "http://ims.example/v2/images/x/file")
    monkeypatch.setenv("NO_PROXY", "ims.example")
    assert httpput.applies(session, "http://ims.example/v2/images/x/file")
