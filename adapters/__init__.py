"""Backend adapters (CPU, CUDA, Ascend NPU) that run the compile, and the cache adapter over
cache-dit. Device runtimes and cache-dit are imported lazily, when an adapter is used."""

from adapters.base import BackendAdapter, TorchCompileAdapter, dynamo_graph_count
from adapters.cache import CacheDitAdapter, CacheSummary
from adapters.compiler import Compiler, CompileReport, JitBlocksCompiler, JitModelCompiler, OutsideBounds
from adapters.errors import AdapterError, BackendUnavailable, InvalidOptions, UnsupportedForCache
from adapters.protocols import CacheAdapter, CompilePlanLike
from adapters.registry import (
    AUTO_ORDER,
    ENTRY_POINT_GROUP,
    backend_names,
    get_backend,
    register_backend,
)

__all__ = [
    "AUTO_ORDER",
    "ENTRY_POINT_GROUP",
    "AdapterError",
    "BackendAdapter",
    "BackendUnavailable",
    "CacheAdapter",
    "CacheDitAdapter",
    "CacheSummary",
    "CompilePlanLike",
    "CompileReport",
    "Compiler",
    "InvalidOptions",
    "JitBlocksCompiler",
    "JitModelCompiler",
    "OutsideBounds",
    "TorchCompileAdapter",
    "UnsupportedForCache",
    "backend_names",
    "dynamo_graph_count",
    "get_backend",
    "register_backend",
]
