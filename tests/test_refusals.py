"""Names with characters that do not show are refused at the door, naming the field."""

import base64

import pytest

from uploads.models import CloudAccount, Upload


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
