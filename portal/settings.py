"""Settings for the IMS upload portal: one file, every value read from the environment.

Every variable read here is listed, with its meaning, in `.env.example` and the README.
The defaults give the embedded set-up (SQLite, local staging, the local IMS simulator), so that
`make run` works on a fresh machine without a cloud account.
"""

import os
from datetime import timedelta
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured
from csp.constants import NONE, SELF

from uploads.crypto import DEMO_TOKEN_KEY

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


DEBUG = env_bool("DEBUG", False)

# The embedded default keys are for a laptop demo only; production sets real ones. The demo key
# starts with "django-insecure-", so that `check --deploy` refuses it (security.W009).
SECRET_KEY = os.environ.get("SECRET_KEY") or "django-insecure-dev-only-key-change-me-in-production-0123456789"
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "")

# HTTPS, off by default so that `make run` (plain http on 127.0.0.1, DEBUG off) can sign in: a
# browser never sends a Secure cookie back over http. Production sets SECURE_HTTPS=1: http is
# redirected to https, the session and CSRF cookies are Secure, and browsers are told (HSTS) to
# use nothing but https. It does not follow DEBUG, so that turning DEBUG on for a moment in
# production keeps the cookies Secure. `check --deploy` warns while it is off.
SECURE_HTTPS = env_bool("SECURE_HTTPS", False)
SECURE_SSL_REDIRECT = SECURE_HTTPS
SESSION_COOKIE_SECURE = SECURE_HTTPS
CSRF_COOKIE_SECURE = SECURE_HTTPS
# CSRF_COOKIE_HTTPONLY stays off: static/js/upload.js reads the cookie for tus's X-CSRFToken header.
SECURE_HSTS_SECONDS = int(os.environ.get("SECURE_HSTS_SECONDS") or (365 * 24 * 3600 if SECURE_HTTPS else 0))
SECURE_HSTS_INCLUDE_SUBDOMAINS = True
# "preload" only consents: browsers build it in only if the owner of the registrable domain
# submits that domain (hstspreload.org); on the portal's own host name it changes nothing.
SECURE_HSTS_PRELOAD = True
# Behind a proxy that ends TLS, Django sees plain http and learns from X-Forwarded-Proto what the
# browser used (for the redirect, Secure cookies and the https:// Location of tus uploads). Turn it
# on only when the proxy sets that header on every request, or a client could claim https itself.
if env_bool("SECURE_BEHIND_PROXY", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

# Content-Security-Policy on every page (django-csp): scripts, styles and requests only from this
# site and no inline script or style, so injected markup cannot run. The pages and Django's admin
# have none inline (json_script blocks are data, not script); Uppy's CSS draws icons as data: images.
# django-csp leaves out Django's own debug error pages (inline styles) when DEBUG is on.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF],
        "style-src": [SELF],
        "img-src": [SELF, "data:"],
        "connect-src": [SELF],
        "frame-ancestors": [NONE],
        "base-uri": [SELF],
        "form-action": [SELF],
        "object-src": [NONE],
    },
}

# Cloud tokens are encrypted with a key of their own, not with SECRET_KEY, so that rotating one
# does not touch the other. A comma-separated list of Fernet keys: the first encrypts, all decrypt.
TOKEN_ENCRYPTION_KEY = os.environ.get("TOKEN_ENCRYPTION_KEY") or DEMO_TOKEN_KEY  # `make run` needs no set-up

IMS_ENDPOINT = os.environ.get("IMS_ENDPOINT", "http://127.0.0.1:8990").rstrip("/")
IAM_ENDPOINT = os.environ.get("IAM_ENDPOINT", "http://127.0.0.1:8990/v3").rstrip("/")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "axes",
    "csp",
    "uploads",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "csp.middleware.CSPMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    # The person's language: the switch in the header (a cookie), else the browser's Accept-Language.
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "axes.middleware.AxesMiddleware",  # last, as django-axes asks: it turns a lock-out into its page
]

