"""Template filters of the uploads app: sizes in the same words as the code writes them."""

from django import template
from django.utils.formats import number_format
from django.utils.translation import get_language, gettext

from uploads.i18n import local_size

register = template.Library()


@register.filter
def human_size(n) -> str:
    """{{ upload.size|human_size }}: "16 MB", "1.0 GB"; "1,0 GB" in German (uploads.i18n.local_size)."""
    return local_size(n)


@register.filter
def grouped(n) -> str:
    """A whole number with the person's digit grouping: "1,073,741,824"; "1.073.741.824" in German."""
    return number_format(n, decimal_pos=0, force_grouping=True)


@register.filter
def check_outcome(outcome) -> str:
    """One safety check's outcome as the check recorded it ("passed", "failed: <detail>",
    "skipped: <why>"), its first word in the person's language; the detail stays technical."""
    word, _, detail = str(outcome).partition(": ")
    words = {"passed": gettext("passed"), "failed": gettext("failed"), "skipped": gettext("skipped")}
    if word not in words:
        return str(outcome)
    return f"{words[word]}: {detail}" if detail else words[word]


@register.filter
def in_sentence(label) -> str:
    """A status word inside a sentence ("3 ready, 1 failed"): lower case in English; German keeps
    its capitals (nouns must), and so does any other language."""
    return str(label).lower() if (get_language() or "en").startswith("en") else str(label)

