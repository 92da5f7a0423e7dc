"""The tus 1.0.0 server at /tus/: core protocol, creation, termination, expiration."""

import base64
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from uploads import services
from uploads.models import Status, Upload

# Each test runs with local staging and with object staging (tests/s3_fixture.py).
pytestmark = pytest.mark.usefixtures("staging_backend")

TUS = {"Tus-Resumable": "1.0.0"}
OCTETS = "application/offset+octet-stream"


def metadata(**fields) -> str:
    return ",".join(f"{k} {base64.b64encode(str(v).encode()).decode()}" for k, v in fields.items())


def create(client, length=10, **fields):
    fields.setdefault("filename", "disk.qcow2")
    return client.post(
        "/tus/", headers={**TUS, "Upload-Length": str(length), "Upload-Metadata": metadata(**fields)}
    )


def patch(client, url, data: bytes, offset: int, content_type=OCTETS):
    return client.generic(
        "PATCH", url, data, content_type=content_type, headers={**TUS, "Upload-Offset": str(offset)}
    )


@pytest.fixture
def tus_client(alice_with_token, client):
    client.force_login(alice_with_token)
    return client


def test_options_tells_what_the_server_can_do(client):
    response = client.options("/tus/")
    assert response.status_code == 204
    assert response["Tus-Version"] == "1.0.0"
    assert set(response["Tus-Extension"].split(",")) == {"creation", "termination", "expiration", "checksum"}
    assert "sha1" in response["Tus-Checksum-Algorithm"].split(",")
    assert response["Tus-Max-Size"] == str(128 * 1024**3 - 1)


def test_it_requires_sign_in(client):
    assert create(client).status_code == 403


def test_it_refuses_without_a_cloud_account(alice_client):
    response = create(alice_client)
    assert response.status_code == 403
    assert "Connect your cloud account" in response.content.decode()
    assert "/cloud/" in response.content.decode()
    assert not Upload.objects.exists()


def test_it_refuses_with_an_expired_cloud_account(tus_client, alice_with_token):
    alice_with_token.cloud_account.expires_at = timezone.now() - timedelta(minutes=1)
    alice_with_token.cloud_account.save()
    assert create(tus_client).status_code == 403


def test_creation_makes_the_upload_row_and_a_staged_file(tus_client, staging_dir):
    response = create(
        tus_client, length=1234, filename="web server.qcow2", image_name="web-server",
        os_version="Ubuntu 22.04 server 64bit", min_disk="40", min_ram="1024", tags="team=web, env=prod",
    )
    assert response.status_code == 201
    assert response["Tus-Resumable"] == "1.0.0"
    assert "Upload-Expires" in response
    upload = Upload.objects.get()
    assert response["Location"].endswith(f"/tus/{upload.uid}")
    assert (upload.name, upload.filename, upload.disk_format) == ("web-server", "web server.qcow2", "qcow2")
    assert (upload.os_version, upload.min_disk, upload.min_ram) == ("Ubuntu 22.04 server 64bit", 40, 1024)
    assert upload.tags == ["team=web", "env=prod"]
    assert upload.status == Status.RECEIVING and upload.size == 1234
    # The staged file has a name the server made, never the user's file name.
    assert [p.name for p in staging_dir.iterdir()] == [f"{upload.uid}.img"]


def test_defaults_come_from_the_file_name(tus_client):
    assert create(tus_client, filename="../../etc/centos7.VMDK").status_code == 201
    upload = Upload.objects.get()
    assert (upload.name, upload.filename, upload.disk_format) == ("centos7", "centos7.VMDK", "vmdk")


