"""The commands behind ``python -m lifecycle`` / ``dit-lifecycle``: demo, build, graph, audit
verify, audit show.

This is a script, not the library: it is the one place that configures structlog (through
``audit.configure_default``) and quiets third-party loggers. Bad arguments and expected
failures (a missing backend, an unwritable audit file) print one line on stderr and exit
non-zero: 2 for usage, 1 for everything else. ``graph`` and ``audit`` import neither torch nor
the lifecycle core; each command imports what it needs when it runs.

Adding a flag to a command: add it in that command's ``_add_*_arguments`` and read it from
``args`` in its ``_cmd_*`` handler.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

from lifecycle._cli import PROG

PIPELINES = ("flux", "wan22")


class UsageError(Exception):
    """Bad command-line arguments (exit 2)."""


class CliError(Exception):
    """An expected failure worth one line, not a traceback (exit 1)."""


class _Parser(argparse.ArgumentParser):
    # argparse prints the usage block and exits; one line and a hint read better.
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def installed_version() -> str:
    """The installed distribution's version (a source tree never installed says so)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dit-lifecycle")
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535 (0: any free port), got {text!r}")
    return int(text)


def _add_policy_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-cache", action="store_true", help="policy without cache-dit")
    parser.add_argument("--no-compile", action="store_true", help="policy without torch.compile")


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's flags; each reaches ``_cmd_demo`` as ``args.<name>``."""
    parser.add_argument(
        "--backend", default="auto", help="auto (default), cpu, cuda, npu, or a registered name"
    )
    _add_policy_flags(parser)
    parser.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend (default: aot_eager on the CPU, inductor on a GPU)",
    )
    parser.add_argument(
        "--regional", action="store_true", help="compile the repeated blocks one by one (faster cold start)"
    )
    parser.add_argument(
        "--aot", action="store_true",
        help="compile the repeated blocks ahead of time (AOTInductor); "
        "with --artifacts a second run loads them",
    )
    parser.add_argument(
        "--artifacts", metavar="DIR",
        help="reuse compile artifacts in DIR (loaded before compile, saved when warm)",
    )
    parser.add_argument("--steps", type=_positive, default=8, help="denoising steps per request (8)")
    parser.add_argument("--warmup-steps", type=_positive, default=2, help="steps of the warm-up call (2)")
    parser.add_argument("--requests", type=_positive, default=3, help="identical requests to serve (3)")
    parser.add_argument("--pipeline", choices=PIPELINES, help="a tiny diffusers pipeline instead")
    parser.add_argument(
        "--shapes", action="store_true",
        help="declared serving buckets, a miss under each on_unwarmed policy, the per-bucket table",
    )
    parser.add_argument("--audit", metavar="FILE", help="append the audit events to FILE (JSONL)")
    parser.add_argument("--fsync", action="store_true", help="fsync the audit file after every event")
    parser.add_argument("--json", action="store_true", help="print only a JSON result on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument(
        "--metrics-port", type=_port, metavar="N",
        help="serve /health/live, /health/ready and /metrics on 127.0.0.1:N while the demo runs "
        "(0: any free port; the URLs are printed)",
    )


