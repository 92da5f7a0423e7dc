"""A refusal is not a failure: a file the check refused is *Refused*, says why and what to do, and
offers one clear next step (the format fix, else Remove), never a Retry that can only be refused
again. Names with characters that do not show are refused at the door, naming the field."""

import base64
import importlib
import io
import os
import shutil
from datetime import timedelta

import pytest
from django.apps import apps as django_apps
from django.utils import timezone

from tests.test_inspect import REFUSED, corpus  # noqa: F401  (corpus: a session fixture)
from tests.test_pipeline import received_upload
from uploads import services
from uploads.diskimage import LABELS
from uploads.models import ALLOWED_MOVES, CloudAccount, Status, Upload, UploadEvent, can_move

needs_qemu = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img (qemu-utils)")

# Bytes that are no disk image format at all: the check can only say "raw, if anything".
RANDOM = bytes(512) + os.urandom(200_000)


def status(client, upload) -> dict:
    return client.get(f"/uploads/{upload.uid}/status").json()


def refused_upload(owner, data=RANDOM, disk_format="qcow2", name="random") -> Upload:
    upload = received_upload(owner, data, disk_format=disk_format, name=name)
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    return upload


# ---------------------------------------------------------------------------------------------
# The state machine


def test_refused_is_a_status_of_its_own_with_its_own_moves():
    assert Status.REFUSED.label == "Refused"
    assert can_move(Status.CHECKING, Status.REFUSED) and can_move(Status.CONVERTING, Status.REFUSED)
    assert ALLOWED_MOVES[Status.REFUSED] == {Status.RECEIVED, Status.CANCELLED}  # format fix, Remove
    assert not can_move(Status.REFUSED, Status.CHECKING) and not can_move(Status.REFUSED, Status.READY)


# ---------------------------------------------------------------------------------------------
# What the owner meets


@needs_qemu
def test_random_bytes_named_qcow2_are_refused_with_upload_it_as_raw_first(alice_connected, sim, client):
    upload = refused_upload(alice_connected)
    assert upload.status == Status.REFUSED and upload.error_message and upload.error_hint
    assert [r for r in sim.requests_seen() if r["path"].startswith("/v2")] == []
    client.force_login(alice_connected)
    data = status(client, upload)
    assert (data["status"], data["status_label"]) == ("refused", "Refused")
    assert data["primary_action"]["kind"] == "use_format"
    assert (data["primary_action"]["label"], data["primary_action"]["format"]) == ("Upload it as RAW", "raw")
    assert [a["kind"] for a in data["actions"]] == ["use_format", "remove"]
    assert data["can_retry"] is False and data["suggested_format"] == "raw"

    page = client.get("/uploads/").content.decode()
    assert "Refused" in page and "Upload it as RAW" in page
    assert "Stopped" not in page and "Cancel upload" not in page


def test_my_uploads_counts_and_filters_refused_files_apart_from_failed_ones(alice_client, alice):
    made = dict(owner=alice, filename="x.qcow2", disk_format="qcow2", size=1, staged_name="x")
    Upload.objects.create(name="refused-one", status=Status.REFUSED, **made)
    Upload.objects.create(name="failed-one", status=Status.FAILED, **made)
    page = alice_client.get("/uploads/").content.decode()
    assert "2 uploads: 0 in progress, 0 ready, 1 failed, 1 refused" in page
    refused = alice_client.get("/uploads/?state=refused").content.decode()
    assert "refused-one" in refused and "failed-one" not in refused
    assert "refused-one" not in alice_client.get("/uploads/?state=failed").content.decode()


@needs_qemu
def test_upload_it_as_raw_sends_the_same_file_without_a_new_upload(alice_connected, sim, client):
    upload = refused_upload(alice_connected)
    client.force_login(alice_connected)
    response = client.post(f"/uploads/{upload.uid}/use-format", {"disk_format": "raw"}, follow=True)
    assert "will be sent as RAW" in response.content.decode()
    upload.refresh_from_db()
    assert (upload.status, upload.disk_format) == (Status.RECEIVED, "raw")
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.READY, upload.error_message
    [image] = sim.images()
    assert upload.send_format == "raw" and image["size"] == len(RANDOM)


