"""Run every benchmark in bench/ and print one table: ``python -m bench.run``.

    python -m bench.run [--size-mb 150] [--rss-gb 2] [--quick] [--json out.json]

Each ``bench/*_bench.py`` module's ``run(BenchOptions) -> list[Metric]`` is
called in turn. The table shows absolute numbers, the ratio against each
benchmark's in-run reference, and PASS/MISS for every metric that has a
target (INFO: no target; SKIP: not measured, the note says why). The exit
status is 0 when everything ran, 1 with ``--strict`` when a target was missed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc

import bench
from bench import BenchOptions, Metric, MiB, add_report_options
from gateway.hashing import MAX_CHUNK_BYTES

QUICK_NOTE = ", QUICK (figures meaningless)"

QUICK = {"size_mb": 8, "rss_gb": 32 / 1024, "reps": 2}
"""--quick: sizes that prove the harness works in seconds; the figures mean nothing."""


def discover() -> list[ModuleType]:
    """The benchmark modules of this package (``*_bench``), by name."""
    names = sorted(
        m.name for m in pkgutil.iter_modules(bench.__path__) if m.name.endswith("_bench")
    )
    return [importlib.import_module(f"bench.{name}") for name in names]


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "grpc": grpc.__version__,
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}" if abs(value) < 1 else f"{value:.2f}"


def table(metrics: Sequence[Metric]) -> str:
    rows = [("metric", "value", "unit", "target", "status", "note")]
    for m in metrics:
        rows.append((m.label, _fmt(m.value), m.unit, str(m.target or ""), m.status, m.note))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = []
    for n, r in enumerate(rows):
        cells = [r[0].ljust(widths[0]), r[1].rjust(widths[1])]
        cells += [c.ljust(w) for c, w in zip(r[2:5], widths[2:5], strict=True)]
        lines.append("  ".join([*cells, r[5]]).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> tuple[BenchOptions, argparse.Namespace]:
    p = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    p.add_argument("--size-mb", type=int, default=150, help="throughput object, MiB (150)")
    p.add_argument(
        "--rss-gb", type=float, default=2.0, help="RSS object, GiB (2; 0 skips the RSS run)"
    )
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per side (5)")
    p.add_argument(
        "--chunk-bytes", type=int, default=MiB, help="transfer chunk size, bytes (1 MiB)"
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes: a harness check only")
    add_report_options(p)
    args = p.parse_args(argv)
    sizes = (
        QUICK if args.quick else {"size_mb": args.size_mb, "rss_gb": args.rss_gb, "reps": args.reps}
    )
    if sizes["size_mb"] < 1 or sizes["rss_gb"] < 0 or sizes["reps"] < 1:
        p.error("--size-mb and --reps must be positive, --rss-gb not negative")
    if not 4096 <= args.chunk_bytes <= MAX_CHUNK_BYTES:
        p.error(f"--chunk-bytes must be 4096-{MAX_CHUNK_BYTES} (transfer.chunk_bytes range)")
    opts = BenchOptions(
        size_mb=int(sizes["size_mb"]),
        rss_gb=float(sizes["rss_gb"]),
        reps=int(sizes["reps"]),
        chunk_bytes=args.chunk_bytes,
        workdir=args.workdir,
        keep=args.keep,
        quick=args.quick,
    )
    return opts, args


def run_and_report(
    title: str,
    options: str,
    json_options: dict[str, Any],
    work: Callable[[], list[Metric]],
    json_path: Path | None,
    strict: bool,
) -> int:
    """Run ``work``, print the machine, the options and the table (and write them as
    JSON to ``json_path``); the exit status: 1 when ``strict`` and a target was missed."""
    info = machine()
    load_start = os.getloadavg()[0]
    began = time.monotonic()
    metrics = work()
    elapsed = time.monotonic() - began
    info["loadavg_1min"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
    print(
        f"{title}: {info['cpus']} CPUs ({info['processor']}), "
        f"Python {info['python']}, grpcio {info['grpc']}, {info['date']}"
    )
    print(
        f"options: {options}; ran {elapsed:.0f} s; 1-min load average {load_start:.2f} at "
        f"start, {info['loadavg_1min'][1]:.2f} at end (other work on the machine skews the "
        "figures)"
    )
    print()
    print(table(metrics))
    if json_path:
        payload = {
            "machine": info,
            "options": json_options,
            "seconds": elapsed,
            "metrics": {m.key: m.to_json() for m in metrics},
        }
        json_path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    return 1 if strict and any(m.status == "MISS" for m in metrics) else 0


def main(argv: Sequence[str] | None = None) -> int:
    opts, args = parse_args(argv)

    def work() -> list[Metric]:
        metrics: list[Metric] = []
        for module in discover():
            metrics += module.run(opts)
        return metrics

    return run_and_report(
        "yigong-gateway benchmarks",
        f"size {opts.size_mb} MiB, RSS object {opts.rss_gb:g} GiB, {opts.reps} reps, "
        f"chunk {opts.chunk_bytes} B{QUICK_NOTE if opts.quick else ''}",
        {k: str(v) if isinstance(v, Path) else v for k, v in vars(opts).items()},
        work,
        args.json,
        args.strict,
    )


if __name__ == "__main__":
    sys.exit(main())
