"""Before a byte leaves: the worker checks what each file really is, converts what IMS does not
take, refuses what is unsafe or mislabelled (with a one-click fix), and checks again while sending."""

import hashlib
import io
import os
import subprocess
from pathlib import Path

import pytest

from uploads import qemu, services, staging
from uploads.models import Status, Upload

# Each test runs with local staging and with object staging (tests/s3_fixture.py).
pytestmark = [
    pytest.mark.skipif(not Path("/usr/bin/qemu-img").exists(), reason="needs qemu-img (qemu-utils)"),
    pytest.mark.usefixtures("staging_backend"),
]


def qemu_img(*args):
    subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True)


@pytest.fixture
def disk(tmp_path):
    """A raw disk with some data in it, to convert into any format."""
    path = tmp_path / "disk.raw"
    with open(path, "wb") as out:
        out.truncate(3 * 1024**3 + 5)  # a 3 GiB disk (sparse): min_disk must become 4 GB
        out.seek(1024 * 1024)
        out.write(os.urandom(512 * 1024))
    return path


def received(owner, path: Path, disk_format: str, min_disk: int = 0) -> Upload:
    data = path.read_bytes()
    upload = services.upload_create(owner=owner, size=len(data), filename=f"{path.stem}.{disk_format}",
                                    name=path.stem, disk_format=disk_format, min_disk=min_disk)
    services.upload_receive(upload=upload, offset=0, stream=io.BytesIO(data), length=len(data))
    return upload


def ims_requests(sim) -> list[dict]:
    return [r for r in sim.requests_seen() if r["path"].startswith("/v2")]


def test_a_qcow2_is_checked_sent_as_is_and_min_disk_covers_its_disk(alice_connected, sim, disk, tmp_path):
    image = tmp_path / "web.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", disk, image)
    upload = received(alice_connected, image, "qcow2", min_disk=1)
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.READY, upload.error_message
    assert (upload.detected_format, upload.send_format, upload.min_disk) == ("qcow2", "qcow2", 4)
    assert upload.virtual_size >= 3 * 1024**3 + 5  # qemu-img rounds the disk up to whole sectors
    assert upload.inspection["checks"]["format_matches"] == "passed"
    [stored] = sim.images()
    assert stored["checksum"] == hashlib.md5(image.read_bytes()).hexdigest()
    messages = [e.message for e in upload.events.all()]
    assert "Checked the file: a QCOW2 disk of 3.0 GB" in messages
    assert "Min disk raised to 4 GB from 1 GB to hold the disk inside the file (3.0 GB)" in messages


def test_a_vmdk_is_converted_to_qcow2_first(alice_connected, sim, disk, tmp_path, staging_dir):
    image = tmp_path / "legacy.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", disk, image)
    upload = received(alice_connected, image, "vmdk")
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.READY, upload.error_message
    assert (upload.detected_format, upload.send_format) == ("vmdk", "qcow2")
    converted = staging_dir / upload.converted_name
    assert upload.send_size == converted.stat().st_size
    [stored] = sim.images()
    assert stored["checksum"] == hashlib.md5(converted.read_bytes()).hexdigest() == upload.md5
    assert any(e.message.startswith("Converting the VMDK file to QCOW2") for e in upload.events.all())
    # After the retention time, the clean-up removes the converted copy with the staged one.
    Upload.objects.filter(pk=upload.pk).update(finished_at=upload.created_at.replace(year=2000))
    services.staging_cleanup()
    assert not converted.exists() and not (staging_dir / upload.staged_name).exists()


def test_a_mislabelled_file_is_refused_with_a_one_click_fix(alice_connected, sim, disk, tmp_path, client):
    image = tmp_path / "really-qcow2.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", disk, image)
    upload = received(alice_connected, image, "vmdk")
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.REFUSED and upload.error_code == "format_mismatch"
    assert upload.error_message == "This file is a QCOW2 disk, not VMDK — upload it as QCOW2?"
    assert ims_requests(sim) == []  # refused before any request to IMS

    client.force_login(alice_connected)
    assert client.get(f"/uploads/{upload.uid}/status").json()["suggested_format"] == "qcow2"
    assert "Upload it as QCOW2" in client.get("/uploads/").content.decode()
    response = client.post(f"/uploads/{upload.uid}/use-format", {"disk_format": "qcow2"})
    assert response.status_code == 302
    upload.refresh_from_db()
    assert (upload.status, upload.disk_format) == (Status.RECEIVED, "qcow2")
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.READY


