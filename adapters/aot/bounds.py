"""Bounds: which dims of a block kind's calls are dynamic, and the guard a call is checked by."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from adapters.aot.capture import BlockCall
from adapters.aot.errors import AotBuildFailed, AotUnsupported


@dataclass(frozen=True)
class TensorSpec:
    """One tensor argument: its size per dim, static (int) or dynamic ``(min, max)``; the example
    size the export was hinted with; its dtype."""

    path: str
    sizes: tuple[int | tuple[int, int], ...]
    example: tuple[int, ...]
    dtype: str

    @property
    def dynamic_dims(self) -> tuple[int, ...]:
        return tuple(i for i, size in enumerate(self.sizes) if isinstance(size, tuple))


@dataclass(frozen=True)
class CallSpec:
    """The bounds of one block kind's calls: argument structure, tensors, non-tensor values."""

    treespec: str
    tensors: tuple[TensorSpec, ...]
    constants: tuple[tuple[int, Any], ...]  # (leaf index, value) of every non-tensor leaf

    @property
    def dynamic(self) -> bool:
        return any(t.dynamic_dims for t in self.tensors)

    def to_json(self) -> dict[str, Any]:
        return {
            "treespec": self.treespec,
            "tensors": [
                {"path": t.path, "sizes": [list(s) if isinstance(s, tuple) else s for s in t.sizes],
                 "example": list(t.example), "dtype": t.dtype}
                for t in self.tensors
            ],
            "constants": [[index, value] for index, value in self.constants],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CallSpec:
        return cls(
            treespec=str(data["treespec"]),
            tensors=tuple(
                TensorSpec(
                    path=str(t["path"]),
                    sizes=tuple(tuple(s) if isinstance(s, list) else int(s) for s in t["sizes"]),
                    example=tuple(int(s) for s in t["example"]),
                    dtype=str(t["dtype"]),
                )
                for t in data["tensors"]
            ),
            constants=tuple((int(i), v) for i, v in data["constants"]),
        )


_PLAIN = (bool, int, float, str, type(None))


def _leaf_paths(kwargs: Mapping[str, Any]) -> list[str]:
    flat, _ = pytree.tree_flatten_with_path(((), dict(kwargs)))
    return [pytree.keystr(path[1:]).lstrip(".").replace("['", "").replace("']", "") for path, _ in flat]


def plan_bounds(calls: Sequence[BlockCall]) -> CallSpec:
    """Which dims are dynamic: those whose sizes differ between ``calls`` (one per declared size),
    bounded by the smallest and largest seen; with one call (or equal sizes) all are static. The
    first call is the export's example. Raises ``AotUnsupported`` if the calls cannot share one export
    (another structure, dtype, rank or non-tensor value)."""
    if not calls:
        raise AotUnsupported("no captured call: run the module once before planning bounds")
    first = calls[0]
    leaves, spec = pytree.tree_flatten(((), first.kwargs))
    paths = _leaf_paths(first.kwargs)
    constants: list[tuple[int, Any]] = []
    for index, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor):
            if not isinstance(leaf, _PLAIN):
                raise AotUnsupported(
                    f"argument {paths[index]} is a {type(leaf).__name__}: only tensors and plain values "
                    "(None, bool, int, float, str) can be matched against an exported block"
                )
            constants.append((index, leaf))
    seen_sizes: dict[int, list[tuple[int, ...]]] = {
        i: [] for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)
    }
    for call in calls:
        other, other_spec = pytree.tree_flatten(((), call.kwargs))
        if other_spec != spec:
            raise AotUnsupported("the captured calls differ in argument structure: no single export fits")
        for index, (a, b) in enumerate(zip(leaves, other, strict=True)):
            if isinstance(a, torch.Tensor):
                if not isinstance(b, torch.Tensor) or a.dtype != b.dtype or a.dim() != b.dim():
                    raise AotUnsupported(f"argument {paths[index]} changes dtype or rank between calls")
                seen_sizes[index].append(tuple(b.shape))
            elif type(a) is not type(b) or a != b:
                raise AotUnsupported(f"argument {paths[index]} changes value between calls ({a!r}, {b!r})")
    tensors = []
    for index, sizes in seen_sizes.items():
        leaf = leaves[index]
        dims: list[int | tuple[int, int]] = []
        for d in range(leaf.dim()):
            values = {s[d] for s in sizes}
            dims.append(values.pop() if len(values) == 1 else (min(values), max(values)))
        tensors.append(TensorSpec(paths[index], tuple(dims), tuple(leaf.shape), str(leaf.dtype)))
    return CallSpec(pytree.treespec_dumps(spec), tuple(tensors), tuple(constants))


