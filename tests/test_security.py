"""Security settings and what they promise: Celery for hours-long pushes, key rotation, the admin's
review permission, sign-in lock-out, https in production, the Content-Security-Policy,
`check --deploy`, and no secret in any log, broker message or admin page."""

import io
import json
import logging
import os
import secrets
import subprocess
import sys
from datetime import timedelta
from html.parser import HTMLParser
from pathlib import Path

import pytest
import redis
from axes.models import AccessAttempt
from celery.signals import before_task_publish
from cryptography.fernet import Fernet
from django.conf import settings as django_settings
from django.contrib.auth.models import Permission
from django.core.management import call_command
from django.test import Client
from django.utils import timezone

from imssim.server import DEMO_DOMAIN, DEMO_PASSWORD, DEMO_PROJECT_NAME, DEMO_USER
from tests.conftest import connect_cloud, make_image, tus_headers, wait_for
from tests.test_browser import browser_page  # noqa: F401  (a fixture)
from uploads import crypto, services
from uploads.models import CloudAccount, Status, Upload

ROOT = Path(__file__).resolve().parent.parent
CLOUD_FORM = {"domain": DEMO_DOMAIN, "user_name": DEMO_USER, "password": DEMO_PASSWORD, "project": DEMO_PROJECT_NAME}


def an_upload(owner, **fields) -> Upload:
    defaults = {"name": "web-server", "filename": "disk.qcow2", "disk_format": "qcow2", "size": 2048,
                "staged_name": "x.img"}
    return Upload.objects.create(owner=owner, **{**defaults, **fields})


# ---------------------------------------------------------------------------------------------
# Celery for pushes that take hours


@pytest.fixture
def celery_app():
    from portal.celery import app

    app.loader.import_default_modules()
    return app


def test_a_push_of_the_largest_image_at_the_slowest_rate_fits_its_limits_and_the_visibility_timeout(celery_app):
    longest_push = django_settings.UPLOAD_MAX_BYTES / django_settings.SLOWEST_PUSH_BYTES_PER_SECOND
    assert 18 * 3600 < longest_push < 19 * 3600  # 128 GiB at 2 MiB/s
    push = celery_app.tasks["uploads.tasks.push_upload"]
    visibility_timeout = celery_app.conf.broker_transport_options["visibility_timeout"]
    assert longest_push < push.soft_time_limit < push.time_limit < visibility_timeout
    assert longest_push < services.LONGEST_TOKEN_WAIT.total_seconds()  # one token lasts the whole push


def test_pushes_are_acknowledged_late_one_at_a_time_on_their_own_queue(celery_app):
    conf = celery_app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert celery_app.amqp.router.route({}, "uploads.tasks.push_upload")["queue"].name == "uploads"
    assert conf.worker_cancel_long_running_tasks_on_connection_loss is False
    # Short tasks are limited too, well below the push's limits.
    poll = celery_app.tasks["uploads.tasks.poll_upload"]
    assert (poll.time_limit or conf.task_time_limit) <= 3600


def test_every_push_retry_countdown_is_far_below_the_visibility_timeout(alice, sim, celery_app):
    """A countdown longer than the visibility timeout would be delivered again and again."""
    connect_cloud(alice)
    sim.set_faults(fail_puts=services.MAX_PUSH_ATTEMPTS)
    data = os.urandom(1024)
    upload = services.upload_create(owner=alice, size=len(data), filename="d.raw", name="d", disk_format="raw")
    services.upload_receive(upload=upload, offset=0, stream=io.BytesIO(data), length=len(data))
    countdowns = [services.upload_push(upload_id=upload.pk).retry_in for _ in range(services.MAX_PUSH_ATTEMPTS - 1)]
    assert all(countdowns)
    assert max(countdowns) <= 300 < celery_app.conf.broker_transport_options["visibility_timeout"] / 100


# ---------------------------------------------------------------------------------------------
# Rotating the token key


