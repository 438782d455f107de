"""A package's manifest: its key, its files (name -> SHA-256 and size), the caller's metadata
(what it was built for), who published it, and an optional signature over all of that.

Files are stored once, by content (``blobs/<sha256>``); the manifest (``manifests/<key>.json``) is
published last, in one atomic write, so a package is visible whole or not at all, and two builders
racing on one key can only replace one whole manifest with another."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from adapters.store import signing

FORMAT = 1
MAX_MANIFEST_BYTES = 16 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,199}$")


class ManifestInvalid(ValueError):
    """Bytes that are not a manifest this build reads."""


def check_name(value: object, what: str) -> str:
    """A key or file name: letters, digits, ``._-``, at most 200 characters, no leading dot."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(
            f"{what} {value!r} is not a store name (letters, digits, '._-', at most 200, "
            "not starting with '.')"
        )
    return value


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    key: str
    files: Mapping[str, FileEntry]
    meta: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    published_by: str = ""
    signature: str | None = None

    def document(self) -> dict[str, Any]:
        """Everything but the signature: what is signed."""
        return {
            "format": FORMAT,
            "key": self.key,
            "files": {name: {"sha256": e.sha256, "bytes": e.size} for name, e in self.files.items()},
            "meta": json.loads(json.dumps(dict(self.meta))),
            "published_by": self.published_by,
        }

    def to_bytes(self) -> bytes:
        document = self.document()
        if self.signature is not None:
            document["signature"] = {"alg": signing.ALGORITHM, "value": self.signature}
        return signing.canonical(document)

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        try:
            document = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise ManifestInvalid(f"not JSON ({type(exc).__name__})") from exc
        if not isinstance(document, dict):
            raise ManifestInvalid("not a JSON object")
        if document.get("format") != FORMAT:
            raise ManifestInvalid(f"format {document.get('format')!r}, this build reads {FORMAT}")
        try:
            key = check_name(document["key"], "key")
            files_doc = document["files"]
            meta = document.get("meta", {})
            published_by = str(document.get("published_by", ""))
            if not isinstance(files_doc, dict) or not isinstance(meta, dict):
                raise TypeError("files and meta must be objects")
            files = {}
            for name, entry in files_doc.items():
                check_name(name, "file name")
                sha, size = entry["sha256"], entry["bytes"]
                if not isinstance(sha, str) or not _SHA256.match(sha):
                    raise ValueError(f"{name}: sha256 is not 64 hex digits")
                if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                    raise ValueError(f"{name}: bytes is not a byte count")
                files[name] = FileEntry(sha, size)
            signature = document.get("signature")
            value: str | None = None
            if signature is not None:
                if not isinstance(signature, dict) or signature.get("alg") != signing.ALGORITHM \
                        or not isinstance(signature.get("value"), str):
                    raise ValueError("signature is not {'alg': 'hmac-sha256', 'value': <hex>}")
                value = signature["value"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestInvalid(f"{type(exc).__name__}: {str(exc)[:200]}") from exc
        manifest = cls(key, MappingProxyType(files), MappingProxyType(meta), published_by, value)
        return manifest


__all__ = ["FORMAT", "MAX_MANIFEST_BYTES", "FileEntry", "Manifest", "ManifestInvalid", "check_name"]