def _dynamic_shapes(call: BlockCall, spec: CallSpec) -> dict[str, Any]:
    by_leaf = iter(spec.tensors)

    def one(leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor):
            return None
        tensor_spec = next(by_leaf)
        dims = {
            d: torch.export.Dim.AUTO(min=size[0], max=size[1])
            for d, size in enumerate(tensor_spec.sizes) if isinstance(size, tuple)
        }
        return dims or None

    leaves, treespec = pytree.tree_flatten(call.kwargs)
    shapes: dict[str, Any] = pytree.tree_unflatten([one(leaf) for leaf in leaves], treespec)
    return shapes


# ---------------------------------------------------------------------------------------- guard
@dataclass(frozen=True)
class _Guard:
    """The exported sizes, as the compiled code assumes them: per tensor and dim a static size, a
    symbol (bound by the first dim that has it, then range-checked) or a linear relation of symbols."""

    static: tuple[tuple[int, int, int], ...]  # (tensor, dim, size)
    symbols: tuple[tuple[int, int, str], ...]  # (tensor, dim, name)
    ranges: tuple[tuple[str, int, int | None], ...]  # (name, min, max or None)
    linear: tuple[tuple[int, int, int, tuple[tuple[str, int], ...]], ...]  # (tensor, dim, c, terms)
    ranks: tuple[int, ...]

    def check(self, shapes: Sequence[torch.Size]) -> bool:
        if len(shapes) != len(self.ranks) or any(
            len(s) != r for s, r in zip(shapes, self.ranks, strict=True)
        ):
            return False
        for t, d, size in self.static:
            if shapes[t][d] != size:
                return False
        env: dict[str, int] = {}
        for t, d, name in self.symbols:
            value = int(shapes[t][d])
            if env.setdefault(name, value) != value:
                return False
        for name, low, high in self.ranges:
            value = env[name]
            if value < low or (high is not None and value > high):
                return False
        for t, d, const, terms in self.linear:
            if shapes[t][d] != const + sum(coeff * env[name] for name, coeff in terms):
                return False
        return True

    def to_json(self) -> dict[str, Any]:
        return {
            "static": [list(x) for x in self.static],
            "symbols": [list(x) for x in self.symbols],
            "ranges": [list(x) for x in self.ranges],
            "linear": [[t, d, c, [list(term) for term in terms]] for t, d, c, terms in self.linear],
            "ranks": list(self.ranks),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> _Guard:
        return cls(
            static=tuple((int(t), int(d), int(s)) for t, d, s in data["static"]),
            symbols=tuple((int(t), int(d), str(n)) for t, d, n in data["symbols"]),
            ranges=tuple((str(n), int(lo), None if hi is None else int(hi)) for n, lo, hi in data["ranges"]),
            linear=tuple(
                (int(t), int(d), int(c), tuple((str(n), int(k)) for n, k in terms))
                for t, d, c, terms in data["linear"]
            ),
            ranks=tuple(int(r) for r in data["ranks"]),
        )


def _guard_from_export(kind: str, ep: Any) -> _Guard:
    nodes = {node.name: node for node in ep.graph.nodes if node.op == "placeholder"}
    tensor_shapes: list[Any] = []
    for input_spec in ep.graph_signature.input_specs:
        if input_spec.kind.name != "USER_INPUT" or type(input_spec.arg).__name__ != "TensorArgument":
            continue
        tensor_shapes.append(nodes[input_spec.arg.name].meta["val"].shape)
    static, symbols, linear = [], [], []
    names: set[str] = set()
    for t, shape in enumerate(tensor_shapes):
        for d, size in enumerate(shape):
            if isinstance(size, int):
                static.append((t, d, size))
                continue
            expr = size.node.expr
            if expr.is_Symbol:
                symbols.append((t, d, str(expr)))
                names.add(str(expr))
                continue
            terms: list[tuple[str, int]] = []
            const = 0
            for term, coeff in expr.as_coefficients_dict().items():
                if not coeff.is_Integer:
                    raise AotBuildFailed(kind, f"exported size {expr} is not an integer relation")
                if term.is_Number:
                    const += int(coeff) * int(term)
                elif term.is_Symbol:
                    terms.append((str(term), int(coeff)))
                    names.add(str(term))
                else:
                    raise AotBuildFailed(
                        kind, f"exported size {expr} is not linear in the dynamic sizes: declare sizes "
                        "that keep this dim static, or use the just-in-time plan"
                    )
            linear.append((t, d, const, tuple(sorted(terms))))
    bound = {name for _, _, name in symbols}
    if not names <= bound:
        raise AotBuildFailed(kind, f"sizes {sorted(names - bound)} appear only inside relations")
    ranges = []
    for sym, value_range in ep.range_constraints.items():
        if getattr(sym, "is_Symbol", False) and str(sym) in bound:
            upper = value_range.upper
            high = int(upper) if getattr(upper, "is_finite", True) and math.isfinite(float(upper)) else None
            ranges.append((str(sym), int(value_range.lower), high))
    return _Guard(tuple(static), tuple(symbols), tuple(sorted(ranges)), tuple(linear),
                  tuple(len(shape) for shape in tensor_shapes))