def test_the_one_click_fix_accepts_only_the_detected_format(alice_connected, sim, disk, tmp_path):
    image = tmp_path / "really-qcow2.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", disk, image)
    upload = received(alice_connected, image, "vmdk")
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    with pytest.raises(services.ServiceError):
        services.upload_use_format(upload=upload, disk_format="raw", by="alice")


def test_a_qcow2_pointing_at_a_server_file_is_refused_before_any_request(alice_connected, sim, tmp_path):
    image = tmp_path / "hostile.qcow2"
    qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", "/etc/passwd", image, "1G")
    upload = received(alice_connected, image, "qcow2")
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.REFUSED and upload.error_code == "backing_file"
    assert "/etc/passwd" not in upload.error_message  # technical detail is for admins only
    assert any("/etc/passwd" in e.detail for e in upload.events.all())
    assert ims_requests(sim) == []


@pytest.mark.parametrize("second", ["shadow", "neighbour", "./neighbour", "NEIGHBOUR", "own server name",
                                    "absolute neighbour"])
def test_a_vmdk_naming_a_second_extent_never_reaches_qemu_img_nor_ims(alice_connected, bob, sim, tmp_path,
                                                                    staging_dir, monkeypatch, second):
    """Issue 14: a monolithicSparse VMDK whose descriptor adds `RW 2048 FLAT "<name>" 0` to its
    own extent, the name pointing next to it in staging (another person's upload)."""
    from tests.test_inspect import replace_embedded_descriptor, vmdk_descriptor

    neighbour = services.upload_create(owner=bob, size=6, filename="theirs.raw", name="theirs",
                                       disk_format="raw", min_disk=0)
    services.upload_receive(upload=neighbour, offset=0, stream=io.BytesIO(b"theirs"), length=6)
    sparse = tmp_path / "sparse.vmdk"
    qemu_img("create", "-f", "vmdk", sparse, "4M")  # 8192 sectors
    data = sparse.read_bytes()
    upload = services.upload_create(owner=alice_connected, size=len(data), filename="two-extents.vmdk",
                                    name="two-extents", disk_format="vmdk", min_disk=0)
    name = {"neighbour": neighbour.staged_name, "./neighbour": f"./{neighbour.staged_name}",
            "NEIGHBOUR": neighbour.staged_name.upper(), "own server name": upload.staged_name,
            "absolute neighbour": str(staging_dir / neighbour.staged_name)}.get(second, second)
    extents = f'RW 8192 SPARSE "two-extents.vmdk"\nRW 2048 FLAT "{name}" 0'
    replace_embedded_descriptor(sparse, tmp_path / "two-extents.vmdk", vmdk_descriptor(extents))
    hostile = (tmp_path / "two-extents.vmdk").read_bytes()
    services.upload_receive(upload=upload, offset=0, stream=io.BytesIO(hostile), length=len(hostile))

    def no_qemu_img(*args, **kwargs):
        raise AssertionError("qemu-img ran on the hostile file")

    monkeypatch.setattr(qemu, "_run_limited", no_qemu_img)
    monkeypatch.setattr(qemu, "_run_with_progress", no_qemu_img)
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.REFUSED and upload.error_code == "data_file", upload.error_message
    assert upload.error_message == (
        "This disk image keeps its data in other files, so the file you chose is not the whole disk."
    )
    assert name not in upload.error_message + upload.error_hint
    assert ims_requests(sim) == []
    assert (staging_dir / neighbour.staged_name).read_bytes() == b"theirs"


def test_random_bytes_named_qcow2_are_refused(alice_connected, sim, tmp_path):
    image = tmp_path / "random.qcow2"
    image.write_bytes(os.urandom(100_000))
    upload = received(alice_connected, image, "qcow2")
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.REFUSED
    assert "QCOW2" in upload.error_message and upload.error_hint
    assert ims_requests(sim) == []


