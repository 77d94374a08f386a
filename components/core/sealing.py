"""Keys and sealing: AES-256-GCM with a fresh random 96-bit nonce per record, and the index key of device groups.

A sealed body is ``nonce (12) || ciphertext || tag (16)``. The associated data binds the record's clear
index fields, so a body moved to another row, or an edited index field, fails to open. Key ids are
derived from the key material (HMAC), so the same key has the same id whatever its source, and an id
reveals nothing of its key. Sealing uses OpenSSL through ``cryptography`` with the cipher set up once per
key: about 1.5 µs per small record here, against 137 µs for pycryptodome, whose per-call set-up dominates;
that is what lets every device row be sealed on its own.

The index key (``KeyRing.index_key``) makes device tags: HMAC-SHA256(index key, device id). It is kept
beside the data keys (in the key file, in ``IOT_INDEX_KEY``, or derived from the passphrase), is never used to
seal, and survives rekey: tags, and with them device groups and device row names, never change.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from components.core.errors import ConfigError, DecryptionFailed
from components.core.files import write_private
from components.core.settings import KeySettings

log = logging.getLogger(__name__)

KEY_BYTES = 32
NONCE_BYTES = 12
NONCES_PER_DRAW = 256
"""Nonces drawn from the OS in one call: a commit seals a record per device row and per batch."""
TAG_BYTES = 16
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1


def key_id(key: bytes) -> str:
    """A short, stable, non-revealing id of ``key``."""
    return hmac.new(key, b"sensorhub key id", hashlib.sha256).hexdigest()[:16]


def _check_key(key: bytes, what: str = "a storage key") -> bytes:
    if len(key) != KEY_BYTES:
        raise ConfigError(f"{what} must be {KEY_BYTES} bytes, got {len(key)}")
    return key


@dataclass(frozen=True)
class KeyRing:
    """Keys by id; new records are sealed with the active one, old ones open with theirs."""

    active_id: str
    keys: Mapping[str, bytes]
    index_key: bytes
    _ciphers: dict[str, AESGCM] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def of(cls, keys: list[bytes], index_key: bytes) -> KeyRing:
        """A ring of ``keys``, the first one active."""
        if not keys:
            raise ConfigError("no storage key configured")
        for key in keys:
            _check_key(key)
        return cls(key_id(keys[0]), {key_id(k): k for k in keys}, _check_key(index_key, "the index key"))

    def rotated(self, active_id: str, keys: Mapping[str, bytes]) -> KeyRing:
        """The same index key with other data keys."""
        return KeyRing(active_id, keys, self.index_key)

    def _cipher(self, kid: str) -> AESGCM:
        cipher = self._ciphers.get(kid)
        if cipher is None:
            cipher = self._ciphers[kid] = AESGCM(self.keys[kid])
        return cipher

    def seal(self, plaintext: bytes, associated: bytes) -> tuple[str, bytes]:
        """Encrypt with the active key; return (key id, body)."""
        nonce = _nonce()
        return self.active_id, nonce + self._cipher(self.active_id).encrypt(nonce, plaintext, associated)

    def open(self, kid: str, body: bytes, associated: bytes, what: str) -> bytes:
        """Decrypt and verify; DecryptionFailed names ``what`` when the key is missing or the check fails."""
        key = self.keys.get(kid)
        if key is None:
            raise DecryptionFailed(f"{what} is sealed with key {kid}, which is not among the configured keys "
                                   f"({', '.join(sorted(self.keys))}): configure that key or restore the key file")
        if len(body) < NONCE_BYTES + TAG_BYTES:
            raise DecryptionFailed(f"{what} is truncated ({len(body)} bytes)")
        try:
            return self._cipher(kid).decrypt(body[:NONCE_BYTES], body[NONCE_BYTES:], associated)
        except InvalidTag:
            raise DecryptionFailed(f"{what} failed its integrity check under key {kid}: the record or one of its "
                                   f"index fields was changed, or it was moved from another row") from None


_pool = threading.local()


def _new_pool() -> None:
    global _pool
    _pool = threading.local()


os.register_at_fork(after_in_child=_new_pool)  # a child never hands out its parent's nonces


def _nonce() -> bytes:
    """A random nonce, from a per-thread pool drawn from ``os.urandom`` (each nonce is handed out once)."""
    pool = _pool
    at: int = getattr(pool, "at", 0)
    if at == 0:
        pool.buf = os.urandom(NONCE_BYTES * NONCES_PER_DRAW)
    pool.at = (at + NONCE_BYTES) % (NONCE_BYTES * NONCES_PER_DRAW)
    nonce: bytes = pool.buf[at:at + NONCE_BYTES]
    return nonce


def _create_exclusive(path: Path, content: bytes) -> bool:
    """Create ``path`` with ``content``, owner-only, unless it exists (race-free); True if created."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(content)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
    finally:
        os.unlink(tmp)


