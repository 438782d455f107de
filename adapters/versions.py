"""What differs between the cache-dit and diffusers releases this project supports, in one table.

Each ``Difference`` names a behaviour of an older release that the newest tested one does not
have, the first release without it, and what the adapters do about it. The adapters ask
``active(key)`` and nothing else compares versions; docs/pipelines.md lists the same table.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import metadata
from typing import Final

from packaging.version import Version

# The releases the compatibility matrix (noxfile.py) runs; README and docs/pipelines.md name them.
TESTED: Final = {
    "sglang-0.5.23": {"cache-dit": "1.5.1", "diffusers": "0.37.0"},
    "vllm-omni-0.30.0": {"cache-dit": "1.5.0", "diffusers": "0.40.0"},
    "newest": {"cache-dit": "1.5.3", "diffusers": "0.42.1"},
}
"""The pinned sets of the compatibility matrix: session name -> distribution -> version."""


@dataclass(frozen=True)
class Difference:
    """A behaviour of releases before ``fixed_in`` that the adapters handle.

    Args:
        key: the name the adapters ask ``active`` about.
        package: the distribution (``"cache-dit"`` or ``"diffusers"``).
        fixed_in: the first release that behaves as the newest tested one does.
        what: the older behaviour, as a user would meet it.
        handling: what the adapter does about it.

    Example::

        Difference("k", "cache-dit", "1.5.2", "what happens", "what we do")
    """

    key: str
    package: str
    fixed_in: str
    what: str
    handling: str

    def __post_init__(self) -> None:
        if self.package not in ("cache-dit", "diffusers"):
            raise ValueError(
                f"Difference {self.key}: package must be cache-dit or diffusers, got {self.package!r}"
            )
        Version(self.fixed_in)  # raises InvalidVersion for a typo


VERSION_ATTRIBUTE: Final = "version_attribute"
FAKE_PIPELINE_FLAG: Final = "fake_pipeline_flag"

DIFFERENCES: Final[tuple[Difference, ...]] = (
    Difference(
        VERSION_ATTRIBUTE,
        "cache-dit",
        "1.5.1",
        what="`cache_dit.__version__` says `1.3.13.dev9` (the installed distribution is 1.5.0)",
        handling=(
            "`CacheDitAdapter.version()` (part of the compile-artifact key) reads the installed "
            "distribution's version, which is right on every release"
        ),
    ),
    Difference(
        FAKE_PIPELINE_FLAG,
        "cache-dit",
        "1.5.2",
        what=(
            "`enable_cache` on a bare transformer marks the class `FakeDiffusionPipeline` (shared by "
            "every bare-transformer mount) as cached, so every later bare-transformer mount in the "
            "process skips creating its cache context and fails with a bare `AssertionError`"
        ),
        handling=(
            "`CacheDitAdapter.mount` removes that class-level `_is_cached` flag before each "
            "bare-transformer mount (each mount then gets its own context, as in 1.5.2 and later)"
        ),
    ),
)
"""Every difference the adapters handle, oldest first."""

_BY_KEY: Final = {difference.key: difference for difference in DIFFERENCES}


@functools.cache
def installed(package: str) -> Version:
    """The installed version of ``package`` (read once per process).

    Args:
        package: a distribution name, e.g. ``"cache-dit"``.

    Raises:
        importlib.metadata.PackageNotFoundError: it is not installed.

    Example::

        installed("diffusers") >= Version("0.37")
    """
    return Version(metadata.version(package))


def cache_dit_version() -> str:
    """The installed cache-dit's version, from its distribution (see ``VERSION_ATTRIBUTE``);
    ``cache_dit.__version__`` when cache-dit runs from a source tree with no metadata.

    Example::

        cache_dit_version()     # "1.5.3"
    """
    try:
        return str(installed("cache-dit"))
    except metadata.PackageNotFoundError:
        import cache_dit

        return str(getattr(cache_dit, "__version__", "unknown"))


def active(key: str) -> bool:
    """Whether the installed release still behaves as ``DIFFERENCES[key]`` describes.

    Args:
        key: a ``Difference.key``.

    Raises:
        KeyError: no such difference.

    Example::

        if active(FAKE_PIPELINE_FLAG):
            ...
    """
    difference = _BY_KEY[key]
    return installed(difference.package) < Version(difference.fixed_in)


def forget_fake_pipeline_flag() -> None:
    """Remove the class-level ``_is_cached`` flag an earlier bare-transformer mount left on
    cache-dit's ``FakeDiffusionPipeline`` (see ``FAKE_PIPELINE_FLAG``); nothing when the
    installed cache-dit does not leave it.

    Example::

        forget_fake_pipeline_flag()
        cache_dit.enable_cache(transformer, cache_config=config)
    """
    if not active(FAKE_PIPELINE_FLAG):
        return
    from cache_dit.caching.block_adapters import FakeDiffusionPipeline

    if "_is_cached" in vars(FakeDiffusionPipeline):
        del FakeDiffusionPipeline._is_cached


__all__ = [
    "DIFFERENCES",
    "FAKE_PIPELINE_FLAG",
    "TESTED",
    "VERSION_ATTRIBUTE",
    "Difference",
    "active",
    "cache_dit_version",
    "forget_fake_pipeline_flag",
    "installed",
]
