"""The documentation is held to the code.

- Every ```python example of README.md and docs/**/*.md runs as written: a page's examples run in
  order in one fresh interpreter (as a reader pasting them into one session), in an empty working
  folder. An example preceded by ``<!-- docs-test: gpu -->`` needs an NVIDIA GPU: it runs on its
  own, and is skipped without one.
- The plot script draws every plot of the benchmarks page from the committed results.
- The Grafana dashboard is an importable dashboard, and every panel query names a metric that
  ``lifecycle.ops.LifecycleMetrics`` exports; the operating page describes every panel.
- The architecture page lists every .py file of states/, lifecycle/ and adapters/, one line each.
- The diagram on the concepts page is what ``python -m lifecycle graph`` prints.
- The supported-pipelines table is the generated one (its rows match the families registry here;
  tests/test_families.py checks every cell against the runs).
- Every public name has a reference entry and a docstring.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]
DASHBOARD = ROOT / "dashboards" / "dit-lifecycle.json"
PACKAGES = ("states", "lifecycle", "adapters")
EXAMPLE_TIMEOUT_S = 900

_FENCE = re.compile(
    r"(?:^<!--\s*docs-test:\s*(?P<mark>[a-z-]+)\s*-->\s*\n)?^```python[^\n]*\n(?P<code>.*?)^```\s*$",
    re.M | re.S,
)
MARKS = {"gpu"}


@dataclass(frozen=True)
class Example:
    page: Path
    line: int
    code: str
    mark: str | None

    @property
    def name(self) -> str:
        return str(self.page.relative_to(ROOT))


def examples(page: Path) -> list[Example]:
    text = page.read_text()
    found = []
    for match in _FENCE.finditer(text):
        line = text.count("\n", 0, match.start("code")) + 1
        found.append(Example(page, line, match.group("code"), match.group("mark")))
    return found


def _script(blocks: list[Example]) -> str:
    parts = []
    for block in blocks:
        parts.append(f"# ---- {block.name}, line {block.line}\n{block.code}")
    return "\n".join(parts)


def _run(script: str, workdir: Path, label: str) -> None:
    path = workdir / "example.py"
    path.write_text(script)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(path)], cwd=workdir, env=env, capture_output=True, text=True,
        timeout=EXAMPLE_TIMEOUT_S,
    )
    if done.returncode != 0:
        tail = (done.stdout[-3000:] + "\n" + done.stderr[-6000:]).strip()
        pytest.fail(f"{label}: the example exited {done.returncode}\n{tail}", pytrace=False)


CPU_PAGES = [p for p in PAGES if any(e.mark is None for e in examples(p))]
GPU_EXAMPLES = [e for p in PAGES for e in examples(p) if e.mark == "gpu"]


def test_every_marked_example_uses_a_known_mark() -> None:
    for page in PAGES:
        for example in examples(page):
            assert example.mark is None or example.mark in MARKS, (
                f"{example.name}:{example.line}: unknown docs-test mark {example.mark!r}; "
                f"known: {sorted(MARKS)}"
            )


@pytest.mark.slow
@pytest.mark.parametrize("page", CPU_PAGES, ids=[str(p.relative_to(ROOT)) for p in CPU_PAGES])
def test_page_examples_run(page: Path, tmp_path: Path) -> None:
    """The page's examples, in order, in one fresh interpreter, on the CPU."""
    blocks = [e for e in examples(page) if e.mark is None]
    _run(_script(blocks), tmp_path, str(page.relative_to(ROOT)))


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize("example", GPU_EXAMPLES, ids=[f"{e.name}:{e.line}" for e in GPU_EXAMPLES])
def test_gpu_example_runs(example: Example, tmp_path: Path) -> None:
    if not _cuda():
        pytest.skip("needs an NVIDIA GPU")
    _run(_script([example]), tmp_path, f"{example.name}:{example.line}")


def test_readme_is_short_and_links_every_topic() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 150, "the README is at most 150 lines: move the detail into docs/"
    for page in sorted(DOCS.glob("*.md")):
        if page.name in ("index.md", "changelog.md"):
            continue
        assert f"docs/{page.name}" in text, f"the README links no page for {page.name}"
    for relative in re.findall(r"\]\(((?:docs/|CHANGELOG)[^)#]*)", text):
        assert (ROOT / relative).exists(), f"the README links a missing file: {relative}"