# Error reports (e-mails, DEBUG pages) hide secret-looking POST fields and local variables too.
DEFAULT_EXCEPTION_REPORTER_FILTER = "uploads.reporting.SecretsHidingFilter"

ROOT_URLCONF = "portal.urls"
WSGI_APPLICATION = "portal.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.template.context_processors.i18n",
                "portal.i18n.i18n_context",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "uploads.views.cloud_account_context",
                "uploads.limits.limits_context",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL") or f"sqlite:///{BASE_DIR / 'db.sqlite3'}",
        conn_max_age=60,
    )
}
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # A web process and the workers write to the same SQLite file. WAL lets readers (the status
    # polls) go on while a writer commits, and synchronous=NORMAL syncs at checkpoints rather
    # than at every commit: a commit no longer waits behind the staging disk's writeback. A
    # writer waits for the lock (timeout) instead of failing at once.
    DATABASES["default"].setdefault("OPTIONS", {})["timeout"] = 30
    DATABASES["default"]["OPTIONS"]["transaction_mode"] = "IMMEDIATE"
    DATABASES["default"]["OPTIONS"]["init_command"] = "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "upload"
LOGOUT_REDIRECT_URL = "login"

# Password guessing (django-axes, on the sign-in page and the admin's alike): after 5 wrong
# passwords for one user name from one IP address, that pair is locked out for 15 minutes. Five
# forgives typos; 15 minutes caps guessing at 20 tries an hour. Locking the pair, not the name
# alone, keeps one person from locking a colleague out from elsewhere, and not the address alone,
# keeps one office behind one NAT address from locking each other out. Attempts are kept in the
# database, which web processes share. Behind a proxy every client has the proxy's address (no
# X-Forwarded-For is trusted), so the lock then is per user name.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = 5
AXES_COOLOFF_TIME = timedelta(minutes=15)
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "registration/locked_out.html"

# English and German (locale/de/). English is the language of the code and the fallback; a new
# language is one more line here and a locale/<code>/ folder (README, "Languages").
LANGUAGE_CODE = "en"
LANGUAGES = [("en", "English"), ("de", "Deutsch")]
LOCALE_PATHS = [BASE_DIR / "locale"]
# The language switch's cookie lasts a year; it is read only by the server.
LANGUAGE_COOKIE_AGE = 365 * 24 * 3600
LANGUAGE_COOKIE_SAMESITE = "Lax"
LANGUAGE_COOKIE_HTTPONLY = True
LANGUAGE_COOKIE_SECURE = SECURE_HTTPS
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
# Dates in the person's locale: portal/formats/<language>/formats.py (DATETIME_FORMAT ...).
FORMAT_MODULE_PATH = ["portal.formats"]
# Numbers are not grouped by default: a number in an attribute, a URL or an SVG coordinate must
# stay plain digits. Counts for people are grouped where they are shown, in the person's locale
# (the `grouped` template filter: 1,073,741,824 in English, 1.073.741.824 in German).
USE_THOUSAND_SEPARATOR = False

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
# Uppy comes from the npm registry (package.json), not from copies in the repo.
STATICFILES_DIRS = [
    BASE_DIR / "static",
    ("vendor/uppy", BASE_DIR / "node_modules" / "uppy" / "dist"),
    # Uppy's own words in other languages (de_DE.min.js ...): the upload page in German.
    ("vendor/uppy-locales", BASE_DIR / "node_modules" / "@uppy" / "locales" / "dist"),
]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
    # Where uploaded bytes wait between the browser and IMS: a folder on local disk, or
    # S3-compatible object storage (OBS) when STAGING_S3_BUCKET is set (uploads/staging/).
    "staging": {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": os.environ.get("STAGING_DIR") or str(BASE_DIR / "var" / "staging")},
    },
}
if os.environ.get("STAGING_S3_BUCKET"):
    from botocore.config import Config as _BotoConfig

    STORAGES["staging"] = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": os.environ["STAGING_S3_BUCKET"],
            "location": os.environ.get("STAGING_S3_PREFIX", "staging/"),
            "endpoint_url": os.environ.get("STAGING_S3_ENDPOINT_URL") or None,
            "region_name": os.environ.get("STAGING_S3_REGION") or None,
            "access_key": os.environ.get("STAGING_S3_ACCESS_KEY") or None,
            "secret_key": os.environ.get("STAGING_S3_SECRET_KEY") or None,
            "addressing_style": os.environ.get("STAGING_S3_ADDRESSING_STYLE", "path"),
            "signature_version": "s3v4",
            "file_overwrite": True,
            # S3-compatible stores (OBS, Swift) do not all know the CRC checksum headers newer
            # boto3 sends by default; a short connect timeout makes an unreachable store a
            # quick, clear error rather than a hanging request.
            "client_config": _BotoConfig(
                request_checksum_calculation="when_required", response_checksum_validation="when_required",
                connect_timeout=5, read_timeout=60, retries={"max_attempts": 2, "mode": "standard"},
            ),
        },
    }