def test_a_file_that_changes_after_the_check_is_stopped_mid_send(alice_connected, sim, disk, tmp_path,
                                                                  staging_dir, monkeypatch):
    image = tmp_path / "web.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", disk, image)
    upload = received(alice_connected, image, "qcow2")
    original = services.images.prepare_image

    def overwrite_then_prepare(upload, client, attempt):
        with open(staging_dir / upload.staged_name, "r+b") as staged:
            staged.write(b"KDMV" + bytes(508))  # now it starts like a VMDK
        return original(upload, client, attempt)

    monkeypatch.setattr(services.images, "prepare_image", overwrite_then_prepare)
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.FAILED and upload.error_code == "file_changed"
    assert sim.images() == []  # the half-sent image was deleted


def test_the_owner_sees_the_sha512_of_the_file_they_uploaded(alice_connected, sim, disk, tmp_path, client):
    image = tmp_path / "legacy.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", disk, image)
    upload = received(alice_connected, image, "vmdk")
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    own = hashlib.sha512(image.read_bytes()).hexdigest()
    assert upload.staged_sha512 == own and upload.sha512 != own  # the converted copy was sent
    client.force_login(alice_connected)
    page = client.get(f"/uploads/{upload.uid}/").content.decode()
    assert own in page and "SHA-512 of your file" in page
    assert "sent to IMS as QCOW2: converted" in page
    assert "Disk inside the file" in page


def test_without_conversion_the_sent_bytes_are_the_uploaded_file(alice_connected, sim, disk, tmp_path):
    image = tmp_path / "web.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", disk, image)
    upload = received(alice_connected, image, "qcow2")
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.staged_sha512 == upload.sha512 == hashlib.sha512(image.read_bytes()).hexdigest()


def test_a_token_that_would_not_last_the_converted_file_waits_for_reconnect(alice_connected, sim, disk, tmp_path,
                                                                          monkeypatch):
    image = tmp_path / "legacy.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", disk, image)
    upload = received(alice_connected, image, "vmdk")
    asked = []
    original = services.cloud.why_token_cannot_push

    def lasts_only_for_the_original(token, upload):
        asked.append(upload.send_size)
        if upload.converted_name:  # asked again about the converted copy: not long enough
            return "Your cloud sign-in ends before the converted file could be sent."
        return original(token, upload)

    monkeypatch.setattr(services.cloud, "why_token_cannot_push", lasts_only_for_the_original)
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.RECONNECT, f"{upload.error_message} {upload.events.last().detail}"
    assert upload.error_message == "Your cloud sign-in ends before the converted file could be sent."
    assert [r for r in sim.requests_seen() if r["path"].startswith("/v2")] == []