def test_rotate_token_key_re_encrypts_every_token_with_the_first_key(settings, alice, bob):
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    settings.TOKEN_ENCRYPTION_KEY = old
    for user, token in [(alice, "alice-token-value"), (bob, "bob-token-value")]:
        CloudAccount.objects.create(user=user, domain_name="d", user_name=user.username,
                                    token_encrypted=crypto.encrypt(token),
                                    expires_at=timezone.now() + timedelta(hours=12))
    settings.TOKEN_ENCRYPTION_KEY = f"{new},{old}"
    out, err = io.StringIO(), io.StringIO()
    call_command("rotate_token_key", stdout=out, stderr=err)
    assert "Re-encrypted 2 token(s)" in out.getvalue() and err.getvalue() == ""
    settings.TOKEN_ENCRYPTION_KEY = new  # the old key is gone: every token still opens
    tokens = {a.user_name: crypto.decrypt(a.token_encrypted) for a in CloudAccount.objects.all()}
    assert tokens == {"alice": "alice-token-value", "bob": "bob-token-value"}


def test_rotate_token_key_names_the_accounts_whose_token_no_key_opens_but_never_the_token(settings, alice, bob):
    lost = Fernet(Fernet.generate_key()).encrypt(b"lost-token-value").decode()
    CloudAccount.objects.create(user=alice, domain_name="d", user_name="u", token_encrypted=lost,
                                expires_at=timezone.now() + timedelta(hours=12))
    CloudAccount.objects.create(user=bob, domain_name="d", user_name="u", token_encrypted=crypto.encrypt("bob-token"),
                                expires_at=timezone.now() + timedelta(hours=12))
    out, err = io.StringIO(), io.StringIO()
    call_command("rotate_token_key", stdout=out, stderr=err)
    assert "Re-encrypted 1 token(s)" in out.getvalue()
    assert "1 token(s) could not be opened" in err.getvalue() and "alice" in err.getvalue()
    for secret in ("lost-token-value", lost, "bob-token"):
        assert secret not in out.getvalue() + err.getvalue()
    assert CloudAccount.objects.get(user=alice).token_encrypted == lost  # left for its owner to replace


# ---------------------------------------------------------------------------------------------
# The admin's Retry and Cancel need uploads.review_upload


def staff_client(django_user_model, name: str, *codenames: str) -> Client:
    user = django_user_model.objects.create_user(name, f"{name}@example.com", "pw-1234-abcd", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(content_type__app_label="uploads", codename__in=codenames))
    client = Client()
    client.force_login(user)
    return client


def test_a_viewer_sees_uploads_but_not_the_actions_and_cannot_post_them(django_user_model, alice):
    upload = an_upload(alice, status=Status.FAILED)
    viewer = staff_client(django_user_model, "carol", "view_upload")
    page = viewer.get("/admin/uploads/upload/").content.decode()
    assert "web-server" in page
    assert "retry_uploads" not in page and "cancel_uploads" not in page
    assert viewer.get(f"/admin/uploads/upload/{upload.pk}/change/").status_code == 200
    for action in ("cancel_uploads", "retry_uploads"):
        viewer.post("/admin/uploads/upload/", {"action": action, "_selected_action": [upload.pk]})
    upload.refresh_from_db()
    assert upload.status == Status.FAILED and not upload.events.exists()


def test_a_reviewer_may_cancel(django_user_model, alice, django_capture_on_commit_callbacks):
    upload = an_upload(alice)
    reviewer = staff_client(django_user_model, "dave", "view_upload", "review_upload")
    assert "cancel_uploads" in reviewer.get("/admin/uploads/upload/").content.decode()
    with django_capture_on_commit_callbacks():
        reviewer.post("/admin/uploads/upload/", {"action": "cancel_uploads", "_selected_action": [upload.pk]})
    upload.refresh_from_db()
    assert upload.status == Status.CANCELLED


# ---------------------------------------------------------------------------------------------
# Sign-in lock-out (django-axes). Attempts live in the database, so each test starts with none.


def sign_in(client, url: str, password: str, username: str = "alice", **extra):
    return client.post(url, {"username": username, "password": password}, **extra)


def test_five_wrong_passwords_pause_signing_in_for_15_minutes(client, alice):
    for _ in range(4):
        response = sign_in(client, "/accounts/login/", "wrong")
        assert response.status_code == 200 and "Please enter a correct username" in response.content.decode()
    response = sign_in(client, "/accounts/login/", "wrong")  # the fifth
    assert response.status_code == 429
    # Even the right password is refused now, with a page that says why and for how long.
    response = sign_in(client, "/accounts/login/", "alice-pw-1234")
    page = response.content.decode()
    assert response.status_code == 429 and "_auth_user_id" not in client.session
    assert "Sign-in paused" in page and "15 minutes" in page and "portal.css" in page
    # After the cool-off it works again.
    AccessAttempt.objects.update(attempt_time=timezone.now() - timedelta(minutes=16))
    response = sign_in(client, "/accounts/login/", "alice-pw-1234")
    assert response.status_code == 302 and client.session["_auth_user_id"] == str(alice.pk)


