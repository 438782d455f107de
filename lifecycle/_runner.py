"""The transition runner: one lifecycle's state, its trigger attempts, their commit and history.

Every trigger is fired on the policy's transitions machine (``lifecycle._machine``), which decides
legality from the states table. The work runs in the machine's ``before`` callback, so work that
raises leaves the state unchanged; the commit hook (``lifecycle._commit``) agrees before the state
moves; the audit event and the ``history`` record are written from the machine's ``after`` /
``on_exception`` callbacks.

``TransitionRunner`` owns the state holder, the sequence number, the history and whether a
running trigger has taken the module out of service; the lifecycle owns the work. The work gets
a ``TransitionStep``: ``extra`` holds fields for the audit event, ``on_undo`` registers how to
take the work back should the commit hook refuse the commit (a peer rank failed).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from lifecycle import audit
from lifecycle._commit import CommitHook
from lifecycle._errors import (
    REFUSALS,
    AuditWriteError,
    IllegalTransitionError,
    LifecycleError,
    PeerFailedError,
    RankDivergenceError,
    TransitionFailedError,
)
from lifecycle._locking import LockConflict, OwnerLock
from lifecycle._machine import MachineError, StateHolder, events_for
from lifecycle._record import Outcome, TransitionRecord, warn_unwritten
from states import LifecyclePolicy, State, Trigger, allowed_triggers, explain_illegal

HISTORY_LIMIT = 10_000
# Triggers whose work takes the module out of service while it runs (probes answer not ready).
_UNREADY_WHILE_RUNNING = frozenset({Trigger.RESET, Trigger.INVALIDATE, Trigger.WARM_UP})
_STATES: dict[str, State] = {state.value: state for state in State}
# Read on every trigger: a module constant is cheaper than an enum class attribute.
_LOADED = State.LOADED
_RESET = Trigger.RESET

# The lifecycle's check before any work: (trigger, source) -> None, raising to refuse.
Guard = Callable[[Trigger, State], None]
Work = Callable[["TransitionStep"], None]


class TransitionStep:
    """One trigger attempt, run by the machine's callbacks (``lifecycle._machine.Attempt``)."""

    __slots__ = (
        "after_error", "done", "extra", "runner", "source", "started", "trigger", "undo", "voted",
        "work", "worked",
    )

    def __init__(self, runner: TransitionRunner, trigger: Trigger, work: Work) -> None:
        self.runner = runner
        self.trigger = trigger
        self.work = work
        self.source = _STATES[runner.holder.state]
        self.started = time.perf_counter()
        self.extra: dict[str, Any] = {}
        self.undo: list[Callable[[], None]] | None = None  # made on first use: several works add none
        self.voted = self.worked = self.done = False
        self.after_error: BaseException | None = None

    def on_undo(self, undo: Callable[[], None]) -> None:
        if self.undo is None:
            self.undo = [undo]
        else:
            self.undo.append(undo)

    # ------------------------------------------------------------------ machine callbacks
    def run(self) -> None:
        runner = self.runner
        trigger = self.trigger
        runner.guard(trigger, self.source)
        if trigger in _UNREADY_WHILE_RUNNING:
            runner.mark_unready(trigger)
        self.work(self)
        self.worked = self.voted = True
        commit = runner.commit
        if not commit.votes:  # a single process: the local outcome is the outcome
            return
        name = runner.name
        if trigger is _RESET:
            # An unmount cannot be undone: commit, then tell the caller what the others did.
            try:
                failed = commit.agree(name, trigger._value_, self.source, None)
            except BaseException as exc:
                self.after_error = exc
                return
            if failed:
                self.after_error = commit.committed_anyway(name, _LOADED, failed)
            return
        failed = commit.agree(name, trigger._value_, self.source, None)
        if failed:
            text = "; ".join(f"rank {rank} ({what})" for rank, what in sorted(failed.items()))
            raise PeerFailedError(f"failed on {text}", failed)

    def committed(self) -> None:
        self.done = True
        runner = self.runner
        runner.mark_unready(None)
        dest = _STATES[runner.holder.state]
        lost = runner.record(self.trigger, self.source, dest, "ok", self.started, None, self.extra)
        if self.after_error is not None:
            if lost is not None:
                warn_unwritten(audit.TRANSITION_EVENT, runner.name, lost, self.after_error)
            raise self.after_error
        if lost is not None:
            raise AuditWriteError(
                f"{runner.name}: {self.trigger.value} succeeded and the state is now {dest.value}, but "
                f"its audit event could not be written ({type(lost).__name__}: {lost}). The "
                "lifecycle keeps working; fix the audit sink.",
                module=runner.name, state=dest, trigger=self.trigger,
            ) from lost

    def aborted(self, error: BaseException) -> None:
        runner = self.runner
        if runner.unready_for is self.trigger:
            runner.mark_unready(None)
        if self.done:  # raised after the commit (a lost audit write, a reset's late verdict)
            raise error
        trigger, source, name = self.trigger, self.source, runner.name
        if self.worked and self.undo is not None:
            for undo in reversed(self.undo):
                undo()
        if isinstance(error, MachineError):
            error = IllegalTransitionError(
                module=name, state=source, trigger=trigger,
                reason=explain_illegal(runner.policy, source, trigger),
                allowed=allowed_triggers(runner.policy, source),
            )
        if isinstance(error, REFUSALS):
            lost = runner.record(trigger, source, source, "refused", self.started, error, self.extra)
            if not self.voted:
                self.voted = True
                runner.commit.agree(name, trigger.value, source, error)
            if lost is not None:
                warn_unwritten(audit.TRANSITION_EVENT, name, lost, error)
            raise error
        nested = isinstance(error, TransitionFailedError) and error.module is not None
        cause = error.__cause__ if nested and error.__cause__ is not None else error
        failed: Mapping[int, str] | None = None
        vote_error: BaseException | None = None
        if not self.voted:
            self.voted = True
            try:
                failed = runner.commit.agree(name, trigger.value, source, cause)
            except BaseException as exc:
                vote_error = exc
        elif isinstance(error, PeerFailedError):
            failed = error.failed_ranks
        lost = runner.record(trigger, source, source, "failed", self.started, cause, self.extra)
        if isinstance(cause, (KeyboardInterrupt, SystemExit)):
            raise cause
        if vote_error is not None:
            raise vote_error
        if isinstance(cause, RankDivergenceError):
            raise cause from None
        typed = runner.commit.failure(name, trigger, source, cause, failed)
        if lost is not None:
            warn_unwritten(audit.TRANSITION_EVENT, name, lost, typed)
        raise typed from cause