def _add_build_arguments(parser: argparse.ArgumentParser) -> None:
    """The build's flags; each reaches ``_cmd_build`` as ``args.<name>``."""
    parser.add_argument("--model", required=True,
                        help="tiny-flux (the tests' tiny Flux) or package.module:factory returning "
                        "(module, run) or (module, run, lifecycle_kwargs); "
                        "run(module, shape) warms one bucket")
    parser.add_argument("--shapes", required=True,
                        help='the serving buckets: JSON (\'[{"tokens": 64}]\') or tokens=64,tokens=16 '
                        "(a bucket's dims joined by '/': height=512/width=512)")
    parser.add_argument("--compile-plan", default="blocks,aot",
                        help="comma list of blocks, aot, reproducible, model (default blocks,aot)")
    parser.add_argument("--compile-options", default="{}", metavar="JSON",
                        help="torch.compile's arguments as JSON (default {}: inductor)")
    parser.add_argument("--artifact-dir", required=True, help="a local path or an fsspec URL (s3://bucket/prefix)")
    parser.add_argument("--storage-options-file", metavar="FILE",
                        help="a JSON file of fsspec options (endpoint_url, credentials)")
    parser.add_argument("--signing-key-env", metavar="NAME",
                        help="sign manifests with this env variable's bytes")
    parser.add_argument("--signing-key-file", metavar="FILE",
                        help="sign manifests with this file's bytes (a trailing newline removed)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: build for this device")
    parser.add_argument("--build-wait", type=float, default=600.0, metavar="S",
                        help="seconds to wait for another builder of the same key (600)")
    parser.add_argument("--json", action="store_true", help="print only a JSON result on stdout")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="An explicit, audited lifecycle for diffusion-transformer modules.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {installed_version()}")
    commands = parser.add_subparsers(dest="command", metavar="{demo,build,graph,audit}", required=True)

    demo = commands.add_parser(
        "demo",
        help="run the whole lifecycle on a tiny real transformer and serve a few requests",
        description="Prepare a tiny real FluxTransformer2DModel (random weights) through the lifecycle, "
        "serve identical requests, and print a summary.",
    )
    _add_demo_arguments(demo)
    demo.set_defaults(handler=_cmd_demo)

    build = commands.add_parser(
        "build", help="build a model's compile artifacts offline into a store (for a CI job)",
        description="Prepare a model through the lifecycle with the store as artifact_dir, so that "
        "replicas with the same model, buckets, plan and options load the artifacts. Exit 0 when "
        "the store holds them (built or already there), 1 otherwise.",
    )
    _add_build_arguments(build)
    build.set_defaults(handler=_cmd_build)

    graph = commands.add_parser(
        "graph", help="draw the legal transitions of a policy",
        description="Print the legal transitions of a policy, generated from the states table.",
    )
    _add_policy_flags(graph)
    graph.add_argument("--format", choices=("mermaid", "dot"), default="mermaid")
    graph.set_defaults(handler=_cmd_graph)

    audit_cmd = commands.add_parser("audit", help="check or read a JSONL audit file")
    audit_commands = audit_cmd.add_subparsers(dest="audit_command", metavar="{verify,show}", required=True)
    verify = audit_commands.add_parser(
        "verify", help="replay audits against the legal-transition table",
        description="Exit 0 when every file is clean; 1 naming the file, line and reason of the "
        "first problem in each bad file.",
    )
    verify.add_argument("files", nargs="+", metavar="FILE")
    verify.add_argument("--json", action="store_true", help="one JSON object per file on stdout")
    verify.set_defaults(handler=_cmd_verify)
    show = audit_commands.add_parser("show", help="a readable timeline per module")
    show.add_argument("file", metavar="FILE")
    show.set_defaults(handler=_cmd_show)
    return parser


# ---------------------------------------------------------------------------- commands
def _policy(args: argparse.Namespace) -> Any:
    from states import LifecyclePolicy

    return LifecyclePolicy(cache_dit=not args.no_cache, compile=not args.no_compile)


def _cmd_graph(args: argparse.Namespace) -> int:
    from states.graph import render

    sys.stdout.write(render(_policy(args), args.format))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from lifecycle.audit.verify import verify_files

    results = verify_files(args.files)
    for result in results:
        if args.json:
            print(json.dumps(result.as_dict()))
        else:
            print(result, file=sys.stdout if result.ok else sys.stderr)
    return 0 if all(result.ok for result in results) else 1


def _cmd_show(args: argparse.Namespace) -> int:
    from lifecycle.audit.show import write_timeline

    if not os.path.isfile(args.file):
        raise UsageError(f"no such audit file: {args.file}")
    write_timeline(args.file, sys.stdout)
    return 0


