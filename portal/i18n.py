"""The JavaScript catalogue's address and age: pages load /jsi18n/ with the language and the
catalogues' version in the query, so a browser may keep it (Cache-Control) without ever mixing
languages or keeping words of an older release.

The version is taken once per process from the compiled catalogues (locale/*/LC_MESSAGES/djangojs.mo):
a release with new words is a new process.
"""

import hashlib
from datetime import datetime, timezone
from functools import cache
from pathlib import Path

from django.conf import settings
from django.urls import reverse
from django.utils.http import urlencode
from django.utils.translation import get_language


def _catalogues() -> list[Path]:
    return sorted(p for d in settings.LOCALE_PATHS for p in Path(d).glob("*/LC_MESSAGES/djangojs.mo"))


@cache
def catalogue_version() -> str:
    digest = hashlib.blake2s(digest_size=6)
    for path in _catalogues():
        digest.update(path.read_bytes())
    return digest.hexdigest()


@cache
def _changed_at() -> datetime:
    times = [p.stat().st_mtime for p in _catalogues()]
    return datetime.fromtimestamp(max(times, default=0), tz=timezone.utc)


def catalogue_changed_at(request, *args, **kwargs) -> datetime:
    """Last-Modified of /jsi18n/ (Django's last_modified decorator calls it with the request)."""
    return _changed_at()


# Uppy's language pack for each language but English (node_modules/@uppy/locales/dist/<name>.min.js).
UPPY_LOCALES = {"de": "de_DE"}


def i18n_context(request) -> dict:
    """`jsi18n_url`: the catalogue of the active language, for base.html's script tag;
    `uppy_locale`: Uppy's language pack for the upload page ("" for English)."""
    language = get_language() or settings.LANGUAGE_CODE
    query = urlencode({"lang": language, "v": catalogue_version()})
    return {
        "jsi18n_url": f"{reverse('javascript_catalog')}?{query}",
        "uppy_locale": UPPY_LOCALES.get(language.split("-")[0], ""),
    }
