"""The lifecycle's typed errors. Each names the module, its state, and the call that fixes it."""

from __future__ import annotations

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
