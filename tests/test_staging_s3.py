"""Staging in S3-compatible object storage (uploads/staging/s3.py) against a real Swift with s3api
on loopback: tus into a multipart upload, reading back by streaming, and the clean-up."""

import hashlib
import io
import os
from datetime import timedelta

import pytest
from django.utils import timezone

from tests.s3_fixture import PART, multipart_uploads_under, objects_under
from tests.test_tus import create, patch
from uploads import services, staging
from uploads.models import StagedMultipart, Status, Upload

pytestmark = pytest.mark.usefixtures("object_staging")


@pytest.fixture
def tus_client(alice_with_token, client):
    client.force_login(alice_with_token)
    return client


def new_upload(tus_client, length: int) -> str:
    response = create(tus_client, length=length)
    assert response.status_code == 201, response.content
    return response["Location"]


def send(tus_client, url: str, data: bytes, chunk_sizes: list[int]) -> int:
    """PATCH `data` in chunks of the given sizes (the last repeats); returns the final offset."""
    offset, sizes = 0, list(chunk_sizes)
    while offset < len(data):
        size = sizes.pop(0) if len(sizes) > 1 else sizes[0]
        response = patch(tus_client, url, data[offset: offset + size], offset)
        assert response.status_code == 204, response.content
        offset = int(response["Upload-Offset"])
    return offset


def head_offset(tus_client, url: str) -> int:
    response = tus_client.head(url, headers={"Tus-Resumable": "1.0.0"})
    assert response.status_code == 200
    return int(response["Upload-Offset"])


def stored(store, upload: Upload) -> bytes:
    return store.client().get_object(Bucket=store.bucket, Key=store.prefix + upload.staged_name)["Body"].read()


@pytest.mark.parametrize("chunk_sizes", [
    [PART - 1],  # never a whole part per PATCH: every part starts with an incomplete one
    [PART + 1],
    [1, PART - 1, PART + 1, 3 * PART + 7],
    [3 * PART],  # several parts in one PATCH, the last one short
], ids=["part-1", "part+1", "mixed", "three-parts"])
def test_a_tus_upload_becomes_one_object_whatever_the_patch_sizes(tus_client, object_staging, chunk_sizes):
    data = os.urandom(3 * PART + 12345)
    url = new_upload(tus_client, len(data))
    assert send(tus_client, url, data, chunk_sizes) == len(data)
    upload = Upload.objects.get()
    assert upload.status == Status.RECEIVED
    assert stored(object_staging, upload) == data
    # Completed: no multipart upload, no incomplete part, no state left behind.
    assert multipart_uploads_under(object_staging, object_staging.prefix) == []
    assert objects_under(object_staging, object_staging.prefix) == {upload.staged_name: len(data)}
    assert not StagedMultipart.objects.exists()
    assert staging.size(upload.staged_name) == len(data)


def test_a_200_mib_patch_lands_in_parts_of_the_part_size(tus_client, object_staging):
    data = os.urandom(200 * 1024**2 + 3)
    url = new_upload(tus_client, len(data))
    assert send(tus_client, url, data, [len(data)]) == len(data)
    upload = Upload.objects.get()
    head = object_staging.client().head_object(Bucket=object_staging.bucket,
                                               Key=object_staging.prefix + upload.staged_name)
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-41")  # 40 parts of 5 MiB and the last 3 bytes
    with staging.open_for_reading(upload.staged_name) as stream:
        assert hashlib.file_digest(stream, "md5").digest() == hashlib.md5(data).digest()


def test_head_reports_the_bytes_in_object_storage_and_the_rest_waits_in_an_incomplete_part(
    tus_client, object_staging
):
    data = os.urandom(2 * PART)
    url = new_upload(tus_client, len(data))
    patch(tus_client, url, data[: PART + 10], 0)
    assert head_offset(tus_client, url) == PART + 10
    row = StagedMultipart.objects.get()
    assert [(number, size) for number, size, _ in row.parts] == [(1, PART)]
    assert row.pending_size == 10
    pending = row.pending_key[len(object_staging.prefix):]
    assert objects_under(object_staging, object_staging.prefix) == {pending: 10}
    # The next PATCH starts its part with those 10 bytes, and the old incomplete part goes.
    response = patch(tus_client, url, data[PART + 10:], PART + 10)
    assert response.status_code == 204
    upload = Upload.objects.get()
    assert stored(object_staging, upload) == data
    assert objects_under(object_staging, object_staging.prefix) == {upload.staged_name: len(data)}