@pytest.fixture
def small_staging_disk(tmp_path, settings):
    """A 64 MiB file system (tmpfs) as the staging folder: a disk that fills up for real."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    settings.STORAGES = {**settings.STORAGES, "staging": {
        "BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": str(folder)}}}
    settings.STAGING_FREE_RESERVE_BYTES = 0  # the whole small disk is for the test
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_no_room_to_convert_is_explained_and_the_file_kept_for_retry(alice_connected, sim, disk, tmp_path,
                                                                   small_staging_disk):
    image = tmp_path / "legacy.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", disk, image)  # a 3 GiB disk in a small file
    upload = received(alice_connected, image, "vmdk")
    assert services.upload_push(upload_id=upload.pk).retry_in  # maybe there is room later
    upload.refresh_from_db()
    assert upload.status == Status.RECEIVED
    assert upload.error_message == "There is not enough free disk space on the server to convert this image."
    for _ in range(services.MAX_PUSH_ATTEMPTS - 1):
        services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.FAILED and upload.can_retry
    assert (small_staging_disk / upload.staged_name).read_bytes() == image.read_bytes()  # kept for Retry
    assert not list(small_staging_disk.glob("*.qcow2"))
    assert [r for r in sim.requests_seen() if r["path"].startswith("/v2")] == []


def test_ims_storing_something_else_fails_the_upload_and_deletes_the_image(alice_connected, sim, disk, tmp_path,
                                                                          monkeypatch):
    from uploads.ims import ImsClient

    image = tmp_path / "web.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", disk, image)
    upload = received(alice_connected, image, "qcow2")
    original = ImsClient.get_image

    def corrupted(self, image_id):
        found = original(self, image_id)
        if found.status == "active":
            found.checksum = "0" * 32
        return found

    monkeypatch.setattr(ImsClient, "get_image", corrupted)
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.FAILED and upload.error_code == "checksum_mismatch"
    assert upload.error_message == "The cloud stored something other than what you uploaded."
    assert upload.can_retry and sim.images() == []


def test_small_disks_are_described_in_human_sizes(alice_connected, sim, tmp_path):
    image = tmp_path / "tiny.qcow2"
    qemu_img("create", "-f", "qcow2", image, "16M")
    upload = received(alice_connected, image, "qcow2")
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.READY, upload.error_message
    messages = [e.message for e in upload.events.all()]
    assert "Checked the file: a QCOW2 disk of 16 MB" in messages
    assert "Min disk raised to 1 GB, the smallest the cloud takes: the disk inside the file is 16 MB" in messages


def test_a_converted_file_is_pushed_with_one_lookup_of_the_token(alice_connected, sim, disk, tmp_path, monkeypatch):
    from uploads import crypto

    image = tmp_path / "legacy.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", disk, image)
    upload = received(alice_connected, image, "vmdk")
    decrypted = []
    original = crypto.decrypt
    monkeypatch.setattr(crypto, "decrypt", lambda value: decrypted.append(value) or original(value))
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.READY and upload.converted_name
    assert len(decrypted) == 2  # the push's one lookup (asked again after converting), and the first poll's


def test_a_converted_file_is_sent_and_matches_what_staging_holds(alice_connected, sim, disk, tmp_path):
    image = tmp_path / "legacy.vdi"
    qemu_img("convert", "-f", "raw", "-O", "vdi", disk, image)
    upload = received(alice_connected, image, "vdi")
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.READY, upload.error_message
    assert (upload.detected_format, upload.send_format) == ("vdi", "qcow2")
    with staging.open_for_reading(upload.converted_name) as converted:
        sent = hashlib.md5(converted.read()).hexdigest()
    [stored] = sim.images()
    assert stored["checksum"] == sent == upload.md5
    assert upload.checked_file == {upload.staged_name: staging.version(upload.staged_name),
                                   upload.converted_name: staging.version(upload.converted_name)}


def test_the_check_makes_no_local_copy_of_a_file_it_does_not_convert(alice_connected, sim, disk, tmp_path,
                                                                     monkeypatch):
    image = tmp_path / "web.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", disk, image)
    upload = received(alice_connected, image, "qcow2")

    def no_copy(*args, **kwargs):
        raise AssertionError("a local copy was made")

    monkeypatch.setattr(staging, "local_copy", no_copy)
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.READY, upload.error_message
    assert upload.inspection["checks"]["qemu_img_check"] == "passed"  # qemu-img read it too


def test_a_staged_file_replaced_after_its_check_is_never_sent(alice_connected, sim, disk, tmp_path, monkeypatch):
    image = tmp_path / "web.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", disk, image)
    upload = received(alice_connected, image, "qcow2")
    original = services.images.prepare_image

    def replace_then_prepare(upload, client, attempt):  # same size and format, other bytes
        other = bytearray(image.read_bytes())
        other[-1] ^= 0xFF
        if staging.is_object_storage():
            bucket, key = staging.object_location(upload.staged_name)
            staging.s3.client().put_object(Bucket=bucket, Key=key, Body=bytes(other))
        else:
            replacement = Path(staging.path(upload.staged_name) + ".new")
            replacement.write_bytes(other)
            os.replace(replacement, staging.path(upload.staged_name))
        return original(upload, client, attempt)

    monkeypatch.setattr(services.images, "prepare_image", replace_then_prepare)
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.FAILED and upload.error_code == "file_changed"
    assert not [r for r in ims_requests(sim) if r["path"].endswith("/file")]  # not one byte went out
    assert sim.images() == []
