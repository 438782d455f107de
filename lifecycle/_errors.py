"""The lifecycle's typed errors. Each names the module, its state, and the call that fixes it."""

from __future__ import annotations

from collections.abc import Mapping

from states import State, Trigger


class LifecycleError(RuntimeError):
    """Base of every error the lifecycle raises.

    Args:
        message: the text, naming the module and the fix.
        module: the lifecycle's name.
        state: the state when it was raised.
        trigger: the trigger refused or failed.

    Example::

        try:
            lc.prepare(run)
        except LifecycleError as exc:
            log.error("%s in %s at %s", exc.module, exc.state, exc.trigger)
    """

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
    """The trigger is not legal in the current state; the state is unchanged.

    ``reason`` says why; ``allowed`` lists the triggers legal now.

    Example::

        try:
            lc.compile()
        except IllegalTransitionError as exc:
            print(exc.reason, exc.allowed)
    """

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
    """The work of a legal transition raised; the original is ``__cause__``, the state is unchanged.

    Example::

        try:
            lc.warm_up(run)
        except TransitionFailedError as exc:
            print(exc.state, repr(exc.__cause__))
    """


class BackendUnavailableError(LifecycleError):
    """The chosen backend's runtime or device is missing; the message says how to get it.

    Example::

        try:
            lc = ModuleLifecycle(module, backend="npu")
        except BackendUnavailableError:
            lc = ModuleLifecycle(module, backend="cpu")
    """


class UnsupportedModuleError(LifecycleError):
    """Not an ``nn.Module``, or cache-dit cannot wrap it.

    Example::

        try:
            ModuleLifecycle("not a module", name="transformer")
        except UnsupportedModuleError as exc:
            print(exc)
    """


class InvalidConfigError(LifecycleError, ValueError):
    """A bad argument (compile options, cache config, step count, warm-up callable), refused
    before any work; the state is unchanged. Also a ``ValueError``.

    Example::

        try:
            lc.refresh(num_inference_steps=0)
        except InvalidConfigError as exc:
            print(exc)   # names the argument and the fix
    """


class AuditWriteError(LifecycleError):
    """The audit event of a transition that succeeded could not be written (e.g. a full disk).

    The work was done and the state moved: ``state`` is the new state, as the message says. The
    lifecycle keeps working; fix the audit sink. (When a refused or failed trigger's event cannot
    be written, the trigger's own typed error is raised instead, with an ``AuditWriteWarning`` and a
    note naming the sink failure.)

    Example::

        try:
            lc.prepare(run)
        except AuditWriteError as exc:
            assert lc.state is exc.state   # the work was done; fix the sink
    """


class AuditWriteWarning(UserWarning):
    """An audit event could not be written; the warning names the event and the sink's error.

    Example::

        warnings.simplefilter("error", AuditWriteWarning)   # make a lost event fatal
    """


class UnwarmedShapeError(LifecycleError):
    """A request at a shape no warm-up covered, under ``on_unwarmed="fail"``; raised before the
    transformer runs, the state stays WarmedUp. ``shape_key`` is the shape's key when the request
    named one.

    Example::

        try:
            with lc.request(shape={"height": 768, "width": 768}, on_unwarmed="fail"):
                lc.module(x)
        except UnwarmedShapeError as exc:
            lc.warm_up(run, shapes=lc.missed_shapes())
    """

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

    Example::

        try:
            plc.prepare(run)
        except PipelineError as exc:
            print(exc.member, exc.members, repr(exc.__cause__))
    """

    def __init__(
        self, message: str, *, member: str, state: State | None, members: tuple[str, ...] = ()
    ) -> None:
        super().__init__(message, module=member, state=state)
        self.member = member
        self.members = members or (member,)


class DistributedTransitionError(TransitionFailedError):
    """A transition failed on at least one rank; every rank raises it and stays in its previous
    state (see ``reset`` in the module docstring). ``failed_ranks`` maps rank -> error text.

    Example::

        try:
            lc.prepare(run)
        except DistributedTransitionError as exc:
            print(exc.rank, exc.failed_ranks)
    """

    def __init__(
        self, message: str, *, module: str, state: State, trigger: Trigger | str,
        rank: int, failed_ranks: Mapping[int, str],
    ) -> None:
        super().__init__(message, module=module, state=state, trigger=trigger)
        self.rank = rank
        self.failed_ranks = dict(failed_ranks)


class RankDivergenceError(LifecycleError):
    """Ranks disagree on where the module is, or called different triggers at the same point.

    Example::

        try:
            lc.prepare(run)
        except RankDivergenceError:
            lc.reset()        # on every rank, then prepare again
            lc.prepare(run)
    """


class PeerFailedError(LifecycleError):
    """The cause recorded on a rank whose own work succeeded while a peer's failed: this rank's
    work was undone and its state did not move.

    Args:
        message: the text, naming the ranks that failed.
        failed_ranks: rank -> error text.

    Example::

        try:
            lc.prepare(run)
        except DistributedTransitionError as exc:
            if isinstance(exc.__cause__, PeerFailedError):
                print("failed elsewhere:", exc.__cause__.failed_ranks)
    """

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


# A refusal: the trigger or request was not legal now, or an argument was bad; nothing ran.
# Anything else a transition or request raises is a failure. The audit's outcome, the rank vote
# and the request events all read this one table.
REFUSALS: tuple[type[LifecycleError], ...] = (
    IllegalTransitionError, InvalidConfigError, UnsupportedModuleError, UnwarmedShapeError,
)
