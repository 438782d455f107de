"""``DistributedLifecycle``: one sharded (or replicated) transformer whose ranks move together.

Every rank of a ``torch.distributed`` process group runs the same transition on its own copy of
the module; before any rank's state moves, the ranks exchange their outcomes with one
``all_gather_object``. Only when every rank succeeded does each rank commit. When any rank
failed, every rank raises ``DistributedTransitionError`` naming the failed rank(s), undoes its
own local work (unmount, drop compiled code, restore the cache context) and stays in its previous
state. Construction and the start of ``prepare`` (arguments, every rank in the same state) are
agreed the same way. The vote is an ordinary collective, so nothing here is device-specific:
tested with gloo on CPUs; with NCCL, call ``torch.cuda.set_device(local_rank)`` before
constructing, as ``all_gather_object`` requires.

Rules for the host (the same as for any collective):
- every rank calls the same triggers on its lifecycles, in the same order, from one thread
  per rank (the payload names module and trigger, so a mismatch raises ``RankDivergenceError``
  instead of pairing the wrong votes);
- a warm-up whose forward itself runs collectives (context parallelism) cannot be saved by the
  vote if one rank dies mid-forward: the peers wait in the forward's collective until the
  group's timeout (``init_process_group(timeout=...)``).

``reset`` is the exception to "stay in the previous state": unmounting cannot be undone, so a
rank whose reset succeeded stays in Loaded and still raises; call ``reset()`` again on every
rank (legal from any state) to converge.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import structlog
import torch.distributed as dist
from torch import nn

from adapters import BackendAdapter
from lifecycle.errors import (
    DistributedTransitionError,
    IllegalTransitionError,
    InvalidConfigError,
    LifecycleError,
    PeerFailedError,
    RankDivergenceError,
    TransitionFailedError,
    UnsupportedModuleError,
)
from lifecycle.module import (
    ModuleLifecycle,
    RequestRecord,
    WarmupRun,
    _Attempt,
)
from states import LifecyclePolicy, State, Trigger

_REFUSALS = (IllegalTransitionError, InvalidConfigError, UnsupportedModuleError)




@dataclass(frozen=True)
class _Vote:
    rank: int
    module: str
    trigger: str
    state: str
    outcome: str  # "ok" | "failed" | "refused"
    error: str | None


@dataclass(frozen=True)
class _Verdict:
    votes: tuple[_Vote, ...]

    @property
    def ok(self) -> bool:
        return all(v.outcome == "ok" for v in self.votes)

    @property
    def failed(self) -> dict[int, str]:
        return {v.rank: f"{v.outcome}: {v.error}" for v in self.votes if v.outcome != "ok"}

    def describe(self) -> str:
        return "; ".join(f"rank {rank} ({text})" for rank, text in sorted(self.failed.items()))


class DistributedLifecycle(ModuleLifecycle):
    """A ``ModuleLifecycle`` whose every transition is agreed by all ranks of ``group``.

    Construct it on every rank with the same arguments (and the rank's own module). Requests
    stay per rank: they need no agreement. Audit events carry ``rank`` and ``world_size``.
    """

    def __init__(
        self,
        module: nn.Module,
        name: str = "transformer",
        policy: LifecyclePolicy | None = None,
        backend: str | BackendAdapter = "auto",
        cache_config: Any = None,
        compile_options: Mapping[str, Any] | None = None,
        *,
        group: Any = None,
        cache_adapter: Any = None,
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise InvalidConfigError(
                f"{name}: DistributedLifecycle needs an initialised process group; call "
                "torch.distributed.init_process_group(...) on every rank first, or use ModuleLifecycle",
                module=name,
                state=State.LOADED,
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        error: LifecycleError | None = None
        try:
            super().__init__(
                module, name, policy, backend, cache_config, compile_options, cache_adapter=cache_adapter
            )
        except LifecycleError as exc:  # e.g. BackendUnavailableError on one node only
            error = exc
        # Agree on construction too: a rank that could not build its lifecycle would otherwise
        # leave the others waiting in their first vote.
        votes: list[Any] = [None] * self.world_size
        dist.all_gather_object(votes, None if error is None else _describe(error), group=group)
        if error is not None:
            raise error
        failed = {rank: text for rank, text in enumerate(votes) if text is not None}
        if failed:
            raise InvalidConfigError(
                f"{name} (rank {self.rank}): DistributedLifecycle could not be built on "
                + "; ".join(f"rank {r} ({t})" for r, t in sorted(failed.items()))
                + ". Fix it there and construct it again on every rank.",
                module=name,
                state=State.LOADED,
            )

    def __repr__(self) -> str:
        return (
            f"DistributedLifecycle({self.name!r}, rank={self.rank}/{self.world_size}, "
            f"state={self.state.value}, policy={self.policy})"
        )

    # ------------------------------------------------------------------ audit
    def _audit_base(self) -> dict[str, Any]:
        return {**super()._audit_base(), "rank": self.rank, "world_size": self.world_size}

    @contextmanager
    def request(
        self, num_inference_steps: int | None = None, request_id: str | None = None
    ) -> Iterator[RequestRecord]:
        # Request events have no per-lifecycle base; the rank reaches them through contextvars.
        with structlog.contextvars.bound_contextvars(rank=self.rank, world_size=self.world_size):
            with super().request(num_inference_steps, request_id) as record:
                yield record

    # ------------------------------------------------------------------ agreement
    def _gather(self, trigger: str, error: BaseException | None) -> _Verdict:
        """One collective: every rank's outcome of this attempt, in rank order."""
        if error is None:
            outcome = "ok"
        else:
            outcome = "refused" if isinstance(error, _REFUSALS) else "failed"
        vote = _Vote(
            rank=self.rank,
            module=self.name,
            trigger=trigger,
            state=self.state.value,
            outcome=outcome,
            error=None if error is None else _describe(error),
        )
        votes: list[Any] = [None] * self.world_size
        dist.all_gather_object(votes, vote, group=self.group)
        verdict = _Verdict(tuple(votes))
        mismatched = {(v.module, v.trigger) for v in verdict.votes}
        if len(mismatched) > 1:
            raise RankDivergenceError(
                f"{self.name} (rank {self.rank}): ranks voted on different transitions "
                f"{sorted(mismatched)}; every rank must call the same triggers in the same order. "
                "Call reset() on every rank, then prepare(run).",
                module=self.name,
                state=self.state,
                trigger=trigger,
            )
        return verdict

    def _snapshot(self) -> dict[str, Any]:
        return {"serving_steps": self._serving_steps, "warmup_covered": self._warmup_covered}

    def _undo(self, trigger: Trigger, attempt: _Attempt, snapshot: Mapping[str, Any]) -> None:
        """Take back this rank's successful work because a peer failed (state has not moved)."""
        if trigger is Trigger.MOUNT_CACHE:
            # An adopted mount was the host's: let go of it without unmounting.
            self._release_cache_mount(unmount=not attempt.extra.get("adopted"))
        elif trigger is Trigger.COMPILE:
            self._release_compiled()
        elif trigger is Trigger.REFRESH:
            self._serving_steps = snapshot["serving_steps"]
            self.cache.refresh(self._module, self.cache_config, self._serving_steps)
        # warm_up and invalidate change no module state worth undoing: compiled graphs a warm-up
        # added stay in dynamo's cache and make the retry faster.
        self._warmup_covered = snapshot["warmup_covered"]

    @contextmanager
    def _transition(self, trigger: Trigger) -> Iterator[_Attempt]:
        """The local transition with a vote of all ranks between the work and the commit.

        Exactly one collective per attempt on every rank, whatever the local outcome (refused,
        failed or ok), so no rank is left waiting in the vote.
        """
        with self._lock:
            source = self.state
            snapshot = self._snapshot()
            verdict: _Verdict | None = None
            late: BaseException | None = None  # a reset's vote failed after its work was done
            try:
                with super()._transition(trigger) as attempt:
                    try:
                        yield attempt
                    except BaseException as exc:
                        verdict = self._gather(trigger.value, exc)  # peers learn; the local error wins
                        raise
                    try:
                        verdict = self._gather(trigger.value, None)
                    except BaseException as exc:
                        if trigger is not Trigger.RESET:
                            self._undo(trigger, attempt, snapshot)
                            raise
                        late = exc  # unmounted already: commit, then raise
                    if verdict is not None and not verdict.ok and trigger is not Trigger.RESET:
                        self._undo(trigger, attempt, snapshot)
                        raise PeerFailedError(f"failed on {verdict.describe()}", verdict.failed)
            except _REFUSALS as exc:
                if verdict is None:
                    self._gather(trigger.value, exc)  # refused before any work: still vote
                raise
            except TransitionFailedError as exc:
                cause = exc.__cause__ if exc.__cause__ is not None else exc
                if isinstance(cause, RankDivergenceError):
                    raise cause from None
                raise self._group_error(trigger, source, cause, verdict) from cause
            if late is not None:
                raise late
            if verdict is not None and not verdict.ok:
                # Only reset gets here: the unmount cannot be undone, so this rank committed.
                raise DistributedTransitionError(
                    f"{self.name} (rank {self.rank}): reset succeeded here but {verdict.describe()}; "
                    "this rank is Loaded, the failed rank(s) kept their state. Call reset() again "
                    "on every rank.",
                    module=self.name, state=self.state, trigger=trigger, rank=self.rank,
                    failed_ranks=verdict.failed,
                )

    def _group_error(
        self, trigger: Trigger, source: State, cause: BaseException, verdict: _Verdict | None
    ) -> DistributedTransitionError:
        if verdict is None:  # the vote itself failed (e.g. the group timed out)
            failed = {self.rank: f"failed: {_describe(cause)}"}
            where = f"could not agree ({_describe(cause)})"
        else:
            failed = verdict.failed
            where = f"failed on {verdict.describe()}"
        if trigger is Trigger.RESET:
            outcome = (
                f"this rank stays in {source.value}, ranks whose reset succeeded are Loaded. Fix the "
                "cause, then call reset() again on every rank."
            )
        else:
            retry = "prepare(run)" if trigger is Trigger.WARM_UP else f"{trigger.value}() (or prepare(run))"
            outcome = (
                f"every rank stays in {source.value}. Fix the cause on the failed rank(s), then call "
                f"{retry} on every rank again."
            )
        return DistributedTransitionError(
            f"{self.name} (rank {self.rank}/{self.world_size}): {trigger.value} {where}; {outcome}",
            module=self.name, state=source, trigger=trigger, rank=self.rank, failed_ranks=failed,
        )

    # ------------------------------------------------------------------ prepare
    def prepare(self, run: WarmupRun, num_inference_steps: int | None = None) -> None:
        """``ModuleLifecycle.prepare`` on every rank, after the ranks agree on where they start."""
        with self._lock:
            error: BaseException | None = None
            try:
                if self.state is not State.WARMED_UP:
                    self._check_callable(Trigger.WARM_UP, run)
                self._check_steps(Trigger.REFRESH, num_inference_steps)
            except LifecycleError as exc:
                error = exc
            verdict = self._gather("prepare", error)
            if error is not None:
                raise error
            if not verdict.ok:
                raise DistributedTransitionError(
                    f"{self.name} (rank {self.rank}): prepare refused on {verdict.describe()}; "
                    f"nothing was done on any rank. Fix the arguments there and call prepare(run) again.",
                    module=self.name, state=self.state, trigger="prepare", rank=self.rank,
                    failed_ranks=verdict.failed,
                )
            states = {v.rank: v.state for v in verdict.votes}
            if len(set(states.values())) > 1:
                raise RankDivergenceError(
                    f"{self.name} (rank {self.rank}): ranks are in different states {states}; call "
                    "reset() on every rank, then prepare(run).",
                    module=self.name, state=self.state, trigger="prepare",
                )
            super().prepare(run, num_inference_steps)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


__all__ = ["DistributedLifecycle"]
