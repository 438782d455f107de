"""Hypothesis drives ``ModuleLifecycle`` with random trigger sequences and checks it, after every
step, against a reference model of the API.md table: state, errors, ``allowed_triggers()``,
``history`` and the audit (one event per trigger attempt, ``seq`` from 1 without gaps).

The reference table below is typed in from API.md by hand on purpose: it is an independent
model of the contract, not a copy of ``states.transitions_for``, and one test checks that the
two agree edge for edge.

Steps: at least 10,000 in all by default (2,500 per policy); set DIT_LIFECYCLE_STATEFUL_STEPS
for more (the total, split over the four policies).
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from structlog.testing import capture_logs
from torch import nn

from lifecycle import (
    IllegalTransitionError,
    InvalidConfigError,
    LifecyclePolicy,
    ModuleLifecycle,
    State,
    TransitionFailedError,
    Trigger,
    WarmupCoverageWarning,
)
from lifecycle.testing import NoopCache
from lifecycle.testing.tiny import FluxInputs, demo_cache_config, denoise, flux_inputs, tiny_flux
from states import transitions_for

L, M, C, W = "Loaded", "CacheMounted", "Compiled", "WarmedUp"
RESET_ANY = {L: L, M: L, C: L, W: L}

# API.md, "Legal transitions", column by column: (cache_dit, compile) -> trigger -> {source: dest}.
API_TABLE: dict[tuple[bool, bool], dict[str, dict[str, str]]] = {
    (True, True): {
        "mount_cache": {L: M},
        "compile": {M: C},
        "warm_up": {C: W, W: W},
        "refresh": {M: M, C: C, W: W},
        "invalidate": {W: C},
        "reset": RESET_ANY,
        "request": {W: W},
    },
    (True, False): {
        "mount_cache": {L: M},
        "compile": {},
        "warm_up": {M: W, W: W},
        "refresh": {M: M, W: W},
        "invalidate": {W: M},
        "reset": RESET_ANY,
        "request": {W: W},
    },
    (False, True): {
        "mount_cache": {},
        "compile": {L: C},
        "warm_up": {C: W, W: W},
        "refresh": {},
        "invalidate": {W: C},
        "reset": RESET_ANY,
        "request": {W: W},
    },
    (False, False): {
        "mount_cache": {},
        "compile": {},
        "warm_up": {L: W, W: W},
        "refresh": {},
        "invalidate": {W: L},
        "reset": RESET_ANY,
        "request": {W: W},
    },
}
# The forward path prepare() walks, per policy (API.md: "walks the legal path to WarmedUp").
API_PATH: dict[tuple[bool, bool], list[str]] = {
    (True, True): [L, M, C, W],
    (True, False): [L, M, W],
    (False, True): [L, C, W],
    (False, False): [L, W],
}
POLICIES = [LifecyclePolicy(cache_dit=c, compile=k) for c, k in API_TABLE]
DEFAULT_TOTAL_STEPS = 10_000
EAGER = {"backend": "eager"}


def _total_steps() -> int:
    return int(os.environ.get("DIT_LIFECYCLE_STATEFUL_STEPS", DEFAULT_TOTAL_STEPS))


@pytest.mark.parametrize("policy", POLICIES, ids=str)
def test_library_table_matches_api_table(policy: LifecyclePolicy) -> None:
    key = (policy.cache_dit, policy.compile)
    expected = {
        (trigger, source, dest)
        for trigger, edges in API_TABLE[key].items()
        for source, dest in edges.items()
    }
    actual = {(e.trigger.value, e.source.value, e.dest.value) for e in transitions_for(policy)}
    assert actual == expected
    assert [s.value for s in policy.path] == API_PATH[key]


class Small(nn.Module):
    """A cheap real module: compiling it with the eager backend traces a real dynamo graph."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.lin(x))


X = torch.ones(1, 4)


def _run(module: nn.Module) -> None:
    assert module(X).shape == (1, 4)


class WarmupBroke(RuntimeError):
    pass


@dataclass(frozen=True)
class Expected:
    """One audit event / history record the model predicts."""

    trigger: str
    source: str
    dest: str
    outcome: str


