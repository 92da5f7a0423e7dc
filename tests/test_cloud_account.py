"""The Cloud account page: a token from IAM, kept encrypted; the password never kept."""

import re
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from imssim.server import DEMO_DOMAIN, DEMO_PASSWORD, DEMO_PROJECT_NAME, DEMO_USER
from uploads import crypto
from uploads.models import CloudAccount, Status, Upload

FORM = {"domain": DEMO_DOMAIN, "user_name": DEMO_USER, "password": DEMO_PASSWORD, "project": DEMO_PROJECT_NAME}


def all_database_text() -> str:
    """Every value of every table, as text: to prove what is (not) stored."""
    text = []
    with connection.cursor() as cursor:
        for table in connection.introspection.table_names():
            cursor.execute(f'SELECT * FROM "{table}"')
            text.extend(str(value) for row in cursor.fetchall() for value in row)
    return "\n".join(text)


def test_connecting_stores_an_encrypted_token_and_never_the_password(alice_client, alice, sim):
    response = alice_client.post("/cloud/", FORM)
    assert response.status_code == 302
    account = CloudAccount.objects.get(user=alice)
    assert (account.domain_name, account.user_name, account.project_name) == (DEMO_DOMAIN, DEMO_USER, "eu-de")
    assert account.expires_at > timezone.now() + timedelta(hours=23)
    token = crypto.decrypt(account.token_encrypted)
    assert token and token not in account.token_encrypted
    stored = all_database_text()
    assert DEMO_PASSWORD not in stored
    assert token not in stored


def test_the_page_shows_who_is_connected_and_until_when(alice_client, sim):
    alice_client.post("/cloud/", FORM)
    page = alice_client.get("/cloud/").content.decode()
    assert DEMO_USER in page and DEMO_DOMAIN in page and DEMO_PROJECT_NAME in page
    assert "Sign-in valid until" in page
    token = crypto.decrypt(CloudAccount.objects.get().token_encrypted)
    assert token not in page


def test_wrong_credentials_give_a_clear_message(alice_client, sim):
    response = alice_client.post("/cloud/", {**FORM, "password": "nope"})
    assert response.status_code == 200
    assert "did not accept these details" in response.content.decode()
    assert not CloudAccount.objects.exists()


def test_an_unreachable_iam_is_explained(alice_client, settings):
    settings.IAM_ENDPOINT = "http://127.0.0.1:9/v3"
    response = alice_client.post("/cloud/", FORM)
    assert "Could not reach the cloud" in response.content.decode()


def test_disconnect_deletes_the_token(alice_client, alice, sim):
    alice_client.post("/cloud/", FORM)
    response = alice_client.post("/cloud/disconnect")
    assert response.status_code == 302
    assert not CloudAccount.objects.filter(user=alice).exists()


def test_a_rotated_key_still_opens_old_tokens(settings):
    from cryptography.fernet import Fernet

    old_key = settings.TOKEN_ENCRYPTION_KEY
    secret = crypto.encrypt("token-value")
    settings.TOKEN_ENCRYPTION_KEY = f"{Fernet.generate_key().decode()},{old_key}"
    assert crypto.decrypt(secret) == "token-value"
    settings.TOKEN_ENCRYPTION_KEY = Fernet.generate_key().decode()
    assert crypto.decrypt(secret) is None


def test_it_needs_sign_in(client):
    response = client.get("/cloud/")
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]


def test_connecting_from_a_link_goes_back_to_the_page_it_came_from(alice_client, sim):
    page = alice_client.get("/cloud/?next=/uploads/").content.decode()
    assert '<input type="hidden" name="next" value="/uploads/">' in page
    response = alice_client.post("/cloud/", {**FORM, "next": "/uploads/"})
    assert response.status_code == 302 and response["Location"] == "/uploads/"


@pytest.mark.parametrize("target", [
    "https://evil.example/", "//evil.example/", "/\\evil.example", "\\\\evil.example", "https:evil.example",
    "javascript:alert(1)", "http://testserver/upload/", " //evil.example", "upload/", "/\t/evil.example",
])
def test_a_next_that_leaves_the_site_is_ignored(alice_client, sim, target):
    page = alice_client.get("/cloud/", {"next": target}).content.decode()
    cloud_form = re.search(r'<form method="post" action="/cloud/".*?</form>', page, re.S).group(0)
    assert 'name="next"' not in cloud_form  # (the header's language switch returns to this page)
    response = alice_client.post("/cloud/", {**FORM, "next": target})
    assert response.status_code == 302 and response["Location"] == "/cloud/"


def test_a_connected_account_offers_the_way_on_to_upload(alice_client, sim):
    alice_client.post("/cloud/", FORM)
    page = alice_client.get("/cloud/").content.decode()
    assert '<a class="button button--primary" href="/upload/">Continue to Upload</a>' in page
    page = alice_client.get("/cloud/?next=/uploads/").content.decode()
    assert '<a class="button button--primary" href="/uploads/">Go back to where you were</a>' in page
    assert 'href="/upload/">Continue to Upload</a>' in page


def test_a_wrong_password_keeps_the_way_back(alice_client, sim):
    response = alice_client.post("/cloud/", {**FORM, "password": "nope", "next": "/upload/"})
    assert '<input type="hidden" name="next" value="/upload/">' in response.content.decode()


def test_the_links_to_the_cloud_account_page_carry_the_way_back(alice_client, alice):
    page = alice_client.get("/upload/").content.decode()
    assert 'href="/cloud/?next=/upload/">Connect cloud account</a>' in page
    upload = Upload.objects.create(owner=alice, name="web", filename="web.qcow2", disk_format="qcow2", size=10,
                                   staged_name="w", status=Status.RECONNECT)
    page = alice_client.get(f"/uploads/{upload.uid}/").content.decode()
    assert f'href="/cloud/?next=/uploads/{upload.uid}/"' in page  # its Reconnect button