def test_a_tiny_file_and_an_empty_one_are_staged_too(tus_client, object_staging):
    url = new_upload(tus_client, 3)
    assert send(tus_client, url, b"abc", [1]) == 3
    assert stored(object_staging, Upload.objects.get()) == b"abc"


def test_a_chunk_with_a_wrong_checksum_is_not_kept_in_object_storage(tus_client, object_staging):
    import base64

    data = os.urandom(PART + 100)
    url = new_upload(tus_client, len(data))
    patch(tus_client, url, data[:50], 0)
    wrong = base64.b64encode(hashlib.sha1(b"other").digest()).decode()
    response = tus_client.generic("PATCH", url, data[50:], content_type="application/offset+octet-stream",
                                  headers={"Tus-Resumable": "1.0.0", "Upload-Offset": "50",
                                           "Upload-Checksum": f"sha1 {wrong}"})
    assert response.status_code == 460
    assert head_offset(tus_client, url) == 50
    assert patch(tus_client, url, data[50:], 50).status_code == 204
    assert stored(object_staging, Upload.objects.get()) == data


def test_cancel_mid_upload_aborts_the_multipart_upload(tus_client, object_staging, task_queue):
    data = os.urandom(PART + 10)
    url = new_upload(tus_client, len(data))
    patch(tus_client, url, data[: PART + 5], 0)
    assert multipart_uploads_under(object_staging, object_staging.prefix)
    response = tus_client.delete(url, headers={"Tus-Resumable": "1.0.0"})
    assert response.status_code == 204
    [(kind, upload_id)] = task_queue
    assert kind == "discard"
    services.upload_discard(upload_id=upload_id)
    assert multipart_uploads_under(object_staging, object_staging.prefix) == []
    assert objects_under(object_staging, object_staging.prefix) == {}
    assert not StagedMultipart.objects.exists()


def test_expiry_aborts_the_multipart_upload(tus_client, object_staging):
    url = new_upload(tus_client, PART + 10)
    patch(tus_client, url, os.urandom(7), 0)
    Upload.objects.update(receive_expires_at=timezone.now() - timedelta(seconds=1))
    assert services.staging_cleanup() == 1
    assert multipart_uploads_under(object_staging, object_staging.prefix) == []
    assert objects_under(object_staging, object_staging.prefix) == {}
    assert Upload.objects.get().status == Status.FAILED


def test_the_clean_up_aborts_old_multipart_uploads_that_no_upload_owns(tus_client, object_staging):
    client, bucket, prefix = object_staging.client(), object_staging.bucket, object_staging.prefix
    orphan = client.create_multipart_upload(Bucket=bucket, Key=prefix + "orphan.img")["UploadId"]
    client.put_object(Bucket=bucket, Key=prefix + "orphan.img.part-3-abcd", Body=b"xyz")
    url = new_upload(tus_client, PART + 10)
    patch(tus_client, url, b"12345", 0)
    owned = Upload.objects.get()

    assert staging.abort_orphans(timezone.now() - timedelta(hours=1)) == 0  # too young to tell
    assert staging.abort_orphans(timezone.now() + timedelta(seconds=5)) == 2
    assert multipart_uploads_under(object_staging, prefix) == [prefix + owned.staged_name]
    assert orphan not in str(client.list_multipart_uploads(Bucket=bucket, Prefix=prefix))
    assert list(objects_under(object_staging, prefix)) == [StagedMultipart.objects.get().pending_key[len(prefix):]]
    assert head_offset(tus_client, url) == 5


def test_a_silent_writer_is_taken_over_and_cannot_write_after(tus_client, object_staging):
    url = new_upload(tus_client, 2 * PART)
    upload = Upload.objects.get()
    silent = staging.locked_for_writing(upload.staged_name, idle_seconds=60)
    with silent:
        with pytest.raises(staging.StagingBusy):
            with staging.locked_for_writing(upload.staged_name, idle_seconds=60):
                pass
        StagedMultipart.objects.update(active_at=timezone.now() - timedelta(seconds=120))
        assert patch(tus_client, url, b"fresh", 0).status_code == 204
        with pytest.raises(staging.TakenOver):
            silent.write_at(0, io.BytesIO(b"stale"), 5)
    assert head_offset(tus_client, url) == 5