def _quiet_third_party() -> None:
    # cache-dit reads its level from the environment when imported; diffusers after import.
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")
    import logging

    logging.getLogger("CACHE_DIT").setLevel(logging.WARNING)
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
    except ImportError:
        pass


def _cmd_build(args: argparse.Namespace) -> int:
    from lifecycle._cli import build

    try:
        options = json.loads(args.compile_options)
        if not isinstance(options, dict):
            raise ValueError("not a JSON object")
        request = build.BuildRequest(
            model=args.model, shapes=build.parse_shapes(args.shapes),
            compile_plan=build.parse_plan(args.compile_plan), compile_options=options,
            artifact_dir=args.artifact_dir,
            storage_options=build.read_json_file(args.storage_options_file, "--storage-options-file"),
            signing_key=build.read_signing_key(args.signing_key_env, args.signing_key_file),
            device=args.device, build_wait_s=args.build_wait,
        )
    except ValueError as exc:
        raise UsageError(f"--compile-options: {exc}") from None
    except build.BuildError as exc:
        raise UsageError(str(exc)) from None
    _quiet_third_party()
    try:
        result = build.run_build(request)
    except build.BuildError as exc:
        raise CliError(str(exc)) from None
    if args.json:
        print(json.dumps(result, default=str))
    else:
        sys.stdout.write(build.format_result(result))
    return 0 if result["ok"] else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from lifecycle import audit
    from lifecycle._cli.progress import Progress

    _quiet_third_party()
    progress = Progress(enabled=not args.quiet)
    ops = None
    if args.metrics_port is not None:
        if args.pipeline:
            raise UsageError("--metrics-port serves the single-module demo; leave out --pipeline")
        from lifecycle.ops.demo import DemoOps

        ops = DemoOps(args.metrics_port)
    extra = ops.processors if ops is not None else []
    # The demo configures structlog for itself; called in-process (main([...])), it gives the
    # caller's configuration back afterwards, or later events would still run its processors.
    import structlog

    configured, previous = structlog.is_configured(), structlog.get_config()
    sink = audit.configure_default(args.audit, fsync=args.fsync, echo=False, processors=[progress, *extra])
    try:
        if ops is not None:
            from lifecycle.ops.demo import format_urls

            print(format_urls(ops.start()), end="", file=sys.stderr, flush=True)
        if args.pipeline:
            result = _run_pipeline(args, progress)
        elif args.shapes:
            from lifecycle._cli.shapes_demo import run_shapes_demo

            result = run_shapes_demo(
                backend=args.backend, compile_backend=args.compile_backend, steps=args.steps,
                warmup_steps=args.warmup_steps,
            )
        else:
            from lifecycle._cli.demo import DemoOptions, run_demo

            options = DemoOptions(
                backend=args.backend,
                policy=_policy(args),
                compile_backend=args.compile_backend,
                steps=args.steps,
                warmup_steps=args.warmup_steps,
                requests=args.requests,
                regional=args.regional,
                aot=args.aot,
                artifact_dir=args.artifacts,
            )
            result = run_demo(options, progress, on_lifecycle=ops.watch if ops is not None else None)
        if ops is not None:
            result["ops"] = ops.finish()
    finally:
        if ops is not None:
            ops.stop()
        progress.close()
        if sink is not None:
            sink.close()
        if configured:
            structlog.configure(**previous)
        else:
            structlog.reset_defaults()
    if args.json:
        print(json.dumps(result, default=str))
    elif args.pipeline:
        sys.stdout.write(_format_pipeline(result))
    elif args.shapes:
        from lifecycle._cli.shapes_demo import format_shapes_demo

        sys.stdout.write(format_shapes_demo(result))
    else:
        from lifecycle._cli.demo import format_summary

        sys.stdout.write(format_summary(result))
        if "ops" in result:
            from lifecycle.ops.demo import format_summary as format_ops

            sys.stdout.write(format_ops(result["ops"]))
    if args.audit and not args.json:
        print(f"audit: {args.audit} (check it with '{PROG} audit verify {args.audit}')")
    return 0 if result.get("ok", True) else 1


