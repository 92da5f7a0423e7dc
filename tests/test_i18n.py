"""English and German: the catalogues are complete and current, pages and the JavaScript speak
the person's language (browser or the header's switch), and sizes, numbers and dates follow it."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import polib
import pytest
from django.conf import settings
from django.contrib.staticfiles import finders
from django.test import Client
from django.utils import translation

from uploads import diskimage
from uploads.i18n import local_size, stored_text
from uploads.models import Status, Upload, UploadEvent
from uploads.services import state

ROOT = Path(__file__).resolve().parent.parent
LOCALE = ROOT / "locale"
CATALOGUES = sorted(LOCALE.glob("*/LC_MESSAGES/*.po"))
GERMAN = {"HTTP_ACCEPT_LANGUAGE": "de-DE,de;q=0.9,en;q=0.5"}
# %(name)s in Python and templates, %{name} in Uppy's strings, {name} in the upload page's words.
PLACEHOLDERS = re.compile(r"%\(\w+\)[sdg]|%\{\w+\}|\{\w+\}|%%")


def entries(path: Path):
    return [e for e in polib.pofile(str(path)) if not e.obsolete]


def test_there_are_german_catalogues_for_the_pages_and_the_javascript():
    assert {p.relative_to(LOCALE).as_posix() for p in CATALOGUES} >= {
        "de/LC_MESSAGES/django.po", "de/LC_MESSAGES/djangojs.po"}


@pytest.mark.parametrize("path", CATALOGUES, ids=lambda p: p.relative_to(LOCALE).as_posix())
def test_every_string_is_translated_and_none_is_fuzzy(path):
    po = polib.pofile(str(path))
    untranslated = [e.msgid for e in po.untranslated_entries() if not e.obsolete]
    fuzzy = [e.msgid for e in po.fuzzy_entries() if not e.obsolete]
    assert not untranslated, f"{path}: not translated: {untranslated}"
    assert not fuzzy, f"{path}: fuzzy (check the translation, then drop the flag): {fuzzy}"
    assert not po.metadata_is_fuzzy


@pytest.mark.parametrize("path", CATALOGUES, ids=lambda p: p.relative_to(LOCALE).as_posix())
def test_translations_keep_every_placeholder(path):
    def found(text):
        return set(PLACEHOLDERS.findall(text))

    wrong = []
    for entry in entries(path):
        if entry.msgid_plural:  # the singular may leave the count out ("one more")
            forms = [entry.msgstr_plural[i] for i in sorted(entry.msgstr_plural)]
            allowed = found(entry.msgid) | found(entry.msgid_plural)
            if found(forms[-1]) != found(entry.msgid_plural) or any(not found(f) <= allowed for f in forms):
                wrong.append((entry.msgid_plural, forms))
        elif found(entry.msgid) != found(entry.msgstr):
            wrong.append((entry.msgid, entry.msgstr))
    assert not wrong


@pytest.mark.parametrize("path", CATALOGUES, ids=lambda p: p.relative_to(LOCALE).as_posix())
def test_the_committed_compiled_catalogue_matches_its_po_file(path):
    """The .mo files are committed (no msgfmt needed on a fresh clone): they must say what the
    .po says. After editing a .po: manage.py compilemessages (make messages)."""
    mo = path.with_suffix(".mo")
    assert mo.exists(), f"{mo} is missing: run make messages"

    def key(e):
        return (e.msgctxt or "", e.msgid, e.msgid_plural or "")

    def value(e):
        return tuple(e.msgstr_plural[i] for i in sorted(e.msgstr_plural)) if e.msgid_plural else e.msgstr

    compiled = {key(e): value(e) for e in polib.mofile(str(mo)) if e.msgid}
    written = {key(e): value(e) for e in entries(path) if e.translated()}
    assert compiled == written, f"{mo} is out of date with {path.name}: run make messages"


@pytest.mark.skipif(shutil.which("xgettext") is None, reason="gettext's xgettext is not installed (make test installs it)")
def test_the_catalogues_hold_exactly_the_strings_the_code_wraps(tmp_path):
    """makemessages over a copy of the code: a newly wrapped string (not yet in locale/) or a
    string no longer in the code (still in locale/) fails here, so German never lags behind."""
    for part in ("manage.py", "portal", "uploads", "templates", "static/js", "locale"):
        source, target = ROOT / part, tmp_path / part
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    for domain in ("django", "djangojs"):
        subprocess.run(
            [sys.executable, "manage.py", "makemessages", "--locale", "de", "--domain", domain],
            cwd=tmp_path, check=True, capture_output=True, timeout=300,
        )

    def ids(path: Path) -> set:
        return {(e.msgctxt, e.msgid, e.msgid_plural) for e in entries(path)}

    for domain in ("django", "djangojs"):
        relative = f"de/LC_MESSAGES/{domain}.po"
        in_code, in_catalogue = ids(tmp_path / "locale" / relative), ids(LOCALE / relative)
        missing = sorted(msgid for _, msgid, _ in in_code - in_catalogue)
        gone = sorted(msgid for _, msgid, _ in in_catalogue - in_code)
        assert not missing, f"wrapped in the code, missing from locale/{relative} (make messages, then translate): {missing}"
        assert not gone, f"in locale/{relative} but no longer in the code (make messages): {gone}"


# ---- pages in German ----------------------------------------------------------------------------


@pytest.fixture
def upload(alice):
    return Upload.objects.create(
        owner=alice, name="web-server", filename="disk.qcow2", disk_format="qcow2", size=1073741824,
        received_bytes=536870912, staged_name="x.img",
    )


def test_a_page_is_german_when_the_browser_asks_for_german(alice_client, upload):
    page = alice_client.get("/uploads/", **GERMAN).content.decode()
    assert '<html lang="de">' in page
    assert "<h1>Meine Uploads</h1>" in page
    assert "512 MB von 1,0 GB empfangen" in page
    english = alice_client.get("/uploads/", HTTP_ACCEPT_LANGUAGE="en").content.decode()
    assert "<h1>My uploads</h1>" in english and "512 MB of 1.0 GB received" in english


def test_the_switch_in_the_header_sets_the_language_and_returns_to_the_page(alice_client, upload):
    page = alice_client.get("/uploads/?state=in_progress").content.decode()
    switch = re.search(r'<form class="lang-switch".*?</form>', page, re.S).group(0)
    assert 'action="/i18n/setlang/"' in switch and 'aria-labelledby="lang-switch-label"' in switch
    assert 'name="next" value="/uploads/?state=in_progress"' in switch
    assert '<button name="language" value="de" lang="de"' in switch and 'aria-pressed="false">Deutsch</button>' in switch
    assert 'aria-pressed="true">English</button>' in switch

    response = alice_client.post("/i18n/setlang/", {"language": "de", "next": "/uploads/?state=in_progress"})
    assert response.status_code == 302 and response.url == "/uploads/?state=in_progress"
    cookie = response.cookies[settings.LANGUAGE_COOKIE_NAME]
    assert cookie.value == "de" and cookie["httponly"] and cookie["samesite"] == "Lax"
    page = alice_client.get("/uploads/", HTTP_ACCEPT_LANGUAGE="en").content.decode()  # the switch wins
    assert "<h1>Meine Uploads</h1>" in page and 'aria-pressed="true">Deutsch</button>' in page

    alice_client.post("/i18n/setlang/", {"language": "en", "next": "/uploads/"})
    assert "<h1>My uploads</h1>" in alice_client.get("/uploads/", **GERMAN).content.decode()


def test_the_switch_is_on_the_sign_in_page_too(client):
    page = client.get("/accounts/login/", **GERMAN).content.decode()
    assert '<h1 id="login-title">Anmelden</h1>' in page
    assert 'class="lang-switch"' in page and "Passwort" in page


def test_every_page_of_the_uploader_is_german(alice_client, alice_with_token, upload):
    for url, words in [
        ("/upload/", ["Disk-Images hochladen", "Gleich für jede Datei", "Welche Dateien?"]),
        (f"/uploads/{upload.uid}/", ["Verlauf", "Betriebssystem", "(1.073.741.824 Byte)"]),
        ("/cloud/", ["Ihr Cloud-Konto", "Anmeldung gültig bis", "IAM-Benutzername"]),
    ]:
        page = alice_client.get(url, **GERMAN).content.decode()
        for word in words:
            assert word in page, (url, word)


def test_dates_follow_the_language(alice_client, upload):
    page = alice_client.get(f"/uploads/{upload.uid}/", **GERMAN).content.decode()
    assert re.search(r"<dd><time datetime=\"[^\"]+\">\d{1,2}\. \w{3} \d{4}, \d\d:\d\d UTC</time>", page)
    english = alice_client.get(f"/uploads/{upload.uid}/", HTTP_ACCEPT_LANGUAGE="en").content.decode()
    assert re.search(r"<dd><time datetime=\"[^\"]+\">\d{1,2} \w{3} \d{4}, \d\d:\d\d UTC</time>", english)


def test_sizes_are_written_in_the_persons_language():
    with translation.override("de"):
        assert (local_size(1536 * 1024**2), local_size(128 * 1024**3), local_size(1), local_size(500)) == (
            "1,5 GB", "128 GB", "1 Byte", "500 Byte")
    with translation.override("en"):
        assert (local_size(1536 * 1024**2), local_size(1), local_size(500)) == ("1.5 GB", "1 byte", "500 bytes")


def test_a_refused_file_is_explained_in_german_also_when_it_was_refused_before_the_switch(
    alice_client, upload, tmp_path
):
    path = tmp_path / "zeros.qcow2"
    path.write_bytes(bytes(1024 * 1024))  # no disk image format at all
    problem = diskimage.inspect_file(str(path), declared_format="qcow2").problem
    Upload.objects.filter(pk=upload.pk).update(  # as the check leaves it (services/check.py)
        status=Status.CHECKING, received_bytes=upload.size,
        inspection={"problem": {"code": problem.code, "suggested_format": problem.suggested_format}})
    upload.refresh_from_db()
    assert state.move(upload, Status.REFUSED, problem.message, detail=problem.detail, **state.error_fields(problem))
    assert upload.error_message.startswith("This file is not a QCOW2 disk")  # stored in English

    data = alice_client.get(f"/uploads/{upload.uid}/status", **GERMAN).json()
    assert data["status_label"] == "Zurückgewiesen"
    assert data["error_message"] == ("Diese Datei ist keine QCOW2-Disk: Das Portal erkennt darin kein "
                                     "Disk-Image-Format.")
    assert data["error_hint"].startswith("Ist es ein rohes Disk-Image, laden Sie es als RAW hoch")
    assert [a["label"] for a in data["actions"]] == ["Als RAW hochladen", "Entfernen"]
    page = alice_client.get(f"/uploads/{upload.uid}/", **GERMAN).content.decode()
    assert "Diese Datei ist keine QCOW2-Disk" in page
    assert "Zurückgewiesen" in page
    english = alice_client.get(f"/uploads/{upload.uid}/status", HTTP_ACCEPT_LANGUAGE="en").json()
    assert english["error_message"] == upload.error_message


def test_timeline_lines_recorded_in_english_read_in_german(alice_client, upload):
    UploadEvent.objects.create(upload=upload, message="Could not reach the cloud while sending the file. "
                                                      "Trying again in 30 seconds.")
    UploadEvent.objects.create(upload=upload, message="Sent 1.5 GB to IMS (md5 0123abcd)")
    UploadEvent.objects.create(upload=upload, message="A line no catalogue knows")
    page = alice_client.get(f"/uploads/{upload.uid}/", **GERMAN).content.decode()
    assert "Die Cloud war beim Senden der Datei nicht erreichbar. Neuer Versuch in 30 Sekunden." in page
    assert "1,5 GB an IMS gesendet (MD5 0123abcd)" in page
    assert "A line no catalogue knows" in page  # shown as stored


def test_stored_words_without_a_translation_stay_as_they_were():
    with translation.override("de"):
        assert stored_text("") == ""
        assert stored_text("A reviewer (bob) rejected this upload: falsches Betriebssystem") == (
            "Bei der Freigabe abgelehnt (bob): falsches Betriebssystem")
        assert stored_text("kein Treffer and no pattern") == "kein Treffer and no pattern"


def test_the_upload_servers_refusals_are_german(alice_client):
    response = alice_client.post("/tus/", HTTP_TUS_RESUMABLE="1.0.0", HTTP_UPLOAD_LENGTH="10", **GERMAN)
    assert response.status_code == 403
    assert response.content.decode().startswith("Verbinden Sie zuerst Ihr Cloud-Konto")
    assert response["Content-Language"] == "de"


def test_form_errors_are_german(alice_client):
    page = alice_client.post("/cloud/", {"domain": "d", "user_name": "u\u202e", "password": "p", "project": "x"},
                             **GERMAN).content.decode()
    assert "Der IAM-Benutzername enthält ein verborgenes oder Steuerzeichen (U+202E right-to-left override)" in page


# ---- the JavaScript ------------------------------------------------------------------------------


def test_pages_load_the_javascript_catalogue_of_their_language(alice_client, upload):
    page = alice_client.get("/uploads/", **GERMAN).content.decode()
    url = re.search(r'<script src="(/jsi18n/\?lang=de&amp;v=\w+)" defer></script>', page).group(1).replace("&amp;", "&")
    response = alice_client.get(url, **GERMAN)
    assert response.status_code == 200 and response["Content-Type"].startswith("text/javascript")
    body = response.content.decode()
    assert '"Copied": "Kopiert"' in body and "Image-ID kopiert" in body
    assert "max-age=86400" in response["Cache-Control"] and response.has_header("Last-Modified")
    english_url = re.search(r'<script src="(/jsi18n/\?lang=en[^"]+)"', alice_client.get(
        "/uploads/", HTTP_ACCEPT_LANGUAGE="en").content.decode()).group(1).replace("&amp;", "&")
    assert "Kopiert" not in alice_client.get(english_url, HTTP_ACCEPT_LANGUAGE="en").content.decode()


def test_the_upload_page_in_german_loads_uppys_own_german(alice_client, alice_with_token):
    page = alice_client.get("/upload/", **GERMAN).content.decode()
    assert 'src="/static/vendor/uppy-locales/de_DE.min.js"' in page and 'data-uppy-locale="de_DE"' in page
    assert finders.find("vendor/uppy-locales/de_DE.min.js"), "node_modules/@uppy/locales is missing (make setup)"
    words = json.loads(re.search(r'<script id="upload-words" type="application/json">(.*?)</script>', page, re.S)[1])
    assert words["cancelled"] == "Unter „Meine Uploads“ abgebrochen: Es wird nichts mehr gesendet."
    english = alice_client.get("/upload/", HTTP_ACCEPT_LANGUAGE="en").content.decode()
    assert "uppy-locales" not in english and 'data-uppy-locale=""' in english


def test_the_javascript_uses_the_catalogue_for_its_own_words():
    for name in ("upload.js", "progress.js"):
        source = (ROOT / "static" / "js" / name).read_text()
        assert "window.gettext" in source, name
    po = polib.pofile(str(LOCALE / "de" / "LC_MESSAGES" / "djangojs.po"))
    files = {occurrence for e in po for occurrence, _ in e.occurrences}
    assert files >= {"static/js/upload.js", "static/js/progress.js"}


# ---- the reviewer's pages ------------------------------------------------------------------------


@pytest.fixture
def carol(django_user_model):
    from django.contrib.auth.models import Permission

    user = django_user_model.objects.create_user("carol", password="pw-carol")
    user.user_permissions.add(Permission.objects.get(codename="review_upload"))
    return user


def test_a_german_reviewers_rejection_reads_in_each_owners_language(alice_client, upload, carol):
    Upload.objects.filter(pk=upload.pk).update(
        status=Status.AWAITING_REVIEW, received_bytes=upload.size,
        inspection={"checks": {"qcow2_header": "passed", "qemu_img_check": "skipped: qemu-img cannot check raw"}})
    client = Client()
    client.force_login(carol)
    page = client.get(f"/review/{upload.uid}/", **GERMAN).content.decode()
    assert "Freigeben und an IMS senden" in page and "Wartet auf Freigabe" in page
    assert "qcow2_header: bestanden" in page and "qemu_img_check: übersprungen: qemu-img cannot check raw" in page

    response = client.post("/review/decide", {"uid": str(upload.uid), "decision": "reject",
                                              "reason": "Bitte ohne Swap-Partition"}, follow=True, **GERMAN)
    assert "1 Upload abgelehnt: “web-server”. Der Eigentümer sieht Ihre Begründung." in response.content.decode()
    upload.refresh_from_db()
    assert upload.error_message == "A reviewer (carol) rejected this upload: Bitte ohne Swap-Partition"  # stored English

    german = alice_client.get(f"/uploads/{upload.uid}/status", **GERMAN).json()
    assert german["error_message"] == "Bei der Freigabe abgelehnt (carol): Bitte ohne Swap-Partition"
    assert german["error_hint"].endswith("Das Portal löscht diese Kopie nach 24 Stunden.")
    english = alice_client.get(f"/uploads/{upload.uid}/status", HTTP_ACCEPT_LANGUAGE="en").json()
    assert english["error_message"] == upload.error_message
