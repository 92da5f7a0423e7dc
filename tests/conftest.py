"""Shared fixtures: users alice and bob, a temp staging folder, the IMS simulator over real HTTP,
and (for end-to-end tests) a real Celery worker process with real Redis.

Servers that are slow to start live once per test session (the simulator, OpenStack peers) or
once per test module (the Celery worker); tests reset their state instead of restarting them.
"""

import os
import secrets
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from django.conf import settings as django_settings
from django.utils import timezone, translation

from imssim.server import DEMO_DOMAIN, DEMO_PASSWORD, DEMO_PROJECT_NAME, DEMO_USER, Simulator
from tests.openstack_fixture import openstack_peers  # noqa: F401  (a session fixture)
from tests.s3_fixture import object_staging, staging_backend, swift_store  # noqa: F401  (object staging)

ROOT = Path(__file__).resolve().parent.parent
CSRF_SECRET = "a" * 32  # any 32-letter secret works as the csrftoken cookie and header


def wait_for(condition, *, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    """Wait until condition() returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(autouse=True)
def default_language():
    """Each test starts in the default language: a test that renders German (a request through
    LocaleMiddleware, translation.activate) leaves it active in its thread otherwise."""
    translation.deactivate()
    yield
    translation.deactivate()


@pytest.fixture(autouse=True)
def staging_dir(settings, tmp_path):
    """Every test stages files in a folder of its own."""
    folder = tmp_path / "staging"
    folder.mkdir()
    settings.STORAGES = {
        **django_settings.STORAGES,
        "staging": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": str(folder)},
        },
    }
    return folder


@pytest.fixture
def alice(django_user_model):
    return django_user_model.objects.create_user("alice", "alice@example.com", "alice-pw-1234")


@pytest.fixture
def bob(django_user_model):
    return django_user_model.objects.create_user("bob", "bob@example.com", "bob-pw-1234")


@pytest.fixture
def alice_client(client, alice):
    client.force_login(alice)
    return client


@pytest.fixture(scope="session")
def session_sim(tmp_path_factory):
    sim = Simulator(tmp_path_factory.mktemp("imssim"), processing_seconds=0.0).start()
    yield sim
    sim.stop()


@pytest.fixture
def sim(session_sim, settings):
    """The IMS simulator, cleared for this test, with the portal pointed at it."""
    session_sim.reset()
    settings.IMS_ENDPOINT = session_sim.url
    settings.IAM_ENDPOINT = f"{session_sim.url}/v3"
    return session_sim


def connect_cloud(user):
    """Link `user` to the simulator's demo cloud account through the real IAM call."""
    from uploads import services

    return services.cloud_account_connect(
        user=user, domain=DEMO_DOMAIN, user_name=DEMO_USER, password=DEMO_PASSWORD, project=DEMO_PROJECT_NAME
    )


@pytest.fixture
def alice_connected(alice, sim):
    connect_cloud(alice)
    return alice


@pytest.fixture
def alice_with_token(alice):
    """Alice with a stored (made-up) token: enough for the tus server, which never calls IMS."""
    from uploads import crypto
    from uploads.models import CloudAccount

    CloudAccount.objects.create(
        user=alice,
        domain_name="d",
        user_name="u",
        project_name="eu-de",
        token_encrypted=crypto.encrypt("made-up-token"),
        expires_at=timezone.now() + timedelta(hours=12),
    )
    return alice


@pytest.fixture
def task_queue(monkeypatch):
    """Catch the tasks services would send, instead of sending them: for tests that commit
    (transactional) and must not hand their uploads to a session's running worker."""
    from uploads import services

    sent = []
    monkeypatch.setattr(services.dispatch, "enqueue_push", lambda upload_id, countdown=None: sent.append(("push", upload_id)))
    monkeypatch.setattr(services.dispatch, "enqueue_discard", lambda upload_id: sent.append(("discard", upload_id)))
    monkeypatch.setattr(services.dispatch, "enqueue_early_push", lambda upload_id: sent.append(("early", upload_id)))
    return sent


def make_image(path: Path, size: int) -> Path:
    """A raw disk image: an empty boot sector, then random data."""
    path.write_bytes(bytes(512) + os.urandom(size - 512))
    return path


# ---------------------------------------------------------------------------------------------
# A real Celery worker (with embedded beat) and real Redis, for end-to-end tests.


def _redis_url() -> str:
    # A database number of its own, so that tests never mix with a running `make run`.
    return os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def _database_url(settings_dict) -> str:
    name = settings_dict["NAME"]
    if settings_dict["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{name}"
    user = settings_dict.get("USER") or ""
    password = f":{settings_dict['PASSWORD']}" if settings_dict.get("PASSWORD") else ""
    auth = f"{user}{password}@" if user else ""
    host = settings_dict.get("HOST") or "127.0.0.1"
    port = settings_dict.get("PORT") or 5432
    # Named, so that the test can tell the worker's sessions from its own.
    return f"postgres://{auth}{host}:{port}/{name}?application_name={WORKER_APPLICATION_NAME}"


WORKER_APPLICATION_NAME = "ims-portal-test-worker"


# Every key this test session puts in Redis starts with this, so that two test runs on one
# machine (and one Redis) never take each other's messages.
KEY_PREFIX = f"ims-portal-test-{os.getpid()}:"
# Starts a worker whose broker keys carry KEY_PREFIX (given in the environment).
WORKER_MAIN = (
    "import os, sys; from portal.celery import app; "
    "app.conf.broker_transport_options = {**app.conf.broker_transport_options, "
    "'global_keyprefix': os.environ['TEST_KEY_PREFIX']}; app.worker_main(sys.argv[1:])"
)


@pytest.fixture(scope="session", autouse=True)
def test_broker():
    """Any task a test sends goes to the test Redis database, never to a running portal's,
    under this session's key prefix."""
    from portal.celery import app

    app.conf.broker_url = _redis_url()
    app.conf.broker_transport_options = {**app.conf.broker_transport_options, "global_keyprefix": KEY_PREFIX}
    return app.conf.broker_url


@pytest.fixture(scope="session")
def django_db_modify_db_settings(tmp_path_factory):
    """SQLite tests use a file, not memory, so that a worker process can share the database.
    Connections close after each request: the live server's request threads end, and a
    connection left open in one would keep the test database from being dropped."""
    db = django_settings.DATABASES["default"]
    db["CONN_MAX_AGE"] = 0
    if db["ENGINE"].endswith("sqlite3"):
        db.setdefault("TEST", {})["NAME"] = str(tmp_path_factory.mktemp("db") / "test.sqlite3")


class Worker:
    def __init__(self, env: dict, log_path: Path):
        self.env = env
        self.log_path = log_path
        self.process = None

    def start(self):
        self.log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-c", WORKER_MAIN, "worker", "-B", "-Q", "uploads,celery",
             "--concurrency", "2", "-l", "info", "--without-gossip", "--without-mingle",
             "-s", str(self.log_path.parent / "beat-schedule")],
            cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_for(lambda: b"ready." in self.log_path.read_bytes(), timeout=60, what="the Celery worker")
        return self

    def stop(self):
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def worker_environment() -> dict:
    """More environment for the module's worker: a test module overrides this fixture (e.g. to
    point the worker's mail at a test SMTP server)."""
    return {}


# One per test module: its beat must not follow the uploads of another module's servers (the
# fault tests run a stack of their own on the same database).
@pytest.fixture(scope="module")
def celery_worker_process(django_db_setup, django_db_blocker, session_sim, tmp_path_factory, test_broker,
                          worker_environment):
    """A real Celery worker (with beat) on the test database."""
    url = test_broker
    try:
        redis.Redis.from_url(url).ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"Redis is needed for end-to-end tests at {url}: {exc}")
    from django.db import connection

    folder = tmp_path_factory.mktemp("worker")
    staging = folder / "staging"
    staging.mkdir()
    env = {
        **os.environ,
        "DATABASE_URL": _database_url(connection.settings_dict),
        "REDIS_URL": url,
        "TEST_KEY_PREFIX": KEY_PREFIX,
        "STAGING_DIR": str(staging),
        "IMS_ENDPOINT": session_sim.url,
        "IAM_ENDPOINT": f"{session_sim.url}/v3",
        "TOKEN_ENCRYPTION_KEY": django_settings.TOKEN_ENCRYPTION_KEY,
        "UPLOAD_POLL_SECONDS": "0.5",
        "LOG_LEVEL": "INFO",
        **worker_environment,
    }
    worker = Worker(env, folder / "worker.log").start()
    worker.staging = staging
    worker.redis_url = url
    worker.key_prefix = KEY_PREFIX
    yield worker
    worker.stop()
    client = redis.Redis.from_url(url)
    for key in client.scan_iter(f"{KEY_PREFIX}*"):
        client.delete(key)
    with django_db_blocker.unblock():
        _wait_for_worker_sessions_to_end()


