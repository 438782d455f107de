"""One lifecycle's compile-artifact session: load before compile, save at WarmedUp, and the rule
that decides whether the save is worth it. Reports only; the lifecycle audits them.

The rule: save once per compile, unless the loaded artifacts already held everything (a load
that came back ``loaded`` and inductor compiled nothing from scratch since: its FX graph cache
counted no miss). The key is built once, before compile (mounted, before any call), so every
start builds the same key at the same point, whatever the warm-up calls change afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from adapters.artifact_store import StoredArtifacts
from adapters.artifacts import ArtifactKey, ArtifactReport, ArtifactStore, inductor_cache_misses
from adapters.store import PackageStore

JIT_FOLDER = "jit"


class ArtifactSession:
    """Compile artifacts of one lifecycle, in one directory."""

    def __init__(self, directory: str | os.PathLike[str] | PackageStore) -> None:
        # An artifact store: its ``jit`` folder; a plain path: files in that directory.
        self.store = (
            StoredArtifacts(directory.child(JIT_FOLDER)) if isinstance(directory, PackageStore)
            else ArtifactStore(directory)
        )
        self.reports: dict[str, ArtifactReport] = {}
        self._key: ArtifactKey | None = None
        self._misses_at_compile = 0
        self._saved = False

    @property
    def key(self) -> ArtifactKey | None:
        """The key of this compile (None before it, or when it could not be built)."""
        return self._key

    def before_compile(self, make_key: Callable[[], ArtifactKey]) -> ArtifactReport:
        """Key this compile and load what an earlier start saved for it (never raises)."""
        self.reports.pop("save", None)
        self._saved = False
        self._key = None
        self._misses_at_compile = inductor_cache_misses()
        try:
            self._key = make_key()
        except Exception as exc:  # artifacts are an optimisation: never fail the compile
            report = ArtifactReport("load", "failed", None, f"cannot build the key: {exc!r}")
        else:
            report = _never_raising("load", self.store.load, self._key)
        self.reports["load"] = report
        return report

    def after_warmup(self) -> ArtifactReport | None:
        """Save what this compile added, once; None when there is nothing worth saving."""
        if self._saved or self._key is None:
            return None  # saved already, or no key (the load reported why)
        loaded = self.reports.get("load")
        compiled_new = inductor_cache_misses() > self._misses_at_compile
        if loaded is not None and loaded.status == "loaded" and not compiled_new:
            return None
        self._saved = True
        report = _never_raising("save", self.store.save, self._key)
        self.reports["save"] = report
        return report

    def statuses(self) -> dict[str, str] | None:
        return {action: report.status for action, report in self.reports.items()} or None


def _never_raising(
    action: str, step: Callable[[ArtifactKey], ArtifactReport], key: ArtifactKey
) -> ArtifactReport:
    """The store reports what it meets; anything it did not foresee is reported too (failed),
    so that a file on disk can never fail a compile or a warm-up."""
    try:
        return step(key)
    except Exception as exc:
        return ArtifactReport(action, "failed", None, f"{type(exc).__name__}: {exc}")


__all__ = ["ArtifactSession"]
