"""The supported cache-dit and diffusers releases: the project's ranges admit every tested pin,
the version table (``adapters.versions``) says what differs and is what the docs list, each
listed difference is real on the releases it names and handled there, and a family an older
diffusers lacks is skipped by name. Run by every nox session, so each checks its own pins."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
from families import FAMILIES, FamilyCase, missing_from_diffusers, unavailable
from packaging.requirements import Requirement
from packaging.version import Version

from adapters import CacheDitAdapter
from adapters.versions import (
    DIFFERENCES,
    FAKE_PIPELINE_FLAG,
    TESTED,
    Difference,
    active,
    forget_fake_pipeline_flag,
    installed,
)
from lifecycle.testing.tiny import FluxShape, demo_cache_config, denoise, flux_inputs, tiny_flux

ROOT = Path(__file__).resolve().parent.parent
SMALL = FluxShape()


def _requirements() -> dict[str, Requirement]:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = [Requirement(line) for line in project["dependencies"]]
    return {req.name: req for req in found}


def test_every_tested_pin_is_inside_the_project_ranges() -> None:
    requirements = _requirements()
    for session, pins in TESTED.items():
        for package, version in pins.items():
            assert Version(version) in requirements[package].specifier, (session, package, version)
    # The engines' pins sit at the lower bounds; the upper bound keeps the next minor out.
    assert str(requirements["cache-dit"].specifier) in ("<1.6,>=1.5.0", ">=1.5.0,<1.6")
    assert str(requirements["diffusers"].specifier) == ">=0.37"
    # torch's lower bound is a torch the project runs on; this process runs on one inside it.
    assert Version(installed("torch").base_version) in requirements["torch"].specifier


def test_noxfile_sessions_are_the_tested_sets() -> None:
    spec = importlib.util.spec_from_file_location("_noxfile_under_test", ROOT / "noxfile.py")
    assert spec is not None and spec.loader is not None
    pytest.importorskip("nox")
    noxfile = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = noxfile
    try:
        spec.loader.exec_module(noxfile)
    finally:
        del sys.modules[spec.name]
    assert noxfile.TESTED == TESTED
    assert set(TESTED) == {"sglang-0.5.23", "vllm-omni-0.30.0", "newest"}
    for path in [*noxfile.CORE, *noxfile.FAMILIES]:
        assert (ROOT / path).is_file(), path


def test_the_docs_name_every_difference_and_the_readme_every_tested_set() -> None:
    pipelines = (ROOT / "docs" / "pipelines.md").read_text()
    for d in DIFFERENCES:
        row = f"| `{d.key}` | {d.package} before {d.fixed_in} | {d.what} | {d.handling} |"
        assert row in pipelines, f"docs/pipelines.md's table of differences lacks: {row}"
    readme = (ROOT / "README.md").read_text()
    for pins in TESTED.values():
        assert f"cache-dit {pins['cache-dit']}" in readme and f"diffusers {pins['diffusers']}" in readme


def test_a_difference_is_active_exactly_below_the_release_that_fixed_it() -> None:
    for difference in DIFFERENCES:
        assert active(difference.key) is (installed(difference.package) < Version(difference.fixed_in))
    with pytest.raises(KeyError):
        active("no_such_difference")
    with pytest.raises(ValueError, match="cache-dit or diffusers"):
        Difference("k", "torch", "2.0", "what", "handling")


def test_bare_transformer_mounts_in_a_row_each_get_a_context() -> None:
    """Two bare transformers mounted one after the other (what two lifecycles in one server
    do): each gets its own cache context and caches steps, on every supported cache-dit. On
    the releases ``FAKE_PIPELINE_FLAG`` names, raw cache-dit fails the second mount; the adapter
    does not."""
    import cache_dit

    inputs = flux_inputs(SMALL)
    if active(FAKE_PIPELINE_FLAG):
        first, second = tiny_flux(SMALL), tiny_flux(SMALL)
        forget_fake_pipeline_flag()  # an earlier mount in this process left it
        cache_dit.enable_cache(first, cache_config=demo_cache_config(8))
        try:
            with pytest.raises(AssertionError):
                cache_dit.enable_cache(second, cache_config=demo_cache_config(8))
        finally:
            cache_dit.disable_cache(first)
            CacheDitAdapter().unmount(second)
    adapter = CacheDitAdapter()
    modules = [tiny_flux(SMALL), tiny_flux(SMALL)]
    try:
        for module in modules:
            adapter.mount(module, demo_cache_config(8))
        for module in modules:
            adapter.refresh(module, demo_cache_config(8))
            denoise(module, inputs, steps=8)
            summary = adapter.summary(module)
            assert summary.contexts == 1 and summary.executed_steps == 8
            assert summary.cached_steps > 0
    finally:
        for module in modules:
            adapter.unmount(module)
    assert not any(adapter.is_mounted(module) for module in modules)


def test_a_family_missing_from_an_older_diffusers_is_skipped_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    import diffusers
    import families

    assert all(unavailable(family) is None for family in FAMILIES)  # every tested diffusers has them
    ghost = FamilyCase("ghost", "Ghost", "GhostPipeline", "image", lambda seed: None, lambda **kw: {})
    monkeypatch.setattr(diffusers, "__version__", "0.37.0")
    assert unavailable(ghost) == "Ghost: diffusers 0.37.0 has no GhostPipeline"
    with pytest.raises(families.NotInDiffusers, match="has no GhostTransformer"):
        families._diffusers("FluxPipeline", "GhostTransformer")
    # On the newest tested diffusers a missing class is a bug of the case, never a skip.
    monkeypatch.setattr(diffusers, "__version__", TESTED["newest"]["diffusers"])
    assert unavailable(ghost) is None and missing_from_diffusers("GhostPipeline") is None
    with pytest.raises(AttributeError):
        families._diffusers("GhostPipeline")


def test_pyproject_explains_the_torch_bound() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    comment = text[: text.index('"torch>=')]
    assert re.search(r"torch 2\.13.*2\.11", comment, re.S), "say which torch releases are tested"


def test_cache_dit_version_is_the_installed_distribution() -> None:
    """Part of the compile-artifact key: right even where ``cache_dit.__version__`` is not."""
    from importlib import metadata

    assert CacheDitAdapter().version() == metadata.version("cache-dit")
