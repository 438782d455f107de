"""Compile artifacts (``adapters.artifacts``) in an artifact store shared by a fleet
(``adapters.store``): a local folder, a shared volume or an object store.

Each key's file keeps its own format (header with the whole key and the payload's checksum) and
is published as a store package named after it: the bytes by content, the manifest last, signed
when the operator set a key, so a replica never reads half a file and never loads one whose
signature does not verify. No lease: two replicas saving the same key write equal content, and
the later manifest wins. A read-only store loads and reports its saves as ``read_only``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from adapters.artifacts import (
    FORMAT,
    MAGIC,
    SUFFIX,
    ArtifactKey,
    ArtifactReport,
    ArtifactStore,
    _differing,
    _read_file,
    _Unreadable,
    artifact_file,
)

if TYPE_CHECKING:
    from adapters.store import PackageStore

PAYLOAD = "payload"


def _name(key: ArtifactKey) -> str:
    return key.filename[: -len(SUFFIX)]


class StoredArtifacts(ArtifactStore):
    """Artifact files as packages of ``store`` (its ``jit`` folder, as the lifecycle hands it)."""

    def __init__(self, store: PackageStore) -> None:
        self.packages = store
        self.directory = Path(store.location.root)

    def where(self, key: ArtifactKey) -> str:
        return f"{self.packages.location.url.rstrip('/')}/{_name(key)}"

    def write(self, key: ArtifactKey, payload: bytes) -> ArtifactReport:
        where = self.where(key)
        fd, tmp = tempfile.mkstemp(prefix="dit-lifecycle-artifacts-", suffix=SUFFIX)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(artifact_file(key, payload))
            published = self.packages.publish(
                _name(key), {PAYLOAD: Path(tmp)},
                {"format": FORMAT, "digest": key.digest, "key": dict(key.fields)},
            )
        except OSError as exc:
            return ArtifactReport("save", "failed", where, f"cannot stage the file: {exc}")
        finally:
            Path(tmp).unlink(missing_ok=True)
        if published.status == "published":
            return ArtifactReport("save", "saved", where, "", len(payload))
        return ArtifactReport("save", published.status, where, published.detail)

    def read(self, key: ArtifactKey) -> tuple[ArtifactReport, bytes | None]:
        where = self.where(key)
        fetched = self.packages.fetch(_name(key))
        if fetched.status == "missing":
            if self.packages.read_manifest(_name(key))[0] == "found":
                # Its manifest is there but a file it names is not (a dangling link, a cleanup).
                detail = f"a stored file is missing: {fetched.detail}"
                return ArtifactReport("load", "corrupt", where, detail), None
            return self._absent(key), None
        if fetched.status == "untrusted":
            return ArtifactReport("load", "corrupt", where, f"untrusted: {fetched.detail}"), None
        if fetched.package is None:
            return ArtifactReport("load", "unreachable", where, fetched.detail), None
        try:
            header, payload = _read_file(fetched.package.files[PAYLOAD])
        except (_Unreadable, KeyError) as exc:
            return ArtifactReport("load", "corrupt", where, str(exc)), None
        if header.get("format") != FORMAT or header["key"] != dict(key.fields):
            fields = _differing(key.fields, header["key"])
            return ArtifactReport(
                "load", "stale", where, f"saved for another configuration ({', '.join(fields)})",
                differing_fields=fields,
            ), None
        return ArtifactReport("load", "loaded", where, "", len(payload)), payload

    def _absent(self, key: ArtifactKey) -> ArtifactReport:
        for other in sorted(self.packages.keys() or (), reverse=True):
            if not other.startswith(f"{key.label}-"):
                continue
            status, manifest, _ = self.packages.read_manifest(other)
            saved = None if manifest is None else manifest.meta.get("key")
            if status != "found" or not isinstance(saved, dict):
                continue
            fields = _differing(key.fields, saved)
            return ArtifactReport(
                "load", "stale", f"{self.packages.location.url.rstrip('/')}/{other}",
                f"only artifacts for another configuration ({', '.join(fields)}); compiling cold",
                differing_fields=fields,
            )
        return ArtifactReport("load", "missing", None, "no artifacts for this configuration yet")


__all__ = ["MAGIC", "StoredArtifacts"]
