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

The vote is the lifecycle's commit hook (``lifecycle._commit``): ``ModuleLifecycle`` calls it once
per attempt, after the work and before the state moves; it never overrides the lifecycle's
internals. Every audit event carries ``rank`` and ``world_size`` (the hook's audit fields).

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

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from torch import nn

from lifecycle._errors import (
    REFUSALS,
    DistributedTransitionError,
    InvalidConfigError,
    LifecycleError,
    RankDivergenceError,
)
from lifecycle._module import ModuleLifecycle, WarmupRun
from lifecycle._preparing import check_prepare_arguments
from lifecycle._record import Outcome
from states import State, Trigger


@dataclass(frozen=True)
class _Vote:
    rank: int
    module: str
    trigger: str
    state: str
    outcome: Outcome
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


def _describe_failed(failed: Mapping[int, str]) -> str:
    return "; ".join(f"rank {rank} ({text})" for rank, text in sorted(failed.items()))


class RankVote:
    """The commit hook of a ``DistributedLifecycle``: one ``all_gather_object`` per attempt."""

    votes = True

    def __init__(self, group: Any) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def audit_fields(self) -> dict[str, Any]:
        return {"rank": self.rank, "world_size": self.world_size}

    def exchange(self, payload: Any) -> list[Any]:
        votes: list[Any] = [None] * self.world_size
        dist.all_gather_object(votes, payload, group=self.group)
        return votes

    def gather(self, name: str, trigger: str, state: State, error: BaseException | None) -> _Verdict:
        """Every rank's outcome of this attempt, in rank order."""
        outcome: Outcome = "ok" if error is None else "refused" if isinstance(error, REFUSALS) else "failed"
        vote = _Vote(self.rank, name, trigger, State(state).value, outcome,
                     None if error is None else _describe(error))
        verdict = _Verdict(tuple(self.exchange(vote)))
        mismatched = {(v.module, v.trigger) for v in verdict.votes}
        if len(mismatched) > 1:
            raise RankDivergenceError(
                f"{name} (rank {self.rank}): ranks voted on different transitions "
                f"{sorted(mismatched)}; every rank must call the same triggers in the same order. "
                "Call reset() on every rank, then prepare(run).",
                module=name, state=state, trigger=trigger,
            )
        return verdict

    def agree(self, name: str, trigger: str, state: State, error: BaseException | None) -> Mapping[int, str]:
        return self.gather(name, trigger, state, error).failed

    def failure(
        self, name: str, trigger: Trigger, source: State, cause: BaseException,
        failed: Mapping[int, str] | None,
    ) -> DistributedTransitionError:
        if failed is None:  # the vote itself failed (e.g. the group timed out)
            failed = {self.rank: f"failed: {_describe(cause)}"}
            where = f"could not agree ({_describe(cause)})"
        else:
            failed = dict(failed) or {self.rank: f"failed: {_describe(cause)}"}
            where = f"failed on {_describe_failed(failed)}"
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
            f"{name} (rank {self.rank}/{self.world_size}): {trigger.value} {where}; {outcome}",
            module=name, state=source, trigger=trigger, rank=self.rank, failed_ranks=failed,
        )

    def committed_anyway(self, name: str, state: State, failed: Mapping[int, str]) -> BaseException | None:
        # Only reset gets here: the unmount cannot be undone, so this rank committed.
        return DistributedTransitionError(
            f"{name} (rank {self.rank}): reset succeeded here but failed on {_describe_failed(failed)}; "
            "this rank is Loaded, the failed rank(s) kept their state. Call reset() again "
            "on every rank.",
            module=name, state=state, trigger=Trigger.RESET, rank=self.rank, failed_ranks=failed,
        )


