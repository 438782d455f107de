"""The lifecycle's typed errors. Each names the module, its state, and the call that fixes it."""

from __future__ import annotations

from collections.abc import Mapping

from states import State, Trigger


class LifecycleError(RuntimeError):
    """Base of every error the lifecycle raises."""

    def __init__(
        self,
        message: str,
        *,
        module: str | None = None,
        state: State | None = None,
        trigger: Trigger | str | None = None,
    ) -> None:
        super().__init__(message)
        self.module = module
        self.state = state
        self.trigger = trigger


class IllegalTransitionError(LifecycleError):
    """The trigger is not legal in the current state; the state is unchanged."""

    def __init__(
        self,
        *,
        module: str,
        state: State,
        trigger: Trigger | str,
        reason: str,
        allowed: tuple[Trigger, ...],
    ) -> None:
        allowed_text = ", ".join(t.value for t in allowed) or "none"
        trigger_text = trigger.value if isinstance(trigger, Trigger) else trigger
        super().__init__(
            f"{module}: cannot {trigger_text} in state {State(state).value}: {reason}. "
            f"Allowed now: {allowed_text}.",
            module=module,
            state=state,
            trigger=trigger,
        )
        self.reason = reason
        self.allowed = allowed


class TransitionFailedError(LifecycleError):
    """The work of a legal transition raised; the original is ``__cause__``, the state is unchanged."""


class BackendUnavailableError(LifecycleError):
    """The chosen backend's runtime or device is missing; the message says how to get it."""


class UnsupportedModuleError(LifecycleError):
    """Not an ``nn.Module``, or cache-dit cannot wrap it."""


class InvalidConfigError(LifecycleError, ValueError):
    """A bad argument (compile options, cache config, step count, warm-up callable), refused
    before any work; the state is unchanged."""


class AuditWriteError(LifecycleError):
    """The audit event of a transition that succeeded could not be written (e.g. a full disk).

    The work was done and the state moved: ``state`` is the new state, as the message says. The
    lifecycle keeps working; fix the audit sink. (When a refused or failed trigger's event cannot
    be written, the trigger's own typed error is raised instead, with an ``AuditWriteWarning`` and a
    note naming the sink failure.)"""


class AuditWriteWarning(UserWarning):
    """An audit event could not be written; the warning names the event and the sink's error."""


class UnwarmedShapeError(LifecycleError):
    """A request at a shape no warm-up covered, under ``on_unwarmed="fail"``; raised before the
    transformer runs, the state stays WarmedUp. ``shape_key`` is the shape's key when the request
    named one."""

    def __init__(
        self,
        message: str,
        *,
        module: str | None = None,
        state: State | None = None,
        trigger: Trigger | str | None = None,
        shape_key: str | None = None,
    ) -> None:
        super().__init__(message, module=module, state=state, trigger=trigger)
        self.shape_key = shape_key


class PipelineError(LifecycleError):
    """A member's transition failed; ``member`` names it, ``__cause__`` is the member's error.

    ``members`` names every member the failure concerns: one for a member's own transition,
    all of them for a joint warm-up (one pipeline call drives them all, so the failure cannot
    be pinned on one) or for a reset where several failed.
    """

    def __init__(
        self, message: str, *, member: str, state: State | None, members: tuple[str, ...] = ()
    ) -> None:
        super().__init__(message, module=member, state=state)
        self.member = member
        self.members = members or (member,)


class DistributedTransitionError(TransitionFailedError):
    """A transition failed on at least one rank; every rank raises it and stays in its previous
    state (see ``reset`` in the module docstring). ``failed_ranks`` maps rank -> error text."""

    def __init__(
        self, message: str, *, module: str, state: State, trigger: Trigger | str,
        rank: int, failed_ranks: Mapping[int, str],
    ) -> None:
        super().__init__(message, module=module, state=state, trigger=trigger)
        self.rank = rank
        self.failed_ranks = dict(failed_ranks)


class RankDivergenceError(LifecycleError):
    """Ranks disagree on where the module is, or called different triggers at the same point."""


class PeerFailedError(LifecycleError):
    """The cause recorded on a rank whose own work succeeded while a peer's failed: this rank's
    work was undone and its state did not move."""

    def __init__(self, message: str, failed_ranks: Mapping[int, str]) -> None:
        super().__init__(message)
        self.failed_ranks = dict(failed_ranks)


def translate_adapter_error(
    error: Exception, *, module: str, state: State | None = None, trigger: Trigger | str | None = None
) -> LifecycleError:
    """The one place adapter errors (``adapters.errors``) become lifecycle errors: the adapter's
    message, prefixed with the module name; module, state and trigger attached."""
    from adapters.errors import BackendUnavailable, InvalidOptions, UnsupportedForCache

    kind: type[LifecycleError]
    if isinstance(error, BackendUnavailable):
        kind = BackendUnavailableError
    elif isinstance(error, InvalidOptions):
        kind = InvalidConfigError
    elif isinstance(error, UnsupportedForCache):
        kind = UnsupportedModuleError
    else:
        kind = TransitionFailedError
    return kind(f"{module}: {error}", module=module, state=state, trigger=trigger)
