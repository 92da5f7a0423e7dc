"""Encryption at rest of cloud tokens, with a key of their own (TOKEN_ENCRYPTION_KEY).

The setting holds one or more Fernet keys separated by commas: the first encrypts, every one
decrypts (MultiFernet), so a new key can be put in front and old tokens still read.
"""

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings


def _fernet() -> MultiFernet:
    keys = [key.strip() for key in settings.TOKEN_ENCRYPTION_KEY.split(",") if key.strip()]
    return MultiFernet([Fernet(key) for key in keys])


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
