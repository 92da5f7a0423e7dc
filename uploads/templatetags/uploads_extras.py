"""Template filters of the uploads app: sizes in the same words as the code writes them."""

from django import template

from uploads import sizes

register = template.Library()


@register.filter
def human_size(n) -> str:
    """{{ upload.size|human_size }}: "16 MB", "1.0 GB" (uploads.sizes.human_size)."""
    return sizes.human_size(n)

