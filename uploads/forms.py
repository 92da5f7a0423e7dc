"""What people type in: the cloud account form, the per-file details of an upload, and the
profile's mail settings."""

import os
import re
import unicodedata

from django import forms
from django.conf import settings
from django.utils.translation import gettext, gettext_lazy as _

from uploads import limits
from uploads.models import EXTENSION_FORMATS, DiskFormat, NotificationSettings

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
# A tag is key=value (IMS's limits): the key up to TAG_KEY_MAX characters, the value up to TAG_VALUE_MAX.
TAG_KEY_MAX, TAG_VALUE_MAX = 36, 43
TAG_RE = re.compile(rf"^[\w.\-]{{1,{TAG_KEY_MAX}}}(=[\w.\-:/ ]{{0,{TAG_VALUE_MAX}}})?$")
# The longest name (image, file, OS version, cloud identifiers) the portal takes.
NAME_MAX_LENGTH = 255


# Characters that do not show, or that change how the text around them shows, such as U+202E,
# which makes "innocent\u202egpj.qcow2" read as "innocentqcow2.jpg": controls (Cc), format
# characters (Cf: bidi overrides and isolates, zero-width characters, soft hyphens...), line and
# paragraph separators (Zl, Zp), lone surrogates (Cs) and code points with no character yet (Cn).
INVISIBLE_CATEGORIES = {"Cc", "Cf", "Zl", "Zp", "Cs", "Cn"}
# Letters by category that show as nothing: the Hangul fillers, the combining grapheme joiner.
INVISIBLE_LETTERS = {"\u115f", "\u1160", "\u3164", "\uffa0", "\u034f"}


def invisible_character(text: str) -> str | None:
    """The first character in `text` a person cannot see (or that disguises the rest), named:
    "U+202E right-to-left override"."""
    for char in text:
        if unicodedata.category(char) in INVISIBLE_CATEGORIES or char in INVISIBLE_LETTERS:
            return f"U+{ord(char):04X} {unicodedata.name(char, 'unnamed character').lower()}"
    return None


TYPE_AGAIN = _("type it again without it")


def refuse_invisible(value: str, what: str, fix: str = TYPE_AGAIN) -> str:
    """`value`, or a ValidationError that names the field (`what`), the character and the `fix`."""
    found = invisible_character(value)
    if found:
        raise forms.ValidationError(
            gettext("%(what)s contains a hidden or control character (%(character)s). Such characters can make a "
                    "name look like another one, so they are not accepted: %(fix)s.")
            % {"what": what, "character": found, "fix": fix},
            code="invisible_character",
        )
    return value


class NameField(forms.CharField):
    """A CharField for names people read (file, image, OS version, account names) that refuses
    characters which do not show. `what` names the field in the message, `fix` says what to do."""

    def __init__(self, *args, what: str, fix: str = TYPE_AGAIN, **kwargs):
        super().__init__(*args, **kwargs)
        self.what, self.fix = what, fix

    def to_python(self, value):
        if isinstance(value, str):  # before stripping, which would quietly drop some of them
            refuse_invisible(value, self.what, self.fix)
        return super().to_python(value)


def format_for_filename(filename: str) -> str | None:
    return EXTENSION_FORMATS.get(os.path.splitext(filename.lower())[1])


def default_image_name(filename: str) -> str:
    return os.path.splitext(os.path.basename(filename))[0][:NAME_MAX_LENGTH] or "image"  # a name in IMS: not translated


def _plain_text(**attrs) -> forms.TextInput:
    """A text input for identifiers: no auto-capitalisation or spell checking."""
    return forms.TextInput(attrs={"autocapitalize": "none", "spellcheck": "false", "autocomplete": "off", **attrs})


def _name_field(what: str, label: str, help_text: str = "", **attrs) -> NameField:
    """A cloud identifier (IAM names, the project): plain text up to NAME_MAX_LENGTH characters."""
    return NameField(what=what, label=label, max_length=NAME_MAX_LENGTH, widget=_plain_text(**attrs), help_text=help_text)


class CloudAccountForm(forms.Form):
    domain = _name_field(_("The IAM domain name"), _("IAM domain name"),
                         _("Your cloud account (tenant) name, e.g. OTC-EU-DE-00000000001000000001."))
    user_name = _name_field(_("The IAM user name"), _("IAM user name"), autocomplete="username")
    password = forms.CharField(
        label=_("Password"),
        max_length=NAME_MAX_LENGTH,
        strip=False,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "current-password"}),
        help_text=_("Used once to get a token from IAM; the portal never stores it."),
    )
    project = _name_field(_("The project"), _("Project (name or id)"),
                          _("The region project, e.g. eu-de, or its 32-character id."))

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

    filename = NameField(what=_("The file name"), fix=_("rename the file without it, then add it again"),
                         max_length=NAME_MAX_LENGTH, error_messages={"required": _("The file has no name.")})
    image_name = NameField(what=_("The image name"), max_length=NAME_MAX_LENGTH, required=False)
    disk_format = forms.ChoiceField(choices=DiskFormat.choices, required=False)
    os_version = NameField(what=_("The OS version"), max_length=NAME_MAX_LENGTH, required=False)
    min_disk = forms.IntegerField(min_value=0, max_value=1024, required=False)
    min_ram = forms.IntegerField(min_value=0, max_value=2 * 1024 * 1024, required=False)
    tags = forms.CharField(max_length=2000, required=False)  # one per line or comma: checked one by one
    size = forms.IntegerField(min_value=0)

    def clean_filename(self):
        filename = os.path.basename(self.cleaned_data["filename"].replace("\\", "/"))
        if format_for_filename(filename) is None:
            known = ", ".join(sorted(EXTENSION_FORMATS))
            raise forms.ValidationError(
                gettext("“%(file)s” is not a disk image file this portal knows. Files must end in one of: %(known)s.")
                % {"file": filename, "known": known}
            )
        return filename

    def clean_image_name(self):
        return self.cleaned_data["image_name"].strip()

    def clean_tags(self):
        tags = [t.strip() for t in re.split(r"[,\n]", self.cleaned_data["tags"]) if t.strip()]
        if len(tags) > MAX_TAGS:
            raise forms.ValidationError(gettext("At most %(most)d tags.") % {"most": MAX_TAGS})
        for tag in tags:
            refuse_invisible(tag, gettext("A tag"))
            if not TAG_RE.match(tag):
                raise forms.ValidationError(
                    gettext("Tag “%(tag)s” is not valid: use key=value with letters, digits, '.', '-' and '_' "
                            "(key up to %(key)d, value up to %(value)d characters).")
                    % {"tag": tag, "key": TAG_KEY_MAX, "value": TAG_VALUE_MAX}
                )
        return tags

    def clean_size(self):
        size = self.cleaned_data["size"]
        if size == 0:
            raise forms.ValidationError(limits.EMPTY_FILE)
        if size > settings.UPLOAD_MAX_BYTES:
            raise forms.ValidationError(limits.too_large())
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


class NotificationSettingsForm(forms.ModelForm):
    """The profile page: which e-mails a person wants, and in which language. Only reviewers
    have the switch for mails about uploads awaiting review."""

    language = forms.ChoiceField(label=_("Language of the e-mails"), choices=lambda: settings.LANGUAGES)

    class Meta:
        model = NotificationSettings
        fields = ["mail_upload_outcomes", "mail_review_requests", "language"]

    def __init__(self, *args, reviewer: bool, **kwargs):
        super().__init__(*args, **kwargs)
        if not reviewer:
            del self.fields["mail_review_requests"]