class Model:
    """The reference: the API.md table's behaviour, kept apart from the library's code."""

    def __init__(self, key: tuple[bool, bool]) -> None:
        self.table = API_TABLE[key]
        self.path = API_PATH[key]
        self.state = L
        self.records: list[Expected] = []

    def dest(self, trigger: str) -> str | None:
        return self.table[trigger].get(self.state)

    def allowed(self) -> set[str]:
        return {t for t, edges in self.table.items() if self.state in edges}

    def attempt(self, trigger: str, outcome_if_legal: str) -> Expected:
        """Record one trigger attempt; ``outcome_if_legal`` is what the work does when legal."""
        dest = self.dest(trigger)
        if dest is None:
            record = Expected(trigger, self.state, self.state, "refused")
        elif outcome_if_legal == "ok":
            record = Expected(trigger, self.state, dest, "ok")
            self.state = dest
        else:
            record = Expected(trigger, self.state, self.state, outcome_if_legal)
        self.records.append(record)
        return record


class LifecycleMachine(RuleBasedStateMachine):
    policy: ClassVar[LifecyclePolicy]
    module: ClassVar[nn.Module]
    steps: ClassVar[int] = 0

    def call(self, module: nn.Module) -> None:
        _run(module)

    def call_then_raise(self, module: nn.Module) -> None:
        self.call(module)
        raise WarmupBroke("warm-up callable raised")

    def make_lifecycle(self) -> ModuleLifecycle:
        return ModuleLifecycle(
            self.module, name="stateful", policy=self.policy, backend="cpu",
            compile_options=EAGER, cache_adapter=NoopCache(),
        )

    def __init__(self) -> None:
        super().__init__()
        self.key = (self.policy.cache_dit, self.policy.compile)
        self.model = Model(self.key)
        self._capture = capture_logs()
        self.logs = self._capture.__enter__()
        self.seen = 0
        self.lc = self.make_lifecycle()

    def teardown(self) -> None:
        try:
            self.lc.reset()  # drops the compiled code, so the next example starts from eager
        finally:
            self._capture.__exit__(None, None, None)

    # ---------------------------------------------------------------- checking one step
    def _new_events(self) -> list[dict[str, Any]]:
        events = self.logs[self.seen:]
        self.seen = len(self.logs)
        return [e for e in events if str(e.get("event", "")).startswith("lifecycle.")]

    def _check_transition_events(self, expected: list[Expected]) -> None:
        events = [e for e in self._new_events() if e["event"] == "lifecycle.transition"]
        first_seq = len(self.model.records) - len(expected) + 1
        assert [
            (e["trigger"], e["source"], e["dest"], e["outcome"], e["seq"]) for e in events
        ] == [
            (x.trigger, x.source, x.dest, x.outcome, first_seq + i) for i, x in enumerate(expected)
        ]
        for event in events:
            assert event["module"] == "stateful"
            assert event["module_id"] == self.lc.module_id
            assert event["backend"] == "cpu"
            assert event["policy"] == {"cache_dit": self.key[0], "compile": self.key[1]}
            assert event["duration_ms"] >= 0
            assert ("error" in event) == (event["outcome"] != "ok")
            assert event["log_level"] == {"ok": "info", "refused": "warning", "failed": "error"}[
                event["outcome"]
            ]

    def _trigger(self, trigger: str, call: Any, outcome_if_legal: str = "ok",
                 error_if_legal: type[BaseException] | None = None) -> None:
        LifecycleMachine.steps += 1
        before = self.model.state
        legal = self.model.dest(trigger) is not None
        expected = self.model.attempt(trigger, outcome_if_legal)
        if not legal:
            with pytest.raises(IllegalTransitionError) as info:
                call()
            err = info.value
            assert err.state is State(before)
            assert err.trigger is Trigger(trigger)
            assert {t.value for t in err.allowed} == self.model.allowed()
            text = str(err)
            assert "stateful" in text and before in text and trigger in text
        elif outcome_if_legal == "ok":
            call()
        else:
            assert error_if_legal is not None
            with pytest.raises(error_if_legal) as failed:
                call()
            if error_if_legal is TransitionFailedError:
                assert isinstance(failed.value.__cause__, WarmupBroke)
                assert before in str(failed.value)
        self._check_transition_events([expected])

    # ---------------------------------------------------------------- rules
    @rule()
    def mount_cache(self) -> None:
        self._trigger("mount_cache", self.lc.mount_cache)

    @rule()
    def compile(self) -> None:
        self._trigger("compile", self.lc.compile)

    @rule()
    def warm_up(self) -> None:
        self._trigger("warm_up", lambda: self.lc.warm_up(self.call))

    @rule()
    def warm_up_raising(self) -> None:
        self._trigger(
            "warm_up", lambda: self.lc.warm_up(self.call_then_raise), "failed", TransitionFailedError
        )

    @rule(run=st.sampled_from([None, 3, "run", object()]))
    def warm_up_not_callable(self, run: Any) -> None:
        self._trigger("warm_up", lambda: self.lc.warm_up(run), "refused", InvalidConfigError)

    @rule(steps=st.one_of(st.none(), st.integers(1, 1000)))
    def refresh(self, steps: int | None) -> None:
        self._trigger("refresh", lambda: self.lc.refresh(num_inference_steps=steps))

    @rule(steps=st.sampled_from([0, -1, -1000, True, 2.5, "8"]))
    def refresh_bad_steps(self, steps: Any) -> None:
        self._trigger("refresh", lambda: self.lc.refresh(num_inference_steps=steps), "refused",
                      InvalidConfigError)

    @rule()
    def invalidate(self) -> None:
        self._trigger("invalidate", self.lc.invalidate)

    @rule()
    def reset(self) -> None:
        self._trigger("reset", self.lc.reset)

    @rule(fails=st.booleans())
    def prepare(self, fails: bool) -> None:
        LifecycleMachine.steps += 1
        model = self.model
        if model.state == W:
            expected: list[Expected] = []
        else:
            remaining = model.path[model.path.index(model.state) + 1:]
            expected = []
            for dest in remaining:
                trigger = {M: "mount_cache", C: "compile", W: "warm_up"}[dest]
                outcome = "failed" if fails and dest == W else "ok"
                expected.append(model.attempt(trigger, outcome))
        if fails and expected:
            with pytest.raises(TransitionFailedError) as info:
                self.lc.prepare(self.call_then_raise)
            assert isinstance(info.value.__cause__, WarmupBroke)
        else:
            self.lc.prepare(self.call_then_raise if fails else self.call)
        self._check_transition_events(expected)

    @rule()
    def prepare_not_callable(self) -> None:
        # A bad argument is refused before any trigger fires, and audited as a refused warm_up
        # (every refusal is recorded).
        LifecycleMachine.steps += 1
        if self.model.state == W:
            self.lc.prepare(None)  # type: ignore[arg-type]  # nothing to do, nothing called
            self._check_transition_events([])
            return
        with pytest.raises(InvalidConfigError):
            self.lc.prepare(None)  # type: ignore[arg-type]
        record = Expected("warm_up", self.model.state, self.model.state, "refused")
        self.model.records.append(record)
        self._check_transition_events([record])

    @rule(body_raises=st.booleans(), steps=st.sampled_from([None, 4, 0]))
    def request(self, body_raises: bool, steps: int | None) -> None:
        LifecycleMachine.steps += 1
        boom = WarmupBroke("request body raised")
        if self.model.state != W:
            with pytest.raises(IllegalTransitionError, match="prepare"):
                with self.lc.request(num_inference_steps=steps):
                    pass
            outcome = "refused"
        elif steps == 0:
            with pytest.raises(InvalidConfigError):
                with self.lc.request(num_inference_steps=steps):
                    pass
            outcome = "refused"
        elif body_raises:
            with pytest.raises(WarmupBroke) as info:
                with self.lc.request(num_inference_steps=steps) as req:
                    self.call(self.lc.module)
                    raise boom
            assert info.value is boom  # propagates unchanged
            assert req.outcome == "failed"
            outcome = "failed"
        else:
            with self.lc.request(num_inference_steps=steps) as req:
                assert self.lc.state is State.WARMED_UP
                self.call(self.lc.module)
            assert req.outcome == "ok" and req.duration_ms >= 0
            outcome = "ok"
        events = self._new_events()
        assert [e["event"] for e in events] == ["lifecycle.request"]
        assert events[0]["outcome"] == outcome
        assert ("error" in events[0]) == (outcome != "ok")

    # ---------------------------------------------------------------- invariants
    @invariant()
    def state_and_allowed_match(self) -> None:
        assert self.lc.state is State(self.model.state)
        assert {t.value for t in self.lc.allowed_triggers()} == self.model.allowed()
        assert len(self.lc.allowed_triggers()) == len(set(self.lc.allowed_triggers()))

    @invariant()
    def history_matches(self) -> None:
        history = self.lc.history
        assert [(r.seq, r.trigger.value, r.source.value, r.dest.value, r.outcome) for r in history] == [
            (i + 1, x.trigger, x.source, x.dest, x.outcome) for i, x in enumerate(self.model.records)
        ]
        assert all((r.error is None) == (r.outcome == "ok") for r in history)

    @invariant()
    def module_still_callable(self) -> None:
        self.call(self.lc.module)


