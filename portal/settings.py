"""Settings for the IMS upload portal: one file, every value read from the environment.

Every variable read here is listed, with its meaning, in `.env.example` and the README.
The defaults give the embedded set-up (SQLite, local staging, the local IMS simulator), so that
`make run` works on a fresh machine without a cloud account.
"""

import os
from pathlib import Path

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


DEBUG = env_bool("DEBUG", False)

# The embedded default keys are for a laptop demo only; `check --deploy` and production set real ones.
SECRET_KEY = os.environ.get("SECRET_KEY") or "insecure-dev-only-key-change-me-in-production-0123456789"
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "")

# Cloud tokens are encrypted with a key of their own, not with SECRET_KEY, so that rotating one
# does not touch the other. A comma-separated list of Fernet keys: the first encrypts, all decrypt.
TOKEN_ENCRYPTION_KEY = os.environ.get("TOKEN_ENCRYPTION_KEY") or (
    # A fixed demo key (urlsafe base64 of 32 bytes) so that `make run` needs no set-up.
    "ZGVtby1vbmx5LWtleS1ub3QtZm9yLXByb2QhISEhISE="  # b"demo-only-key-not-for-prod!!!!!!"
)

IMS_ENDPOINT = os.environ.get("IMS_ENDPOINT", "http://127.0.0.1:8990").rstrip("/")
IAM_ENDPOINT = os.environ.get("IAM_ENDPOINT", "http://127.0.0.1:8990/v3").rstrip("/")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "uploads",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

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
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "uploads.views.cloud_account_context",
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
    # A web process and a worker write to the same SQLite file: wait for the lock instead of
    # failing at once, and don't reuse connections across threads.
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"].setdefault("OPTIONS", {})["timeout"] = 30
    DATABASES["default"]["OPTIONS"]["transaction_mode"] = "IMMEDIATE"

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

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
# Uppy comes from the npm registry (package.json), not from copies in the repo.
STATICFILES_DIRS = [
    BASE_DIR / "static",
    ("vendor/uppy", BASE_DIR / "node_modules" / "uppy" / "dist"),
]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
    # Where uploaded bytes wait between the browser and IMS (a folder on local disk).
    "staging": {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": os.environ.get("STAGING_DIR") or str(BASE_DIR / "var" / "staging")},
    },
}
WHITENOISE_USE_FINDERS = DEBUG

# Uploads: the limits of IMS and of the tus server.
UPLOAD_MAX_BYTES = 128 * 1024**3 - 1  # IMS takes files under 128 GB (137438953472 bytes).
TUS_UPLOAD_EXPIRY_SECONDS = int(os.environ.get("TUS_UPLOAD_EXPIRY_SECONDS", 7 * 24 * 3600))
# How long the staged copy of an image that is ready in IMS is kept (to compare, or send again).
STAGING_RETENTION_HOURS = float(os.environ.get("STAGING_RETENTION_HOURS", 24))
UPLOAD_POLL_SECONDS = float(os.environ.get("UPLOAD_POLL_SECONDS", 5))
# A push beats every 10 s; one silent for this long has lost its worker and is taken over.
PUSH_STALE_SECONDS = float(os.environ.get("PUSH_STALE_SECONDS", 120))
# The reconciler runs this often and re-queues received uploads nobody claimed for this long.
RECONCILE_EVERY_SECONDS = float(os.environ.get("RECONCILE_EVERY_SECONDS", 60))
RECONCILE_GRACE_SECONDS = float(os.environ.get("RECONCILE_GRACE_SECONDS", 120))

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
# Pushes (hours long) have a queue of their own, so that polls and clean-ups never wait behind them.
CELERY_TASK_ROUTES = {"uploads.tasks.push_upload": {"queue": "uploads"}}
CELERY_BEAT_SCHEDULE = {
    "poll-ims": {"task": "uploads.tasks.poll_due_uploads", "schedule": UPLOAD_POLL_SECONDS},
    "reconcile": {"task": "uploads.tasks.reconcile_uploads", "schedule": RECONCILE_EVERY_SECONDS},
    "clean-staging": {"task": "uploads.tasks.clean_staging", "schedule": 3600.0},
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
}