def test_the_worker_streams_the_object_and_copies_it_only_for_a_conversion(tus_client, object_staging, tmp_path):
    data = os.urandom(PART + 3)
    url = new_upload(tus_client, len(data))
    send(tus_client, url, data, [len(data)])
    name = Upload.objects.get().staged_name
    with staging.open_for_reading(name) as stream:
        assert hashlib.file_digest(stream, "md5").hexdigest() == hashlib.md5(data).hexdigest()
    assert staging.s3.read_range(name, PART, 10) == data[PART: PART + 10]
    with staging.local_copy(name) as copy:
        assert open(copy, "rb").read() == data
    assert not os.listdir(tmp_path / "scratch")  # the scratch copy is gone afterwards


def test_the_check_reads_the_object_by_ranges_pinned_to_its_etag(tus_client, object_staging):
    data = os.urandom(3 * PART + 5)
    url = new_upload(tus_client, len(data))
    send(tus_client, url, data, [len(data)])
    name = Upload.objects.get().staged_name
    image = staging.image(name)
    assert image.path is None and image.size == len(data) and image.version == staging.version(name)
    assert image.read_at(PART - 3, 10) == data[PART - 3: PART + 7]
    assert image.read_at(len(data) - 4, 100) == data[-4:]  # fewer at the end
    assert image.read_at(PART, 10) == data[PART: PART + 10] and image.gets == 2  # the second from its blocks
    with image.open() as stream:  # in order, by growing ranges
        assert stream.read() == data
    # The object is replaced: the pinned image, and a push of the checked version, read nothing of it.
    bucket, key = staging.object_location(name)
    staging.s3.client().put_object(Bucket=bucket, Key=key, Body=data[::-1])
    with pytest.raises(staging.StagedFileChanged):
        image.read_at(2 * PART + 1000, 10)
    with pytest.raises(staging.StagedFileChanged):
        staging.open_for_reading(name, image.version)


def test_parts_are_sent_while_the_next_is_received_and_in_order(tus_client, object_staging, monkeypatch):
    import threading

    real_client, threads = staging.s3.client, set()

    class Watching:
        def __getattr__(self, name):
            method = getattr(real_client(), name)
            if name != "upload_part":
                return method

            def upload_part(**kwargs):
                threads.add(threading.current_thread().name)
                return method(**kwargs)
            return upload_part

    monkeypatch.setattr(staging.s3, "client", Watching)
    data = os.urandom(4 * PART + 11)
    url = new_upload(tus_client, len(data))
    send(tus_client, url, data, [len(data)])
    assert any(name.startswith("s3-part") for name in threads)  # not the request's own thread
    assert stored(object_staging, Upload.objects.get()) == data


def test_a_store_failing_mid_patch_keeps_the_parts_it_confirmed_and_the_upload_resumes(
    tus_client, object_staging, monkeypatch
):
    from botocore.exceptions import EndpointConnectionError

    real_client = staging.s3.client

    class FailsPartThree:
        def __getattr__(self, name):
            method = getattr(real_client(), name)
            if name != "upload_part":
                return method

            def upload_part(**kwargs):
                if kwargs["PartNumber"] == 3:
                    raise EndpointConnectionError(endpoint_url="http://store")
                return method(**kwargs)
            return upload_part

    data = os.urandom(5 * PART + 3)
    url = new_upload(tus_client, len(data))
    with monkeypatch.context() as patched:
        patched.setattr(staging.s3, "client", FailsPartThree)
        response = patch(tus_client, url, data, 0)
    assert response.status_code == 503
    assert "Nothing is lost" in response.content.decode()
    row = StagedMultipart.objects.get()
    assert [(number, size) for number, size, _ in row.parts] == [(1, PART), (2, PART)] and not row.pending_key
    assert head_offset(tus_client, url) == 2 * PART  # what the store holds, no more, no less
    assert patch(tus_client, url, data[2 * PART:], 2 * PART).status_code == 204
    assert stored(object_staging, Upload.objects.get()) == data


