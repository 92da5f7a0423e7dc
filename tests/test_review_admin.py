"""All uploads for reviewers: the reason an upload stopped and how far it got, filters, search,
pages, a CSV export of exactly the filtered list (safe to open in a spreadsheet); the admin's list
for superusers; and a late decision that says on which day the other reviewer decided. (That the
list fits a 1280 px screen is checked in chromium: tests/test_browser_review_admin.py.)"""

import csv
import io
from datetime import datetime, timedelta, timezone as dt_timezone

import pytest
from django.http import StreamingHttpResponse
from django.utils import timezone, translation

from tests.test_review import awaiting_upload, make_reviewer, review_on  # noqa: F401  (a fixture)
from uploads import all_uploads, review
from uploads.models import CloudAccount, Status, Upload

NOW = timezone.now()


@pytest.fixture
def carol(django_user_model):
    return make_reviewer(django_user_model, "carol")


@pytest.fixture
def carol_client(client, carol):
    client.force_login(carol)
    return client


def make_upload(owner, name="image", **fields) -> Upload:
    values = {"filename": f"{name}.qcow2", "disk_format": "qcow2", "size": 1000, "status": Status.READY,
              "staged_name": f"staged-{name}", **fields}
    return Upload.objects.create(owner=owner, name=name, **values)


def page_uids(response) -> list[str]:
    return [row["upload"].uid.hex for row in response.context["rows"]]


def csv_table(response) -> list[list[str]]:
    assert isinstance(response, StreamingHttpResponse)
    text = b"".join(response.streaming_content).decode("utf-8-sig")
    return list(csv.reader(io.StringIO(text)))


# ---------------------------------------------------------------------------------------------
# Who sees it


def test_all_uploads_and_the_dashboard_are_for_reviewers_only(alice_client, client):
    for url in ("/review/all/", "/review/all.csv", "/review/dashboard/", "/review/dashboard/workers"):
        assert alice_client.get(url).status_code == 403, url
    client.logout()
    assert client.get("/review/all/").status_code == 302


def test_the_header_links_all_uploads_and_the_dashboard_for_reviewers_only(alice_client, carol):
    page = alice_client.get("/uploads/").content.decode()
    assert "data-all-uploads-link" not in page and "data-dashboard-link" not in page
    alice_client.force_login(carol)
    page = alice_client.get("/review/all/").content.decode()
    assert 'href="/review/all/" aria-current="page" data-all-uploads-link' in page and "data-dashboard-link" in page


# ---------------------------------------------------------------------------------------------
# What a row says


def test_each_row_says_owner_project_state_reason_size_and_links_to_the_review_page(alice, carol_client):
    CloudAccount.objects.create(user=alice, domain_name="d", user_name="u", project_name="eu-de-images",
                                token_encrypted="x", expires_at=NOW)
    failed = make_upload(alice, "web-server", status=Status.FAILED, size=2 * 1024**3, send_size=1000,
                         received_bytes=2 * 1024**3, sent_bytes=400,
                         error_code="forbidden",
                         error_message="Your cloud account is not allowed to do this in the selected project.")
    page = carol_client.get("/review/all/").content.decode()
    assert f'href="/review/{failed.uid}/"' in page and "web-server.qcow2" in page
    assert "alice" in page and "eu-de-images" in page and "2.0 GB" in page and "QCOW2" in page
    assert "Your cloud account is not allowed to do this in the selected project." in page
    assert "Stopped at 40 % sent" in page
    assert '<th scope="col">' in page and '<th scope="row">' in page  # a table with its headers


@pytest.mark.parametrize("fields, words", [
    ({"status": Status.FAILED, "sent_bytes": 400, "send_size": 1000}, "Stopped at 40 % sent"),
    ({"status": Status.CANCELLED, "received_bytes": 300}, "Stopped at 30 % received"),
    ({"status": Status.CANCELLED, "received_bytes": 1000}, "Stopped before sending"),
    ({"status": Status.RECONNECT, "received_bytes": 1000, "sent_bytes": 1000}, "Stopped at 100 % sent"),
    ({"status": Status.REFUSED, "received_bytes": 1000}, "Not sent"),
    ({"status": Status.REJECTED, "received_bytes": 1000}, "Not sent"),
    ({"status": Status.RECEIVING, "received_bytes": 250}, "25 % received"),
    ({"status": Status.PUSHING, "sent_bytes": 500}, "50 % sent"),
    ({"status": Status.CONVERTING, "convert_percent": 70}, "70 % converted"),
    ({"status": Status.READY, "received_bytes": 1000}, "Sent in full"),
    ({"status": Status.AWAITING_REVIEW, "received_bytes": 1000}, "Received, not sent yet"),
])
def test_progress_says_where_a_stopped_upload_stopped_and_how_far_a_moving_one_is(alice, fields, words):
    upload = make_upload(alice, **fields)
    assert all_uploads.progress_words(upload) == words
    moving = upload.status in {Status.RECEIVING, Status.PUSHING, Status.CONVERTING}
    assert (all_uploads.moving_percent(upload) is not None) == moving  # a bar only while it moves


