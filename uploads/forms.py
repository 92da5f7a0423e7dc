"""What people type in: the cloud account form and the per-file details of an upload."""

import os
import re

from django import forms
from django.conf import settings

from uploads.models import EXTENSION_FORMATS, DiskFormat

# The values of __os_version that people choose most; any other text is accepted too.
COMMON_OS_VERSIONS = [
    "Ubuntu 24.04 server 64bit",
    "Ubuntu 22.04 server 64bit",
    "Ubuntu 20.04 server 64bit",
    "Debian GNU/Linux 12 64bit",
    "Debian GNU/Linux 11 64bit",
    "CentOS 7.9 64bit",
    "Rocky Linux 9.0 64bit",
    "AlmaLinux 9.0 64bit",
    "Red Hat Linux 9.0 64bit",
    "SUSE Linux Enterprise Server 15 SP5 64bit",
    "openSUSE 15.5 64bit",
    "Oracle Linux Server release 8.6 64bit",
    "Windows Server 2022 Standard 64bit",
    "Windows Server 2019 Standard 64bit",
    "Windows Server 2016 Standard 64bit",
    "Other Linux(64 bit)",
    "Other Windows(64 bit)",
]

MAX_TAGS = 20
TAG_RE = re.compile(r"^[\w.\-]{1,36}(=[\w.\-:/ ]{0,43})?$")


def format_for_filename(filename: str) -> str | None:
    return EXTENSION_FORMATS.get(os.path.splitext(filename.lower())[1])


def default_image_name(filename: str) -> str:
    return os.path.splitext(os.path.basename(filename))[0][:255] or "image"


def _plain_text(**attrs) -> forms.TextInput:
    """A text input for identifiers: no auto-capitalisation or spell checking."""
    return forms.TextInput(attrs={"autocapitalize": "none", "spellcheck": "false", "autocomplete": "off", **attrs})


class CloudAccountForm(forms.Form):
    domain = forms.CharField(
        label="IAM domain name",
        max_length=255,
        widget=_plain_text(),
        help_text="Your cloud account (tenant) name, e.g. OTC-EU-DE-00000000001000000001.",
    )
    user_name = forms.CharField(label="IAM user name", max_length=255, widget=_plain_text(autocomplete="username"))
    password = forms.CharField(
        label="Password",
        max_length=255,
        strip=False,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "current-password"}),
        help_text="Used once to get a token from IAM; the portal never stores it.",
    )
    project = forms.CharField(
        label="Project (name or id)",
        max_length=255,
        widget=_plain_text(),
        help_text="The region project, e.g. eu-de, or its 32-character id.",
    )

    @classmethod
    def for_account(cls, account, data=None) -> "CloudAccountForm":
        """The form, pre-filled from the connected account so that reconnecting takes a password."""
        if account is None:
            return cls(data)
        form = cls(data, initial={
            "domain": account.domain_name,
            "user_name": account.user_name,
            "project": account.project_name or account.project_id,
        })
        form.fields["password"].widget.attrs["autofocus"] = True
        return form


class UploadMetadataForm(forms.Form):
    """The details a tus creation request carries in Upload-Metadata, checked like any form."""

    filename = forms.CharField(max_length=255, error_messages={"required": "The file has no name."})
    image_name = forms.CharField(max_length=255, required=False)
    disk_format = forms.ChoiceField(choices=DiskFormat.choices, required=False)
    os_version = forms.CharField(max_length=255, required=False)
    min_disk = forms.IntegerField(min_value=0, max_value=1024, required=False)
    min_ram = forms.IntegerField(min_value=0, max_value=2 * 1024 * 1024, required=False)
    tags = forms.CharField(max_length=2000, required=False)
    size = forms.IntegerField(min_value=0)

    def clean_filename(self):
        filename = os.path.basename(self.cleaned_data["filename"].replace("\\", "/"))
        if format_for_filename(filename) is None:
            known = ", ".join(sorted(EXTENSION_FORMATS))
            raise forms.ValidationError(
                f"“{filename}” is not a disk image file this portal knows. Files must end in one of: {known}."
            )
        return filename

    def clean_image_name(self):
        name = self.cleaned_data["image_name"].strip()
        if any(ord(c) < 32 for c in name):
            raise forms.ValidationError("The image name may not contain control characters.")
        return name

    def clean_tags(self):
        tags = [t.strip() for t in re.split(r"[,\n]", self.cleaned_data["tags"]) if t.strip()]
        if len(tags) > MAX_TAGS:
            raise forms.ValidationError(f"At most {MAX_TAGS} tags.")
        for tag in tags:
            if not TAG_RE.match(tag):
                raise forms.ValidationError(
                    f"Tag “{tag}” is not valid: use key=value with letters, digits, '.', '-' and '_' "
                    "(key up to 36, value up to 43 characters)."
                )
        return tags

    def clean_size(self):
        size = self.cleaned_data["size"]
        if size == 0:
            raise forms.ValidationError("The file is empty: choose the disk image file itself.")
        if size > settings.UPLOAD_MAX_BYTES:
            raise forms.ValidationError("The file is 128 GB or larger; IMS takes only smaller images.")
        return size

    def clean(self):
        data = super().clean()
        filename = data.get("filename")
        if filename:
            data["image_name"] = data.get("image_name") or default_image_name(filename)
            data["disk_format"] = data.get("disk_format") or format_for_filename(filename)
        data["min_disk"] = data.get("min_disk") or 0
        data["min_ram"] = data.get("min_ram") or 0
        return data

    def error_text(self) -> str:
        """All problems as one plain sentence per line, for a tus client to show."""
        return "\n".join(str(e) for errors in self.errors.values() for e in errors)
