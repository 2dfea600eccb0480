"""A/B of the node's TLS terminator on the transfer bench's gateway measurement.

``python -m bench.tls_ab [--size-mb 150] [--reps 3]``: the same hospital→factory
transfer as ``transfer.gateway_mib_s`` (bench/transfer_bench.py), with
``server.tls_terminator = "gateway"`` (the node's own TLS, audited handshakes) and
``"grpc"`` (gRPC's TLS) on both nodes, alternating, after one untimed warm-up each.
Prints MiB/s and CPU seconds per repetition, the medians and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from bench.transfer_bench import GatewayPair, stamp_payload, write_payload
from tests.cluster import Federation

MiB = 1024 * 1024


class ModePair(GatewayPair):
    """A GatewayPair whose nodes use ``mode`` for their public TLS port."""

    def __init__(self, fed: Federation, workdir: Path, chunk_bytes: int, mode: str) -> None:
        super().__init__(fed, workdir, chunk_bytes)
        self.mode = mode

    def start(self) -> None:
        import tests.cluster as cluster

        original = cluster.render_config

        def render(**kwargs: object) -> str:
            text = original(**kwargs)  # type: ignore[arg-type]
            return text.replace("\n[server]\n", f'\n[server]\ntls_terminator = "{self.mode}"\n')

        cluster.render_config = render
        try:
            super().start()
        finally:
            cluster.render_config = original


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=int, default=150)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    size = args.size_mb * MiB
    with tempfile.TemporaryDirectory(prefix="tls-ab-") as tmp:
        work = Path(tmp)
        fed = Federation(work / "fed")
        payload = work / "payload.bin"
        write_payload(payload, size)
        pairs = {m: ModePair(fed, work / m, MiB, m) for m in ("gateway", "grpc")}
        rates: dict[str, list[float]] = {m: [] for m in pairs}
        cpu: dict[str, list[float]] = {m: [] for m in pairs}
        stamp = 1
        try:
            for pair in pairs.values():
                pair.start()
            for rep in range(args.reps + 1):
                order = ("gateway", "grpc") if rep % 2 else ("grpc", "gateway")
                for mode in order:
                    stamp += 1
                    stamp_payload(payload, stamp)
                    os.sync()
                    r = pairs[mode].send(payload, size, timeout=600)
                    c = sum(r.cpu_seconds.values())
                    each = " ".join(f"{k} {v:.2f}" for k, v in sorted(r.cpu_seconds.items()))
                    print(
                        f"rep {rep} {mode:8s} {r.mib_s:7.1f} MiB/s  cpu {c:.2f} s ({each})"
                        f"{'  (warm-up)' if rep == 0 else ''}",
                        flush=True,
                    )
                    if rep:
                        rates[mode].append(r.mib_s)
                        cpu[mode].append(r.cpu_seconds.get("factory", 0.0))
        finally:
            for pair in pairs.values():
                pair.stop()
    g, b = statistics.median(rates["gateway"]), statistics.median(rates["grpc"])
    print(
        f"gateway terminator: median {g:.1f} MiB/s {sorted(round(x) for x in rates['gateway'])}"
        f" factory cpu {statistics.median(cpu['gateway']):.2f} s"
    )
    print(
        f"grpc TLS:           median {b:.1f} MiB/s {sorted(round(x) for x in rates['grpc'])}"
        f" factory cpu {statistics.median(cpu['grpc']):.2f} s"
    )
    print(f"ratio gateway/grpc: {g / b:.3f}; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
