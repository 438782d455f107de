"""When a transition's work is done, who agrees that the state may move: the commit hook.

``ModuleLifecycle`` calls a hook that ``votes`` exactly once per trigger attempt, whatever the
outcome, after the work and before the state moves (refused and failed attempts vote too, so
that a peer never waits). ``LocalCommit`` does not vote: it agrees with every success, so it is
asked only about failures and refusals; ``lifecycle._distributed`` supplies a rank vote.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from lifecycle._errors import TransitionFailedError
from states import State, Trigger


class CommitHook(Protocol):
    # False: the local outcome is the outcome, and a successful attempt is not put to a vote
    # (a trigger costs one call less); failed and refused attempts are always told.
    votes: bool

    def audit_fields(self) -> dict[str, Any]:
        """Fields every audit event of this lifecycle carries (e.g. ``rank``, ``world_size``)."""

    def agree(self, name: str, trigger: str, state: State, error: BaseException | None) -> Mapping[int, str]:
        """Vote this attempt's outcome (``error`` None: the local work succeeded); return who
        failed, empty when everyone agrees. May raise when agreement itself fails."""

    def failure(
        self, name: str, trigger: Trigger, source: State, cause: BaseException,
        failed: Mapping[int, str] | None,
    ) -> TransitionFailedError:
        """The error raised when the work failed here or elsewhere (state unchanged); ``failed``
        is None when agreement itself failed."""

    def committed_anyway(self, name: str, state: State, failed: Mapping[int, str]) -> BaseException | None:
        """For a trigger that cannot be undone (reset): the error to raise after this rank's state
        moved although ``failed`` did not agree; None to raise nothing."""


FIX_HINTS: dict[Trigger, str] = {
    Trigger.MOUNT_CACHE: "Check the cache_config, then call mount_cache() again.",
    Trigger.COMPILE: "Check compile_options, then call compile() again, or use "
    "LifecyclePolicy(compile=False).",
    Trigger.WARM_UP: "Fix the warm-up callable (or the compile it triggered), then call "
    "warm_up(run) or prepare(run) again; reset() returns the module to eager.",
    Trigger.REFRESH: "Call refresh() again with a valid step count.",
    Trigger.INVALIDATE: "Call invalidate() again.",
    Trigger.RESET: "Call reset() again once the cause is fixed.",
    Trigger.REQUEST: "Call refresh() to retry, or reset() and prepare(run) again.",
}


class LocalCommit:
    """A single process: the local outcome is the outcome."""

    votes = False

    def audit_fields(self) -> dict[str, Any]:
        return {}

    def agree(self, name: str, trigger: str, state: State, error: BaseException | None) -> Mapping[int, str]:
        return {}

    def failure(
        self, name: str, trigger: Trigger, source: State, cause: BaseException,
        failed: Mapping[int, str] | None,
    ) -> TransitionFailedError:
        return TransitionFailedError(
            f"{name}: {trigger.value} failed in state {source.value} "
            f"({type(cause).__name__}: {cause}); the state stays {source.value} and the "
            f"module is usable. {FIX_HINTS[trigger]}",
            module=name,
            state=source,
            trigger=trigger,
        )

    def committed_anyway(self, name: str, state: State, failed: Mapping[int, str]) -> BaseException | None:
        return None
