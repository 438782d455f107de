"""Draw the benchmark plots of the docs from the committed results in ``bench/results/``.

    python3 scripts/plots.py                  # writes docs/assets/*.png
    python3 scripts/plots.py --out /tmp/plots # somewhere else
    python3 scripts/plots.py --list           # the plots and the result file each reads

Every plot reads one JSON file that a script under ``bench/`` wrote, and names the machine it
was measured on (GPU or CPU, torch, cache-dit, diffusers) under the axes, so a picture never
travels without its machine. Re-run a benchmark, commit its JSON, run this script: the docs'
benchmarks page shows the new numbers. Needs matplotlib (the ``docs`` extra).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
ASSETS = ROOT / "docs" / "assets"

# One palette for every plot: the lifecycle's own runs stand out, the rest stays quiet.
LIFECYCLE = "#1f6feb"
TRAP = "#d1242f"
OTHER = "#8c959f"
ACCENT = "#2da44e"
SERIES = ("#8c959f", "#1f6feb", "#bf8700", "#2da44e")


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((RESULTS / name).read_text())
    return data


def machine_line(data: Mapping[str, Any], source: str) -> str:
    """'NVIDIA H100 80GB HBM3, torch 2.11.0+cu130, ...; bench/results/<file>'."""
    machine = data.get("machine", {})
    if machine.get("gpu"):
        gpus = machine.get("gpus") or [machine["gpu"]] * int(machine.get("gpu_count", 1))
        where = machine["gpu"] if len(gpus) <= 1 else f"{len(gpus)}x {machine['gpu']}"
    else:
        cores = machine.get("cores") or machine.get("cpu_count")
        where = f"{machine.get('cpu_model', 'CPU')}, {cores} cores (shared VM)"
    versions = [f"{lib} {machine[lib]}" for lib in ("torch", "cache_dit", "diffusers") if machine.get(lib)]
    text = ", ".join([where, *versions])
    return f"Measured on {text}\nsource: bench/results/{source}"


@dataclass(frozen=True)
class Plot:
    name: str  # file name under the output folder, without .png
    source: str  # the result file under bench/results/
    title: str
    draw: Callable[[Any, dict[str, Any]], None]  # draw(figure, data)
    size: tuple[float, float] = (8.0, 4.2)


def _label_bars(ax: Any, bars: Any, fmt: Callable[[float], str], **kwargs: Any) -> None:
    for bar in bars:
        height = bar.get_height()
        ax.annotate(
            fmt(height), (bar.get_x() + bar.get_width() / 2, height), xytext=(0, 2),
            textcoords="offset points", ha="center", va="bottom", fontsize=8, **kwargs,
        )


def _style(ax: Any) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


# ------------------------------------------------------------------------------------ plots
TRAP_LABELS = {
    "a": "compile, warm up,\nthen mount cache",
    "b": "mount, compile,\n2-step warm-up by hand",
    "c": "ModuleLifecycle\n.prepare",
    "d": "eager +\ncache-dit",
    "e": "compiled,\nno cache",
}


def draw_trap(fig: Any, data: dict[str, Any]) -> None:
    scenarios = data["scenarios"]
    keys = [k for k in TRAP_LABELS if k in scenarios]
    first = [scenarios[k]["first_request_s"] for k in keys]
    steady = [scenarios[k]["steady_median_s"] for k in keys]
    ax = fig.add_subplot(1, 1, 1)
    x = range(len(keys))
    width = 0.38
    colors = [TRAP if k in ("a", "b") else LIFECYCLE if k == "c" else OTHER for k in keys]
    bars = ax.bar([i - width / 2 for i in x], first, width, color=colors)
    ax.bar([i + width / 2 for i in x], steady, width, color=colors, alpha=0.35)
    _label_bars(ax, bars, lambda v: f"{v:.2f} s")
    labels = []
    for k in keys:
        graphs = scenarios[k]["graphs_in_first_request"]
        labels.append(f"{TRAP_LABELS[k]}\n({graphs} new graph{'s' if graphs != 1 else ''} in 1st)")
    ax.set_yscale("log")
    ax.set_ylabel("seconds (log scale)")
    ax.set_xticks(list(x), labels, fontsize=8)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=OTHER, label="first request"),
                       Patch(color=OTHER, alpha=0.35, label="steady request (median)")],
              frameon=False, fontsize=8)
    _style(ax)


def draw_cold_start(fig: Any, data: dict[str, Any]) -> None:
    scenarios = data["scenarios"]
    extra = ", reproducible=True" if data.get("settings", {}).get("reproducible") else ""
    plans = [("whole", f'CompilePlan(scope="model"{extra})'),
             ("regional", f'CompilePlan(scope="blocks"{extra})')]
    ax = fig.add_subplot(1, 1, 1)
    width = 0.38
    cold = [scenarios[f"{p}-cold"]["prepare_s"] for p, _ in plans]
    warm = [scenarios[f"{p}-warm"]["prepare_s"] for p, _ in plans]
    x = range(len(plans))
    bars_cold = ax.bar([i - width / 2 for i in x], cold, width, color=OTHER,
                       label="cold start (empty caches)")
    bars_warm = ax.bar([i + width / 2 for i in x], warm, width, color=LIFECYCLE,
                       label="restart from artifact_dir")
    _label_bars(ax, bars_cold, lambda v: f"{v:.1f} s")
    _label_bars(ax, bars_warm, lambda v: f"{v:.1f} s")
    for i, (p, _) in enumerate(plans):
        ratio = scenarios[f"{p}-warm"]["prepare_s"] / scenarios[f"{p}-cold"]["prepare_s"]
        ax.annotate(f"{ratio:.2f}x of cold", (i + width / 2, warm[i]), xytext=(0, 14),
                    textcoords="offset points", ha="center", fontsize=8, color=LIFECYCLE)
    ax.set_ylabel("prepare(): mount, compile, warm up (s)")
    ax.set_xticks(list(x), [label for _, label in plans], fontsize=9)
    ax.legend(frameon=False, fontsize=8, loc="upper right")
    _style(ax)


def draw_flux_dev(fig: Any, data: dict[str, Any]) -> None:
    scenarios = data["scenarios"]
    order = [("whole-cold", 'scope="model"'), ("regional-cold", 'scope="blocks"')]
    left = fig.add_subplot(1, 2, 1)
    bars = left.bar([label for _, label in order], [scenarios[k]["prepare_s"] for k, _ in order],
                    color=[OTHER, LIFECYCLE], width=0.55)
    _label_bars(left, bars, lambda v: f"{v:.1f} s")
    left.set_ylabel("cold prepare (s)")
    left.set_title("cold start", fontsize=9)
    _style(left)
    right = fig.add_subplot(1, 2, 2)
    width = 0.38
    x = range(len(order))
    first = [scenarios[k]["first_request_s"] for k, _ in order]
    steady = [scenarios[k]["steady_median_s"] for k, _ in order]
    right.bar([i - width / 2 for i in x], first, width, color=LIFECYCLE, label="first request")
    right.bar([i + width / 2 for i in x], steady, width, color=LIFECYCLE, alpha=0.35, label="steady")
    for i in range(len(order)):
        ratio = first[i] / steady[i]
        right.annotate(f"{ratio:.3f}x", (i - width / 2, first[i]), xytext=(0, 2), textcoords="offset points",
                       ha="center", fontsize=8)
    right.set_xticks(list(x), [label for _, label in order])
    right.set_ylabel("28-step request (s)")
    right.set_title("first request vs steady", fontsize=9)
    right.set_ylim(0, max(first + steady) * 1.3)
    right.legend(frameon=False, fontsize=8, loc="upper right", ncols=2)
    _style(right)


SHAPE_MODES = [
    ("static", "static per bucket\n(torch dynamic=False)"),
    ("shared", "shared graphs\n(the default)"),
    ("default", "torch's automatic\ndynamic"),
]


def draw_shapes(fig: Any, data: dict[str, Any]) -> None:
    modes = {k: v for k, v in data["modes"].items()}
    buckets = list(data["buckets"])
    present = [(m, label) for m, label in SHAPE_MODES if m in modes]
    width = 0.8 / len(present)
    steady_ax = fig.add_subplot(1, 3, (1, 2))
    for j, (mode, label) in enumerate(present):
        values = [modes[mode]["buckets"][b]["steady_median_s"] * 1000 for b in buckets]
        offsets = [i + (j - (len(present) - 1) / 2) * width for i in range(len(buckets))]
        steady_ax.bar(offsets, values, width, color=SERIES[j], label=label.replace("\n", " "))
        for off, b in zip(offsets, buckets, strict=True):
            ratio = modes[mode]["buckets"][b]["first_over_steady"]
            steady_ax.annotate(f"{ratio:.2f}x", (off, modes[mode]["buckets"][b]["steady_median_s"] * 1000),
                               xytext=(0, 2), textcoords="offset points", ha="center", fontsize=6.5,
                               rotation=90)
    steady_ax.set_xticks(range(len(buckets)), buckets)
    steady_ax.set_ylabel("steady 28-step request (ms)")
    steady_ax.set_title("per bucket (label: first request / steady)", fontsize=9)
    steady_ax.legend(frameon=False, fontsize=7, loc="upper right")
    steady_ax.set_ylim(0, max(modes[m]["buckets"][b]["steady_median_s"] for m, _ in present for b in buckets)
                       * 1000 * 1.35)
    _style(steady_ax)
    prep_ax = fig.add_subplot(1, 3, 3)
    bars = prep_ax.bar(range(len(present)), [modes[m]["prepare_s"] for m, _ in present],
                       color=[SERIES[j] for j in range(len(present))])
    _label_bars(prep_ax, bars, lambda v: f"{v:.0f} s")
    prep_ax.set_xticks(range(len(present)), [label for _, label in present], fontsize=6.5)
    prep_ax.set_ylabel(f"prepare, {len(buckets)} buckets (s)")
    prep_ax.set_title("warm-up of all buckets", fontsize=9)
    _style(prep_ax)


def draw_unwarmed(fig: Any, data: dict[str, Any]) -> None:
    static = data["modes"]["static"]["undeclared"]
    steady = static["compile"]["steady_median_s"]
    rows = [
        ('on_unwarmed="compile"\n(compiles inline)', static["compile"]["first_s"], TRAP),
        ('on_unwarmed="eager"\n(runs eager)', static["eager"]["first_s"], LIFECYCLE),
        ('on_unwarmed="fail"\n(refused, 0 calls)', static["fail_named"]["seconds"], ACCENT),
        ("steady request at\nthat shape, compiled", steady, OTHER),
    ]
    ax = fig.add_subplot(1, 1, 1)
    bars = ax.barh([r[0] for r in rows], [r[1] for r in rows], color=[r[2] for r in rows])
    for bar, (_, value, _) in zip(bars, rows, strict=True):
        text = f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s ({value / steady:.0f}x steady)"
        ax.annotate(text, (bar.get_width(), bar.get_y() + bar.get_height() / 2), xytext=(3, 0),
                    textcoords="offset points", va="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(f"first request at the undeclared {data['undeclared']} (s, log scale)")
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="x", alpha=0.3)


def _distinct(count: int, processes: int) -> str:
    if count == 1:
        return f"one output, bit-identical in all {processes} processes"
    return f"{count} different outputs from {processes} processes"


def draw_replicas(fig: Any, data: dict[str, Any]) -> None:
    summary = data["summary"]
    ax = fig.add_subplot(1, 1, 1)
    settings = [("default", "default"), ("repro", "CompilePlan(reproducible=True)")]
    width = 0.38
    for j, (key, label) in enumerate(settings):
        values = [s * 1000 for s in summary[key]["steady_median_s_per_process"]]
        offsets = [i + (j - 0.5) * width for i in range(len(values))]
        bars = ax.bar(offsets, values, width, color=OTHER if j == 0 else LIFECYCLE,
                      label=f"{label}: {_distinct(summary[key]['distinct_outputs'], len(values))}")
        _label_bars(ax, bars, lambda v: f"{v:.0f}")
    ax.set_xticks(range(3), [f"process {i + 1}" for i in range(3)])
    ax.set_ylabel("steady 28-step request (ms)")
    ax.set_ylim(0, max(max(summary[k]["steady_median_s_per_process"]) for k, _ in settings) * 1000 * 1.3)
    ax.legend(frameon=False, fontsize=8, loc="upper left")
    _style(ax)


def draw_overhead(fig: Any, data: dict[str, Any]) -> None:
    per_trigger = data["per_trigger_median_us"]
    results = data["results"]
    rows = [(name, value, LIFECYCLE) for name, value in per_trigger.items()]
    rows.append(("request (empty body)", results["lifecycle_request"]["median_us"], LIFECYCLE))
    rows.append(("illegal trigger (refused)", results["lifecycle_refused"]["median_us"], LIFECYCLE))
    rows.append(("floor: transitions.Machine trigger", results["transitions_Machine"]["median_us"], OTHER))
    rows.append(("floor: one structlog JSON event", results["structlog_json_event"]["median_us"], OTHER))
    ax = fig.add_subplot(1, 1, 1)
    bars = ax.barh([r[0] for r in rows], [r[1] for r in rows], color=[r[2] for r in rows])
    for bar, (_, value, _) in zip(bars, rows, strict=True):
        ax.annotate(f"{value:.1f} us", (bar.get_width(), bar.get_y() + bar.get_height() / 2), xytext=(3, 0),
                    textcoords="offset points", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("median per call, work stubbed out (microseconds)")
    ax.tick_params(axis="y", labelsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="x", alpha=0.3)


PLOTS: tuple[Plot, ...] = (
    Plot("trap", "gpu_trap_h100.json",
         "First request after warm-up, by order of operations (Flux-architecture DiT, 28 steps)", draw_trap,
         (9.0, 4.8)),
    Plot("cold_start", "gpu_cold_start-NVIDIA-H200-reproducible.json",
         "Cold start vs restart from compile artifacts, per compile plan", draw_cold_start),
    Plot("flux_dev", "gpu_cold_start-NVIDIA-H100-80GB-HBM3-19x38.json",
         "FLUX.1-dev's size (19 double + 38 single blocks): cold start and first request", draw_flux_dev),
    Plot("shapes", "gpu_shapes_h200.json",
         "Four declared buckets: steady latency per bucket and warm-up time", draw_shapes, (10.0, 4.6)),
    Plot("unwarmed", "gpu_shapes_h200.json",
         "A request at a shape no warm-up covered, per on_unwarmed policy", draw_unwarmed, (8.5, 3.6)),
    Plot("replicas", "gpu_replicas-NVIDIA-H200.json",
         "Three replica processes: outputs and steady latency", draw_replicas, (8.0, 3.8)),
    Plot("overhead", "cpu_overhead.json",
         "What the lifecycle itself costs per call", draw_overhead, (8.0, 4.0)),
)


def render(plot: Plot, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = load(plot.source)
    fig = plt.figure(figsize=plot.size, dpi=110)
    plot.draw(fig, data)
    fig.suptitle(plot.title, fontsize=10.5)
    fig.text(0.01, 0.01, machine_line(data, plot.source), fontsize=7, color="#57606a", va="bottom")
    fig.tight_layout(rect=(0, 0.08, 1, 0.97))
    path = out / f"{plot.name}.png"
    # No timestamp or version in the file: the same results draw the same bytes.
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ASSETS, help="folder for the PNG files (docs/assets)")
    parser.add_argument(
        "--list", action="store_true", help="print each plot and its result file, draw nothing"
    )
    args = parser.parse_args(argv)
    if args.list:
        for plot in PLOTS:
            print(f"{plot.name}.png\tbench/results/{plot.source}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for plot in PLOTS:
        path = render(plot, args.out)
        print(path, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