def test_the_lock_is_for_one_user_name_from_one_address(client, alice, bob):
    for _ in range(5):
        sign_in(client, "/accounts/login/", "wrong")
    assert sign_in(Client(), "/accounts/login/", "bob-pw-1234", username="bob").status_code == 302
    assert sign_in(Client(), "/accounts/login/", "alice-pw-1234", REMOTE_ADDR="10.9.8.7").status_code == 302


def test_the_admin_sign_in_is_limited_too(client, admin_user):
    for _ in range(5):
        sign_in(client, "/admin/login/", "wrong", username="admin")
    response = sign_in(client, "/admin/login/", "password", username="admin")
    assert response.status_code == 429 and "Sign-in paused" in response.content.decode()


# ---------------------------------------------------------------------------------------------
# https in production, plain http for `make run`


def settings_under(env: dict) -> dict:
    """Some settings as portal/settings.py makes them with this environment (a fresh process)."""
    names = ["DEBUG", "SECURE_SSL_REDIRECT", "SESSION_COOKIE_SECURE", "CSRF_COOKIE_SECURE", "SECURE_HSTS_SECONDS",
             "SECURE_PROXY_SSL_HEADER"]
    code = (f"import json, portal.settings as s; print(json.dumps({{n: getattr(s, n, None) for n in {names!r}}}))")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SECURE_", "DEBUG"))}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**clean, **env}, capture_output=True,
                          text=True, timeout=60, check=True)
    return json.loads(done.stdout)


def test_plain_http_is_the_default_so_that_make_run_can_sign_in():
    values = settings_under({})
    assert values["DEBUG"] is False  # `make run` runs without DEBUG ...
    assert not values["SESSION_COOKIE_SECURE"] and not values["CSRF_COOKIE_SECURE"]  # ... over http
    assert not values["SECURE_SSL_REDIRECT"] and values["SECURE_HSTS_SECONDS"] == 0


def test_secure_https_turns_on_redirect_secure_cookies_and_hsts():
    values = settings_under({"SECURE_HTTPS": "1"})
    assert values["SECURE_SSL_REDIRECT"] and values["SESSION_COOKIE_SECURE"] and values["CSRF_COOKIE_SECURE"]
    assert values["SECURE_HSTS_SECONDS"] == 365 * 24 * 3600 and values["SECURE_PROXY_SSL_HEADER"] is None
    values = settings_under({"SECURE_HTTPS": "1", "SECURE_HSTS_SECONDS": "3600", "SECURE_BEHIND_PROXY": "1"})
    assert values["SECURE_HSTS_SECONDS"] == 3600
    assert values["SECURE_PROXY_SSL_HEADER"] == ["HTTP_X_FORWARDED_PROTO", "https"]