def test_an_upload_sent_on_to_ims_while_it_arrives_is_moving_not_stopped(alice):
    """sending_early (services/early_push.py) receives and sends at once: the row says how much
    arrived, with a bar, never "Stopped at ... sent" as for a failed upload."""
    upload = make_upload(alice, status=Status.SENDING_EARLY, received_bytes=250, sent_bytes=100)
    assert all_uploads.progress_words(upload) == "25 % received"
    assert all_uploads.moving_percent(upload) == 25


def test_the_reason_is_given_for_failed_refused_and_rejected_rows_only(alice):
    said = "This disk image is damaged."
    assert all_uploads.reason_words(make_upload(alice, status=Status.REFUSED, error_code="corrupt",
                                                error_message=said)) == said
    assert all_uploads.reason_words(make_upload(alice, status=Status.FAILED, error_code="forbidden")) == (
        "Not allowed in the cloud project"  # no message kept: the code's words
    )
    assert all_uploads.reason_words(make_upload(alice, status=Status.READY, error_message="old")) == ""


def test_a_moving_upload_shows_a_bar_and_a_stopped_one_does_not(alice, carol_client):
    make_upload(alice, "moving", status=Status.PUSHING, sent_bytes=500)
    make_upload(alice, "stopped", status=Status.FAILED, sent_bytes=400)
    page = carol_client.get("/review/all/").content.decode()
    assert page.count("<progress") == 1 and 'value="50"' in page


# ---------------------------------------------------------------------------------------------
# Filters, search, pages


@pytest.fixture
def mixed(alice, bob):
    """Uploads of two owners in several states, formats, reasons and days."""
    rows = {
        "a-ready": make_upload(alice, "a-ready", ims_image_id="0c5e7e2c-aaaa-4bbb-8ccc-123456789abc"),
        "a-failed": make_upload(alice, "a-failed", status=Status.FAILED, error_code="forbidden", disk_format="vmdk",
                                filename="appliance.vmdk"),
        "b-refused": make_upload(bob, "b-refused", status=Status.REFUSED, error_code="corrupt"),
        "b-failed": make_upload(bob, "b-failed", status=Status.FAILED, error_code="corrupt"),
        "b-old": make_upload(bob, "b-old"),
    }
    Upload.objects.filter(pk=rows["b-old"].pk).update(created_at=NOW - timedelta(days=10))
    return rows


def names(response) -> set[str]:
    return {row["upload"].name for row in response.context["rows"]}


def test_filters_by_state_owner_format_reason_and_date(mixed, bob, carol_client):
    get = carol_client.get
    assert names(get("/review/all/", {"state": "failed"})) == {"a-failed", "b-failed"}
    assert names(get("/review/all/", {"owner": bob.pk})) == {"b-refused", "b-failed", "b-old"}
    assert names(get("/review/all/", {"disk_format": "vmdk"})) == {"a-failed"}
    assert names(get("/review/all/", {"reason": "corrupt"})) == {"b-refused", "b-failed"}
    assert names(get("/review/all/", {"reason": "corrupt", "state": "refused"})) == {"b-refused"}
    ten_days_ago = (NOW - timedelta(days=10)).date().isoformat()
    assert names(get("/review/all/", {"created_to": ten_days_ago})) == {"b-old"}
    assert "b-old" not in names(get("/review/all/", {"created_from": (NOW - timedelta(days=1)).date().isoformat()}))


def test_the_reason_filter_offers_the_reasons_there_are_in_words(mixed, carol_client):
    form = carol_client.get("/review/all/").context["form"]
    assert list(form.fields["reason"].choices) == [("", "Any"), ("corrupt", "File damaged"),
                                                   ("forbidden", "Not allowed in the cloud project")]


