"""Benchmarks of yigong-gateway, each measured against a reference in the same run.

Every benchmark module in this package is named ``*_bench.py`` and exposes
``run(options: BenchOptions) -> list[Metric]``; ``python -m bench.run`` finds
and runs them all and prints one table (see bench/README.md).
"""

from __future__ import annotations

import argparse
import operator
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

MiB = 1024 * 1024

Status = Literal["PASS", "MISS", "INFO", "SKIP"]


@dataclass(frozen=True)
class Target:
    """A requirement on a metric: ``value <op> threshold``."""

    op: Literal[">=", "<"]
    threshold: float

    def met(self, value: float) -> bool:
        compare = operator.ge if self.op == ">=" else operator.lt
        return bool(compare(value, self.threshold))

    def __str__(self) -> str:
        return f"{self.op} {self.threshold:g}"


@dataclass
class Metric:
    """One number the benchmarks report (``value`` is None when it was skipped)."""

    key: str
    label: str
    value: float | None
    unit: str
    target: Target | None = None
    note: str = ""
    samples: list[float] = field(default_factory=list)

    @property
    def status(self) -> Status:
        if self.value is None:
            return "SKIP"
        if self.target is None:
            return "INFO"
        return "PASS" if self.target.met(self.value) else "MISS"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["target"] = str(self.target) if self.target else None
        out["status"] = self.status
        return out


@dataclass(frozen=True)
class BenchOptions:
    """What ``python -m bench.run`` was asked to do."""

    size_mb: int = 150
    """Object size (MiB) for the throughput comparison."""
    rss_gb: float = 2.0
    """Object size (GiB) for the peak-RSS measurement."""
    reps: int = 5
    """Timed repetitions of each side of the throughput comparison (median reported)."""
    chunk_bytes: int = MiB
    """Transfer chunk size, for the gateway (transfer.chunk_bytes) and the bare stream."""
    workdir: Path | None = None
    """Where nodes, payloads and stores live (a fresh temporary directory by default)."""
    keep: bool = False
    """Keep the work directory (node logs, stores) instead of deleting it."""
    quick: bool = False
    """Tiny sizes: proves the harness works; the figures mean nothing."""
    min_free_factor: float = 5.0
    """The RSS run needs this many times its object size free on disk (source file,
    hospital store, submit spool, factory spool and store)."""


def add_report_options(p: argparse.ArgumentParser) -> None:
    """The options every benchmark command shares: where results and work go."""
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument("--workdir", type=Path, help="parent of the work directory (system temp)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")


class Started:
    """Something a benchmark starts and must stop: ``with`` calls :meth:`start` (and
    :meth:`stop` if starting fails half-way), and :meth:`stop` on leaving."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class NodePair(Started):
    """A hospital and a factory node process a benchmark started (``NodeProcess`` from
    tests/cluster.py, or None before start): their pids and the ends of their logs."""

    hospital: Any
    factory: Any

    def pids(self) -> dict[str, int]:
        out = {}
        for name, proc in (("hospital", self.hospital), ("factory", self.factory)):
            if proc is not None and proc.proc is not None:
                out[name] = proc.proc.pid
        return out

    def logs_tail(self) -> str:
        parts = []
        for proc in (self.hospital, self.factory):
            if proc is not None and proc.log_path.exists():
                parts.append(f"--- {proc.log_path} ---\n{proc.log_path.read_text()[-3000:]}")
        return "\n".join(parts)


class Poller(Started):
    """Calls :meth:`poll` every ``interval`` seconds in a background thread while it
    is started."""

    def __init__(self, name: str, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def poll(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.interval)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