def run_deploy_check(env: dict) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("SECURE_", "DEBUG", "SECRET_KEY", "ALLOWED_HOSTS", "TOKEN_ENCRYPTION_KEY"))}
    return subprocess.run([sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"], cwd=ROOT,
                          env={**clean, **env}, capture_output=True, text=True, timeout=120)


def test_production_settings_pass_check_deploy():
    done = run_deploy_check({
        "DEBUG": "0",
        "SECRET_KEY": secrets.token_urlsafe(50),
        "TOKEN_ENCRYPTION_KEY": Fernet.generate_key().decode(),
        "ALLOWED_HOSTS": "portal.example.com",
        "SECURE_HTTPS": "1",
        "SECURE_BEHIND_PROXY": "1",
    })
    assert done.returncode == 0, done.stdout + done.stderr


def test_check_deploy_refuses_the_demo_defaults():
    done = run_deploy_check({})
    assert done.returncode != 0
    for check in ("security.W009", "security.W008", "security.W012", "security.W016"):  # demo key, http
        assert check in done.stderr, check


# ---------------------------------------------------------------------------------------------
# Content-Security-Policy: on every page, and nothing inline that it would block

POLICY = {
    "default-src": "'self'", "script-src": "'self'", "style-src": "'self'", "img-src": "'self' data:",
    "connect-src": "'self'", "frame-ancestors": "'none'", "base-uri": "'self'", "form-action": "'self'",
    "object-src": "'none'",
}


def policy_of(response) -> dict:
    directives = (part.strip().split(" ", 1) for part in response["Content-Security-Policy"].split(";"))
    return {name: value for name, value in directives}


class InlineCode(HTMLParser):
    """Finds what a strict CSP blocks: inline scripts, event-handler attributes, style attributes."""

    def __init__(self):
        super().__init__()
        self.found = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script" and "src" not in attrs and attrs.get("type") != "application/json":
            self.found.append(f"inline <script> {attrs}")
        self.found += [f"<{tag} {name}=…>" for name in attrs if name.startswith("on") or name == "style"]


@pytest.fixture
def pages(alice_with_token, admin_client):
    alice = Client()
    alice.force_login(alice_with_token)
    upload = an_upload(alice_with_token)
    account = alice_with_token.cloud_account
    return [
        (Client(), "/accounts/login/"),
        (alice, "/upload/"),
        (alice, "/uploads/"),
        (alice, f"/uploads/{upload.uid}/"),
        (alice, "/cloud/"),
        (admin_client, "/admin/"),
        (admin_client, "/admin/uploads/upload/"),
        (admin_client, f"/admin/uploads/upload/{upload.pk}/change/"),
        (admin_client, "/admin/uploads/cloudaccount/"),
        (admin_client, f"/admin/uploads/cloudaccount/{account.pk}/change/"),
    ]


def test_every_page_carries_the_policy_and_has_nothing_inline(pages):
    for client, url in pages:
        response = client.get(url)
        assert response.status_code == 200, url
        assert policy_of(response) == POLICY, url
        parser = InlineCode()
        parser.feed(response.content.decode())
        assert parser.found == [], url


def test_the_lock_out_page_carries_the_policy_too(client, alice):
    for _ in range(5):
        response = sign_in(client, "/accounts/login/", "wrong")
    assert response.status_code == 429 and policy_of(response) == POLICY


# ---------------------------------------------------------------------------------------------
# No secret anywhere: a whole upload with every log, the broker's contents and the admin's pages


def redis_contents(url: str) -> str:
    db = redis.Redis.from_url(url)
    found = []
    for key in db.scan_iter(count=1000):
        kind = db.type(key).decode()
        value = {
            "string": lambda: [db.get(key)],
            "list": lambda: db.lrange(key, 0, -1),
            "hash": lambda: [b"%s=%s" % item for item in db.hgetall(key).items()],
            "set": lambda: list(db.smembers(key)),
            "zset": lambda: db.zrange(key, 0, -1),
        }.get(kind, lambda: [])()
        found += [key, *value]
    return b"\n".join(found).decode(errors="replace")


@pytest.mark.e2e
@pytest.mark.slow
def test_no_token_or_password_in_logs_broker_messages_or_admin_pages(
    e2e, live_server, client, admin_client, alice, sim, tmp_path, caplog
):
    from tusclient.client import TusClient

    caplog.set_level(logging.DEBUG)
    published = []

    def record(body=None, headers=None, routing_key=None, **kwargs):
        published.append(repr((body, headers, routing_key)))

    before_task_publish.connect(record, weak=False)
    try:
        client.force_login(alice)
        assert client.post("/cloud/", CLOUD_FORM).status_code == 302  # the password passes through the portal
        path = make_image(tmp_path / "secret-test.raw", 700 * 1024)
        uploader = TusClient(f"{live_server.url}/tus/", headers=tus_headers(client)).uploader(
            str(path), chunk_size=256 * 1024, metadata={"filename": path.name}
        )
        uploader.upload()
        upload = Upload.objects.get(uid=uploader.url.rstrip("/").rsplit("/", 1)[-1])
        wait_for(lambda: (upload.refresh_from_db(), upload.status == Status.READY)[1], timeout=60,
                 what="the upload to be ready")
    finally:
        before_task_publish.disconnect(record)

    token = crypto.decrypt(CloudAccount.objects.get(user=alice).token_encrypted)
    assert token and len(token) > 16
    admin_pages = "\n".join(
        admin_client.get(url).content.decode()
        for url in ["/admin/uploads/upload/", f"/admin/uploads/upload/{upload.pk}/change/",
                    "/admin/uploads/cloudaccount/", f"/admin/uploads/cloudaccount/{alice.cloud_account.pk}/change/"]
    )
    places = {
        "this process's log (DEBUG)": caplog.text,
        "the worker's log (INFO)": e2e.output(),
        "messages sent to the broker": "\n".join(published),
        "Redis": redis_contents(e2e.redis_url),
        "admin pages": admin_pages,
    }
    # Each place really holds what it should, so that finding nothing in it means something.
    assert any(r.levelno == logging.DEBUG for r in caplog.records)
    assert f"upload {upload.pk}: pushing -> processing" in places["the worker's log (INFO)"]
    assert "uploads.tasks.push_upload" in places["messages sent to the broker"]
    assert upload.name in admin_pages and DEMO_USER in admin_pages
    for name, text in places.items():
        assert token not in text, f"the token is in {name}"
        assert DEMO_PASSWORD not in text, f"the cloud password is in {name}"


def test_an_error_report_of_a_failed_connect_shows_neither_password_nor_token(alice_client, sim, monkeypatch):
    """Error e-mails and error trackers show POST data and every frame's local variables."""
    from django.views.debug import ExceptionReporter

    reports = []

    class Reporter(logging.Handler):
        def emit(self, record):
            if getattr(record, "request", None) is not None and record.exc_info:
                reporter = ExceptionReporter(record.request, *record.exc_info, is_email=True)
                reports.extend([reporter.get_traceback_text(), reporter.get_traceback_html()])

    def database_down(**kwargs):
        raise RuntimeError("the database is down")

    monkeypatch.setattr(CloudAccount.objects, "update_or_create", database_down)
    handler = Reporter()
    tokens_before = set(sim._tokens)
    logging.getLogger("django.request").addHandler(handler)
    try:
        alice_client.raise_request_exception = False
        assert alice_client.post("/cloud/", CLOUD_FORM).status_code == 500
    finally:
        logging.getLogger("django.request").removeHandler(handler)
    [token] = set(sim._tokens) - tokens_before  # the one IAM issued for this connect
    assert reports and all("the database is down" in report for report in reports)
    for report in reports:
        assert DEMO_PASSWORD not in report and token not in report


@pytest.mark.browser
@pytest.mark.slow
def test_the_admin_passes_the_policy_in_a_browser(live_server, admin_user, alice_with_token, browser_page):
    """Chromium reports every CSP violation as a console error; browser_page fails on any. (The
    lock-out page is left to test_the_lock_out_page_carries_the_policy_too: its 429 status is a
    console error by itself; it uses nothing the sign-in page does not.)"""
    page = browser_page
    page.set_default_timeout(30_000)
    # Django's admin names no icon, so the browser asks for /favicon.ico: a 404 that is no CSP matter.
    page.route("**/favicon.ico", lambda route: route.fulfill(status=204))
    upload = an_upload(alice_with_token, status=Status.FAILED)
    page.goto(f"{live_server.url}/admin/login/")
    page.fill("#id_username", "admin")
    page.fill("#id_password", "password")
    page.click("input[type=submit]")
    page.wait_for_selector("text=Site administration")
    page.goto(f"{live_server.url}/admin/uploads/upload/")
    page.check(f"input[name=_selected_action][value='{upload.pk}']")  # the actions' JavaScript runs
    page.select_option("select[name=action]", "cancel_uploads")
    page.click("button[name=index]")
    page.wait_for_selector("text=cancelled")
    page.goto(f"{live_server.url}/admin/uploads/upload/{upload.pk}/change/")
    page.goto(f"{live_server.url}/admin/uploads/cloudaccount/{alice_with_token.cloud_account.pk}/change/")
    page.wait_for_selector("text=Change cloud account")


def test_check_deploy_refuses_the_demo_token_key(settings):
    from uploads.checks import DEMO_TOKEN_KEY, check_token_encryption_key

    settings.TOKEN_ENCRYPTION_KEY = DEMO_TOKEN_KEY
    assert [w.id for w in check_token_encryption_key(None)] == ["uploads.W001"]
    settings.TOKEN_ENCRYPTION_KEY = "x" * 43 + "="
    assert check_token_encryption_key(None) == []