def test_a_store_failing_at_a_patchs_last_part_keeps_the_parts_before_it(tus_client, object_staging, monkeypatch):
    from botocore.exceptions import EndpointConnectionError

    real_client = staging.s3.client

    class FailsPartThree:
        def __getattr__(self, name):
            method = getattr(real_client(), name)
            if name != "upload_part":
                return method

            def upload_part(**kwargs):
                if kwargs["PartNumber"] == 3:
                    raise EndpointConnectionError(endpoint_url="http://store")
                return method(**kwargs)
            return upload_part

    data = os.urandom(3 * PART)
    url = new_upload(tus_client, len(data))
    with monkeypatch.context() as patched:
        patched.setattr(staging.s3, "client", FailsPartThree)
        assert patch(tus_client, url, data, 0).status_code == 503  # its third part is its last
    assert head_offset(tus_client, url) == 2 * PART
    assert patch(tus_client, url, data[2 * PART:], 2 * PART).status_code == 204
    assert stored(object_staging, Upload.objects.get()) == data


# ---------------------------------------------------------------------------------------------
# The worker's side, and faults


def test_the_push_streams_from_object_storage_and_ends_ready_with_the_same_md5(
    alice_connected, sim, object_staging, monkeypatch
):
    from storages.backends.s3 import S3Storage

    from tests.test_pipeline import received_upload

    def spools_the_whole_object(*args, **kwargs):
        raise AssertionError("S3Storage.open() spools the object into memory or a temp file")

    monkeypatch.setattr(S3Storage, "open", spools_the_whole_object)
    data = bytes(512) + os.urandom(PART + 1000)
    upload = received_upload(alice_connected, data)
    assert services.upload_push(upload_id=upload.pk).retry_in is None
    upload.refresh_from_db()
    assert upload.status == Status.READY
    [image] = sim.images()
    assert image["checksum"] == hashlib.md5(data).hexdigest() == upload.md5
    assert open(image["path"], "rb").read() == data


@pytest.fixture
def proxy_down(object_staging):
    """Stops the store's S3 endpoint; brings it back afterwards whatever happens."""
    object_staging.stop(["proxy"])
    yield object_staging
    if "proxy" not in object_staging.processes:
        object_staging.start(["proxy"])


def test_object_storage_down_during_a_patch_is_a_clear_503_and_the_upload_resumes(tus_client, object_staging):
    data = os.urandom(PART + 20)
    url = new_upload(tus_client, len(data))
    assert patch(tus_client, url, data[:10], 0).status_code == 204
    object_staging.stop(["proxy"])
    try:
        response = patch(tus_client, url, data[10:], 10)
        assert response.status_code == 503
        assert response["Retry-After"] == "5"
        assert "cannot reach its file storage just now. Nothing is lost" in response.content.decode()
        assert head_offset(tus_client, url) == 10
    finally:
        object_staging.start(["proxy"])
    assert patch(tus_client, url, data[10:], 10).status_code == 204
    assert stored(object_staging, Upload.objects.get()) == data


def test_object_storage_down_during_a_push_is_a_temporary_fault_and_nothing_is_lost(
    alice_connected, sim, object_staging
):
    from tests.test_pipeline import received_upload

    data = bytes(512) + os.urandom(100_000)
    upload = received_upload(alice_connected, data)
    object_staging.stop(["proxy"])
    try:
        outcome = services.upload_push(upload_id=upload.pk)
    finally:
        object_staging.start(["proxy"])
    upload.refresh_from_db()
    assert outcome.retry_in and upload.status == Status.RECEIVED
    assert "cannot reach its file storage" in upload.error_message
    Upload.objects.filter(pk=upload.pk).update(retry_at=None)
    assert services.upload_push(upload_id=upload.pk).retry_in is None
    upload.refresh_from_db()
    assert upload.status == Status.READY and upload.md5 == hashlib.md5(data).hexdigest()


def test_a_wrong_secret_key_is_a_clear_message_and_nothing_is_created(tus_client, object_staging, settings, caplog):
    options = settings.STORAGES["staging"]["OPTIONS"]
    settings.STORAGES = {**settings.STORAGES,
                         "staging": {**settings.STORAGES["staging"], "OPTIONS": {**options, "secret_key": "wrong"}}}
    response = create(tus_client, length=10)
    assert response.status_code == 503
    assert "an administrator has to fix the storage settings" in response.content.decode()
    assert not Upload.objects.exists()
    assert "refused the portal's keys" in caplog.text and "wrong" not in caplog.text