@pytest.mark.parametrize("policy", POLICIES, ids=str)
@pytest.mark.slow
def test_lifecycle_follows_api_table(policy: LifecyclePolicy) -> None:
    per_policy = max(1, _total_steps() // len(POLICIES))
    machine = type(f"Machine_{policy.cache_dit}_{policy.compile}", (LifecycleMachine,), {})
    machine.policy = policy
    machine.module = Small()
    LifecycleMachine.steps = 0
    step_count = 50
    # Hypothesis ends some examples early; run batches until the step budget is spent.
    while LifecycleMachine.steps < per_policy:
        examples = max(1, (per_policy - LifecycleMachine.steps) // (step_count // 2))
        run_state_machine_as_test(
            machine,
            settings=settings(
                max_examples=examples,
                stateful_step_count=step_count,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            ),
        )
    assert LifecycleMachine.steps >= per_policy


class FluxMachine(LifecycleMachine):
    """The same rules on a tiny real Flux with the real cache-dit adapter: the module itself must
    follow the state (hooks mounted exactly when the table says so, eager again after reset)."""

    inputs: ClassVar[FluxInputs]
    eager_output: ClassVar[torch.Tensor]

    def call(self, module: nn.Module) -> None:
        assert torch.isfinite(denoise(module, self.inputs, 2)).all()

    def make_lifecycle(self) -> ModuleLifecycle:
        return ModuleLifecycle(
            self.module, name="stateful", policy=self.policy, backend="cpu",
            cache_config=demo_cache_config(8), compile_options=EAGER,
        )

    @invariant()
    def module_follows_state(self) -> None:
        module = self.lc.module
        loaded = self.model.state == L
        assert self.lc.cache.is_mounted(module) is (not loaded)
        compiled = self.policy.compile and self.model.state in (C, W)
        assert (module._compiled_call_impl is not None) is compiled
        if loaded:
            # Reset left nothing behind: the original forward, eager, gives the original output.
            assert "forward" not in vars(module)
            assert torch.equal(denoise(module, self.inputs, 1), self.eager_output)


@pytest.mark.parametrize(
    "policy", [p for p in POLICIES if p.cache_dit], ids=str,
)
@pytest.mark.slow
def test_cache_dit_lifecycle_follows_api_table(policy: LifecyclePolicy) -> None:
    logging.getLogger("CACHE_DIT").setLevel(logging.WARNING)
    machine = type(f"Flux_{policy.compile}", (FluxMachine,), {})
    machine.policy = policy
    machine.module = tiny_flux()
    machine.inputs = flux_inputs()
    machine.eager_output = denoise(machine.module, machine.inputs, 1)
    LifecycleMachine.steps = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", WarmupCoverageWarning)
        run_state_machine_as_test(
            machine,
            settings=settings(
                max_examples=int(os.environ.get("DIT_LIFECYCLE_STATEFUL_FLUX_EXAMPLES", 15)),
                stateful_step_count=12,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            ),
        )
    assert LifecycleMachine.steps >= 20
