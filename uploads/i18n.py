"""Words in the person's language where they are not simply wrapped in gettext: sizes, and the
English the portal stored earlier (an upload's error and hint, its timeline lines).

Stored words stay English in the database (workers have no person, admins and logs read them
alike); every such text is marked with gettext_noop where it is made (uploads/errors.py), so the
catalogue holds it, and `stored_text` translates it when a page or the status JSON shows it, also
for a failure recorded long before the person switched language. A text with values in it
("… broke after 1.5 GB of 3.0 GB.") is matched against the catalogue's texts with %(name)s
placeholders; each value is translated too when it is itself a catalogue text (a phrase such as
"sending the file"), and a size gets the language's decimal separator. Words the catalogue does not
hold are shown as they were stored.
"""

import gettext as gnu_gettext
import re
from functools import lru_cache

from django.conf import settings
from django.utils.formats import get_format
from django.utils.translation import get_language, gettext, ngettext

from uploads.sizes import human_size

PLACEHOLDER = re.compile(r"%\((\w+)\)([sdg])")
# A text with placeholders must have this much of its own words to be matched against: "%(a)s and
# %(b)s" would match far too much.
MIN_LITERAL_CHARS = 12
NUMBER = {"d": int, "g": float}
SIZE = re.compile(r"(\d+)\.(\d) (KB|MB|GB|TB|PB)")
DURATION = re.compile(r"(\d+) (minutes|hours)")  # uploads.services.state.duration


def local_size(n: int | float | None) -> str:
    """human_size in the active language: "1,5 GB", "1 Byte"."""
    n = max(0, int(n or 0))
    if n < 1024:
        return ngettext("%(count)d byte", "%(count)d bytes", n) % {"count": n}
    return human_size(n, decimal_separator=get_format("DECIMAL_SEPARATOR"))


def stored_text(text: str, *, depth: int = 0) -> str:
    """English the portal stored, in the active language (as stored when the catalogue lacks it).
    `depth`: how deep inside another stored text this one is (an error inside a retry line)."""
    if not text:
        return ""
    translated = gettext(text)
    if translated != text:
        return translated
    duration = DURATION.fullmatch(text)
    if duration:
        count = int(duration[1])
        if duration[2] == "minutes":
            return ngettext("%(count)d minute", "%(count)d minutes", count) % {"count": count}
        return ngettext("%(count)d hour", "%(count)d hours", count) % {"count": count}
    if depth < 2:
        for pattern, msgid, kinds in _patterns(get_language() or ""):
            match = pattern.fullmatch(text)
            if match:
                try:
                    values = {name: NUMBER[kinds[name]](value) if kinds[name] in NUMBER
                              else stored_text(value, depth=depth + 1) for name, value in match.groupdict().items()}
                    return gettext(msgid) % values
                except (KeyError, TypeError, ValueError):
                    continue
    return _localized_sizes(text)


def _localized_sizes(text: str) -> str:
    separator = get_format("DECIMAL_SEPARATOR")
    if separator == ".":
        return text
    return SIZE.sub(lambda m: f"{m[1]}{separator}{m[2]} {m[3]}", text)


@lru_cache(maxsize=16)
def _patterns(language: str) -> list[tuple[re.Pattern, str, dict]]:
    """The portal's own texts with placeholders (locale/, not Django's), as patterns that match
    their English with any values, with each placeholder's kind (s, d, g); the longest first, so
    that the most specific text wins."""
    msgids = set()
    for folder in settings.LOCALE_PATHS:
        catalogue = gnu_gettext.translation("django", localedir=folder, languages=[language], fallback=True)
        msgids.update(key for key in getattr(catalogue, "_catalog", {}) if isinstance(key, str))
    patterns = []
    for msgid in msgids:
        literal = PLACEHOLDER.sub("", msgid)
        if "\x04" in msgid or literal == msgid or len(literal.strip()) < MIN_LITERAL_CHARS:
            continue
        pattern, kinds = _pattern(msgid)
        patterns.append((pattern, msgid, kinds))
    patterns.sort(key=lambda item: -len(item[1]))
    return patterns


def _pattern(msgid: str) -> tuple[re.Pattern, dict]:
    parts, kinds, last = [], {}, 0
    for match in PLACEHOLDER.finditer(msgid):
        parts.append(re.escape(msgid[last:match.start()].replace("%%", "%")))
        name = match[1]
        parts.append(f"(?P={name})" if name in kinds else f"(?P<{name}>.+?)")
        kinds[name] = match[2]
        last = match.end()
    parts.append(re.escape(msgid[last:].replace("%%", "%")))
    return re.compile("".join(parts), re.DOTALL), kinds
