"""Which compiler set-up builds AOTInductor packages that load on this machine.

    python bench/gpu_aot_compiler_probe.py --out DIR [--device cuda|cpu]

On the lent H100 every package built with the machine's default ``CXX`` segfaulted on load.
One hypothesis: the package carries its own weak instantiations of std templates (std::regex
among them) from one GCC, and the dynamic linker binds some of its calls to libtorch's from
another. This builds one tiny package per variant (the compiler; the link bound to the
package's own symbols or not), each in its own process, then loads each in a fresh process and
compares its output with eager. A crash in a child is a result, never a crash here.
Result: ``DIR/gpu_aot_compiler_probe-<gpu>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BUILD = r"""
import json, sys, torch
import torch._inductor.cpp_builder as builder
device, package, extra_link = sys.argv[1], sys.argv[2], sys.argv[3]
links = []
original = builder.run_compile_cmd
def run(cmd_line, cwd):
    if extra_link and " -shared" in cmd_line and " -o " in cmd_line and ".so" in cmd_line:
        cmd_line = cmd_line + " " + extra_link
        links.append(cmd_line)
    return original(cmd_line, cwd)
builder.run_compile_cmd = run
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64)).to(device)
example = (torch.randn(8, 64, device=device),)
exported = torch.export.export(model, example)
path = torch._inductor.aoti_compile_and_package(exported, package_path=package)
torch.save({"x": example[0].cpu(), "y": model(*example).detach().cpu()}, package + ".io")
print(json.dumps({"package": path, "patched_links": len(links)}))
"""

LOAD = r"""
import faulthandler, json, sys, torch
faulthandler.enable()
package, device = sys.argv[1], sys.argv[2]
io = torch.load(package + ".io")
print("stage: before load", flush=True)
runner = torch._inductor.aoti_load_package(package)
print("stage: loaded", flush=True)
out = runner(io["x"].to(device))
out = out[0] if isinstance(out, (list, tuple)) else out
print(json.dumps({"max_abs_diff": float((out.cpu() - io["y"]).abs().max())}))
"""


def sh(command: list[str], env: dict[str, str] | None = None, timeout: int = 400) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
        result: dict[str, Any] = {"returncode": done.returncode, "stdout": done.stdout[-3000:],
                                  "stderr": done.stderr[-3000:]}
    except subprocess.TimeoutExpired:
        result = {"returncode": None, "timeout": timeout}
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def _library_facts(package: str, into: Path) -> dict[str, Any]:
    """What the package's shared library needs, and how many std symbols it defines itself."""
    import zipfile

    with zipfile.ZipFile(package) as archive:
        names = [n for n in archive.namelist() if n.endswith(".so")]
        if not names:
            return {"so": None}
        archive.extract(names[0], into)
    so = str(into / names[0])
    needed = sh(["bash", "-c", f"readelf -d {so} | grep NEEDED"])["stdout"]
    std = sh(["bash", "-c", f"nm -DC --defined-only {so} | grep -c ' std::'"])["stdout"].strip()
    return {"so": names[0], "needed": needed.split("\n"), "defined_std_symbols": std}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    system_gxx = shutil.which("g++", path="/usr/bin") or "g++"
    default_cxx = os.environ.get("CXX", "g++")
    variants = {
        "default_cxx": (default_cxx, ""),
        "system_gxx": (system_gxx, ""),
        "default_cxx_bsymbolic": (default_cxx, "-Wl,-Bsymbolic-functions"),
        "system_gxx_bsymbolic": (system_gxx, "-Wl,-Bsymbolic-functions"),
    }
    report: dict[str, Any] = {
        "bench": "gpu_aot_compiler_probe",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch": torch.__version__,
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "device": args.device,
        "compilers": {cxx: sh([cxx, "--version"])["stdout"].splitlines()[:1]
                      for cxx in {default_cxx, system_gxx}},
        "variants": {},
    }
    work = Path(tempfile.mkdtemp(prefix="aot-compiler-probe-"))
    builds = {}
    for name, (cxx, extra) in variants.items():  # built side by side: one process each
        env = {**os.environ, "CXX": cxx, "TORCHINDUCTOR_CACHE_DIR": str(work / f"cache-{name}")}
        package = str(work / f"{name}.pt2")
        builds[name] = (package, subprocess.Popen(
            [sys.executable, "-c", BUILD, args.device, package, extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        ))
    for name, (package, process) in builds.items():
        stdout, stderr = process.communicate(timeout=500)
        entry: dict[str, Any] = {"cxx": variants[name][0], "extra_link": variants[name][1],
                                 "build": {"returncode": process.returncode, "stdout": stdout[-2000:],
                                           "stderr": stderr[-2000:]}}
        if process.returncode == 0:
            entry["load"] = sh([sys.executable, "-c", LOAD, package, args.device])
            entry["loaded"] = entry["load"]["returncode"] == 0
            entry["library"] = _library_facts(package, work / f"x-{name}")
        report["variants"][name] = entry
        print(name, "build", process.returncode, "load", entry.get("load", {}).get("returncode"), flush=True)
    gpu = (report["gpu"] or "cpu").replace(" ", "-")
    path = out / f"gpu_aot_compiler_probe-{gpu}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