def test_search_finds_by_name_file_name_or_image_id(mixed, carol_client):
    get = carol_client.get
    assert names(get("/review/all/", {"q": "B-REF"})) == {"b-refused"}
    assert names(get("/review/all/", {"q": "appliance"})) == {"a-failed"}
    assert names(get("/review/all/", {"q": "0c5e7e2c-aaaa"})) == {"a-ready"}
    assert "No upload matches these filters." in get("/review/all/", {"q": "nothing-like-it"}).content.decode()


def test_a_bad_filter_says_why_and_the_others_still_apply(mixed, carol_client):
    response = carol_client.get("/review/all/", {"state": "lost", "owner": "x", "created_from": "yesterday",
                                                 "disk_format": "vmdk"})
    page = response.content.decode()
    assert response.status_code == 200 and names(response) == {"a-failed"}
    assert page.count('class="errorlist') == 3  # state, owner and the date, each next to its field
    response = carol_client.get("/review/all/", {"created_from": "2026-11-20", "created_to": "2026-11-10"})
    assert "The end of the range comes before its start." in response.content.decode()


def test_pages_of_fifty_keep_the_filters(alice, carol_client):
    for number in range(120):
        make_upload(alice, f"image-{number:03}", status=Status.FAILED if number % 2 else Status.READY)
    first = carol_client.get("/review/all/", {"state": "failed"})
    page = first.content.decode()
    assert len(first.context["rows"]) == 50 and "Page 1 of 2 · uploads 1–50 of 60" in page
    assert 'href="?state=failed&amp;page=2"' in page
    second = carol_client.get("/review/all/", {"state": "failed", "page": 2})
    assert len(second.context["rows"]) == 10 and not set(page_uids(first)) & set(page_uids(second))


# ---------------------------------------------------------------------------------------------
# CSV


def test_the_csv_holds_exactly_the_filtered_list_on_every_page(alice, bob, carol_client):
    for number in range(130):
        make_upload(alice if number % 3 else bob, f"image-{number:03}",
                    status=Status.FAILED if number % 2 else Status.READY, error_code="server" if number % 2 else "")
    query = {"state": "failed", "reason": "server", "q": "image-"}  # 65 of 130: two pages
    listed = []
    for page in (1, 2):
        listed += page_uids(carol_client.get("/review/all/", {**query, "page": page}))
    response = carol_client.get("/review/all.csv", query)
    assert response["Content-Type"].startswith("text/csv") and "attachment;" in response["Content-Disposition"]
    header, *rows = csv_table(response)
    assert header[:5] == ["Image name", "File name", "Owner", "Cloud project", "State"]
    assert [row[-1].replace("-", "") for row in rows] == listed and len(listed) == 65
    assert {row[4] for row in rows} == {"Failed"} and {row[5] for row in rows} == {"server"}
    assert rows[0][6] == "Error of the cloud"


def test_the_csv_link_carries_the_filters(alice, carol_client):
    page = carol_client.get("/review/all/", {"state": "failed", "q": "web", "page": 2}).content.decode()
    assert 'href="/review/all.csv?state=failed&amp;q=web"' in page


@pytest.mark.parametrize("dangerous", ["=HYPERLINK(\"http://evil\")", "+1+1", "-2+3", "@SUM(A1)", "\tx", "\rx"])
def test_csv_cells_that_would_run_as_a_formula_are_made_text(alice, carol_client, dangerous):
    make_upload(alice, dangerous, filename=dangerous + ".raw")
    [_, row] = csv_table(carol_client.get("/review/all.csv"))
    assert row[0] == "'" + dangerous and row[1] == "'" + dangerous + ".raw"


def test_csv_keeps_harmless_cells_and_numbers_as_they_are(alice, carol_client):
    make_upload(alice, "plain name", size=12345)
    [_, row] = csv_table(carol_client.get("/review/all.csv"))
    assert row[0] == "plain name" and row[8] == "12345"


# ---------------------------------------------------------------------------------------------
# The admin's list (superusers)


def test_the_admin_list_has_a_reason_column_and_filters(admin_client, alice):
    make_upload(alice, "broken", status=Status.REFUSED, error_code="corrupt", error_message="This disk image is damaged.")
    page = admin_client.get("/admin/uploads/upload/").content.decode()
    assert "This disk image is damaged." in page and "column-reason" in page
    for name in ("status", "disk_format", "error_code", "created_at"):
        assert f"{name}__" in page or f"?{name}=" in page or f"&amp;{name}=" in page, name
    assert admin_client.get("/admin/uploads/upload/", {"error_code": "corrupt"}).status_code == 200


