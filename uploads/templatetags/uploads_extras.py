"""Template filters of the uploads app: sizes in the same words as the code writes them."""

from django import template
from django.utils.translation import get_language

from uploads.i18n import local_size

register = template.Library()


@register.filter
def human_size(n) -> str:
    """{{ upload.size|human_size }}: "16 MB", "1.0 GB"; "1,0 GB" in German (uploads.i18n.local_size)."""
    return local_size(n)


@register.filter
def in_sentence(label) -> str:
    """A status word inside a sentence ("3 ready, 1 failed"): lower case in English; German keeps
    its capitals (nouns must), and so does any other language."""
    return str(label).lower() if (get_language() or "en").startswith("en") else str(label)

