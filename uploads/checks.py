"""A deployment check of our own: `check --deploy` refuses the demo token key, as Django's own
checks refuse the demo SECRET_KEY."""

from django.conf import settings
from django.core.checks import Warning, register

DEMO_TOKEN_KEY = "ZGVtby1vbmx5LWtleS1ub3QtZm9yLXByb2QhISEhISE="


@register(deploy=True)
def check_token_encryption_key(app_configs, **kwargs):
    keys = [key.strip() for key in settings.TOKEN_ENCRYPTION_KEY.split(",")]
    if DEMO_TOKEN_KEY in keys:
        return [
            Warning(
                "TOKEN_ENCRYPTION_KEY is the demo key that ships with the code: anyone can read the "
                "stored cloud tokens.",
                hint='Make one: python -c "from cryptography.fernet import Fernet; '
                'print(Fernet.generate_key().decode())"',
                id="uploads.W001",
            )
        ]
    return []