@pytest.mark.parametrize(
    "length, fields, status, words",
    [
        (0, {}, 400, "empty"),
        (128 * 1024**3, {}, 413, "128 GB"),
        (10, {"filename": "notes.txt"}, 400, "not a disk image"),
        (10, {"image_name": "x" * 256}, 400, "at most 255"),
        (10, {"tags": "<b>bad tag</b>"}, 400, "Tag"),
        (10, {"min_disk": "2000"}, 400, "1024"),
        (10, {"disk_format": "exe"}, 400, "valid choice"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(tus_client, length, fields, status, words):
    response = create(tus_client, length=length, **fields)
    assert response.status_code == status
    assert words in response.content.decode()
    assert not Upload.objects.exists()


def test_it_requires_the_tus_version_header(tus_client):
    response = tus_client.post("/tus/", headers={"Upload-Length": "10", "Upload-Metadata": metadata(filename="a.raw")})
    assert response.status_code == 412


def test_bad_metadata_encoding_is_refused(tus_client):
    response = tus_client.post("/tus/", headers={**TUS, "Upload-Length": "10", "Upload-Metadata": "filename !!!"})
    assert response.status_code == 400


def test_head_then_patch_then_head(tus_client, staging_dir):
    url = create(tus_client, length=10)["Location"]
    head = tus_client.head(url, headers=TUS)
    assert head.status_code == 200
    assert (head["Upload-Offset"], head["Upload-Length"]) == ("0", "10")
    assert head["Cache-Control"] == "no-store"
    response = patch(tus_client, url, b"hello", 0)
    assert response.status_code == 204
    assert response["Upload-Offset"] == "5"
    assert tus_client.head(url, headers=TUS)["Upload-Offset"] == "5"
    upload = Upload.objects.get()
    assert upload.received_bytes == 5 and upload.status == Status.RECEIVING
    assert (staging_dir / upload.staged_name).read_bytes() == b"hello"


def test_the_last_chunk_completes_the_upload(tus_client, staging_dir, django_capture_on_commit_callbacks):
    url = create(tus_client, length=10)["Location"]
    patch(tus_client, url, b"hello", 0)
    with django_capture_on_commit_callbacks() as callbacks:
        assert patch(tus_client, url, b"world", 5).status_code == 204
    upload = Upload.objects.get()
    assert upload.status == Status.RECEIVED
    assert (staging_dir / upload.staged_name).read_bytes() == b"helloworld"
    assert "All bytes received" in [e.message for e in upload.events.all()]
    assert len(callbacks) == 1  # the push is queued once the row is committed


def test_a_wrong_offset_is_409(tus_client):
    url = create(tus_client, length=10)["Location"]
    patch(tus_client, url, b"hello", 0)
    response = patch(tus_client, url, b"world", 3)
    assert response.status_code == 409
    assert response["Upload-Offset"] == "5"
    assert Upload.objects.get().received_bytes == 5


def test_a_chunk_past_the_length_is_refused(tus_client, staging_dir):
    url = create(tus_client, length=4)["Location"]
    response = patch(tus_client, url, b"hello", 0)
    assert response.status_code == 413
    upload = Upload.objects.get()
    assert upload.received_bytes == 0
    assert (staging_dir / upload.staged_name).read_bytes() == b""


def test_patch_needs_the_tus_content_type(tus_client):
    url = create(tus_client, length=10)["Location"]
    assert patch(tus_client, url, b"hello", 0, content_type="application/json").status_code == 415


def test_another_users_upload_is_404(tus_client, bob):
    url = create(tus_client, length=10)["Location"]
    other = Client()
    other.force_login(bob)
    assert other.head(url, headers=TUS).status_code == 404
    assert patch(other, url, b"hello", 0).status_code == 404
    assert other.delete(url, headers=TUS).status_code == 404
    assert Upload.objects.get().status == Status.RECEIVING


def test_signed_out_is_404(tus_client, client):
    url = create(tus_client, length=10)["Location"]
    assert Client().head(url, headers=TUS).status_code == 404


def test_delete_terminates_the_upload(tus_client, staging_dir):
    url = create(tus_client, length=10)["Location"]
    patch(tus_client, url, b"hello", 0)
    assert tus_client.delete(url, headers=TUS).status_code == 204
    upload = Upload.objects.get()
    assert upload.status == Status.CANCELLED
    services.upload_discard(upload_id=upload.pk)  # what the queued task does
    assert not (staging_dir / upload.staged_name).exists()
    assert tus_client.head(url, headers=TUS).status_code == 410
    assert patch(tus_client, url, b"world", 5).status_code == 409


def test_an_expired_upload_is_gone(tus_client, staging_dir):
    url = create(tus_client, length=10)["Location"]
    Upload.objects.update(receive_expires_at=timezone.now() - timedelta(seconds=1))
    assert tus_client.head(url, headers=TUS).status_code == 410
    upload = Upload.objects.get()
    assert upload.status == Status.FAILED and upload.error_code == "expired"
    assert "expired" in upload.error_message
    assert not (staging_dir / upload.staged_name).exists()


def test_csrf_is_checked_on_tus_requests(alice_with_token):
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(alice_with_token)
    assert create(strict).status_code == 403
    assert not Upload.objects.exists()


def test_a_second_writer_at_the_same_time_is_told_to_wait(tus_client):
    from uploads import staging

    url = create(tus_client, length=10)["Location"]
    with staging.locked_for_writing(Upload.objects.get().staged_name):
        response = patch(tus_client, url, b"hello", 0)
    assert response.status_code == 423
    assert Upload.objects.get().received_bytes == 0


def test_a_full_staging_disk_is_refused_and_the_upload_stays_resumable(tus_client, monkeypatch, staging_dir):
    import errno

    from uploads import staging

    url = create(tus_client, length=10)["Location"]
    patch(tus_client, url, b"hello", 0)

    def disk_full(staged, chunk):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(staging.local, "_write_all", disk_full)
    response = patch(tus_client, url, b"world", 5)
    assert response.status_code == 507
    assert "staging disk is full" in response.content.decode()
    monkeypatch.undo()
    assert tus_client.head(url, headers=TUS)["Upload-Offset"] == "5"
    assert patch(tus_client, url, b"world", 5).status_code == 204


def checksum_header(data: bytes, algorithm: str = "sha1") -> str:
    import hashlib

    return f"{algorithm} {base64.b64encode(hashlib.new(algorithm, data).digest()).decode()}"


def test_a_chunk_with_a_matching_checksum_is_kept(tus_client, staging_dir):
    url = create(tus_client, length=10)["Location"]
    response = tus_client.generic("PATCH", url, b"hello", content_type=OCTETS,
                                  headers={**TUS, "Upload-Offset": "0", "Upload-Checksum": checksum_header(b"hello")})
    assert response.status_code == 204 and response["Upload-Offset"] == "5"


def test_a_chunk_with_a_wrong_checksum_is_460_and_not_kept(tus_client, staging_dir):
    url = create(tus_client, length=10)["Location"]
    response = tus_client.generic("PATCH", url, b"hellO", content_type=OCTETS,
                                  headers={**TUS, "Upload-Offset": "0", "Upload-Checksum": checksum_header(b"hello")})
    assert response.status_code == 460
    upload = Upload.objects.get()
    assert upload.received_bytes == 0
    assert (staging_dir / upload.staged_name).read_bytes() == b""
    assert tus_client.head(url, headers=TUS)["Upload-Offset"] == "0"


def test_an_unknown_checksum_algorithm_is_400(tus_client):
    url = create(tus_client, length=10)["Location"]
    response = tus_client.generic("PATCH", url, b"hello", content_type=OCTETS,
                                  headers={**TUS, "Upload-Offset": "0", "Upload-Checksum": "crc32 AAAA"})
    assert response.status_code == 400