@needs_qemu
def test_a_refused_file_is_never_retried(alice_connected, sim, client, admin_client):
    upload = refused_upload(alice_connected)
    with pytest.raises(services.ServiceError, match="refused the same way"):
        services.upload_retry(upload=upload, by="alice")
    client.force_login(alice_connected)
    response = client.post(f"/uploads/{upload.uid}/retry", follow=True)
    assert "refused the same way" in response.content.decode()
    admin_client.post("/admin/uploads/upload/", {"action": "retry_uploads", "_selected_action": [upload.pk]})
    upload.refresh_from_db()
    assert upload.status == Status.REFUSED and upload.attempt == 1


@needs_qemu
def test_a_file_with_no_format_fix_offers_remove_that_speaks_of_what_exists(
    alice_connected, sim, client, staging_dir, tmp_path, django_capture_on_commit_callbacks
):
    import subprocess

    image = tmp_path / "hostile.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/passwd", str(image), "1G"],
                   check=True)
    upload = refused_upload(alice_connected, image.read_bytes(), name="hostile")
    assert upload.status == Status.REFUSED and upload.error_code == "backing_file"
    client.force_login(alice_connected)
    data = status(client, upload)
    assert [a["kind"] for a in data["actions"]] == ["remove"]
    remove = data["primary_action"]
    assert remove["label"] == "Remove"
    assert remove["confirm"] == "Remove “hostile”? The portal deletes its copy of the file. This cannot be undone."
    page = client.get(f"/uploads/{upload.uid}/").content.decode()
    assert "Cancel upload" not in page and "cloud image" not in page and "in IMS" not in remove["confirm"]

    with django_capture_on_commit_callbacks() as callbacks:
        response = client.post(f"/uploads/{upload.uid}/cancel", {"next": "detail"}, follow=True)
    assert "“hostile” was removed: the portal deletes its copy of the file." in response.content.decode()
    upload.refresh_from_db()
    assert upload.status == Status.CANCELLED and upload.events.filter(message="Removed by alice").exists()
    assert len(callbacks) == 1  # the clean-up task, which does this:
    services.upload_discard(upload_id=upload.pk)
    assert not (staging_dir / upload.staged_name).exists()


def test_a_failed_upload_keeps_retry_as_its_primary_action(alice_client, alice, staging_dir):
    upload = Upload.objects.create(owner=alice, name="n", filename="n.raw", disk_format="raw", size=3,
                                   staged_name="n.img", status=Status.FAILED, error_message="IMS was away.")
    (staging_dir / "n.img").write_bytes(b"abc")
    data = status(alice_client, upload)
    assert data["status_label"] == "Failed"
    assert [(a["kind"], a["primary"]) for a in data["actions"]] == [("retry", True), ("remove", False)]


def test_an_expired_upload_offers_remove_not_a_retry_that_cannot_work(alice_client, alice):
    upload = Upload.objects.create(owner=alice, name="n", filename="n.raw", disk_format="raw", size=3,
                                   staged_name="n.img", status=Status.FAILED, error_code="expired",
                                   staged_deleted_at=timezone.now())
    data = status(alice_client, upload)
    assert data["can_retry"] is False
    assert [a["kind"] for a in data["actions"]] == ["remove"]
    assert data["primary_action"]["confirm"] == (
        "Remove “n”? The portal keeps nothing of it any more, so nothing else is deleted.")


def test_cancelling_while_receiving_speaks_of_the_part_received(alice_client, alice):
    upload = Upload.objects.create(owner=alice, name="n", filename="n.raw", disk_format="raw", size=3,
                                   staged_name="n.img")
    [cancel] = status(alice_client, upload)["actions"]
    assert (cancel["kind"], cancel["label"], cancel["primary"]) == ("cancel", "Cancel upload", False)
    assert cancel["confirm"] == "Cancel “n”? The portal deletes the part received so far. This cannot be undone."


def test_cancelling_while_ims_processes_names_the_image(alice_client, alice):
    upload = Upload.objects.create(owner=alice, name="n", filename="n.raw", disk_format="raw", size=3,
                                   staged_name="n.img", status=Status.PROCESSING, ims_image_id="img-1")
    [cancel] = status(alice_client, upload)["actions"]
    assert cancel["confirm"] == (
        "Cancel “n”? The portal deletes its copy of the file and the image it made in IMS. This cannot be undone.")


