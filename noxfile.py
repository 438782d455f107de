"""The compatibility matrix: one session per pinned (cache-dit, diffusers) set, on torch 2.13 CPU.

    python3 -m nox -s sglang-0.5.23 vllm-omni-0.30.0    # the engines' pins: core tests + families
    python3 -m nox -s newest                            # the newest releases: the whole suite

The sets are ``adapters.versions.TESTED`` (SGLang 0.5.23's and vLLM-Omni 0.30.0's pins, and the
newest releases). Each session is a venv of its own on top of the environment that runs nox
(``--system-site-packages``: torch and the test tools are not installed again); pip installs the
pinned cache-dit and diffusers into it, with whatever of their dependencies the outer
environment does not satisfy (diffusers 0.37 needs huggingface-hub < 2, say), and the session
checks that those pins are what its Python imports before any test runs. Arguments after ``--``
go to pytest (test paths given there replace the session's own).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
nox.options.default_venv_backend = "venv"
nox.options.error_on_missing_interpreters = True
# The outer environment's packages, pip and setuptools included: a venv's own old setuptools
# cannot build the editable project.
VENV = ["--system-site-packages", "--without-pip"]


def _tested() -> dict[str, dict[str, str]]:
    # Read from adapters/versions.py by path: importing the package would import torch.
    spec = importlib.util.spec_from_file_location("_dit_versions", ROOT / "adapters" / "versions.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    tested: dict[str, dict[str, str]] = module.TESTED
    return tested


TESTED = _tested()

# What an engine's pins can break, kept small (these sessions run in every scripts/test.sh): the
# transition table, the audit of a real prepare and its requests, the cache adapter, this
# matrix's own checks, and the families suite (every family through cache-dit and diffusers).
CORE = [
    "tests/test_transition_table.py",
    "tests/test_audit_events.py",
    "tests/test_adapters.py",
    "tests/test_compat.py",
]
FAMILIES = ["tests/test_families.py", "tests/test_diffusers_pipelines.py"]
PYTEST = ["-q", "-p", "no:cacheprovider"]

# What the session checks before any test: the pins are imported, and the project from here.
_CHECK = """
import sys, cache_dit, diffusers, torch, lifecycle
from importlib import metadata
from pathlib import Path
want = dict(arg.split("==") for arg in sys.argv[1:])
have = {name: metadata.version(name) for name in want}
assert have == want, f"pinned {want}, installed {have}"
for name, module in (("cache-dit", cache_dit), ("diffusers", diffusers)):
    # The module imported is the pinned distribution's (cache-dit 1.5.0's __version__ is wrong).
    init = Path(metadata.distribution(name).locate_file(module.__name__ + "/__init__.py"))
    assert init.resolve() == Path(module.__file__).resolve(), (name, module.__file__, init)
print(f"cache-dit {have['cache-dit']}, diffusers {diffusers.__version__}, torch {torch.__version__},"
      f" lifecycle from {Path(lifecycle.__file__).parent}")
"""


def _prepare(session: nox.Session, pins: dict[str, str]) -> None:
    requirements = [f"{name}=={version}" for name, version in pins.items()]
    # The project and the pins in one resolution: pip refuses when the project's ranges exclude
    # a pin. What the outer environment already satisfies (torch, ...) is not installed again.
    session.install("--no-build-isolation", "-e", str(ROOT), *requirements)
    session.run("python", "-c", _CHECK, *requirements)


def _pytest_args(session: nox.Session, default: list[str]) -> list[str]:
    """pytest's arguments: options after ``--`` are added; paths after ``--`` replace the
    session's own (``nox -s newest -- tests/test_logging.py -x``)."""
    workers = ["-n", os.environ.get("DIT_NOX_WORKERS", "2")]
    extra = list(session.posargs)
    paths = [arg for arg in extra if arg.startswith("tests")]
    return [*PYTEST, *workers, *extra, *([] if paths else default)]


def _matrix_session(name: str, pins: dict[str, str], paths: list[str]) -> None:
    @nox.session(name=name, venv_params=VENV)
    def session(session: nox.Session) -> None:
        _prepare(session, pins)
        session.run("python", "-m", "pytest", *_pytest_args(session, paths))

    runs = "the core tests and the families suite" if paths else "the whole suite"
    session.__doc__ = f"cache-dit {pins['cache-dit']} + diffusers {pins['diffusers']}: {runs}"


for _name, _pins in TESTED.items():
    _matrix_session(_name, _pins, [] if _name == "newest" else [*CORE, *FAMILIES])


# The engines' own torch pins, resolved (not installed: a CUDA torch is gigabytes) with theirs.
ENGINE_TORCH = {"sglang-0.5.23": "2.14.1"}


@nox.session(name="resolve", venv_params=VENV)
def resolve(session: nox.Session) -> None:
    """pip resolves the project with each engine's pins (and SGLang's torch pin), installing nothing."""
    for name, pins in TESTED.items():
        requirements = [f"{package}=={version}" for package, version in pins.items()]
        if name in ENGINE_TORCH:
            requirements.append(f"torch=={ENGINE_TORCH[name]}")
        session.run("python", "-m", "pip", "install", "--dry-run", "--quiet", "--no-build-isolation",
                    str(ROOT), *requirements)