def _run_pipeline(args: argparse.Namespace, progress: Any) -> dict[str, Any]:
    try:
        from lifecycle._cli.pipeline_demo import run_pipeline_demo
    except ImportError as exc:
        raise CliError(
            f"--pipeline needs lifecycle._cli.pipeline_demo.run_pipeline_demo, which is not available "
            f"in this installation ({exc})"
        ) from None
    from lifecycle._cli.demo import default_compile_backend, resolve_backend

    compile_backend = args.compile_backend
    if compile_backend is None:
        compile_backend = default_compile_backend(resolve_backend(args.backend).device_type)
    progress.follow_path = False
    progress.start(f"{args.pipeline} pipeline: prepare, then {args.requests} request(s)")
    started = time.perf_counter()
    result = dict(
        run_pipeline_demo(
            args.pipeline,
            backend=args.backend,
            steps=args.steps,
            requests=args.requests,
            compile_backend=compile_backend,
            policy=_policy(args),
        )
    )
    result.setdefault("wall_s", round(time.perf_counter() - started, 3))
    if "ok" not in result:
        recompiles = result.get("recompiles_since_warmup", 0)
        total = sum(recompiles.values()) if isinstance(recompiles, dict) else recompiles
        result["ok"] = bool(result.get("identical_outputs", True)) and total == 0
    return result


def _format_pipeline(result: dict[str, Any]) -> str:
    try:
        from lifecycle._cli.pipeline_demo import format_pipeline_demo
    except ImportError:
        return _format_generic(result)
    verdict = "OK" if result["ok"] else "FAILED"
    recompiles = result.get("recompiles_since_warmup")
    return (
        f"{format_pipeline_demo(result)}\n"
        f"recompiles after warm-up: {recompiles} (must be 0)\n"
        f"demo wall time: {result['wall_s']:.2f} s  ->  {verdict}\n"
    )


def _format_generic(result: dict[str, Any]) -> str:
    """Scalars as ``key: value``; lists of dicts as tables (for the pipeline demo's result)."""
    from lifecycle._cli.format import table

    scalars, tables = [], []
    for key, value in result.items():
        if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            headers = list(dict.fromkeys(k for item in value for k in item))
            rows = [[item.get(h, "") for h in headers] for item in value]
            tables.append(f"{key}:\n{table(headers, rows)}")
        else:
            scalars.append(f"{key}: {json.dumps(value, default=str) if isinstance(value, dict) else value}")
    return "\n\n".join(["\n".join(scalars), *tables]) + "\n"


# ---------------------------------------------------------------------------- entry point
def run(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the command; returns the exit status (0 ok, 1 failure, 2 usage).
    ``lifecycle._cli.main`` wraps it and turns a Ctrl-C into one line and 130."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return int(args.handler(args))
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else 0
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        # Expected failures (a missing backend, an unwritable audit file): one line each.
        # Anything else is a bug and keeps its traceback.
        if not _expected(exc):
            raise
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 1


def _expected(exc: Exception) -> bool:
    """A CliError, a LifecycleError or an AuditSinkError. Their modules are looked up only if
    loaded: an error of a module never imported cannot have been raised (and ``graph`` and
    ``audit`` stay fast by not importing them)."""
    if isinstance(exc, CliError):
        return True
    kinds = [getattr(sys.modules.get(module), name, None) for module, name in
             (("lifecycle._errors", "LifecycleError"), ("lifecycle.audit.sink", "AuditSinkError"))]
    return any(isinstance(kind, type) and isinstance(exc, kind) for kind in kinds)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


__all__ = ["CliError", "UsageError", "build_parser", "run"]
