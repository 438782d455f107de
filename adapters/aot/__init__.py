"""Ahead-of-time compiled blocks ("regional AOT"): export each kind of repeated block once, compile
it with AOTInductor into a weight-free package, and run every block of that kind through it with the
block's own weights. No dynamo and no inductor run at load time: a restart loads packages.

How it fits under cache-dit (read from cache-dit 1.5.3's source, checked by tests/test_aot.py):

- cache-dit's ``CachedBlocks`` wrappers keep the original block objects and call them as
  ``block(hidden_states, encoder_hidden_states, *args, **kwargs)``. ``nn.Module.__call__`` runs
  ``_compiled_call_impl`` when it is set (that is the slot ``block.compile()`` fills), so binding
  puts the AOT call there: every call through a wrapper, Fn, middle or Bn, runs the package, the
  wrappers' per-step decision stays eager, and clearing the slot restores eager exactly. The slot
  skips the block's own forward hooks, so a block with hooks is refused rather than run without them.
- Blocks are grouped by *kind*: class plus the names, shapes and dtypes of their weights and the
  classes of their submodules and attention processors (a class whose last block has other weights,
  as SD3's ``context_pre_only`` block, is two kinds). One export per kind; flags that change the
  forward without changing any weight are not seen.
- The example inputs are captured from real calls (a forward pre-hook on every block, the first call
  of each kind per run kept), so the export sees the signature cache-dit's wrappers use. Arguments
  are normalised against the forward's signature, so positional and keyword calls are one call.
- Dimensions that differ between the captured runs (one run per declared size) are exported dynamic
  within [smallest, largest] with ``Dim.AUTO``, which lets export infer relations (Flux: the rotary
  length is image tokens + text tokens); with one run everything is static.
- Packages leave the weights out (``aot_inductor.package_constants_in_so=False``): a few MB per kind
  instead of hundreds. One loaded package holds one set of constants, so each block gets its own load
  (the first costs about a second, later ones milliseconds) and ``load_constants(...,
  user_managed=True)`` binds the block's tensors without a copy. An in-place weight change is
  therefore seen at once; a tensor *replaced* (``p.data = ...``, a new Parameter, a LoRA fuse) is
  noticed at the block's next call, by identity and data pointer, and re-bound before it runs.
- Every call is checked against what the package was compiled for (argument structure, non-tensor
  values, dtypes, device, and the exported symbolic sizes, relations included); anything else runs
  the block eagerly and counts a miss, optionally reported to ``on_miss``. Never a wrong result.
- Loading native code can kill a process (a segmentation fault on the lent H100 with torch 2.11, for
  every package built with its default ``CXX``, a g++ that links libstdc++ statically; packages
  built with the distribution's g++ load there). ``check_packages`` therefore loads and runs
  packages in a child process first (``adapters/aot/_child.py``); ``build`` saves only packages
  that passed, and the manifest records on which host they passed, so a restart on that host can
  skip the check.
- Package files are named by a key over the block kind's code and weights layout, torch version,
  device (and CPU vector ISA), inductor options, format version and the caller's plan token (the
  declared bounds); a manifest beside each records a SHA-256 of the package. A package for another
  key is ``stale``, one that fails its digest or manifest is ``corrupt``; neither is ever loaded.
- NPU is not supported: AOTInductor builds CPU and CUDA code only.

One job a module: ``kinds`` (which blocks one export serves), ``capture`` (the example calls),
``bounds`` (dynamic dims and the call guard), ``store`` (keys, manifests, files), ``check`` (the
child-process check), ``build``, ``runtime`` (binding), ``compiler`` (one lifecycle's packages:
the ``Compiler``).
"""

from adapters.aot.bounds import CallSpec, TensorSpec, plan_bounds
from adapters.aot.build import AotBuild, build
from adapters.aot.capture import BlockCall, capture_calls, normalize_call
from adapters.aot.check import (
    CheckJob,
    CheckResult,
    Outcome,
    _run_check_process,
    check_packages,
    default_tolerance,
    verify_packages,
)
from adapters.aot.errors import (
    AotBindError,
    AotBuildFailed,
    AotError,
    AotPackageError,
    AotUnsupported,
    Status,
)
from adapters.aot.kinds import SUPPORTED_DEVICES, _check_device, block_kind, block_kinds
from adapters.aot.runtime import (
    AotBinding,
    AotStats,
    aot_blocks,
    bind,
    load_package,
    rebind,
    unbind,
)
from adapters.aot.store import (
    FORMAT_VERSION,
    PackageInfo,
    PackageStatus,
    device_description,
    host_fingerprint,
    inductor_configs,
    open_packages,
    package_key,
)
from adapters.errors import InvalidOptions
from adapters.regional import repeated_blocks

__all__ = [
    "FORMAT_VERSION", "SUPPORTED_DEVICES", "AotBindError", "AotBinding", "AotBuild", "AotBuildFailed",
    "AotError", "AotPackageError", "AotStats", "AotUnsupported", "BlockCall", "CallSpec", "CheckJob",
    "CheckResult", "InvalidOptions", "Outcome", "PackageInfo", "PackageStatus", "Status", "TensorSpec",
    "_check_device", "_run_check_process", "aot_blocks", "bind", "block_kind", "block_kinds",
    "build", "capture_calls", "check_packages", "default_tolerance", "device_description",
    "host_fingerprint", "inductor_configs", "load_package", "normalize_call", "open_packages",
    "package_key", "plan_bounds", "rebind", "repeated_blocks", "unbind", "verify_packages",
]