# Object staging: the part size of the multipart upload a tus upload becomes (at least 5 MiB;
# 64 MiB lets 128 GB fit in 2,048 parts, under S3's 10,000), and the local folder where the
# worker copies an object for qemu-img (conversion) and where a PATCH spools one part.
STAGING_S3_PART_SIZE = int(os.environ.get("STAGING_S3_PART_SIZE", 64 * 1024**2))
# The most parts the store takes in one object: 10,000 for S3 and OBS (Swift's s3api: 1,000
# unless its max_upload_part_num is raised). Parts grow when a file would need more.
STAGING_S3_MAX_PARTS = int(os.environ.get("STAGING_S3_MAX_PARTS", 10_000))
STAGING_SCRATCH_DIR = os.environ.get("STAGING_SCRATCH_DIR") or str(BASE_DIR / "var" / "scratch")
# Send images staged in OBS by IMS's import from OBS (POST /v2/cloudimages/action) instead of
# streaming them through the worker; only with object staging on OBS in the IMS's region.
IMS_IMPORT_FROM_OBS = os.environ.get("IMS_IMPORT_FROM_OBS", "0") == "1"
# How often the worker asks IMS about an import job, and how long it waits for one at most.
IMS_IMPORT_POLL_SECONDS = float(os.environ.get("IMS_IMPORT_POLL_SECONDS", 5))
IMS_IMPORT_TIMEOUT_SECONDS = float(os.environ.get("IMS_IMPORT_TIMEOUT_SECONDS", 6 * 3600))
WHITENOISE_USE_FINDERS = DEBUG

