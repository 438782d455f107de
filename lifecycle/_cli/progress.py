"""Progress lines for the CLI's long phases, driven by the lifecycle's own audit events.

``Progress`` is a structlog processor the CLI (a script) puts in its structlog configuration:
each ``lifecycle.transition`` ends the running phase and starts the next one on the policy's
path, so the display follows what the lifecycle really did. On a terminal a ticker thread
shows the running phase's elapsed time; elsewhere (CI logs, pipes) it prints plain lines.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import MutableMapping
from typing import Any, TextIO

from lifecycle._cli.format import ms
from lifecycle.audit import events as audit
from states import LifecyclePolicy, State, Trigger, destination

# Why a phase may take a while, shown when it starts.
_NOTES = {
    Trigger.COMPILE.value: "installs torch.compile; graphs compile lazily in warm-up",
    Trigger.WARM_UP.value: "runs the warm-up and compiles the graphs: the slow phase",
}


def next_phase(policy: LifecyclePolicy, state: State) -> tuple[Trigger, State] | None:
    """The trigger and state that follow ``state`` on ``policy``'s path (from the table)."""
    path = policy.path
    if state not in path or state is path[-1]:
        return None
    following = path[path.index(state) + 1]
    for trigger in Trigger:
        if destination(policy, state, trigger) is following:
            return trigger, following
    return None


class Progress:
    """Phase lines on ``stream`` (stderr by default); ``enabled=False`` prints nothing."""

    def __init__(
        self, stream: TextIO | None = None, *, enabled: bool = True, tty: bool | None = None
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        # Announce the next phase on the path after each transition: right for one module;
        # a pipeline interleaves its members, so its demo turns this off.
        self.follow_path = True
        self.tty = self.stream.isatty() if tty is None else tty
        self._lock = threading.Lock()
        self._label: str | None = None
        self._started = 0.0
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    # -- phases
    def start(self, label: str, note: str | None = None) -> None:
        with self._lock:
            self._label = label
            self._started = time.perf_counter()
            if self.enabled and not self.tty:
                self._write(f"[..] {label}" + (f"  ({note})" if note else "") + "\n")
        if self.enabled and self.tty and self._ticker is None:
            self._ticker = threading.Thread(target=self._tick, name="dit-lifecycle-progress", daemon=True)
            self._ticker.start()

    def start_next(self, module: str, policy: LifecyclePolicy, state: State) -> None:
        """Start the phase after ``state`` on the path, if any."""
        step = next_phase(policy, state)
        if step is not None:
            trigger, dest = step
            label = f"{module}: {trigger.value} ({state.value} -> {dest.value})"
            self.start(label, _NOTES.get(trigger.value))

    def done(self, text: str, mark: str = "ok") -> None:
        with self._lock:
            self._label = None
            if self.enabled:
                self._write(("\r\033[K" if self.tty else "") + f"[{mark}] {text}\n")

    def note(self, text: str) -> None:
        self.done(text, mark="!!")

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=1.0)
            self._ticker = None
        with self._lock:
            if self.enabled and self.tty and self._label is not None:
                self._write("\r\033[K")
            self._label = None

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def _tick(self) -> None:
        frames = "|/-\\"
        index = 0
        while not self._stop.wait(0.1):
            with self._lock:
                if self._label is not None:
                    elapsed = time.perf_counter() - self._started
                    self._write(f"\r\033[K[{frames[index % 4]}] {self._label}  {elapsed:5.1f} s")
            index += 1

    # -- structlog processor
    def __call__(self, _logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> Any:
        try:
            self._on_event(event_dict)
        except Exception:  # a display must never break the lifecycle it shows
            pass
        return event_dict

    def _on_event(self, event: MutableMapping[str, Any]) -> None:
        name = event.get("event")
        module = event.get("module", "?")
        if name == audit.TRANSITION_EVENT:
            text = (
                f"{module}: {event['trigger']} ({event['source']} -> {event['dest']}) "
                f"{event['outcome']} in {ms(event.get('duration_ms'))}"
            )
            if event["outcome"] == "ok":
                self.done(text)
                if self.follow_path:
                    self.start_next(module, LifecyclePolicy.from_dict(event["policy"]), State(event["dest"]))
            else:
                self.note(f"{text}: {event.get('error', '')}")
        elif name == audit.REQUEST_EVENT:
            text = (
                f"{module}: request {event.get('request_id')} ({event.get('num_inference_steps')} steps, "
                f"{event.get('cached_steps')} cached, {event.get('new_graphs')} new graphs) "
                f"{event.get('outcome')} in {ms(event.get('duration_ms'))}"
            )
            self.done(text) if event.get("outcome") == "ok" else self.note(text)
        elif name == audit.RECOMPILE_EVENT:
            self.note(f"{module}: {event.get('new_graphs')} graph(s) compiled after warm-up")
        elif name == audit.WARMUP_COVERAGE_EVENT:
            self.note(f"{module}: warm-up did not reach cache-dit's cached-step branch")


__all__ = ["Progress", "next_phase"]
