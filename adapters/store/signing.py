"""HMAC-SHA256 over a manifest's canonical JSON, with the operator's key.

The key is bytes the operator chooses and keeps out of the store: from an environment variable
(``os.environb[b"DIT_ARTIFACT_KEY"]``) or a file (``Path("/run/secrets/dit-key").read_bytes()``),
the same on the CI job that builds and on every replica that loads. Without a key, a package is
trusted by its SHA-256 only (which proves the bytes are the ones the manifest names, not who
wrote the manifest)."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

from adapters.errors import InvalidOptions

ALGORITHM = "hmac-sha256"
MIN_KEY_BYTES = 16


def canonical(document: Mapping[str, Any]) -> bytes:
    """The bytes that are signed: sorted keys, no spaces, ASCII, no NaN."""
    return json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def check_key(key: object) -> bytes | None:
    """``artifact_signing_key`` as given, checked: None, or bytes of at least 16 bytes."""
    if key is None:
        return None
    if isinstance(key, str):
        raise InvalidOptions(
            "artifact_signing_key must be bytes, got str: pass os.environb[b'NAME'] or "
            "Path(file).read_bytes() (or encode the str yourself)"
        )
    if not isinstance(key, (bytes, bytearray, memoryview)):
        raise InvalidOptions(f"artifact_signing_key must be bytes or None, got {type(key).__name__}")
    value = bytes(key)
    if len(value) < MIN_KEY_BYTES:
        raise InvalidOptions(
            f"artifact_signing_key has {len(value)} bytes; use at least {MIN_KEY_BYTES} random bytes "
            "(python -c 'import secrets; print(secrets.token_hex(32))')"
        )
    return value


def sign(key: bytes, document: Mapping[str, Any]) -> str:
    return hmac.new(key, canonical(document), hashlib.sha256).hexdigest()


def verify(key: bytes, document: Mapping[str, Any], signature: str) -> bool:
    return hmac.compare_digest(sign(key, document), signature)


__all__ = ["ALGORITHM", "MIN_KEY_BYTES", "canonical", "check_key", "sign", "verify"]
