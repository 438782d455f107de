"""How a lifecycle compiles and how it serves: frozen, typed values checked at construction.

``compile_options`` stays what the host wrote, torch.compile's own keyword arguments, and is
passed to torch unchanged. Everything the library itself decides about compiling lives in a
``CompilePlan``, everything about serving in a ``ServingPolicy``. What a warm-up later decides
(dynamic dims and their bounds) is recorded in the lifecycle's stats and coverage, never written
back here: two lifecycles built with identical arguments stay identical.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from lifecycle.errors import InvalidConfigError

Scope = Literal["model", "blocks"]
OnUnwarmed = Literal["eager", "fail", "compile"]
SCOPES: tuple[str, ...] = ("model", "blocks")
ON_UNWARMED: tuple[str, ...] = ("eager", "fail", "compile")


def _check_bool(owner: str, name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise InvalidConfigError(f"{owner}({name}=...) must be True or False, got {value!r}")


def _check_choice(owner: str, name: str, value: object, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise InvalidConfigError(f"{owner}({name}=...) must be one of {list(choices)}, got {value!r}")


@dataclass(frozen=True)
class CompilePlan:
    """How to compile.

    - ``scope="model"``: ``torch.compile`` the whole module in place. ``"blocks"``: compile each
      repeated block (diffusers' ``_repeated_blocks``, else the items of an ``nn.ModuleList`` of
      identical blocks) in place; cache-dit's wrappers and the model's own code stay eager.
    - ``ahead_of_time``: with ``scope="blocks"``, export and AOTInductor-compile each block class
      once, with the dims that differ between the declared buckets dynamic within their range;
      a restart with ``artifact_dir`` loads the packages (no dynamo, no compile).
    - ``reproducible``: bit-identical outputs across processes and restarts (inductor's
      deterministic mode, for this module's compile only).

    Args:
        scope: ``"model"`` or ``"blocks"``.
        ahead_of_time: export and AOTInductor-compile the blocks (needs ``scope="blocks"``).
        reproducible: bit-identical outputs across processes and restarts.

    Raises:
        InvalidConfigError: a bad value, here at construction.

    Example::

        plan = CompilePlan(scope="blocks", ahead_of_time=True)
        lc = ModuleLifecycle(transformer, compile_plan=plan, artifact_dir="/var/cache/dit")
        lc.prepare(run, shapes=[{"height": 1024, "width": 1024}])
    """

    scope: Scope = "model"
    ahead_of_time: bool = False
    reproducible: bool = False

    def __post_init__(self) -> None:
        _check_choice("CompilePlan", "scope", self.scope, SCOPES)
        _check_bool("CompilePlan", "ahead_of_time", self.ahead_of_time)
        _check_bool("CompilePlan", "reproducible", self.reproducible)
        if self.ahead_of_time and self.scope != "blocks":
            raise InvalidConfigError(
                "CompilePlan(ahead_of_time=True) compiles the repeated blocks ahead of time and "
                "needs scope='blocks': use CompilePlan(scope='blocks', ahead_of_time=True)"
            )

    def as_dict(self) -> dict[str, Any]:
        """The plan as the audit and the artifact key record it."""
        return {"scope": self.scope, "ahead_of_time": self.ahead_of_time, "reproducible": self.reproducible}


@dataclass(frozen=True)
class ServingPolicy:
    """How to serve.

    - ``on_unwarmed``: what a request at a shape no warm-up covered does. ``"eager"`` runs this
      module's eager path (nothing compiles, and nothing else in the process changes);
      ``"fail"`` raises ``UnwarmedShapeError`` before the transformer runs; ``"compile"``
      compiles inline, audited as a recompile. ``request(..., on_unwarmed=...)`` overrides it
      for one request.
    - ``share_bucket_graphs``: two or more buckets declared before the compile share dynamic
      graphs (one compile for all of them), unless ``compile_options`` sets ``dynamic`` itself.
    - ``measure_paths``: after warm-up, time each bucket compiled and eager, and serve it on
      the faster path.

    Args:
        on_unwarmed: ``"eager"``, ``"fail"`` or ``"compile"``.
        share_bucket_graphs: share dynamic graphs between buckets declared before the compile.
        measure_paths: time each bucket compiled and eager, and serve the faster.

    Raises:
        InvalidConfigError: a bad value, here at construction.

    Example::

        lc = ModuleLifecycle(transformer, serving=ServingPolicy(on_unwarmed="fail"))
        lc.prepare(run, shapes=[{"height": 1024, "width": 1024}])
    """

    on_unwarmed: OnUnwarmed = "eager"
    share_bucket_graphs: bool = True
    measure_paths: bool = False

    def __post_init__(self) -> None:
        _check_choice("ServingPolicy", "on_unwarmed", self.on_unwarmed, ON_UNWARMED)
        _check_bool("ServingPolicy", "share_bucket_graphs", self.share_bucket_graphs)
        _check_bool("ServingPolicy", "measure_paths", self.measure_paths)

    def as_dict(self) -> dict[str, Any]:
        """The policy as the audit records it."""
        return {
            "on_unwarmed": self.on_unwarmed,
            "share_bucket_graphs": self.share_bucket_graphs,
            "measure_paths": self.measure_paths,
        }


def check_on_unwarmed(value: object, *, module: str) -> OnUnwarmed:
    """A per-request override of ``ServingPolicy.on_unwarmed``."""
    if not isinstance(value, str) or value not in ON_UNWARMED:
        raise InvalidConfigError(
            f"{module}: on_unwarmed must be one of {list(ON_UNWARMED)}, got {value!r}", module=module
        )
    return value  # type: ignore[return-value]


# compile_options keys that earlier versions took for the library's own settings, and where each
# lives now: refused with the fix rather than silently passed to torch.compile.
MOVED_OPTIONS: dict[str, str] = {
    "regional": "compile_plan=CompilePlan(scope='blocks')",
    "reproducible": "compile_plan=CompilePlan(reproducible=True)",
    "dynamic_buckets": "serving=ServingPolicy(share_bucket_graphs=...)",
    "measure_paths": "serving=ServingPolicy(measure_paths=True)",
}


def check_not_moved(options: object, *, module: str) -> None:
    """Refuse a library setting passed as a torch.compile argument, naming where it lives now."""
    if not isinstance(options, Mapping):
        return
    for key, fix in MOVED_OPTIONS.items():
        if key in options:
            raise InvalidConfigError(
                f"{module}: compile_options holds torch.compile's own arguments only; {key!r} is "
                f"a lifecycle setting: pass {fix}",
                module=module,
            )


__all__ = [
    "MOVED_OPTIONS",
    "ON_UNWARMED",
    "SCOPES",
    "CompilePlan",
    "OnUnwarmed",
    "Scope",
    "ServingPolicy",
    "check_not_moved",
    "check_on_unwarmed",
]