_HISTORY_TALK = re.compile(r"FINDINGS|\bissue\s+#?\d+|\bour defect\b|\bdefect \d+\b", re.I)
FAMILIES_BEGIN = "<!-- families-table:begin"
FAMILIES_END = "<!-- families-table:end -->"


def test_docs_speak_in_the_projects_own_words() -> None:
    """No issue numbers, no notes file, no 'our defect' in README and docs (history: CHANGELOG.md).
    The generated families table is checked where it is generated."""
    for page in PAGES:
        text = page.read_text()
        if FAMILIES_BEGIN in text:
            text = text[: text.index(FAMILIES_BEGIN)] + text[text.index(FAMILIES_END):]
        found = sorted({m.group(0) for m in _HISTORY_TALK.finditer(text)})
        assert not found, f"{page.relative_to(ROOT)}: {found}: say why in the project's own words"


# ------------------------------------------------------------------------------- plots
def _plots_module():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        return importlib.import_module("plots")
    finally:
        sys.path.remove(str(ROOT / "scripts"))


def test_plot_script_draws_every_plot_from_the_committed_results(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "plots.py"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    plots = _plots_module()
    drawn = sorted(p.name for p in tmp_path.glob("*.png"))
    assert drawn == sorted(f"{plot.name}.png" for plot in plots.PLOTS)
    benchmarks = (DOCS / "benchmarks.md").read_text()
    for plot in plots.PLOTS:
        assert (ROOT / "bench" / "results" / plot.source).exists()
        assert (DOCS / "assets" / f"{plot.name}.png").exists(), (
            f"docs/assets/{plot.name}.png is missing: run `python3 scripts/plots.py` and commit it"
        )
        assert f"assets/{plot.name}.png" in benchmarks, f"the benchmarks page does not show {plot.name}.png"
        assert f"bench/results/{plot.source}" in benchmarks, (
            f"the benchmarks page does not name {plot.source} under {plot.name}.png"
        )


# ----------------------------------------------------------------------------- dashboard
def _dashboard() -> dict:  # type: ignore[type-arg]
    data: dict = json.loads(DASHBOARD.read_text())  # type: ignore[type-arg]
    return data


def _panels(dashboard: dict) -> list[dict]:  # type: ignore[type-arg]
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # panels inside a collapsed row
    return panels


PANEL_TYPES = {"row", "timeseries", "stat", "gauge", "bargauge", "table", "state-timeline", "text", "heatmap"}


def test_dashboard_is_an_importable_grafana_dashboard() -> None:
    dashboard = _dashboard()
    for key, kind in (("title", str), ("uid", str), ("panels", list), ("schemaVersion", int),
                      ("templating", dict), ("time", dict)):
        assert isinstance(dashboard.get(key), kind), f"dashboard.{key} must be a {kind.__name__}"
    assert dashboard.get("id") is None, "an exported dashboard has id null (Grafana assigns one on import)"
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dashboard["uid"])
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids, cells = set(), set()
    for panel in _panels(dashboard):
        assert panel["type"] in PANEL_TYPES, panel["type"]
        assert isinstance(panel["id"], int), panel["id"]
        assert panel["id"] not in ids, f"panel ids must be unique: {panel['id']}"
        ids.add(panel["id"])
        assert panel.get("title"), f"panel {panel['id']} has no title"
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= set(grid) and 0 <= grid["x"] and grid["x"] + grid["w"] <= 24
        for dx in range(grid["w"]):  # no two panels share a grid cell
            for dy in range(grid["h"]):
                cell = (grid["x"] + dx, grid["y"] + dy)
                assert cell not in cells, f"panel {panel['title']!r} overlaps another at {cell}"
                cells.add(cell)
        if panel["type"] == "row":
            continue
        assert panel.get("description"), f"panel {panel['title']!r} has no description"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]