def test_a_patch_large_enough_for_a_part_never_waits_in_an_incomplete_part(tus_client, object_staging, settings):
    settings.STAGING_S3_PART_SIZE = 3 * PART  # parts are cut at 15 MiB, but may be as small as 5 MiB
    data = os.urandom(4 * PART)
    url = new_upload(tus_client, len(data))
    patch(tus_client, url, data[: PART + 7], 0)
    row = StagedMultipart.objects.get()
    assert [size for _, size, _ in row.parts] == [PART + 7] and not row.pending_key
    assert objects_under(object_staging, object_staging.prefix) == {}
    assert patch(tus_client, url, data[PART + 7:], PART + 7).status_code == 204
    assert stored(object_staging, Upload.objects.get()) == data


def test_parts_grow_so_that_the_file_fits_in_the_stores_most_parts(tus_client, object_staging, settings):
    settings.STAGING_S3_MAX_PARTS = 2
    data = os.urandom(3 * PART + 1)
    url = new_upload(tus_client, len(data))
    patch(tus_client, url, data[: 2 * PART], 0)
    half = len(data) // 2 + 1
    assert [size for _, size, _ in StagedMultipart.objects.get().parts] == [half]  # not 5 MiB: 4 would not fit
    assert patch(tus_client, url, data[2 * PART:], 2 * PART).status_code == 204
    upload = Upload.objects.get()
    head = object_staging.client().head_object(Bucket=object_staging.bucket,
                                               Key=object_staging.prefix + upload.staged_name)
    assert head["ETag"].strip('"').endswith("-2")
    assert stored(object_staging, upload) == data


def test_the_deploy_check_names_a_wrong_secret_key_and_a_missing_bucket(object_staging, settings):
    from uploads.staging.checks import check_object_storage

    assert check_object_storage(None) == []
    options = settings.STORAGES["staging"]["OPTIONS"]
    settings.STORAGES = {**settings.STORAGES, "staging": {**settings.STORAGES["staging"],
                                                          "OPTIONS": {**options, "secret_key": "wrong"}}}
    [error] = check_object_storage(None)
    assert error.id == "uploads.E011" and "STAGING_S3_SECRET_KEY" in error.msg
    settings.STORAGES = {**settings.STORAGES, "staging": {**settings.STORAGES["staging"],
                                                          "OPTIONS": {**options, "bucket_name": "nowhere"}}}
    [error] = check_object_storage(None)
    assert error.id == "uploads.E010"


def test_a_request_that_died_after_completing_the_upload_is_no_dead_end(tus_client, object_staging, monkeypatch):
    """The multipart upload completed, then the process died before it recorded the offset: the
    client sends the end again (from the offset HEAD gives) and the upload goes on. (Swift still
    takes parts of a completed upload; S3 and OBS answer NoSuchUpload, as the store here does.)"""
    from botocore.exceptions import ClientError

    real_client = staging.s3.client

    class AsS3Does:
        def __getattr__(self, name):
            method = getattr(real_client(), name)
            if name not in ("upload_part", "complete_multipart_upload"):
                return method

            def refused(**kwargs):
                if kwargs["UploadId"] in completed:
                    raise ClientError({"Error": {"Code": "NoSuchUpload"}}, name)
                return method(**kwargs)
            return refused

    completed = set()
    monkeypatch.setattr(staging.s3, "client", AsS3Does)
    data = os.urandom(PART + 100)
    url = new_upload(tus_client, len(data))
    patch(tus_client, url, data[:PART], 0)
    row = StagedMultipart.objects.get()
    upload = Upload.objects.get()
    client, bucket, key = object_staging.client(), object_staging.bucket, object_staging.prefix + upload.staged_name
    last = client.upload_part(Bucket=bucket, Key=key, UploadId=row.multipart_id, PartNumber=2, Body=data[PART:])
    client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=row.multipart_id, MultipartUpload={"Parts": [
        {"PartNumber": 1, "ETag": row.parts[0][2]}, {"PartNumber": 2, "ETag": last["ETag"]}]})
    completed.add(row.multipart_id)
    assert head_offset(tus_client, url) == PART
    response = patch(tus_client, url, data[PART:], PART)
    assert response.status_code == 204, response.content
    assert Upload.objects.get().status == Status.RECEIVED
    assert stored(object_staging, upload) == data and not StagedMultipart.objects.exists()
