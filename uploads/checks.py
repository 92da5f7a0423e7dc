"""A deployment check of our own: `check --deploy` refuses the demo token key, as Django's own
checks refuse the demo SECRET_KEY."""

from django.core.checks import Warning, register

from uploads.crypto import DEMO_TOKEN_KEY, configured_keys


@register(deploy=True)
def check_token_encryption_key(app_configs, **kwargs):
    if DEMO_TOKEN_KEY in configured_keys():
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
