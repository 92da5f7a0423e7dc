"""What one person may hold in staging (issue 14, point 4): unfinished uploads and their bytes per
person, free space on the staging disk, an expiry counted from creation, and a My uploads page
that stays small however many uploads there are."""

import base64
import subprocess
import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone
from django.utils.http import parse_http_date

from uploads import services, staging
from uploads.models import Status, Upload

TUS = {"Tus-Resumable": "1.0.0"}
GiB = 1024**3
MiB = 1024**2


def create(client, length=10, filename="disk.qcow2"):
    encoded = base64.b64encode(filename.encode()).decode()
    return client.post("/tus/", headers={**TUS, "Upload-Length": str(length), "Upload-Metadata": f"filename {encoded}"})


def patch(client, url, data: bytes, offset: int):
    return client.generic("PATCH", url, data, content_type="application/offset+octet-stream",
                          headers={**TUS, "Upload-Offset": str(offset)})


def expires_of(response) -> int:
    return parse_http_date(response["Upload-Expires"])


@pytest.fixture
def tus_client(alice_with_token, client):
    client.force_login(alice_with_token)
    return client


def row(owner, status=Status.RECEIVING, size=10, **fields):
    return Upload.objects.create(owner=owner, name="n", filename="f.raw", disk_format="raw", size=size,
                                 staged_name=f"{Upload.objects.count()}.img", status=status, **fields)


# ---------------------------------------------------------------------------------------------
# Unfinished uploads per person


def test_the_limits_default_to_20_uploads_and_1_tb_and_a_few_gb_of_reserve(settings):
    assert settings.UPLOAD_MAX_UNFINISHED_PER_USER == 20
    assert settings.UPLOAD_MAX_UNFINISHED_BYTES_PER_USER == 1024**4
    assert 1 * GiB <= settings.STAGING_FREE_RESERVE_BYTES <= 10 * GiB


def test_a_person_cannot_start_more_unfinished_uploads_than_the_limit(tus_client, settings, staging_dir, bob):
    settings.UPLOAD_MAX_UNFINISHED_PER_USER = 3
    for _ in range(3):
        assert create(tus_client).status_code == 201
    refused = create(tus_client)
    assert refused.status_code == 403  # a 4xx: tus clients do not send it again by themselves
    assert refused["Content-Type"].startswith("text/plain")  # the upload page shows it as it is
    text = refused.content.decode()
    assert "You already have 3 unfinished uploads" in text and "3 is the most" in text
    assert "Finish or cancel some of them on My uploads (/uploads/)" in text
    assert Upload.objects.count() == 3 and len(list(staging_dir.iterdir())) == 3  # nothing made


def test_cancelling_one_makes_room_again(tus_client, settings, alice_with_token):
    settings.UPLOAD_MAX_UNFINISHED_PER_USER = 1
    assert create(tus_client).status_code == 201
    assert create(tus_client).status_code == 403
    services.upload_cancel(upload=Upload.objects.get(), by="alice")
    assert create(tus_client).status_code == 201


def test_the_limit_is_per_person(tus_client, settings, bob):
    settings.UPLOAD_MAX_UNFINISHED_PER_USER = 1
    row(bob)
    assert create(tus_client).status_code == 201


def test_only_uploads_that_still_hold_staged_bytes_and_are_not_done_count(tus_client, settings, alice_with_token):
    settings.UPLOAD_MAX_UNFINISHED_PER_USER = 3
    alice = alice_with_token
    # Not counted: done with, or their staged file is gone.
    row(alice, Status.READY)
    row(alice, Status.CANCELLED)
    row(alice, Status.FAILED, error_code="expired", staged_deleted_at=timezone.now())
    # Counted: failed (kept for Retry) and waiting for a reconnect still take their space.
    row(alice, Status.FAILED)
    row(alice, Status.RECONNECT)
    assert create(tus_client).status_code == 201
    assert create(tus_client).status_code == 403