class TransitionRunner:
    """Fires one lifecycle's triggers under its lock (see the module docstring).

    Args:
        name: the lifecycle's name, in every event and error.
        policy: the policy whose machine decides legality.
        base: the fields every audit event starts from (read, never changed).
        commit: who agrees before the state moves.
        lock: the lifecycle's lock (shared by the lifecycles over one module).
        guard: the lifecycle's own check before any work, raising to refuse.
    """

    __slots__ = (
        "_events", "_history", "_history_lock", "_seq", "base", "commit", "guard", "holder", "lock",
        "name", "policy", "unready_for",
    )

    def __init__(
        self, name: str, policy: LifecyclePolicy, base: dict[str, Any], commit: CommitHook,
        lock: OwnerLock, guard: Guard,
    ) -> None:
        self.name = name
        self.policy = policy
        self.base = base
        self.commit = commit
        self.lock = lock
        self.guard = guard
        self.holder = StateHolder()
        self._events = events_for(policy)
        # The trigger whose work is running now, when it makes the module unfit to serve (a
        # reset, an invalidate, a re-warm-up): ``ready`` answers False from its first moment.
        self.unready_for: Trigger | None = None
        self._seq = 0
        # Each record as a plain tuple, made a TransitionRecord when ``history`` is read: one is
        # appended per trigger, and reads are rare. The latest HISTORY_LIMIT only (the audit
        # keeps every one). Its own lock: reads never wait for a request.
        self._history: deque[tuple[Any, ...]] = deque(maxlen=HISTORY_LIMIT)
        self._history_lock = threading.Lock()

    @property
    def state(self) -> State:
        return _STATES[self.holder.state]

    def mark_unready(self, trigger: Trigger | None) -> None:
        """``trigger``'s work has taken the module out of service (None: it is back)."""
        self.unready_for = trigger

    def history(self) -> tuple[TransitionRecord, ...]:
        with self._history_lock:
            records = tuple(self._history)
        return tuple(TransitionRecord._make(record) for record in records)

    def fire(self, trigger: Trigger, work: Work) -> None:
        """Run ``work`` as ``trigger``: legal per the table, the state moves only if it succeeds."""
        try:
            self.lock.acquire()
        except LockConflict as exc:
            raise self.busy(trigger, exc) from None
        try:
            self._events[trigger].trigger(self.holder, attempt=TransitionStep(self, trigger, work))
        finally:
            self.lock.release()

    @contextmanager
    def locked(self, trigger: Trigger) -> Iterator[None]:
        """Hold the lock for ``trigger``; another asyncio task of the owner's thread is refused
        (audited) instead of deadlocking the loop."""
        try:
            self.lock.acquire()
        except LockConflict as exc:
            raise self.busy(trigger, exc) from None
        try:
            yield
        finally:
            self.lock.release()

    def busy(self, trigger: Trigger, conflict: LockConflict) -> LifecycleError:
        """Another asyncio task of the owner's thread holds the lock: refused, audited."""
        state = self.state
        error = IllegalTransitionError(
            module=self.name, state=state, trigger=trigger, reason=str(conflict),
            allowed=allowed_triggers(self.policy, state),
        )
        return self.refuse(error, trigger)

    def refuse(self, error: LifecycleError, trigger: Trigger) -> LifecycleError:
        """Audit a refusal decided before any trigger fired (prepare's arguments, a busy lock)."""
        source = self.state
        lost = self.record(trigger, source, source, "refused", time.perf_counter(), error)
        if lost is not None:
            warn_unwritten(audit.TRANSITION_EVENT, self.name, lost, error)
        return error

    def record(
        self,
        trigger: Trigger,
        source: State,
        dest: State,
        outcome: Outcome,
        started: float,
        error: BaseException | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Exception | None:
        """Append to the history and write the transition event; return the sink's error, if any."""
        seq = self._seq = self._seq + 1
        duration_ms = (time.perf_counter() - started) * 1000.0
        error_text = f"{type(error).__name__}: {error}" if error is not None else None
        with self._history_lock:
            self._history.append((seq, trigger, source, dest, outcome, duration_ms, error_text))
        # ``_value_`` (enum's own slot) rather than ``.value``: the property is slower per read.
        fields = {
            **self.base, "trigger": trigger._value_, "source": source._value_, "dest": dest._value_,
            "outcome": outcome, "duration_ms": round(duration_ms, 3), "seq": seq,
        }
        if extra:
            fields.update(extra)
        if error is not None:
            fields["error"] = error_text
            fields["error_type"] = type(error).__name__
        # emit_checked(), inline: one call less on every transition.
        try:
            audit.emit(audit.TRANSITION_EVENT, outcome, fields)
        except Exception as exc:  # a host's sink may raise anything (OSError on a full disk)
            return exc
        return None


__all__ = ["HISTORY_LIMIT", "Guard", "TransitionRunner", "TransitionStep", "Work"]
