"""Ahead-of-time compiled blocks on a GPU: why loading a package fails, and what AOT buys when it loads.

Two parts, each step in a process of its own (a package load that crashes kills only its step):

  probe   pure torch, no project code: a tiny ``nn.Linear`` AOTInductor package built with the
          weights inside and outside the .so (and a CPU package for contrast); each loaded in a
          fresh process that never compiled, through ``aoti_load_package``, through the loader
          class ``torch._C._aoti.AOTIModelPackageLoader`` directly, and by ``dlopen`` of the
          extracted library; ``ldd -r``/``readelf -d`` of that library; a native backtrace of a
          crashing load under ``cuda-gdb`` when one is installed.
  bench   a FLUX-width Flux transformer (hidden 3072, ``--blocks`` double + single, bf16, random
          weights) under cache-dit DBCache F1B0: cold just-in-time regional compile, AOT build
          (export + AOTInductor + the child-process check), and an AOT restart in a fresh process
          that loads the packages; first and steady request latency at two sizes, dynamo graphs,
          outputs against eager.

    python bench/gpu_aot.py probe --out DIR
    python bench/gpu_aot.py bench --out DIR [--blocks 2 4] [--steps 8]
    python bench/gpu_aot.py bench --device cpu --tiny --out /tmp/x     # a dry run on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------------------------------ probe
_BUILD = textwrap.dedent(
    """
    import sys, time, torch, json
    device, out = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64).to(device).eval()
    x = torch.randn(8, 64, device=device)
    ep = torch.export.export(model, (x,))
    times = {}
    for name, in_so in (("in_so", True), ("out_of_so", False)):
        t = time.perf_counter()
        torch._inductor.aoti_compile_and_package(
            ep, package_path=f"{out}/{device}_{name}.pt2",
            inductor_configs={"aot_inductor.package_constants_in_so": in_so})
        times[name] = round(time.perf_counter() - t, 2)
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"x": x.cpu(), "y": model(x).detach().cpu(), "w": weights}, f"{out}/{device}_io.pt")
    print(json.dumps(times))
    """
)

_LOAD = textwrap.dedent(
    """
    import faulthandler, sys, json, torch
    faulthandler.enable()
    how, path, io_path, device = sys.argv[1:5]
    io = torch.load(io_path)
    index = -1 if device == "cpu" else 0
    print("stage: before load", flush=True)
    if how == "aoti_load_package":
        runner = torch._inductor.aoti_load_package(path, device_index=index)
        loader = runner.loader
    else:
        loader = torch._C._aoti.AOTIModelPackageLoader(path, "model", False, 1, index)
        from torch._inductor.package.package import AOTICompiledModel
        runner = AOTICompiledModel(loader)
    print("stage: loaded", flush=True)
    fqns = loader.get_constant_fqns()
    print("constants:", fqns, flush=True)
    if "out_of_so" in path:
        runner.load_constants({k: v.to(device) for k, v in io["w"].items()}, check_full_update=True,
                              user_managed=False)
        print("stage: constants bound", flush=True)
    y = runner(io["x"].to(device))
    y = y[0] if isinstance(y, (list, tuple)) else y
    err = (y.cpu() - io["y"]).abs().max().item()
    print(json.dumps({"max_abs_err": err}), flush=True)
    """
)

_DLOPEN = textwrap.dedent(
    """
    import faulthandler, sys, ctypes, torch
    faulthandler.enable()
    print("stage: torch imported; dlopen", sys.argv[1], flush=True)
    ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_LOCAL)
    print("stage: dlopen ok", flush=True)
    """
)


def _step(command: list[str], timeout: float = 300, env: dict[str, str] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as expired:
        code, out, err = None, str(expired.stdout or ""), str(expired.stderr or "")
    except FileNotFoundError as missing:
        code, out, err = 127, "", str(missing)
    result: dict[str, Any] = {
        "command": " ".join(command)[:300],
        "returncode": code,
        "seconds": round(time.perf_counter() - started, 2),
        "stdout": out[-3000:],
        "stderr": err[-4000:],
    }
    if code is not None and code < 0:
        import signal

        result["signal"] = signal.Signals(-code).name
    return result


def _shell(command: str, timeout: float = 120) -> dict[str, Any]:
    return _step(["bash", "-c", command], timeout)


def probe(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="aot-probe-"))
    report: dict[str, Any] = {"kind": "probe", "steps": {}}
    steps = report["steps"]
    steps["env"] = _shell(
        "python3 -c 'import torch,sys;print(sys.version);print(torch.__version__, torch.version.cuda, "
        "torch.compiled_with_cxx11_abi(), "
        "torch.cuda.get_device_name() if torch.cuda.is_available() else None)';"
        "nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; gcc --version | head -1;"
        "which nvcc cuda-gdb; findmnt -no OPTIONS -T /tmp; uname -r; ldd --version | head -1"
    )
    devices = [args.device] + (["cpu"] if args.device != "cpu" else [])
    for device in devices:
        steps[f"build_{device}"] = _step([sys.executable, "-c", _BUILD, device, str(work)], timeout=600)
    for device in devices:
        for variant in ("in_so", "out_of_so"):
            package = work / f"{device}_{variant}.pt2"
            if not package.exists():
                continue
            io_path = str(work / f"{device}_io.pt")
            for how in ("aoti_load_package", "loader_class"):
                steps[f"load_{device}_{variant}_{how}"] = _step(
                    [sys.executable, "-c", _LOAD, how, str(package), io_path, device], timeout=300,
                    env={"TORCH_SHOW_CPP_STACKTRACES": "1"},
                )
            extracted = work / f"x_{device}_{variant}"
            with zipfile.ZipFile(package) as archive:
                archive.extractall(extracted)
                report.setdefault("package_files", {})[f"{device}_{variant}"] = [
                    f"{info.filename} {info.file_size}" for info in archive.infolist()
                ]
            libraries = sorted(str(p) for p in extracted.rglob("*.so"))
            for library in libraries[:1]:
                steps[f"ldd_{device}_{variant}"] = _shell(
                    f"ldd -r {library} 2>&1 | head -40; readelf -d {library} | grep -E 'NEEDED|RPATH|RUNPATH'"
                )
                steps[f"dlopen_{device}_{variant}"] = _step([sys.executable, "-c", _DLOPEN, library], 120)
    crashed = [name for name, step in steps.items() if step.get("signal") and name.startswith("load_")]
    report["crashed"] = crashed
    if crashed and shutil.which("cuda-gdb"):
        name = crashed[0]
        device = name.split("_")[1]
        variant = "in_so" if "in_so" in name else "out_of_so"
        how = "aoti_load_package" if name.endswith("aoti_load_package") else "loader_class"
        script = work / "load.py"
        script.write_text(_LOAD)
        steps["gdb_backtrace"] = _shell(
            f"timeout 240 cuda-gdb -q -batch -ex 'set pagination off' -ex run -ex 'bt 40' "
            f"-ex 'info sharedlibrary' --args {sys.executable} {script} {how} "
            f"{work / f'{device}_{variant}.pt2'} {work / f'{device}_io.pt'} {device} 2>&1 | tail -150",
            timeout=300,
        )
    shutil.rmtree(work, ignore_errors=True)
    (out / "probe.json").write_text(json.dumps(report, indent=1))
    for name, step in steps.items():
        tail = (step["stdout"].strip().splitlines() or [""])[-1][:160]
        print(f"{name:45s} rc={step['returncode']} {step.get('signal', '')} {step['seconds']}s | {tail}")
    return report


_BUILD2 = textwrap.dedent(
    """
    import sys, time, torch, json
    out = sys.argv[1]
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64).cuda().eval()
    x = torch.randn(8, 64, device="cuda")
    ep = torch.export.export(model, (x,))
    t = time.perf_counter()
    configs = {"aot_inductor.package_constants_in_so": False, "aot_inductor.precompile_headers": False}
    torch._inductor.aoti_compile_and_package(
        ep, package_path=f"{out}/pkg_out_of_so.pt2", inductor_configs=configs)
    t1 = time.perf_counter()
    so = torch._inductor.aot_compile(ep.module(), (x,), options={
        "aot_inductor.package": False, "aot_inductor.precompile_headers": False,
        "aot_inductor.output_path": f"{out}/direct.so"})
    torch.save({"x": x.cpu(), "y": model(x).detach().cpu(),
                "w": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, f"{out}/io.pt")
    print(json.dumps({"package_s": round(t1 - t, 2), "so_s": round(time.perf_counter() - t1, 2), "so": so}))
    """
)

_DIRECT = textwrap.dedent(
    """
    import faulthandler, sys, json, torch
    faulthandler.enable()
    so, io_path = sys.argv[1:3]
    io = torch.load(io_path)
    print("stage: before aot_load", flush=True)
    runner = torch._export.aot_load(so, "cuda")
    print("stage: loaded", flush=True)
    y = runner(io["x"].cuda())
    y = y[0] if isinstance(y, (list, tuple)) else y
    print(json.dumps({"max_abs_err": (y.cpu() - io["y"]).abs().max().item()}), flush=True)
    """
)


def probe2(args: argparse.Namespace) -> dict[str, Any]:
    """The crash under a debugger (full native backtrace to a file), and the package loader bypassed:
    the library from ``aot_compile`` loaded by the container runner directly."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="aot-probe2-"))
    steps: dict[str, Any] = {}
    steps["build"] = _step([sys.executable, "-c", _BUILD2, str(work)], timeout=300)
    (work / "load.py").write_text(_LOAD)
    (work / "direct.py").write_text(_DIRECT)
    so = next(iter(sorted(work.glob("*.so"))), work / "direct.so")
    steps["direct_runner"] = _step(
        [sys.executable, str(work / "direct.py"), str(so), str(work / "io.pt")], 120)
    steps["loader_single_threaded"] = _step(
        [sys.executable, "-c", _LOAD.replace("False, 1, index", "True, 1, index"), "loader_class",
         str(work / "pkg_out_of_so.pt2"), str(work / "io.pt"), "cuda"], 120)
    gdb_log = out / "gdb.txt"
    steps["gdb"] = _shell(
        f"timeout 200 cuda-gdb -q -batch -ex 'set pagination off' -ex 'set cuda api_failures ignore' -ex run "
        f"-ex 'bt 40' -ex 'info symbol $pc' -ex 'x/8i $pc-16' -ex 'info registers rip rsp rdi rsi' "
        f"--args {sys.executable} {work / 'load.py'} loader_class "
        f"{work / 'pkg_out_of_so.pt2'} {work / 'io.pt'} cuda "
        f"> {gdb_log} 2>&1; sed -n '/SIGSEGV/,$p' {gdb_log} | grep -v 'New Thread' | head -80",
        timeout=240,
    )
    shutil.rmtree(work, ignore_errors=True)
    (out / "probe2.json").write_text(json.dumps(steps, indent=1))
    for name, step in steps.items():
        print(f"== {name} rc={step['returncode']} {step.get('signal', '')} {step['seconds']}s")
        print(step["stdout"][-2500:])
        print(step["stderr"][-1200:])
    return steps


_BUILD3 = textwrap.dedent(
    """
    import sys, json, torch
    import torch._inductor.cpp_builder as builder
    device, package, configs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    commands = []
    original = builder.run_compile_cmd
    def spy(cmd_line, cwd):
        commands.append(cmd_line)
        return original(cmd_line, cwd)
    builder.run_compile_cmd = spy
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64).to(device).eval()
    x = torch.randn(8, 64, device=device)
    ep = torch.export.export(model, (x,))
    torch._inductor.aoti_compile_and_package(ep, package_path=package, inductor_configs={
        "aot_inductor.package_constants_in_so": False, "aot_inductor.precompile_headers": False, **configs})
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"x": x.cpu(), "y": model(x).detach().cpu(), "w": weights}, package + ".io.pt")
    links = [c for c in commands if " -shared" in c or " -o " in c and ".so" in c]
    print(json.dumps({"link": links[-1][-1500:] if links else None, "commands": len(commands)}))
    """
)


_BENCH_DIR = str(Path(__file__).resolve().parent)
_MACHINE = (
    f"import json, sys; sys.path.insert(0, {_BENCH_DIR!r}); from _machine import machine_info; "
    "print(json.dumps(machine_info()))"
)


def probe3(args: argparse.Namespace) -> dict[str, Any]:
    """Which libstdc++ the package's library links, and whether linking the shared one fixes the load."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="aot-probe3-"))
    steps: dict[str, Any] = {}
    steps["machine"] = _step([sys.executable, "-c", _MACHINE], timeout=120)
    steps["toolchain"] = _shell(
        "g++ -print-file-name=libstdc++.so; g++ -print-file-name=libstdc++.a; "
        "ls -la $(dirname $(g++ -print-file-name=libstdc++.a))/libstdc++* 2>&1; "
        "ldconfig -p | grep libstdc++; echo CXX=$CXX LIBRARY_PATH=$LIBRARY_PATH LDFLAGS=$LDFLAGS; "
        "python3 -c 'import torch; print(open(\"/proc/self/maps\").read())' "
        "| grep -o '/[^ ]*libstdc++[^ ]*' | sort -u"
    )
    fix = work / "fix"
    fix.mkdir()
    candidates = ("/usr/lib/x86_64-linux-gnu/libstdc++.so.6", "/lib/x86_64-linux-gnu/libstdc++.so.6")
    system = next((p for p in candidates if Path(p).exists()), None)
    if system:
        (fix / "libstdc++.so").symlink_to(system)
    variants = {
        "baseline": ({}, {}),
        "library_path_shared": ({}, {"LIBRARY_PATH": str(fix)}),
        "custom_op_libs_stdcxx": ({"aot_inductor.custom_op_libs": ["stdc++"]}, {"LIBRARY_PATH": str(fix)}),
    }
    devices = ["cpu", args.device] if args.device != "cpu" else ["cpu"]
    for device in devices:
        for name, (configs, env) in variants.items():
            if device != "cpu" and name == "baseline":
                continue
            package = work / f"{device}_{name}_out_of_so.pt2"
            key = f"{device}_{name}"
            steps[f"build_{key}"] = _step([sys.executable, "-c", _BUILD3, device, str(package),
                                           json.dumps(configs)], timeout=240, env=env)
            if not package.exists():
                continue
            extracted = work / f"x_{key}"
            with zipfile.ZipFile(package) as archive:
                archive.extractall(extracted)
            library = next(iter(sorted(extracted.rglob("*.so"))), None)
            if library is not None:
                steps[f"needed_{key}"] = _shell(
                    f"readelf -d {library} | grep NEEDED; echo defined std symbols: "
                    f"$(nm -DC --defined-only {library} | grep -c 'std::'); "
                    f"nm -C {library} | grep -c 'codecvt<char16_t'"
                )
            steps[f"load_{key}"] = _step([sys.executable, "-c", _LOAD, "loader_class", str(package),
                                          str(package) + ".io.pt", device], timeout=120)
            _report(out / "probe3.json", steps)
    shutil.rmtree(work, ignore_errors=True)
    _report(out / "probe3.json", steps)
    return steps


_printed: set[str] = set()


def _report(path: Path, steps: dict[str, Any]) -> None:
    """Save and print what has run so far: a command cut at its time limit still leaves its steps."""
    path.write_text(json.dumps(steps, indent=1))
    for name, step in steps.items():
        if name in _printed:
            continue
        _printed.add(name)
        print(f"== {name} rc={step['returncode']} {step.get('signal', '')} {step['seconds']}s")
        print(step["stdout"][-1800:])
        if step["returncode"] != 0:
            print(step["stderr"][-600:])
        sys.stdout.flush()


# ------------------------------------------------------------------------------------------ bench
def _bench_child(args: argparse.Namespace) -> dict[str, Any]:
    """One scenario in this process: ``jit`` (regional torch.compile), ``aot-build`` or ``aot-load``."""
    sys.path.insert(0, str(ROOT))
    import logging

    logging.getLogger("CACHE_DIT").setLevel(logging.WARNING)
    import torch
    from torch._dynamo.utils import counters

    from adapters import CacheDitAdapter, aot
    from adapters.regional import compile_regional
    from lifecycle.testing.tiny import demo_cache_config, denoise

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _flux import bench_flux

    device = torch.device(args.device)
    # 512x512, 1024x1024 image tokens, and 768x768 between them
    sizes = (64, 128, 96) if args.tiny else (1024, 4096, 2304)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    started = time.perf_counter()
    flux = bench_flux(device, args.blocks, tiny=args.tiny)
    model, inputs = flux.model, flux.inputs
    sync()
    build_model_s = time.perf_counter() - started
    cache_config = demo_cache_config(args.steps, threshold=args.threshold)
    adapter = CacheDitAdapter()
    adapter.mount(model, cache_config)

    def request(tokens: int) -> tuple[torch.Tensor, float]:
        adapter.refresh(model, cache_config, num_inference_steps=args.steps)
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            out = denoise(model, inputs(tokens), args.steps)
        sync()
        return out, time.perf_counter() - t

    result: dict[str, Any] = {"scenario": args.scenario, "build_model_s": round(build_model_s, 2)}
    graphs0 = counters["stats"]["unique_graphs"]
    package_dir = Path(args.packages)
    t0 = time.perf_counter()
    binding: aot.AotBinding | None = None  # the caller owns a binding
    if args.scenario == "eager":
        pass
    elif args.scenario == "jit":
        compile_regional(model, {})
    elif args.scenario == "aot-build":
        with torch.inference_mode():
            calls = aot.capture_calls(model, [
                lambda tokens=tokens: (adapter.refresh(model, cache_config, num_inference_steps=args.steps),
                                       denoise(model, inputs(tokens), 1))
                for tokens in sizes[:2]
            ])
        result["capture_s"] = round(time.perf_counter() - t0, 2)
        built = aot.build(model, calls, package_dir, plan_token=f"bench:{sizes[:2]}", verify=True)
        result["build"] = {
            "seconds": {k: {n: round(v, 2) for n, v in s.items()} for k, s in built.seconds.items()},
            "checks": {k: c.to_json() for k, c in built.checks.items()},
            "bytes": {k: i.manifest["bytes"] for k, i in built.packages.items()},
            "complete": built.complete,
        }
        if built.complete:
            binding = aot.bind(model, built.packages)
            result["bind"] = binding.summary()
    elif args.scenario == "aot-load":
        found = aot.open_packages(model, package_dir, plan_token=f"bench:{sizes[:2]}")
        result["open"] = {k: [s.status, s.verified_here, s.reason] for k, s in found.items()}
        if {s.status for s in found.values()} == {"ok"}:
            infos = {k: s.info for k, s in found.items() if s.info is not None}
            if not all(s.verified_here for s in found.values()):
                result["verify"] = {k: c.to_json() for k, c in aot.verify_packages(model, infos).items()}
            binding = aot.bind(model, infos)
            result["bind"] = binding.summary()
    result["prepare_s"] = round(time.perf_counter() - t0, 2)
    latencies: dict[str, Any] = {}
    outputs = {}
    for tokens in sizes:
        first_out, first = request(tokens)
        steady = [request(tokens)[1] for _ in range(args.repeats)]
        outputs[tokens] = first_out
        latencies[str(tokens)] = {"first_s": round(first, 4), "steady_s": [round(s, 4) for s in steady],
                                  "cached_steps": adapter.summary(model).cached_steps}
    result["to_ready_s"] = round(time.perf_counter() - t0, 2)
    result["requests"] = latencies
    result["dynamo_graphs"] = counters["stats"]["unique_graphs"] - graphs0
    if binding is not None:
        result["aot_stats"] = binding.summary()
    saved = {k: v.float().cpu() for k, v in outputs.items()}
    torch.save(saved, Path(args.packages) / f"out-{args.scenario}.pt")
    return result


def bench(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    package_dir = Path(tempfile.mkdtemp(prefix="aot-packages-"))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _machine import machine_info

    report: dict[str, Any] = {"kind": "bench", "machine": machine_info(), "args": vars(args), "scenarios": {}}
    base = [
        sys.executable, str(Path(__file__).resolve()), "bench-child", "--device", args.device,
        "--blocks", *map(str, args.blocks), "--steps", str(args.steps), "--threshold", str(args.threshold),
        "--repeats", str(args.repeats), "--packages", str(package_dir), *(["--tiny"] if args.tiny else []),
    ]
    for scenario in args.scenarios:
        inductor_cache = tempfile.mkdtemp(prefix=f"inductor-{scenario}-")  # a fresh replica's caches
        caches = {"TORCHINDUCTOR_CACHE_DIR": inductor_cache, "TRITON_CACHE_DIR": inductor_cache + "/triton"}
        step = _step([*base, "--scenario", scenario], timeout=args.timeout, env=caches)
        lines = [line for line in step["stdout"].splitlines() if line.startswith("{")]
        entry: dict[str, Any] = json.loads(lines[-1]) if lines and step["returncode"] == 0 else {}
        entry["process"] = {k: step[k] for k in ("returncode", "seconds", "signal") if k in step}
        if step["returncode"] != 0:
            entry["process"]["stderr"] = step["stderr"][-3000:]
        report["scenarios"][scenario] = entry
        (out / "bench.json").write_text(json.dumps(report, indent=1))  # what ran, even if the rest is cut
        print(scenario, json.dumps(entry)[:1500], flush=True)
    saved = {p.stem.removeprefix("out-"): torch.load(p) for p in package_dir.glob("out-*.pt")}
    if "eager" in saved:
        report["max_abs_vs_eager"] = {
            name: {str(k): float((v - saved["eager"][k]).abs().max()) for k, v in outs.items()}
            for name, outs in saved.items() if name != "eager"
        }
    if "aot-build" in saved and "aot-load" in saved:
        report["aot_restart_bit_identical"] = {
            str(k): bool(torch.equal(v, saved["aot-load"][k])) for k, v in saved["aot-build"].items()
        }
    report["packages"] = sorted(f"{p.name} {p.stat().st_size}" for p in package_dir.iterdir())
    shutil.rmtree(package_dir, ignore_errors=True)
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["probe", "probe2", "probe3", "bench", "bench-child"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--blocks", type=int, nargs=2, default=[2, 4])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threshold", type=float, default=0.6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--timeout", type=float, default=420)
    parser.add_argument("--scenarios", nargs="+", default=["eager", "jit", "aot-build", "aot-load"])
    parser.add_argument("--scenario")
    parser.add_argument("--packages")
    args = parser.parse_args()
    if args.part == "probe":
        probe(args)
    elif args.part == "probe2":
        probe2(args)
    elif args.part == "probe3":
        probe3(args)
    elif args.part == "bench":
        bench(args)
    else:
        print(json.dumps(_bench_child(args)), flush=True)


if __name__ == "__main__":
    print(f"# {platform.node()} {time.strftime('%Y-%m-%d %H:%M:%S')}", file=sys.stderr)
    main()