@needs_qemu
def test_refused_files_keep_their_staged_copy_for_the_retention_time_only(alice_connected, sim, staging_dir,
                                                                          settings, client):
    settings.STAGING_RETENTION_HOURS = 24
    upload = refused_upload(alice_connected)
    assert services.staging_cleanup() == 0
    assert (staging_dir / upload.staged_name).exists()  # time to choose "Upload it as RAW"
    Upload.objects.filter(pk=upload.pk).update(status_changed_at=timezone.now() - timedelta(hours=25))
    assert services.staging_cleanup() == 1
    assert not (staging_dir / upload.staged_name).exists()
    upload.refresh_from_db()
    assert upload.status == Status.REFUSED
    client.force_login(alice_connected)
    data = status(client, upload)
    assert [a["kind"] for a in data["actions"]] == ["remove"]  # the fix needs the file
    assert data["detail"] == "Not sent to IMS: the file did not pass the check; the portal no longer keeps the file"
    with pytest.raises(services.ServiceError, match="no longer keeps this file"):
        services.upload_use_format(upload=upload, disk_format="raw", by="alice")


@needs_qemu
def test_a_refused_upload_is_never_queued_again_by_the_reconciler(alice_connected, sim, settings):
    settings.RECONCILE_GRACE_SECONDS = 0
    upload = refused_upload(alice_connected)
    Upload.objects.filter(pk=upload.pk).update(status_changed_at=timezone.now() - timedelta(hours=1))
    assert upload.pk not in services.uploads_to_reconcile()


def test_uploads_the_check_refused_before_this_status_existed_become_refused(alice):
    migration = importlib.import_module("uploads.migrations.0007_refused")
    made = dict(owner=alice, filename="x.qcow2", disk_format="qcow2", size=1, staged_name="x", status=Status.FAILED)
    refused = Upload.objects.create(name="refused", error_code="backing_file",
                                    inspection={"problem": {"code": "backing_file"}}, **made)
    ims_failure = Upload.objects.create(name="ims", error_code="ims_killed", **made)
    retried_then_ims = Upload.objects.create(name="later", error_code="ims_killed",
                                             inspection={"problem": {"code": "truncated"}}, **made)
    migration.failed_by_the_check_to_refused(django_apps, None)
    statuses = dict(Upload.objects.values_list("name", "status"))
    assert statuses == {"refused": "refused", "ims": "failed", "later": "failed"}
    assert UploadEvent.objects.filter(upload=refused, to_status="refused").exists()
    assert not UploadEvent.objects.filter(upload__in=[ims_failure, retried_then_ims]).exists()


# ---------------------------------------------------------------------------------------------
# Every refusal of the corpus: one clear next step, never Retry


@needs_qemu
@pytest.mark.slow
@pytest.mark.parametrize("sample", REFUSED, ids=str)
def test_every_refused_sample_offers_its_format_fix_or_remove_and_never_retry(
    sample, corpus, alice_connected, sim, client  # noqa: F811
):
    data = (corpus / sample.file).read_bytes()
    upload = services.upload_create(owner=alice_connected, size=len(data), filename=sample.file, name="sample",
                                    disk_format=sample.declared)
    services.upload_receive(upload=upload, offset=0, stream=io.BytesIO(data), length=len(data))
    services.upload_push(upload_id=upload.pk)
    client.force_login(alice_connected)
    answer = status(client, upload)
    assert (answer["status"], answer["needs_action"], answer["can_retry"]) == ("refused", True, False)
    assert "retry" not in [action["kind"] for action in answer["actions"]]
    primary = answer["primary_action"]
    if sample.suggested is None:
        assert (primary["kind"], primary["label"]) == ("remove", "Remove")
        return
    assert (primary["kind"], primary["format"]) == ("use_format", sample.suggested)
    assert primary["label"] == f"Upload it as {LABELS[sample.suggested]}"
    upload.refresh_from_db()
    services.upload_use_format(upload=upload, disk_format=sample.suggested, by="alice")
    services.upload_push(upload_id=upload.pk)
    upload.refresh_from_db()
    assert upload.status == Status.READY, upload.error_message


# ---------------------------------------------------------------------------------------------
# The status JSON: what a polling client needs


@pytest.mark.parametrize("state, final, needs_action, waiting_on", [
    (Status.RECEIVING, False, False, "browser"),
    (Status.RECEIVED, False, False, "portal"),
    (Status.PUSHING, False, False, "portal"),
    (Status.PROCESSING, False, False, "ims"),
    (Status.FAILED, False, True, "person"),
    (Status.REFUSED, False, True, "person"),
    (Status.RECONNECT, False, True, "person"),
    (Status.READY, True, False, None),
    (Status.CANCELLED, True, False, None),
])
def test_the_status_json_says_whether_anything_will_change_without_a_person(
    alice_client, alice, state, final, needs_action, waiting_on
):
    upload = Upload.objects.create(owner=alice, name="n", filename="n.raw", disk_format="raw", size=3,
                                   staged_name="n.img", status=state)
    data = status(alice_client, upload)
    assert (data["final"], data["needs_action"], data["waiting_on"]) == (final, needs_action, waiting_on)
    assert data["finished"] is (final or needs_action)  # a client polling a failed upload can stop
    assert (data["primary_action"] is not None) is needs_action


