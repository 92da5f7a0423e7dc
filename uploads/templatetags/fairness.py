"""Template words about waiting for a push slot (uploads/fairness.py), as the status JSON says them."""

from django import template

from uploads import fairness

register = template.Library()


@register.filter
def waiting_text(upload) -> str:
    """ "Waiting to send: 3 uploads ahead of yours", or "" when the upload does not wait for a slot."""
    return fairness.waiting_text(upload)
