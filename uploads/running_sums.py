"""MD5 and SHA-512 of an upload as it arrives, carried from one tus PATCH to the next in the row.

The push needs both sums of the whole file (IMS reports them back: `checksum`, `os_hash_value`).
Computed while the browser sends, where the client's network is the limit, they cost the push
nothing. A tus upload's PATCHes land on any web process (nginx keeps a pool of connections to
the ingest pool), and hashlib's state cannot be saved; OpenSSL's own MD5_CTX and SHA512_CTX can:
they are plain structs, so `RunningSums.saved()` is their bytes (with the bytes' offset and what
they are valid for), written into the row with the offset at the end of each PATCH, and
`restore()` makes the next PATCH, on whichever process, go on from there. The computation is
OpenSSL's, as hashlib's is (MD5_Update/SHA512_Update through ctypes, the GIL released).

Bytes below a recorded offset never change (tus only appends; a PATCH truncates the file to the
recorded offset before it writes), so a saved state of offset X stays right for as long as the
upload lives. A state that does not match the offset (a PATCH whose process died after a
progress record), or was saved by another OpenSSL or machine type, or no libcrypto at all:
`restore()` gives None, nothing more is hashed on arrival for this upload, and the worker hashes
the file while sending, as before. No Django here.
"""

import base64
import ctypes
import ctypes.util
import platform

# Room for each context: MD5_CTX is 92 bytes and SHA512_CTX 216 in OpenSSL 1.1 and 3.
_CTX_BYTES = {"md5": 128, "sha512": 256}
_DIGEST_BYTES = {"md5": 16, "sha512": 64}
_FUNCTIONS = {"md5": ("MD5_Init", "MD5_Update", "MD5_Final"),
              "sha512": ("SHA512_Init", "SHA512_Update", "SHA512_Final")}


def _load():
    """libcrypto's low-level MD5 and SHA-512 functions, or None where they cannot be had."""
    try:
        name = ctypes.util.find_library("crypto")
        lib = ctypes.CDLL(name) if name else None
        for functions in _FUNCTIONS.values():
            for function in functions:
                getattr(lib, function).restype = ctypes.c_int
        version = lib.OpenSSL_version_num()
    except (OSError, AttributeError, TypeError):
        return None, ""
    # A saved state is only read back by the same OpenSSL major version on the same kind of machine.
    return lib, f"openssl-{version >> 28}-{platform.machine()}-{_CTX_BYTES['md5']}-{_CTX_BYTES['sha512']}"


_lib, _KIND = _load()


def available() -> bool:
    return _lib is not None


class _Context:
    """One hash whose state is the bytes of its context; `update()` lets go of the GIL."""

    def __init__(self, name: str, state: bytes | None = None):
        self.name = name
        self.ctx = ctypes.create_string_buffer(_CTX_BYTES[name])
        init, self._update, self._final = (getattr(_lib, f) for f in _FUNCTIONS[name])
        if state is None:
            init(self.ctx)
        else:
            ctypes.memmove(self.ctx, state, len(state))

    def update(self, data) -> None:
        view = memoryview(data)
        if view.readonly:
            view = memoryview(bytearray(view))
        if len(view):
            self._update(self.ctx, (ctypes.c_char * len(view)).from_buffer(view), ctypes.c_size_t(len(view)))

    def copy(self) -> "_Context":
        return _Context(self.name, self.ctx.raw)

    def hexdigest(self) -> str:
        out = ctypes.create_string_buffer(_DIGEST_BYTES[self.name])
        self._final(out, self.copy().ctx)
        return out.raw.hex()


class RunningSums:
    """The MD5 and SHA-512 of bytes [0, offset) of one upload."""

    def __init__(self, offset: int = 0, md5: _Context | None = None, sha512: _Context | None = None):
        self.offset = offset
        self.abandoned = False  # the receiving outran the hashing: these sums are worth nothing
        self.md5 = md5 or _Context("md5")
        self.sha512 = sha512 or _Context("sha512")

    def copy(self) -> "RunningSums":
        return RunningSums(self.offset, self.md5.copy(), self.sha512.copy())

    def hexdigests(self) -> tuple[str, str]:
        return self.md5.hexdigest(), self.sha512.hexdigest()

    def saved(self) -> dict:
        """What the row keeps between PATCHes (JSON)."""
        return {"offset": self.offset, "kind": _KIND,
                "md5_ctx": base64.b64encode(self.md5.ctx.raw).decode(),
                "sha512_ctx": base64.b64encode(self.sha512.ctx.raw).decode()}


def start_or_restore(saved: dict, offset: int) -> RunningSums | None:
    """The sums to go on with for a PATCH at `offset`: new ones at 0, else the saved state when
    it is of exactly this offset and this kind; None: this upload is not hashed on arrival."""
    if _lib is None:
        return None
    if offset == 0:
        return RunningSums()
    if not saved or saved.get("offset") != offset or saved.get("kind") != _KIND:
        return None
    try:
        md5, sha512 = (base64.b64decode(saved[f"{name}_ctx"], validate=True) for name in ("md5", "sha512"))
    except (KeyError, ValueError, TypeError):
        return None
    if len(md5) != _CTX_BYTES["md5"] or len(sha512) != _CTX_BYTES["sha512"]:
        return None
    return RunningSums(offset, _Context("md5", md5), _Context("sha512", sha512))