def _exported_metric_names() -> set[str]:
    """Every sample name LifecycleMetrics exposes once each kind of audit event went through it."""
    from prometheus_client import CollectorRegistry

    from lifecycle.ops import LifecycleMetrics

    registry = CollectorRegistry()
    metrics = LifecycleMetrics(registry)
    base = {"module": "transformer", "backend": "cpu", "policy": {"cache_dit": True, "compile": True}}
    events = [
        ("lifecycle.transition", {**base, "trigger": "warm_up", "outcome": "ok", "source": "Compiled",
                                  "dest": "WarmedUp", "duration_ms": 12.0}),
        ("lifecycle.request", {**base, "outcome": "ok", "duration_ms": 5.0, "cached_steps": 2}),
        ("lifecycle.recompile", {**base, "new_graphs": 1}),
        ("lifecycle.warmup_coverage", {**base, "covered": True}),
        ("lifecycle.warmup_shape", {**base, "outcome": "ok"}),
        ("lifecycle.shape_miss", {**base, "policy": "eager"}),
    ]
    for event, fields in events:
        metrics.observe(event, fields)
    names = set()
    for family in registry.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


def test_every_dashboard_query_names_an_exported_metric() -> None:
    pytest.importorskip("prometheus_client")
    exported = _exported_metric_names()
    used = set()
    for panel in _panels(_dashboard()):
        for target in panel.get("targets", []):
            names = set(re.findall(r"\bdit_lifecycle_[a-z_]+", target["expr"]))
            assert names, f"panel {panel['title']!r}: its query names no dit_lifecycle_* metric"
            missing = names - exported
            assert not missing, (
                f"panel {panel['title']!r} queries metrics LifecycleMetrics does not export: {missing}"
            )
            used |= names
    for variable in _dashboard()["templating"]["list"]:
        for name in re.findall(r"\bdit_lifecycle_[a-z_]+", json.dumps(variable.get("query", ""))):
            assert name in exported, f"variable {variable['name']!r} queries {name}"
    # The dashboard shows the state, transitions, requests, recompiles, shape misses and coverage.
    for family in ("state", "transitions_total", "transition_seconds", "requests_total", "request_seconds",
                   "recompiles_total", "shape_misses_total", "warmup_covered"):
        assert any(name.startswith(f"dit_lifecycle_{family}") for name in used), f"no panel shows {family}"


def test_operating_page_describes_every_panel() -> None:
    operating = (DOCS / "operating.md").read_text()
    assert "dashboards/dit-lifecycle.json" in operating
    for panel in _panels(_dashboard()):
        if panel["type"] != "row":
            assert f"**{panel['title']}**" in operating, (
                f"docs/operating.md does not describe {panel['title']!r}"
            )


# --------------------------------------------------------------------------- architecture
_LISTED = re.compile(r"^\|\s*`(?P<path>(?:states|lifecycle|adapters)/[^`]+\.py)`\s*\|(?P<what>[^|]*)\|", re.M)


def test_architecture_page_lists_every_file_once() -> None:
    text = (DOCS / "architecture.md").read_text()
    listed = [(m.group("path"), m.group("what").strip()) for m in _LISTED.finditer(text)]
    paths = [path for path, _ in listed]
    on_disk = sorted(
        str(path.relative_to(ROOT)) for package in PACKAGES for path in (ROOT / package).rglob("*.py")
    )
    twice = sorted({p for p in paths if paths.count(p) > 1})
    assert not twice, f"docs/architecture.md lists these more than once: {twice}"
    missing = sorted(set(on_disk) - set(paths))
    assert not missing, f"add one line each to docs/architecture.md: {missing}"
    ghosts = sorted(set(paths) - set(on_disk))
    assert not ghosts, f"docs/architecture.md lists files that do not exist: {ghosts}"
    empty = [path for path, what in listed if not what]
    assert not empty, f"say in one line what these are for: {empty}"


# -------------------------------------------------------------------------------- diagram
def test_concepts_diagram_is_the_generated_one() -> None:
    from states import LifecyclePolicy
    from states.graph import mermaid

    blocks = re.findall(r"```mermaid\n(.*?)```", (DOCS / "concepts.md").read_text(), re.S)
    assert len(blocks) == 1, f"the concepts page embeds exactly one mermaid diagram, found {len(blocks)}"
    assert blocks[0] == mermaid(LifecyclePolicy()), "run `python -m lifecycle graph` and paste its output"