def test_a_person_cannot_declare_more_unfinished_bytes_than_the_limit(tus_client, settings):
    settings.UPLOAD_MAX_UNFINISHED_BYTES_PER_USER = 3 * MiB
    assert create(tus_client, length=2 * MiB).status_code == 201
    refused = create(tus_client, length=2 * MiB)
    assert refused.status_code == 403
    text = refused.content.decode()
    assert "Your unfinished uploads already take 2.0 MB; with this file (2.0 MB) they would pass 3.0 MB" in text
    assert "My uploads (/uploads/)" in text
    assert create(tus_client, length=1 * MiB).status_code == 201  # exactly up to the limit is fine
    assert Upload.objects.count() == 2


@pytest.mark.django_db(transaction=True)
def test_two_creations_at_once_cannot_both_slip_past_the_limit(alice, settings, monkeypatch):
    """Each creation counts, then stops between counting and saving until the other has counted
    too (or has waited for a while): only a lock held from counting to saving keeps the second
    from counting before the first has saved."""
    settings.UPLOAD_MAX_UNFINISHED_PER_USER = 1
    both_counted = threading.Barrier(2, timeout=2)
    real_create = staging.create

    def create_after_the_other_counted(name, size):
        try:
            both_counted.wait()
        except threading.BrokenBarrierError:
            pass  # the other is waiting for our lock: it has not counted
        real_create(name, size)

    monkeypatch.setattr(staging, "create", create_after_the_other_counted)
    outcomes = []

    def start_one(index):
        try:
            services.upload_create(owner=alice, size=10, filename=f"{index}.raw", name="n", disk_format="raw")
            outcomes.append("created")
        except services.UploadLimitReached:
            outcomes.append("refused")
        finally:
            connection.close()

    threads = [threading.Thread(target=start_one, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(outcomes) == ["created", "refused"]
    assert Upload.objects.filter(owner=alice).count() == 1


# ---------------------------------------------------------------------------------------------
# Free space on the staging disk


def test_creation_is_refused_with_507_when_the_disk_lacks_room_for_the_file_and_the_reserve(
    tus_client, settings, monkeypatch, staging_dir
):
    settings.STAGING_FREE_RESERVE_BYTES = 5 * GiB
    monkeypatch.setattr(staging, "free_bytes", lambda: 15 * GiB)
    refused = create(tus_client, length=10 * GiB + 1)
    assert refused.status_code == 507
    assert refused["Content-Type"].startswith("text/plain")
    text = refused.content.decode()
    assert "The portal's staging disk does not have room for this file (10 GB) just now." in text
    assert "Nothing was uploaded: try again later" in text
    assert not Upload.objects.exists() and not list(staging_dir.iterdir())
    assert create(tus_client, length=10 * GiB).status_code == 201


def test_free_space_is_that_of_the_staging_disk(staging_dir):
    import shutil

    assert abs(staging.free_bytes() - shutil.disk_usage(staging_dir).free) < 64 * MiB


@pytest.fixture
def small_staging_disk(tmp_path, settings):
    """A 16 MiB file system (tmpfs) as the staging folder."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    settings.STORAGES = {**settings.STORAGES, "staging": {
        "BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": str(folder)}}}
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_real_small_disk_refuses_a_file_that_does_not_fit(tus_client, settings, small_staging_disk):
    settings.STAGING_FREE_RESERVE_BYTES = 4 * MiB
    (small_staging_disk / "someone-else.img").write_bytes(bytes(6 * MiB))  # 10 MiB left
    assert create(tus_client, length=7 * MiB).status_code == 507
    assert not Upload.objects.exists()
    assert create(tus_client, length=5 * MiB).status_code == 201


# ---------------------------------------------------------------------------------------------
# Expiry: counted from creation


def test_sending_bytes_does_not_push_the_expiry_back(tus_client, settings):
    settings.TUS_UPLOAD_EXPIRY_SECONDS = 3600
    created = create(tus_client, length=10)
    url, deadline = created["Location"], expires_of(created)
    assert abs(deadline - (timezone.now() + timedelta(hours=1)).timestamp()) < 5
    # As if it had been created 40 minutes ago (the deadline stays what creation said).
    earlier = timezone.now() - timedelta(minutes=40)
    Upload.objects.update(created_at=earlier, receive_expires_at=earlier + timedelta(hours=1))
    deadline = int((earlier + timedelta(hours=1)).timestamp())
    sent = patch(tus_client, url, b"hello", 0)
    assert sent.status_code == 204
    assert expires_of(sent) == deadline
    assert expires_of(tus_client.head(url, headers=TUS)) == deadline
    assert int(Upload.objects.get().receive_expires_at.timestamp()) == deadline


def test_an_upload_older_than_the_expiry_expires_even_if_its_deadline_was_pushed_back(tus_client, settings,
                                                                                      staging_dir):
    """Rows from before the rule carry a deadline that each PATCH moved; creation caps it."""
    settings.TUS_UPLOAD_EXPIRY_SECONDS = 3600
    url = create(tus_client, length=10)["Location"]
    Upload.objects.update(created_at=timezone.now() - timedelta(hours=2),
                          receive_expires_at=timezone.now() + timedelta(days=6))
    assert patch(tus_client, url, b"hello", 0).status_code == 410
    upload = Upload.objects.get()
    assert upload.status == Status.FAILED and upload.error_code == "expired"
    assert upload.error_message == "This upload was not finished within 60 minutes of its start, so it has expired."
    assert not (staging_dir / upload.staged_name).exists()


def test_the_hourly_clean_up_expires_uploads_by_their_creation_time(alice, settings, staging_dir):
    settings.TUS_UPLOAD_EXPIRY_SECONDS = 3600
    old = services.upload_create(owner=alice, size=10, filename="o.raw", name="o", disk_format="raw")
    young = services.upload_create(owner=alice, size=10, filename="y.raw", name="y", disk_format="raw")
    Upload.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(hours=2),
                                            receive_expires_at=timezone.now() + timedelta(days=6))
    assert services.staging_cleanup() == 1
    old.refresh_from_db(), young.refresh_from_db()
    assert (old.status, young.status) == (Status.FAILED, Status.RECEIVING)
    assert not (staging_dir / old.staged_name).exists() and (staging_dir / young.staged_name).exists()


# ---------------------------------------------------------------------------------------------
# My uploads: paged, filtered by state, with a summary line


def many_uploads(owner, statuses: dict[str, int]) -> None:
    rows = [
        Upload(owner=owner, name=f"{status}-{i}", filename=f"{status}-{i}.raw", disk_format="raw", size=MiB,
               staged_name=f"{status}-{i}.img", status=status)
        for status, count in statuses.items() for i in range(count)
    ]
    Upload.objects.bulk_create(rows)


MIXED = {Status.RECEIVING: 40, Status.PUSHING: 10, Status.READY: 200, Status.FAILED: 30, Status.RECONNECT: 5,
         Status.CANCELLED: 15}


def cards(page: str) -> int:
    return page.count("data-upload")


def test_my_uploads_stays_small_and_cheap_with_hundreds_of_uploads(alice_client, alice, bob,
                                                                   django_assert_max_num_queries):
    many_uploads(alice, MIXED)
    many_uploads(bob, {Status.FAILED: 50})
    with django_assert_max_num_queries(10):
        response = alice_client.get("/uploads/")
    page = response.content.decode()
    assert response.status_code == 200
    assert len(response.content) < 150_000, len(response.content)
    assert cards(page) == 25
    assert "300 uploads: 50 in progress, 200 ready, 30 failed, 5 reconnect needed, 15 cancelled" in page
    assert "Page 1 of 12" in page
    assert 'href="?page=2"' in page


def test_the_summary_always_names_in_progress_ready_and_failed(alice_client, alice):
    many_uploads(alice, {Status.READY: 2})
    page = alice_client.get("/uploads/").content.decode()
    assert "2 uploads: 0 in progress, 2 ready, 0 failed</p>" in page
    assert "Page 1 of" not in page  # one page: no page links


def test_my_uploads_filters_by_state_and_pages_within_the_filter(alice_client, alice):
    many_uploads(alice, MIXED)
    failed = alice_client.get("/uploads/?state=failed").content.decode()
    assert cards(failed) == 25 and failed.count('data-status="failed"') >= 25
    assert 'data-status="ready"' not in failed
    assert 'href="?state=failed&amp;page=2"' in failed
    rest = alice_client.get("/uploads/?state=failed&page=2").content.decode()
    assert cards(rest) == 5
    assert 'href="?state=failed&amp;page=1"' in rest
    in_progress = alice_client.get("/uploads/?state=in_progress").content.decode()
    assert in_progress.count('data-status="receiving"') and in_progress.count('data-status="pushing"')
    assert cards(alice_client.get("/uploads/?state=in_progress&page=2").content.decode()) == 25
    assert cards(alice_client.get("/uploads/?state=reconnect").content.decode()) == 5


def test_a_filter_with_nothing_in_it_says_so(alice_client, alice):
    many_uploads(alice, {Status.READY: 1})
    page = alice_client.get("/uploads/?state=failed").content.decode()
    assert cards(page) == 0
    assert "Nothing to show under “Failed” right now." in page
    assert "Show all your uploads" in page


@pytest.mark.parametrize("query", ["?state=<script>", "?page=abc", "?page=999", "?page=-1", "?state=failed&page=0"])
def test_odd_filters_and_page_numbers_show_a_page_rather_than_an_error(alice_client, alice, query):
    many_uploads(alice, MIXED)
    response = alice_client.get(f"/uploads/{query}")
    assert response.status_code == 200
    assert cards(response.content.decode()) > 0
    assert "<script>" not in response.content.decode().split("</header>", 1)[1]


def test_unfinished_uploads_on_the_page_keep_their_live_status(alice_client, alice):
    """progress.js polls the uploads of the page shown: each unfinished one carries its status URL."""
    many_uploads(alice, {Status.READY: 30, Status.RECEIVING: 3})
    page = alice_client.get("/uploads/").content.decode()
    assert page.count("data-status-url=") == 3
    assert "js/progress.js" in page
    older = alice_client.get("/uploads/?page=2").content.decode()
    assert older.count("data-status-url=") == 0 and cards(older) == 8


# ---------------------------------------------------------------------------------------------
# What the upload page shows


@pytest.fixture
def browser_page(monkeypatch):
    """tests/test_browser.py's browser, but a refused request may show in the console (Chromium
    logs every 4xx reply there); script errors still fail the test."""
    from django.db import connections
    from playwright.sync_api import sync_playwright

    from tests.test_browser import CHROMIUM

    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    connections.close_all()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        script_errors = []
        page.on("pageerror", lambda error: script_errors.append(str(error)))
        try:
            yield page
        finally:
            connections.close_all()
        browser.close()
    connections.close_all()
    assert script_errors == []


def refused_on_the_upload_page(page, url: str, tmp_path) -> str:
    """Sign alice in, add a file, press Upload: what the page says went wrong."""
    from tests.test_browser import qcow2_file

    page.set_default_timeout(30_000)
    page.goto(f"{url}/")
    page.fill("#id_username", "alice")
    page.fill("#id_password", "alice-pw-1234")
    page.click("button[type=submit]")
    page.goto(f"{url}/upload/")
    page.locator(".uppy-Dashboard-input").first.set_input_files(str(qcow2_file(tmp_path)))
    page.locator(".uppy-Dashboard-FileCard").get_by_text("Save details").click()
    page.click(".uppy-StatusBar-actionBtn--upload")
    problems = page.locator("#upload-problems")
    problems.wait_for(state="visible", timeout=10_000)  # at once: not after minutes of retries
    assert page.locator("#upload-retrying").is_hidden()
    return problems.inner_text()


@pytest.mark.browser
@pytest.mark.slow
def test_the_upload_page_shows_why_a_new_upload_was_refused(live_server, alice_with_token, settings, browser_page,
                                                            tmp_path):
    settings.UPLOAD_MAX_UNFINISHED_PER_USER = 1
    row(alice_with_token)
    said = refused_on_the_upload_page(browser_page, live_server.url, tmp_path)
    assert "You already have 1 unfinished uploads" in said
    assert "Finish or cancel some of them on My uploads" in said
    assert Upload.objects.count() == 1


@pytest.mark.browser
@pytest.mark.slow
def test_the_upload_page_says_at_once_when_the_staging_disk_has_no_room(live_server, alice_with_token, monkeypatch,
                                                                        browser_page, tmp_path):
    monkeypatch.setattr(staging, "free_bytes", lambda: 0)  # the live server runs in this process
    said = refused_on_the_upload_page(browser_page, live_server.url, tmp_path)
    assert "The portal's staging disk does not have room for this file" in said
    assert not Upload.objects.exists()