class DistributedLifecycle(ModuleLifecycle):
    """A ``ModuleLifecycle`` whose every transition is agreed by all ranks of ``group``.

    Construct it on every rank with the same arguments (and the rank's own module): every
    ``ModuleLifecycle`` argument is accepted (``artifact_dir`` too) and passed through unchanged.
    Requests stay per rank: they need no agreement.

    Args:
        module: this rank's transformer.
        *args: ``ModuleLifecycle``'s positional arguments.
        group: the process group that agrees (default: the world).
        **kwargs: ``ModuleLifecycle``'s keyword arguments (not ``commit``).

    Raises:
        InvalidConfigError: no initialised process group, ``commit`` given, or a rank could
            not build its lifecycle.
        DistributedTransitionError: a transition failed on some rank.
        RankDivergenceError: the ranks are in different states.

    Example::

        torch.distributed.init_process_group("nccl")
        lc = DistributedLifecycle(transformer, name="transformer", backend="cuda")
        lc.prepare(run)   # on every rank
    """

    def __init__(self, module: nn.Module, *args: Any, group: Any = None, **kwargs: Any) -> None:
        name = kwargs.get("name", args[0] if args else "transformer")
        if not (dist.is_available() and dist.is_initialized()):
            raise InvalidConfigError(
                f"{name}: DistributedLifecycle needs an initialised process group; call "
                "torch.distributed.init_process_group(...) on every rank first, or use ModuleLifecycle",
                module=str(name),
                state=State.LOADED,
            )
        if "commit" in kwargs:
            raise InvalidConfigError(f"{name}: DistributedLifecycle supplies its own commit hook")
        self.group = group
        self.vote = RankVote(group)
        self.rank = self.vote.rank
        self.world_size = self.vote.world_size
        error: LifecycleError | None = None
        try:
            super().__init__(module, *args, commit=self.vote, **kwargs)
        except LifecycleError as exc:  # e.g. BackendUnavailableError on one node only
            error = exc
        # Agree on construction too: a rank that could not build its lifecycle would otherwise
        # leave the others waiting in their first vote.
        votes = self.vote.exchange(None if error is None else _describe(error))
        if error is not None:
            raise error
        failed = {rank: text for rank, text in enumerate(votes) if text is not None}
        if failed:
            raise InvalidConfigError(
                f"{name} (rank {self.rank}): DistributedLifecycle could not be built on "
                + "; ".join(f"rank {r} ({t})" for r, t in sorted(failed.items()))
                + ". Fix it there and construct it again on every rank.",
                module=str(name),
                state=State.LOADED,
            )

    def __repr__(self) -> str:
        return (
            f"DistributedLifecycle({self.name!r}, rank={self.rank}/{self.world_size}, "
            f"state={self.state.value}, policy={self.policy})"
        )

    def prepare(self, run: WarmupRun, num_inference_steps: int | None = None, shapes: Any = None) -> None:
        """``ModuleLifecycle.prepare`` on every rank, after the ranks agree on where they start.

        Args:
            run: the warm-up callable, as for ``ModuleLifecycle.prepare``.
            num_inference_steps: the serving step count of the cache context.
            shapes: the declared serving buckets.

        Raises:
            InvalidConfigError: a bad argument on this rank (nothing done on any rank).
            DistributedTransitionError: a bad argument on another rank, or a transition failed.
            RankDivergenceError: the ranks start from different states (``reset()`` on every rank).

        Example::

            lc.prepare(lambda module: module(x), num_inference_steps=28)   # on every rank
        """
        with self._locked(Trigger.WARM_UP):
            error: BaseException | None = check_prepare_arguments(self, run, num_inference_steps)
            verdict = self.vote.gather(self.name, "prepare", self.state, error)
            if error is not None:
                raise error
            if not verdict.ok:
                raise DistributedTransitionError(
                    f"{self.name} (rank {self.rank}): prepare refused on {_describe_failed(verdict.failed)}; "
                    "nothing was done on any rank. Fix the arguments there and call prepare(run) again.",
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
            super().prepare(run, num_inference_steps, shapes)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


__all__ = ["DistributedLifecycle", "RankVote"]
