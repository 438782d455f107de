"""Regional compilation: compile a transformer's repeated blocks one by one, not the whole model.

Which modules get compiled, and why (read from cache-dit 1.5.3's source and checked by tests):

- cache-dit mounts by replacing the transformer's ``forward``; during each call it patches the
  transformer's block lists (``transformer_blocks``, ``single_transformer_blocks``) with its own
  ``CachedBlocks`` wrappers (``caching/cache_adapters/cache_adapter.py``, ``mock_transformer``).
  Those wrappers are built once at mount, live in a closure (not in ``modules()``), and keep
  references to the *original* block objects, which they call as ``block(...)``.
- So we compile each original block in place (``block.compile()``: nn.Module stores the compiled
  call in ``_compiled_call_impl``). Every call through cache-dit's wrapper, for Fn, middle and Bn
  blocks alike, then runs compiled code, and ``decompile`` simply drops it again.
- We do not compile the wrappers: their forward holds cache-dit's per-step decision (residual
  diff against a threshold, ``torch.compiler.disable`` regions, context bookkeeping), which would
  break graphs and add recompiles keyed on cache state. Outside the blocks, the model (embedding,
  rotary positions, output norm) and cache-dit's decision run eagerly: a small share of a step.
- Blocks of one class share one code object, and dynamo (inlining nn.Modules, torch's default)
  guards on parameter metadata rather than on the module's identity: every block of a class
  reuses the first block's graph. The graph count depends on the block classes and on the input
  layouts they see (Flux: 3 graphs; the first single block gets a contiguous input, the others a
  strided view), never on the number of blocks.
- Mount before compile still holds: compiling the blocks does not change which forward the
  transformer runs, and the lifecycle's table keeps ``compile`` after ``mount_cache``.
- What it saves, measured: a whole-model compile of a cache-dit-mounted transformer does not
  trace the blocks into one graph either. cache-dit's forward breaks the graph (its
  ``unittest.mock`` patching, and ``torch.compiler.disable`` inside the block loop, which makes
  dynamo skip that frame), so dynamo compiles each block's forward as its own frame and reuses
  it, plus five graphs of the transformer's own code (Flux: 8 graphs against regional's 3, for
  any number of blocks). Regional skips those five: about 1.2 to 1.4x faster cold start on an
  H100, not more (bench/gpu_cold_start.py); reusable artifacts are what cut a restart.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

from torch import nn

from adapters import _torch_internals as internals
from adapters.errors import InvalidOptions

# The blocks each module had compiled by ``compile_regional``: ``decompile_regional`` drops exactly
# those, never a block the host compiled itself. Weak keys: this never keeps a model alive.
_compiled: weakref.WeakKeyDictionary[nn.Module, list[nn.Module]] = weakref.WeakKeyDictionary()


def repeated_blocks(module: nn.Module) -> list[nn.Module]:
    """The blocks regional compilation compiles, in module order.

    diffusers models name their repeated block classes in ``_repeated_blocks`` (Flux:
    ``FluxTransformerBlock``, ``FluxSingleTransformerBlock``); other models fall back to the items of
    every ``nn.ModuleList`` whose entries (two or more) all share one class.
    """
    names = tuple(getattr(type(module), "_repeated_blocks", None) or ())
    found: dict[int, nn.Module] = {}
    if names:
        for sub in module.modules():
            if sub is not module and type(sub).__name__ in names:
                found.setdefault(id(sub), sub)
    else:
        for sub in module.modules():
            if isinstance(sub, nn.ModuleList) and len(sub) >= 2:
                classes = {type(item) for item in sub}
                if len(classes) == 1:
                    for item in sub:
                        found.setdefault(id(item), item)
    # A repeated block nested inside another one is compiled as part of its parent.
    blocks = list(found.values())
    inner = {id(child) for block in blocks for child in block.modules() if child is not block}
    return [block for block in blocks if id(block) not in inner]


def check_regional_module(module: nn.Module) -> None:
    """Refuse regional compilation of a module with no repeated blocks (at construction)."""
    if not repeated_blocks(module):
        raise InvalidOptions(
            f"regional compilation found no repeated blocks in {type(module).__name__}: it has no "
            "diffusers `_repeated_blocks` and no nn.ModuleList of identical blocks; use "
            "CompilePlan(scope='model') to compile the whole model"
        )


def compile_regional(module: nn.Module, torch_options: Mapping[str, Any]) -> list[nn.Module]:
    """Compile each repeated block of ``module`` in place; return the blocks compiled.

    On failure every block compiled so far is returned to eager: never half-compiled.
    """
    blocks = repeated_blocks(module)
    if not blocks:
        raise InvalidOptions(
            f"regional compilation found no repeated blocks in {type(module).__name__}: it has no "
            "diffusers `_repeated_blocks` and no nn.ModuleList of identical blocks; use "
            "CompilePlan(scope='model') to compile the whole model"
        )
    touched: list[nn.Module] = []
    try:
        for block in blocks:
            touched.append(block)
            internals.compile_in_place(block, module, dict(torch_options))
    except BaseException:
        for block in touched:
            internals.set_compiled_call(block, None)
        raise
    _compiled[module] = blocks
    return blocks


def decompile_regional(module: nn.Module) -> None:
    """Return the blocks ``compile_regional`` compiled in ``module`` to eager (no-op otherwise)."""
    for block in _compiled.pop(module, []):
        internals.set_compiled_call(block, None)


def compiled_blocks(module: nn.Module) -> list[nn.Module]:
    """Submodules that currently run compiled code (for tests and the audit)."""
    return [
        sub for sub in module.modules()
        if sub is not module and internals.compiled_call(sub) is not None
    ]
