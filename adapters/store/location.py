"""Where a store lives: ``artifact_dir`` parsed once, at construction, into a frozen location.

``artifact_dir`` is a local path (a node disk, or a shared volume: NFS, a Kubernetes ReadWriteMany
or ReadOnlyMany volume; ``file:///...`` is the same) or an fsspec URL (``s3://bucket/prefix``,
``gs://bucket/prefix``, ...) with ``artifact_storage_options`` passed to fsspec unchanged
(credentials, ``endpoint_url``, ``config_kwargs``). A local path needs nothing beyond the standard
library; a URL needs fsspec and the protocol's package (``pip install 'dit-lifecycle[store]'``
brings fsspec and s3fs).

Everything that can be known without touching the network is checked here and refused with
``InvalidOptions`` (the lifecycle's ``InvalidConfigError``) naming the option or the extra: a
malformed URL, an unknown protocol, a protocol whose package is not installed, credentials in the
URL, S3 with no credential source at all, a key without its secret, options given with a local path.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from adapters.errors import InvalidOptions

LOCAL = "local"
EXTRA = "pip install 'dit-lifecycle[store]'"
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*$")
# S3 and GCS bucket names: 3-63 characters, lower case, digits, dots, hyphens (GCS: underscores).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$")
_BUCKETED = frozenset({"s3", "s3a", "gs", "gcs"})
_S3 = frozenset({"s3", "s3a"})
_GCS = frozenset({"gs", "gcs"})
# Option names whose values never appear in a repr or an error message.
_SECRET_WORDS = ("secret", "key", "token", "password", "credential", "session")


def _refuse(message: str) -> InvalidOptions:
    return InvalidOptions(message)


def _masked(options: Mapping[str, Any]) -> dict[str, Any]:
    return {
        name: "***" if any(word in name.lower() for word in _SECRET_WORDS) else value
        for name, value in options.items()
    }


@dataclass(frozen=True, repr=False)
class StoreLocation:
    """A parsed ``artifact_dir``: ``protocol`` is ``"local"`` or an fsspec protocol; ``root`` is an
    absolute-or-relative path (local) or ``bucket/prefix`` (remote, no trailing slash)."""

    url: str
    protocol: str
    root: str
    storage_options: Mapping[str, Any]

    @property
    def local(self) -> bool:
        return self.protocol == LOCAL

    @property
    def path(self) -> Path:
        """The folder of a local store."""
        if not self.local:
            raise ValueError(f"{self.url} is not a local path")
        return Path(self.root)

    def child(self, name: str) -> StoreLocation:
        """The location of a folder (prefix) inside this one, e.g. ``aot`` or ``jit``."""
        if not re.match(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$", name):
            raise ValueError(f"{name!r} is not a folder name")
        root = f"{self.root.rstrip('/')}/{name}" if self.root else name
        return StoreLocation(f"{self.url.rstrip('/')}/{name}", self.protocol, root, self.storage_options)

    def __repr__(self) -> str:
        options = f", storage_options={_masked(self.storage_options)}" if self.storage_options else ""
        return f"StoreLocation({self.url!r}{options})"

    @classmethod
    def parse(
        cls, artifact_dir: object, storage_options: Mapping[str, Any] | None = None
    ) -> StoreLocation:
        """Parse and check ``artifact_dir`` (see the module docstring); raises ``InvalidOptions``."""
        options = _options(storage_options)
        if not isinstance(artifact_dir, (str, os.PathLike)):
            raise _refuse(
                f"artifact_dir must be a directory path or an fsspec URL (str or PathLike), got "
                f"{type(artifact_dir).__name__}"
            )
        text = os.fspath(artifact_dir)
        if isinstance(text, bytes):
            raise _refuse("artifact_dir must be a str path or URL, not bytes: decode it first")
        if not text:
            raise _refuse(
                "artifact_dir is empty (an unset environment variable?); pass a directory path or "
                "an fsspec URL such as 's3://bucket/prefix', or None to keep no artifacts"
            )
        if "://" not in text:
            if options:
                raise _refuse(
                    f"artifact_storage_options {sorted(options)} apply to fsspec URLs only; "
                    f"artifact_dir {text!r} is a local path: drop the options or pass a URL"
                )
            return cls(text, LOCAL, text, MappingProxyType({}))
        return _parse_url(cls, text, options)


def _options(storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    if storage_options is None:
        return {}
    if not isinstance(storage_options, Mapping):
        raise _refuse(
            f"artifact_storage_options must be a dict of fsspec options, got "
            f"{type(storage_options).__name__}"
        )
    bad = [repr(name) for name in storage_options if not isinstance(name, str)]
    if bad:
        raise _refuse(f"artifact_storage_options keys must be option names (str), got {', '.join(bad)}")
    return dict(storage_options)  # a copy: the caller's dict is never kept or changed


def _parse_url(cls: type[StoreLocation], text: str, options: dict[str, Any]) -> StoreLocation:
    scheme, _, rest = text.partition("://")
    protocol = scheme.lower()
    if not _SCHEME.match(protocol):
        raise _refuse(f"artifact_dir {text!r} is not a URL: {scheme!r} is no protocol name")
    try:
        parts = urlsplit(text)
    except ValueError as exc:
        raise _refuse(f"artifact_dir {text!r} is a malformed URL ({exc})") from exc
    if parts.query or parts.fragment or "?" in rest or "#" in rest:
        raise _refuse(
            f"artifact_dir {text!r} has a query or fragment; put options in artifact_storage_options"
        )
    if "@" in parts.netloc:
        raise _refuse(
            f"artifact_dir for {protocol!r} holds credentials in the URL; pass them in "
            "artifact_storage_options (key=, secret=) instead"
        )
    segments = [segment for segment in parts.path.split("/") if segment]
    if any(segment in (".", "..") for segment in segments):
        raise _refuse(f"artifact_dir {text!r} has '.' or '..' segments; name the prefix directly")
    if protocol == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise _refuse(
                f"artifact_dir {text!r}: a file URL is file:///absolute/path (three slashes)"
            )
        if options:
            raise _refuse(
                f"artifact_storage_options {sorted(options)} apply to remote stores only; "
                f"{text!r} is a local folder"
            )
        return cls(text, LOCAL, parts.path, MappingProxyType({}))
    _check_protocol(protocol, text)
    if protocol in _BUCKETED and not _BUCKET.match(parts.netloc):
        raise _refuse(
            f"artifact_dir {text!r}: {parts.netloc!r} is no bucket name (3-63 lower-case letters, "
            f"digits, dots, hyphens): write {protocol}://bucket/prefix"
        )
    if not parts.netloc and not segments:
        raise _refuse(f"artifact_dir {text!r} names no bucket or folder")
    if protocol in _S3:
        _check_s3(options)
    elif protocol in _GCS:
        _check_gcs(options)
    root = "/".join([parts.netloc, *segments]) if parts.netloc else "/".join(segments)
    return cls(text, protocol, root, MappingProxyType(options))


def _check_protocol(protocol: str, text: str) -> None:
    try:
        import fsspec
        from fsspec.registry import known_implementations
    except ImportError as exc:
        raise _refuse(f"artifact_dir {text!r} needs fsspec, which is not installed: {EXTRA}") from exc
    if protocol not in known_implementations and protocol not in fsspec.available_protocols():
        known = ", ".join(p for p in ("s3", "gs", "az", "file", "memory") if p in known_implementations)
        raise _refuse(
            f"artifact_dir {text!r}: {protocol!r} is not an fsspec protocol (known: {known}, ...)"
        )
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as exc:
        extra = EXTRA if protocol in _S3 else f"pip install {_package_for(protocol)}"
        raise _refuse(f"artifact_dir {text!r} needs {_package_for(protocol)}: {extra} ({exc})") from exc


def _package_for(protocol: str) -> str:
    from fsspec.registry import known_implementations

    spec = known_implementations.get(protocol, {})
    return str(spec.get("class", protocol)).partition(".")[0]


def _check_s3(options: Mapping[str, Any]) -> None:
    """A credential source must exist; nothing here touches the network (an instance role is not
    probed: ``anon=False`` says the operator relies on one)."""
    endpoint = options.get("endpoint_url")
    client_kwargs = options.get("client_kwargs")
    if isinstance(client_kwargs, Mapping):
        endpoint = endpoint or client_kwargs.get("endpoint_url")
    if endpoint is not None:
        parts = urlsplit(str(endpoint)) if isinstance(endpoint, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise _refuse(
                f"artifact_storage_options endpoint_url {endpoint!r} is not an http(s) URL with a host"
            )
    key, secret = options.get("key"), options.get("secret")
    if (key is None) != (secret is None):
        missing = "secret" if secret is None else "key"
        raise _refuse(f"artifact_storage_options has {'key' if key else 'secret'} but no {missing!r}")
    if key is not None or "anon" in options or "session" in options or "token" in options:
        return
    profile = options.get("profile") or os.environ.get("AWS_PROFILE")
    if profile:
        return
    env = os.environ
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        return
    if env.get("AWS_WEB_IDENTITY_TOKEN_FILE") or env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") \
            or env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        return
    home = Path(os.path.expanduser("~"))
    files = [env.get("AWS_SHARED_CREDENTIALS_FILE") or home / ".aws" / "credentials",
             env.get("AWS_CONFIG_FILE") or home / ".aws" / "config"]
    if any(Path(name).is_file() for name in files):
        return
    raise _refuse(
        "artifact_dir is an S3 URL but no credentials were found: pass artifact_storage_options="
        "{'key': ..., 'secret': ...} (plus 'endpoint_url' for an S3-compatible server), set "
        "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, use {'anon': True} for a public "
        "bucket, or {'anon': False} to rely on an instance role"
    )


def _check_gcs(options: Mapping[str, Any]) -> None:
    if "token" in options or os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
        return
    adc = Path(os.path.expanduser("~")) / ".config" / "gcloud" / "application_default_credentials.json"
    if adc.is_file():
        return
    raise _refuse(
        "artifact_dir is a Google Cloud Storage URL but no credentials were found: pass "
        "artifact_storage_options={'token': <path to a service-account JSON>}, set "
        "GOOGLE_APPLICATION_CREDENTIALS, or {'token': 'anon'} for a public bucket, "
        "{'token': 'cloud'} on GCE"
    )


__all__ = ["LOCAL", "StoreLocation"]