class KeyFile:
    """The key file: ``{"active": id, "keys": {id: base64}, "index": base64}``, created on first use with fresh keys.

    A key file of an earlier version (no ``index``) gets an index key the first time it is loaded.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Use the key file at ``path``."""
        self.path = Path(path)

    def load(self) -> KeyRing:
        """Read the ring (creating the file with a new key on first use)."""
        if not self.path.exists():
            key = secrets.token_bytes(KEY_BYTES)
            doc = {"active": key_id(key), "keys": {key_id(key): base64.b64encode(key).decode()},
                   "index": base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()}
            if _create_exclusive(self.path, json.dumps(doc, indent=2).encode()):
                log.info("created storage key file %s (key %s)", self.path, key_id(key))
        mode = self.path.stat().st_mode & 0o777
        if mode & 0o077:
            raise ConfigError(f"key file {self.path} is readable by others (mode {mode:o}); chmod 600 it")
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            keys = {kid: base64.b64decode(k, validate=True) for kid, k in doc["keys"].items()}
            active = doc["active"]
            index = base64.b64decode(doc["index"], validate=True) if "index" in doc else None
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"key file {self.path}: not a valid key file ({err})") from None
        if active not in keys:
            raise ConfigError(f"key file {self.path}: active key {active} is not among its keys")
        for kid, key in keys.items():
            if key_id(key) != kid:
                raise ConfigError(f"key file {self.path}: key {kid} does not match its id")
        if index is None:
            ring = KeyRing(active, keys, secrets.token_bytes(KEY_BYTES))
            self.save(ring)
            log.info("added an index key (device groups) to key file %s", self.path)
            return ring
        return KeyRing(active, keys, _check_key(index, f"key file {self.path}: the index key"))

    def save(self, ring: KeyRing) -> None:
        """Replace the file's content with ``ring`` (atomic, owner-only)."""
        doc = {"active": ring.active_id, "keys": {k: base64.b64encode(v).decode() for k, v in ring.keys.items()},
               "index": base64.b64encode(ring.index_key).decode()}
        write_private(self.path, json.dumps(doc, indent=2))

    def mtime(self) -> float:
        """Modification time, to notice a rekey."""
        try:
            return self.path.stat().st_mtime
        except FileNotFoundError:
            return 0.0


def load_keyring(keys: KeySettings, environ: Mapping[str, str]) -> KeyRing:
    """The key ring the settings point at (file, ``IOT_KEYS`` or ``IOT_KEY_PASSPHRASE``)."""
    if keys.source == "file":
        return KeyFile(keys.file).load()
    if keys.source == "env":
        raw = environ.get("IOT_KEYS", "")
        if not raw.strip():
            raise ConfigError("keys.source is env but IOT_KEYS is not set: expected comma-separated base64 keys "
                              "of 32 bytes, the active one first")
        try:
            data_keys = [base64.b64decode(part.strip(), validate=True) for part in raw.split(",") if part.strip()]
        except ValueError:
            raise ConfigError("IOT_KEYS: expected comma-separated base64 keys of 32 bytes") from None
        raw_index = environ.get("IOT_INDEX_KEY", "").strip()
        if not raw_index:
            raise ConfigError("keys.source is env but IOT_INDEX_KEY is not set: expected one base64 key of 32 bytes "
                              "(the index key of device groups; keep it for the life of the store)")
        try:
            index = base64.b64decode(raw_index, validate=True)
        except ValueError:
            raise ConfigError("IOT_INDEX_KEY: expected one base64 key of 32 bytes") from None
        return KeyRing.of(data_keys, index)
    passphrase = environ.get("IOT_KEY_PASSPHRASE", "")
    if not passphrase:
        raise ConfigError("keys.source is passphrase but IOT_KEY_PASSPHRASE is not set")
    salt_path = Path(keys.salt_file)
    if not salt_path.exists():
        _create_exclusive(salt_path, secrets.token_bytes(16))
    salt = salt_path.read_bytes()
    try:  # stores sealed by earlier versions derived their key from the Latin-1 bytes of the passphrase
        secret = passphrase.encode("latin-1")
    except UnicodeEncodeError:
        secret = passphrase.encode("utf-8")
    key = Scrypt(salt=salt, length=KEY_BYTES, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P).derive(secret)
    return KeyRing.of([key], hmac.new(key, b"sensorhub index key", hashlib.sha256).digest())


class KeySource:
    """The current key ring; a key file is re-read when it changes (so a rekey reaches running services)."""

    RECHECK_S = 1.0

    def __init__(self, keys: KeySettings, environ: Mapping[str, str]) -> None:
        """Load the ring now (errors surface at start-up)."""
        self._settings = keys
        self._environ = environ
        self._file = KeyFile(keys.file) if keys.source == "file" else None
        self._ring = load_keyring(keys, environ)
        self._mtime = self._file.mtime() if self._file else 0.0
        self._checked = time.monotonic()

    def __call__(self) -> KeyRing:
        """The ring to seal and open with now."""
        if self._file is not None and time.monotonic() - self._checked >= self.RECHECK_S:
            self._checked = time.monotonic()
            mtime = self._file.mtime()
            if mtime != self._mtime:
                self._ring = self._file.load()
                self._mtime = mtime
                log.info("storage key file changed: active key is now %s", self._ring.active_id)
        return self._ring