# ------------------------------------------------------------------------------- families
def _families():  # type: ignore[no-untyped-def]
    for name in ("families", "lifecycle.testing.families"):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError:
            continue
    pytest.fail("the families registry (FAMILIES, render_table) was not found")


def test_families_table_is_generated_and_matches_the_registry() -> None:
    families = _families()
    page = (DOCS / "pipelines.md").read_text()
    assert FAMILIES_BEGIN not in README.read_text(), "the families table lives on docs/pipelines.md"
    table = families.readme_table(page)
    header = families.render_table([]).splitlines()[:2]
    assert table.splitlines()[:2] == header, "stale header: run `python scripts/families_table.py --write`"
    rows = [line for line in table.splitlines()[2:] if line.startswith("| ")]
    names = [row.split(" | ")[0].removeprefix("| ") for row in rows]
    assert names == [f.family for f in families.FAMILIES], (
        "the table's rows are not the registry's families: run `python scripts/families_table.py --write`"
    )
    summary = table.splitlines()[-1]
    assert summary.startswith(f"{len(families.FAMILIES)} families tried:")


# ------------------------------------------------------------------------------- reference
REFERENCED_PACKAGES = (
    "states", "lifecycle", "lifecycle.audit", "lifecycle.ops", "adapters", "lifecycle.testing",
)
_DIRECTIVE = re.compile(
    r"^:::\s*(?P<path>[\w.]+)\s*\n(?P<options>(?:[ \t]+.*\n)*)", re.M
)


def _directives() -> dict[str, list[str] | None]:
    """Each ``::: dotted.path`` of the reference pages, with its ``members:`` list (None: all)."""
    found: dict[str, list[str] | None] = {}
    for page in sorted((DOCS / "reference").glob("*.md")):
        for match in _DIRECTIVE.finditer(page.read_text()):
            options = match.group("options")
            members = None
            if re.search(r"^\s+members:\s*(\[\]|false)\s*$", options, re.M):
                members = []  # the entry shows the class alone
            elif re.search(r"^\s+members:\s*$", options, re.M):
                tail = options.split("members:", 1)[1]
                members = re.findall(r"^\s+-\s+(\w+)\s*$", tail, re.M)
            found[match.group("path")] = members
    return found


def _public_names(package: str) -> list[str]:
    """``__all__``, less re-exported modules (each has its own page)."""
    import inspect

    module = importlib.import_module(package)
    return [
        name for name in getattr(module, "__all__", [])
        if not name.startswith("_") and not inspect.ismodule(getattr(module, name))
    ]


@pytest.mark.parametrize("package", REFERENCED_PACKAGES)
def test_every_public_name_has_a_reference_entry(package: str) -> None:
    referenced = set()
    for path, members in _directives().items():
        referenced.add(path.rsplit(".", 1)[-1])
        referenced.update(members or [])
    missing = [name for name in _public_names(package) if name not in referenced]
    assert not missing, f"{package}: add these to a page under docs/reference/: {missing}"


_MISSING = object()


@pytest.mark.parametrize("package", REFERENCED_PACKAGES)
def test_every_documented_name_has_a_docstring(package: str) -> None:
    """Each public class and function, and each member its reference entry shows (all public
    ones when the entry lists none), has a docstring (an override may inherit its base's)."""
    import inspect

    directives = {path.rsplit(".", 1)[-1]: members for path, members in _directives().items()}
    module = importlib.import_module(package)
    missing = []
    for name in _public_names(package):
        value = getattr(module, name)
        if not (inspect.isclass(value) or inspect.isfunction(value)):
            continue
        if not (value.__doc__ or "").strip():
            missing.append(name)
        if not inspect.isclass(value) or value.__module__.split(".")[0] not in PACKAGES:
            continue
        shown = directives.get(name)
        attrs = shown if shown is not None else [a for a in vars(value) if not a.startswith("_")]
        for attr in attrs:
            member = inspect.getattr_static(value, attr, _MISSING)
            if member is _MISSING:
                missing.append(f"{name}.{attr} (no such member)")
                continue
            if isinstance(member, (property, staticmethod, classmethod)) or inspect.isfunction(member):
                if not (inspect.getdoc(getattr(value, attr)) or "").strip():
                    missing.append(f"{name}.{attr}")
    assert not missing, f"{package}: write docstrings for {missing}"