# ---------------------------------------------------------------------------------------------
# A late decision says the day of the first one


def test_a_late_decision_says_the_date_and_time_of_the_one_that_won(
    review_on, alice_connected, carol, django_user_model, sim, task_queue  # noqa: F811
):
    dave = make_reviewer(django_user_model, "dave")
    upload = awaiting_upload(alice_connected)
    stale = Upload.objects.get(pk=upload.pk)
    review.upload_reject(upload=upload, by=carol, reason="Wrong OS version")
    Upload.objects.filter(pk=upload.pk).update(reviewed_at=datetime(2026, 3, 9, 14, 5, 7, tzinfo=dt_timezone.utc))
    with pytest.raises(review.ReviewError) as raised:
        review.upload_approve(upload=stale, by=dave)
    assert "already rejected by carol on March 9, 2026 at 14:05:07 UTC" in str(raised.value)
    with translation.override("de"):
        with pytest.raises(review.ReviewError) as raised:
            review.upload_approve(upload=Upload.objects.get(pk=upload.pk), by=dave)
    assert "9. März 2026" in str(raised.value)  # the date in the reader's language


# ---------------------------------------------------------------------------------------------
# Queries: the same few however many uploads there are (no query per row)


def many(owners, count: int, start: int = 0) -> None:
    from uploads.services import state

    for number in range(start, start + count):
        owner = owners[number % len(owners)]
        CloudAccount.objects.get_or_create(user=owner, defaults={
            "domain_name": "d", "user_name": owner.username, "project_name": f"project-{owner.username}",
            "token_encrypted": "x", "expires_at": NOW})
        upload = make_upload(owner, f"image-{number:04}", status=[Status.FAILED, Status.READY, Status.PUSHING][number % 3],
                             error_code="server", error_message="The cloud's image service had a temporary problem.")
        state.note(upload, "a timeline line")


def queries_for(client, url: str, params=None) -> int:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    client.get(url, params)  # session, permissions and the like once
    with CaptureQueriesContext(connection) as captured:
        response = client.get(url, params)
        if isinstance(response, StreamingHttpResponse):
            b"".join(response.streaming_content)
    return len(captured.captured_queries)


@pytest.mark.parametrize("url, params", [
    ("/review/all/", None),
    ("/review/all/", {"state": "failed", "q": "image", "owner": "ALICE", "reason": "server"}),
    ("/review/all/", {"page": "2"}),
    ("/review/all.csv", None),
    ("/review/all.csv", {"state": "failed"}),
])
def test_all_uploads_and_its_csv_need_the_same_few_queries_however_many_rows(
    alice, bob, carol_client, django_assert_max_num_queries, url, params
):
    params = params and {key: (alice.pk if value == "ALICE" else value) for key, value in params.items()}
    many([alice, bob], 60)
    few = queries_for(carol_client, url, params)
    assert few <= 14  # session, user, permissions, the header's counts, the form's choices, count, ids, rows
    many([alice, bob], 140, start=60)
    with django_assert_max_num_queries(few):
        response = carol_client.get(url, params)
        if isinstance(response, StreamingHttpResponse):
            assert len(b"".join(response.streaming_content).splitlines()) > 60


def test_the_list_leaves_every_json_column_it_does_not_show_in_the_database(alice, carol_client):
    """Each JSON column (inspection, tags, the pinned versions, the sums' state kept between
    PATCHes ...) is parsed for nothing on a page of fifty rows: the list defers them all."""
    from django.db import models

    make_upload(alice, "with-state", received_sums={"offset": 5, "md5_ctx": "A" * 172, "sha512_ctx": "B" * 344})
    rows = carol_client.get("/review/all/").context["rows"]
    json_columns = {field.attname for field in Upload._meta.concrete_fields if isinstance(field, models.JSONField)}
    assert json_columns and json_columns <= rows[0]["upload"].get_deferred_fields()


def test_the_review_page_needs_the_same_few_queries_however_long_its_timeline(
    alice, carol_client, django_assert_max_num_queries
):
    from uploads.services import state

    upload = make_upload(alice, "long-story", status=Status.FAILED)
    for number in range(5):
        state.note(upload, f"line {number}", detail="HTTP 500")
    few = queries_for(carol_client, f"/review/{upload.uid}/")
    assert few <= 12
    for number in range(200):
        state.note(upload, f"more {number}", detail="HTTP 500")
    with django_assert_max_num_queries(few):
        carol_client.get(f"/review/{upload.uid}/")