def test_a_reconnect_offers_the_cloud_account_page_first(alice_client, alice):
    upload = Upload.objects.create(owner=alice, name="n", filename="n.raw", disk_format="raw", size=3,
                                   staged_name="n.img", status=Status.RECONNECT)
    primary = status(alice_client, upload)["primary_action"]
    assert (primary["kind"], primary["url"]) == ("reconnect", "/cloud/")


def test_the_status_json_carries_what_the_details_show(alice_client, alice):
    upload = Upload.objects.create(owner=alice, name="n", filename="n.raw", disk_format="raw", size=3,
                                   staged_name="n.img", status=Status.PROCESSING)
    before = status(alice_client, upload)
    Upload.objects.filter(pk=upload.pk).update(ims_image_id="img-1", min_disk=4, md5="0" * 32)
    after = status(alice_client, upload)
    assert (after["ims_image_id"], after["min_disk"], after["md5"]) == ("img-1", 4, "0" * 32)
    assert after["details_version"] != before["details_version"]  # the own page fetches them anew


# ---------------------------------------------------------------------------------------------
# Names that do not show what they are


def tus_create(client, **fields):
    fields.setdefault("filename", "disk.qcow2")
    metadata = ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in fields.items())
    return client.post("/tus/", headers={"Tus-Resumable": "1.0.0", "Upload-Length": "10",
                                         "Upload-Metadata": metadata})


HIDDEN = {
    "\u202e": "U+202E right-to-left override",
    "\u2066": "U+2066 left-to-right isolate",
    "\u2069": "U+2069 pop directional isolate",
    "\u200b": "U+200B zero width space",
    "\u200f": "U+200F right-to-left mark",
    "\u00ad": "U+00AD soft hyphen",
    "\ufeff": "U+FEFF zero width no-break space",
    "\U000e0041": "U+E0041 tag latin capital letter a",
    "\u0007": "U+0007",
    "\x9b": "U+009B",
    "\u2028": "U+2028 line separator",
    "\u2029": "U+2029 paragraph separator",
    "\u3164": "U+3164 hangul filler",
}
FIELDS = {
    "filename": ("innocent{}gpj.qcow2", "The file name"),
    "image_name": ("web{}server", "The image name"),
    "os_version": ("Ubuntu{} 22.04", "The OS version"),
    "tags": ("team=web, env{}=prod", "A tag"),
}


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("char", HIDDEN)
def test_names_with_characters_that_do_not_show_are_refused_at_creation(client, alice_with_token, field, char):
    client.force_login(alice_with_token)
    template, what = FIELDS[field]
    response = tus_create(client, **{field: template.format(char)})
    assert response.status_code == 400
    text = response.content.decode()
    assert text.startswith(f"{what} contains a hidden or control character ({HIDDEN[char]}")
    assert not Upload.objects.exists()


@pytest.mark.parametrize("where", ["start", "end"])
def test_a_hidden_character_at_either_end_is_refused_not_quietly_dropped(client, alice_with_token, where):
    client.force_login(alice_with_token)
    name = "\u2029web" if where == "start" else "web\u2028"
    assert tus_create(client, image_name=name).status_code == 400


def test_names_in_any_script_are_still_welcome(client, alice_with_token):
    client.force_login(alice_with_token)
    response = tus_create(client, filename="Ünïcødé-名前-диск.qcow2", image_name="Serveur d’été 🚀",
                          os_version="Debian GNU/Linux 12 64bit", tags="équipe=web")
    assert response.status_code == 201, response.content
    upload = Upload.objects.get()
    assert (upload.filename, upload.name) == ("Ünïcødé-名前-диск.qcow2", "Serveur d’été 🚀")


@pytest.mark.parametrize("field", ["domain", "user_name", "project"])
def test_the_cloud_account_form_refuses_them_too(alice_client, field):
    data = {"domain": "OTC-EU-DE-1", "user_name": "demo", "password": "pw\u202e", "project": "eu-de"}
    data[field] += "\u202e"
    page = alice_client.post("/cloud/", data).content.decode()
    assert "contains a hidden or control character (U+202E right-to-left override)" in page
    assert not CloudAccount.objects.exists()