# Uploads: the limits of IMS and of the tus server.
UPLOAD_MAX_BYTES = 128 * 1024**3 - 1  # IMS takes files under 128 GB (137438953472 bytes).
# The disk formats the target's POST /v2/images takes; files in other formats are converted to qcow2.
IMS_DISK_FORMATS = env_list("IMS_DISK_FORMATS", "qcow2,vhd,raw,zvhd2")
# An unfinished browser upload expires this long after it was created (sending more bytes does
# not push it back, so that a trickle cannot hold staging space for ever).
TUS_UPLOAD_EXPIRY_SECONDS = int(os.environ.get("TUS_UPLOAD_EXPIRY_SECONDS", 7 * 24 * 3600))
# What one person may hold in staging at once: unfinished uploads (neither ready nor cancelled)
# whose staged file is still there, counted and summed by their declared sizes. Without a limit,
# one person can claim the staging disk with empty uploads, or fill it, within seconds (figures:
# bench/README.md, "Figures the code's comments lean on").
UPLOAD_MAX_UNFINISHED_PER_USER = int(os.environ.get("UPLOAD_MAX_UNFINISHED_PER_USER", 20))
UPLOAD_MAX_UNFINISHED_BYTES_PER_USER = int(os.environ.get("UPLOAD_MAX_UNFINISHED_BYTES_PER_USER", 1024**4))
# A new upload is refused while the staging disk has less free space than its size plus this
# reserve, which stays for conversions, the database and the logs on the same disk.
STAGING_FREE_RESERVE_BYTES = int(os.environ.get("STAGING_FREE_RESERVE_BYTES", 5 * 1024**3))
# Hostile or broken clients (gunicorn.conf.py, portal/gunicorn_worker.py, uploads/request_body.py):
# a client that sends nothing for REQUEST_IDLE_TIMEOUT_SECONDS, in its headers, its body or an
# upload's chunk, is cut off; a slow client that keeps sending is not. What an upload received
# until then is kept, and a new PATCH may take over from a writer that silent.
REQUEST_IDLE_TIMEOUT_SECONDS = float(os.environ.get("REQUEST_IDLE_TIMEOUT_SECONDS", 60))
# Every request but a tus PATCH (forms, sign-in) has a small body: larger ones are refused (413)
# before a thread waits for them, and Django refuses them too under any other server.
REQUEST_BODY_MAX_BYTES = int(os.environ.get("REQUEST_BODY_MAX_BYTES", 64 * 1024))
DATA_UPLOAD_MAX_MEMORY_SIZE = REQUEST_BODY_MAX_BYTES
# How many request threads of one web process may receive upload chunks at once; more get 503
# and try again (tus clients do by themselves), so that pages always find a thread: gunicorn.conf.py
# gives each process 32, this leaves 8 of them to everything else.
UPLOAD_RECEIVING_THREADS = int(os.environ.get("UPLOAD_RECEIVING_THREADS", 24))
# MD5 and SHA-512 of a file computed while it arrives (local staging; uploads/running_sums.py), so
# that the push sends it without hashing it again (sendfile on plain http). It moves about 2.7 CPU
# s per GiB from the worker to the web process: off (0), the push hashes while sending, as before.
UPLOAD_HASH_ON_ARRIVAL = env_bool("UPLOAD_HASH_ON_ARRIVAL", True)
# Review (uploads/review.py): when on, every upload that passed the file check waits for a
# reviewer (permission uploads.review_upload) to approve it before it is sent to IMS. Members of
# the groups in UPLOAD_REVIEW_GROUPS (comma-separated names) need approval even when it is off.
UPLOAD_REVIEW_REQUIRED = env_bool("UPLOAD_REVIEW_REQUIRED", False)
UPLOAD_REVIEW_GROUPS = env_list("UPLOAD_REVIEW_GROUPS", "")
# How long the staged copy of an image that is ready in IMS is kept (to compare, or send again).
STAGING_RETENTION_HOURS = float(os.environ.get("STAGING_RETENTION_HOURS", 24))
UPLOAD_POLL_SECONDS = float(os.environ.get("UPLOAD_POLL_SECONDS", 5))
# A push says it is alive every PUSH_HEARTBEAT_SECONDS; one silent for PUSH_STALE_SECONDS has
# lost its worker and is taken over.
PUSH_HEARTBEAT_SECONDS = float(os.environ.get("PUSH_HEARTBEAT_SECONDS", 10))
PUSH_STALE_SECONDS = float(os.environ.get("PUSH_STALE_SECONDS", 120))
# Workers shared fairly (uploads/fairness.py): at most this many pushes run at once for one
# person, and for one cloud project (CloudAccount.project_id); more wait, received, and start by
# themselves when a push of theirs ends. Keep them below the number of worker processes, so that
# one person's uploads never hold every worker.
# (At least 1: with 0 nothing would ever be sent.)
PUSH_CONCURRENCY_PER_USER = max(1, int(os.environ.get("PUSH_CONCURRENCY_PER_USER", 2)))
PUSH_CONCURRENCY_PER_PROJECT = max(1, int(os.environ.get("PUSH_CONCURRENCY_PER_PROJECT", 4)))
# Early push (uploads/services/early_push.py): a QCOW2, RAW or VHD file that IMS takes as it is
# is sent on to IMS while the browser still uploads it, the end of the file held back until the
# whole file passed the check. When the browser sends nothing for EARLY_PUSH_STALL_SECONDS, the
# early push is given up (its image deleted) and the file is sent the usual way once it arrived:
# keep it below the image service's idle timeout for a request body (Glance: client_socket_timeout,
# 900 s; a load balancer in front of IMS may cut sooner).
EARLY_PUSH = env_bool("EARLY_PUSH", True)
EARLY_PUSH_STALL_SECONDS = float(os.environ.get("EARLY_PUSH_STALL_SECONDS", 30))
# The reconciler runs this often and re-queues received uploads nobody claimed for this long.
RECONCILE_EVERY_SECONDS = float(os.environ.get("RECONCILE_EVERY_SECONDS", 60))
RECONCILE_GRACE_SECONDS = float(os.environ.get("RECONCILE_GRACE_SECONDS", 120))