def _wait_for_worker_sessions_to_end():
    """PostgreSQL ends a dead client's session a moment after it is gone; dropping the test
    database before then fails. Wait for the worker's sessions to be gone."""
    from django.db import connection

    if connection.vendor != "postgresql":
        return

    def others() -> int:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = %s",
                [WORKER_APPLICATION_NAME],
            )
            return cursor.fetchone()[0]

    wait_for(lambda: others() == 0, timeout=15, interval=0.1, what="the worker's database sessions to end")


@pytest.fixture
def e2e(celery_worker_process, settings, transactional_db, sim):
    """A test that runs against the real worker: this process uses the same staging, broker
    and database as the worker does."""
    settings.STORAGES = {
        **settings.STORAGES,
        "staging": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": str(celery_worker_process.staging)},
        },
    }
    return celery_worker_process


def tus_headers(client) -> dict:
    """Headers with which a tus client outside Django's test client acts as the signed-in user."""
    session = client.cookies[django_settings.SESSION_COOKIE_NAME].value
    return {
        "Cookie": f"{django_settings.SESSION_COOKIE_NAME}={session}; {django_settings.CSRF_COOKIE_NAME}={CSRF_SECRET}",
        "X-CSRFToken": CSRF_SECRET,
    }


def random_name() -> str:
    return secrets.token_hex(4)
