"""Encryption at rest of cloud tokens, with a key of their own (TOKEN_ENCRYPTION_KEY).

The setting holds one or more Fernet keys separated by commas: the first encrypts, every one
decrypts (MultiFernet), so a new key can be put in front and old tokens still read.
"""

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings

# The key `make run` uses when TOKEN_ENCRYPTION_KEY is not set (portal/settings.py), so that a
# laptop demo needs no set-up: urlsafe base64 of b"demo-only-key-not-for-prod!!!!!!". Anyone can
# read it here, so `check --deploy` refuses it (uploads/checks.py).
DEMO_TOKEN_KEY = "ZGVtby1vbmx5LWtleS1ub3QtZm9yLXByb2QhISEhISE="


def configured_keys() -> list[str]:
    """The keys of TOKEN_ENCRYPTION_KEY, first (the one that encrypts) first."""
    return [key.strip() for key in settings.TOKEN_ENCRYPTION_KEY.split(",") if key.strip()]


def _fernet() -> MultiFernet:
    return MultiFernet([Fernet(key) for key in configured_keys()])


def encrypt(secret: str) -> str:
    return _fernet().encrypt(secret.encode()).decode()


def decrypt(ciphertext: str) -> str | None:
    """The secret, or None when no configured key opens it (the key was removed)."""
    try:
        return _fernet().decrypt(ciphertext.encode()).decode()
    except InvalidToken:
        return None


def rotate(ciphertext: str) -> str | None:
    """The same secret encrypted anew with the first key, or None when no configured key opens it."""
    try:
        return _fernet().rotate(ciphertext.encode()).decode()
    except InvalidToken:
        return None
