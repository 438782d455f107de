"""What the probes answer: the lifecycles watched (``Lifecycles``), and liveness and readiness
as plain functions returning a ``Health`` (status and JSON body). No HTTP here.

- liveness never depends on a lifecycle: a module compiling for minutes is alive, not dead;
- readiness is 200 when every lifecycle is ready (``lc.ready``: WarmedUp, and warm in every
  declared bucket), else 503, with each lifecycle's state (and a pipeline's members') either way;
- one model's readiness by name (a lifecycle's, or a pipeline member's); 404 naming the known
  ones for a name not served.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from lifecycle.ops.errors import InvalidConfigError
from states import State


# ---------------------------------------------------------------------------- what is watched
def _name_of(lifecycle: Any) -> str:
    name = getattr(lifecycle, "name", None)
    if isinstance(name, str) and name:
        return name
    return "pipeline" if hasattr(lifecycle, "members") else type(lifecycle).__name__


def _is_lifecycle(lifecycle: Any) -> bool:
    """A ModuleLifecycle or PipelineLifecycle, told by what the probes read: a ``states.State``
    as ``.state`` and a bool ``.ready`` (the class itself, a module or a mock are not)."""
    if isinstance(lifecycle, type):
        return False
    try:
        return isinstance(lifecycle.state, State) and isinstance(lifecycle.ready, bool)
    except Exception:  # an attribute that raises is no lifecycle either
        return False


def _check(lifecycle: Any) -> None:
    if not _is_lifecycle(lifecycle):
        shown = type(lifecycle).__name__ if not isinstance(lifecycle, type) else f"class {lifecycle.__name__}"
        raise InvalidConfigError(
            f"lifecycle.ops cannot answer for a {shown}: it takes a ModuleLifecycle or PipelineLifecycle "
            "instance, a list of them, or a mapping {name: lifecycle}; pass the lifecycle you prepare "
            "(e.g. make_asgi_app(lc)), not its module or class"
        )


class Lifecycles:
    """The lifecycles a probe answers for, by name; a host may add more later (``add``).

    Built from one lifecycle, a sequence of them (named by ``.name``; a pipeline is
    ``"pipeline"``), or a mapping of name to lifecycle. Two with one name raise
    ``InvalidConfigError``: pass a mapping to name them.

    Args:
        lifecycles: a lifecycle or pipeline, a list of them, a mapping of name to lifecycle, or
            another ``Lifecycles`` (copied).

    Raises:
        InvalidConfigError: something that is not a lifecycle, or two lifecycles with one name.

    Example::

        probes = Lifecycles({"flux": flux_lc, "sd3": sd3_lc})
        probes.add(vae_lc, name="vae")
        sorted(probes)     # ["flux", "sd3", "vae"]
    """

    def __init__(self, lifecycles: Any = ()) -> None:
        self._lock = threading.Lock()
        self._by_name: dict[str, Any] = {}
        if isinstance(lifecycles, Lifecycles):
            self._by_name = lifecycles.snapshot()
        elif isinstance(lifecycles, Mapping):
            for name, lifecycle in lifecycles.items():
                self.add(lifecycle, name=name)
        elif isinstance(lifecycles, (list, tuple, set, frozenset)):
            for lifecycle in lifecycles:
                self.add(lifecycle)
        else:
            self.add(lifecycles)

    def add(self, lifecycle: Any, name: str | None = None) -> None:
        """Answer for ``lifecycle`` too, under ``name`` (default: its own name).

        Args:
            lifecycle: a ``ModuleLifecycle`` or ``PipelineLifecycle``.
            name: the name the probes use; None for ``lifecycle.name``.

        Example::

            probes.add(lc)                    # under lc.name
            probes.add(other, name="refiner")

        Raises:
            InvalidConfigError: not a lifecycle, an empty name, or a name another lifecycle has.
        """
        _check(lifecycle)
        key = _name_of(lifecycle) if name is None else name
        if not isinstance(key, str) or not key:
            raise InvalidConfigError(f"a lifecycle's name must be a non-empty str, got {key!r}")
        with self._lock:
            other = self._by_name.get(key)
            if other is not None and other is not lifecycle:
                raise InvalidConfigError(
                    f"two lifecycles named {key!r}; pass a mapping {{name: lifecycle}} to name them apart"
                )
            self._by_name[key] = lifecycle

    def snapshot(self) -> dict[str, Any]:
        """The lifecycles by name, as of now (a copy).

        Example::

            for name, lc in probes.snapshot().items():
                print(name, lc.state)
        """
        with self._lock:
            return dict(self._by_name)

    def __len__(self) -> int:
        return len(self.snapshot())

    def __iter__(self) -> Iterator[str]:
        return iter(self.snapshot())

    def __repr__(self) -> str:
        return f"Lifecycles({sorted(self.snapshot())})"


def _as_lifecycles(lifecycles: Any) -> Lifecycles:
    return lifecycles if isinstance(lifecycles, Lifecycles) else Lifecycles(lifecycles)


# ---------------------------------------------------------------------------- plain functions
@dataclass(frozen=True)
class Health:
    """A probe's answer: HTTP status and JSON body.

    Args:
        status: the HTTP status (200, 503 or 404).
        body: the JSON body, as a dict.

    Example::

        health = health_ready(lc)
        if not health.ok:
            print(health.status, health.body["models"])
    """

    status: int
    body: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether the probe passed (status 200).

        Example::

            assert health_live().ok
        """
        return self.status == 200

    def json(self) -> bytes:
        """The body as the HTTP response sends it: sorted-key JSON and a newline.

        Example::

            health_live().json()     # b'{"live": true}\\n'
        """
        return json.dumps(self.body, sort_keys=True).encode() + b"\n"