# E-mail (uploads/notifications.py): owners hear when an upload is ready or needs them, reviewers
# when uploads await review. Sent by a Celery task, never in a request. Without EMAIL_HOST mails go
# to the console (the worker's output under `make run`); with it, to that SMTP server.
EMAIL_HOST = os.environ.get("EMAIL_HOST", "")
EMAIL_BACKEND = os.environ.get("EMAIL_BACKEND") or (
    "django.core.mail.backends.smtp.EmailBackend" if EMAIL_HOST else "django.core.mail.backends.console.EmailBackend"
)
EMAIL_PORT = int(os.environ.get("EMAIL_PORT") or 25)
EMAIL_HOST_USER = os.environ.get("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = os.environ.get("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", False)  # STARTTLS, usually on port 587
EMAIL_USE_SSL = env_bool("EMAIL_USE_SSL", False)  # TLS from the first byte, usually on port 465
if EMAIL_USE_TLS and EMAIL_USE_SSL:  # Django would refuse each mail; say so at start instead
    raise ImproperlyConfigured("Set at most one of EMAIL_USE_TLS and EMAIL_USE_SSL.")
# Django waits for ever by default: a mail server that hangs would hold a worker.
EMAIL_TIMEOUT = float(os.environ.get("EMAIL_TIMEOUT") or 30)
DEFAULT_FROM_EMAIL = os.environ.get("DEFAULT_FROM_EMAIL") or "IMS upload portal <ims-portal@localhost>"
# Where people reach the portal, for the links in mails (a worker has no request to ask).
PORTAL_BASE_URL = (os.environ.get("PORTAL_BASE_URL") or "http://127.0.0.1:8000").rstrip("/")

# Celery: the broker is Redis; the database row is the source of truth, the message a nudge.
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
# A push of a big image takes hours: acknowledge a message only when its task has finished, so that
# a worker that dies mid-push leaves the message to be delivered again (the row guards against
# doing the work twice), and let each worker take one message at a time.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# A worker that lost Redis tries again for as long as it takes (Celery stops after 100 attempts,
# about 50 minutes, and the worker process with them): an outage must never cost a worker.
CELERY_BROKER_CONNECTION_MAX_RETRIES = None
# kombu's Redis transport with a channel that closes cleanly when Redis has gone: kombu's own
# ended the worker when Redis went away while a push ran (portal/celery.py says how).
CELERY_BROKER_TRANSPORT = "portal.celery:RedisTransport" if REDIS_URL.startswith("redis://") else None
# Pushes (hours long) have a queue of their own, so that polls and clean-ups never wait behind them.
CELERY_TASK_ROUTES = {
    "uploads.tasks.push_upload": {"queue": "uploads"},
    "uploads.tasks.early_push_upload": {"queue": "uploads"},
}
# How long a push may take. The slowest link to IMS we support is 2 MiB/s (16 Mbit/s): at that
# rate the largest image IMS takes (UPLOAD_MAX_BYTES, just under 128 GiB) is sent in 65 536 s, about
# 18.2 hours, which fits in one IAM token (24 hours). The push task also checks the file and may
# convert it (a 128 GB conversion on a slow disk takes most of an hour: bench/README.md), and
# creates and checks the image: 2 hours more, so SoftTimeLimitExceeded is raised in it after about 20.2 hours
# and the worker kills it 10 minutes later. Every other task is short (one IMS call, at most
# 10 minutes): 30 minutes frees a hung one.
SLOWEST_PUSH_BYTES_PER_SECOND = 2 * 1024**2
LONGEST_PUSH_SECONDS = UPLOAD_MAX_BYTES // SLOWEST_PUSH_BYTES_PER_SECOND + 1
PUSH_SOFT_TIME_LIMIT = LONGEST_PUSH_SECONDS + 2 * 3600
PUSH_TIME_LIMIT = PUSH_SOFT_TIME_LIMIT + 10 * 60
CELERY_TASK_ANNOTATIONS = {
    "uploads.tasks.push_upload": {"soft_time_limit": PUSH_SOFT_TIME_LIMIT, "time_limit": PUSH_TIME_LIMIT},
    # An early push lasts as long as the browser upload; past the soft limit it is given up, and
    # the usual push sends the file once it arrived.
    "uploads.tasks.early_push_upload": {"soft_time_limit": PUSH_SOFT_TIME_LIMIT, "time_limit": PUSH_TIME_LIMIT},
}
CELERY_TASK_TIME_LIMIT = 30 * 60
# Redis has no acknowledgements of its own: kombu keeps an unacknowledged message aside and hands
# it to a worker again once `visibility_timeout` has passed (Celery docs, "Using Redis: Caveats").
# With late acknowledgement a push is unacknowledged for its whole run, so the timeout is longer
# than the longest push can run (its hard limit plus an hour, about 21.4 hours); otherwise a second
# worker would get the message while the first still sends. The price: the message of a worker
# that died comes back only that late, but the reconciler (beat, every RECONCILE_EVERY_SECONDS)
# queues such a push again after PUSH_STALE_SECONDS without a heartbeat, and beat hands out due
# polls itself. The same timeout bounds ETA/countdown: a task delayed for longer would be delivered
# again and again, for ever; our longest countdown is the 300 s of a push retry
# (uploads/services/push.py). Web and worker must use the same value, so it lives here.
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": PUSH_TIME_LIMIT + 3600}
# A short loss of Redis should not stop a push that is hours in: it needs only the database and IMS.
# Its message then cannot be acknowledged and comes back after the visibility timeout, when the row
# (no longer "received") turns it away. Cancelling (True, Celery 6's default) would send it again
# from the first byte.
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = False
# Beat runs exactly once per deployment (one `celery beat` process, never `worker -B` on several
# machines): a second beat would only double the work, because each of these tasks is safe to
# run twice at once (tests/test_fairness.py), but it is not a way to scale.
CELERY_BEAT_SCHEDULE = {
    "poll-ims": {"task": "uploads.tasks.poll_due_uploads", "schedule": UPLOAD_POLL_SECONDS},
    "reconcile": {"task": "uploads.tasks.reconcile_uploads", "schedule": RECONCILE_EVERY_SECONDS},
    "clean-staging": {"task": "uploads.tasks.clean_staging", "schedule": 3600.0},
    # Reviewers whose 15 minutes since their last mail have passed hear of uploads still waiting.
    "review-mails": {"task": "uploads.tasks.mail_reviewers", "schedule": 60.0},
    # An owner's mail whose message was lost (Redis away when the upload ended) is queued again.
    "lost-mails": {"task": "uploads.tasks.mail_lost_outcomes", "schedule": 120.0},
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
}