def _describe(lifecycle: Any) -> dict[str, Any]:
    """Ready and state of one lifecycle (lock-free reads: a probe never waits on a compile)."""
    try:
        ready = bool(lifecycle.ready)
        state = lifecycle.state
        entry: dict[str, Any] = {"ready": ready, "state": str(getattr(state, "value", state))}
        members = getattr(lifecycle, "members", None)
        if isinstance(members, Mapping):
            entry["members"] = {name: _describe(member) for name, member in members.items()}
    except Exception as exc:  # a probe reports, it does not crash the server
        return {"ready": False, "state": "unknown", "error": f"{type(exc).__name__}: {exc}"}
    return entry


def health_live() -> Health:
    """Liveness: 200 while the process answers; it never looks at any lifecycle.

    Example::

        health = health_live()
        assert health.status == 200 and health.body == {"live": True}
    """
    return Health(200, {"live": True})


def health_ready(lifecycles: Any) -> Health:
    """Readiness: 200 when every lifecycle is ready, else 503; the body has every state.
    With no lifecycle at all it is 503 (nothing warm to serve yet).

    Args:
        lifecycles: a lifecycle or pipeline, a list of them, a mapping of name to lifecycle, or a
            ``Lifecycles``.

    Raises:
        InvalidConfigError: something that is not a lifecycle, or two lifecycles with one name.

    Example::

        health = health_ready([flux_lc, sd3_lc])
        health.status                         # 200 once both are warm, else 503
        health.body["models"]["flux"]["state"]
    """
    models = {name: _describe(lc) for name, lc in _as_lifecycles(lifecycles).snapshot().items()}
    ready = bool(models) and all(entry["ready"] for entry in models.values())
    body: dict[str, Any] = {"ready": ready, "models": models}
    if not models:
        body["reason"] = "no lifecycle registered yet"
    return Health(200 if ready else 503, body)


def model_ready(lifecycles: Any, name: str) -> Health:
    """One lifecycle's readiness by name (or one pipeline member's); 404 for a name not served.

    Args:
        lifecycles: what the probes answer for, as ``health_ready`` takes it.
        name: a lifecycle's name, or the name of a pipeline's member.

    Raises:
        InvalidConfigError: something that is not a lifecycle, or two lifecycles with one name.

    Example::

        model_ready(plc, "transformer").status     # 200 ready, 503 not yet
        model_ready(plc, "nope").status            # 404
    """
    snapshot = _as_lifecycles(lifecycles).snapshot()
    found = snapshot.get(name)
    if found is None:
        for lifecycle in snapshot.values():
            members = getattr(lifecycle, "members", None)
            if isinstance(members, Mapping) and name in members:
                found = members[name]
                break
    if found is None:
        known = set(snapshot)
        for lifecycle in snapshot.values():
            members = getattr(lifecycle, "members", None)
            known.update(members if isinstance(members, Mapping) else ())
        shown = ", ".join(repr(k) for k in sorted(known)) or "none yet"
        return Health(404, {"name": name, "ready": False, "models": sorted(known),
                            "error": f"no model named {name!r}; the models served are: {shown}"})
    entry = _describe(found)
    return Health(200 if entry["ready"] else 503, {"name": name, **entry})


__all__ = ["Health", "Lifecycles", "health_live", "health_ready", "model_ready"]
