"""A WAN in a box: an asyncio TCP proxy that adds latency and limits bandwidth.

    python -m bench.wan_proxy --target 127.0.0.1:PORT [--listen 127.0.0.1:0]
        [--delay-ms 20] [--mbit 100] [--ready-file PATH]

Every connection accepted on ``--listen`` is forwarded to ``--target``. Each
direction is one link **shared by every connection** (as on a real WAN line: four TCP
streams share its 100 Mbit/s, they do not get 100 each): a byte is put on the wire when
the link is free (a token
bucket of ``--mbit`` Mbit/s, counting TCP payload bytes, holding at most two reads
of 64 KiB, so timer wake-ups a little late do not cost link time) and arrives
``--delay-ms`` later (one-way; 20 ms each way = 40 ms round trip). The reader waits
while the link is busy, so a fast sender is held back by TCP flow control as on a
real link, and the bytes in flight are at most one delay's worth (bandwidth-delay
product) plus a burst. The kernel on the bench
machine has no ``netem``; this is the bench's substitute (see bench/README.md,
"Study benchmark", for its own calibration against a plain socket stream).

Not a general-purpose proxy: loopback benchmarks only; it logs nothing but errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

READ_BYTES = 64 * 1024
BURST_READS = 2
DEFAULT_DELAY_MS = 20.0
DEFAULT_MBIT = 100.0


def link_bytes_per_s(mbit: float) -> float:
    return mbit * 1e6 / 8


class Link:
    """One direction of the WAN line, shared by all connections through the proxy."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.free_at = 0.0  # when the link has finished sending what it took so far
        self.burst = BURST_READS * READ_BYTES / rate

    def take(self, now: float, nbytes: int) -> float:
        """Put ``nbytes`` on the line; when their last byte has left. An idle link saves
        up at most BURST_READS reads' worth, so a wake-up a little late (timer
        granularity) does not lose link time."""
        self.free_at = max(now - self.burst, self.free_at) + nbytes / self.rate
        return self.free_at


async def _pump(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    delay: float,
    link: Link,
) -> None:
    """One direction of one connection over ``link``, delayed by ``delay`` seconds;
    closes the write side when the read side ends."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            arrive, data = await queue.get()
            wait = arrive - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(OSError):
            if writer.can_write_eof():
                writer.write_eof()

    sender = asyncio.create_task(deliver())
    try:
        while True:
            data = await reader.read(READ_BYTES)
            now = loop.time()
            if not data:
                queue.put_nowait((max(now, link.free_at) + delay, b""))
                break
            free_at = link.take(now, len(data))
            queue.put_nowait((free_at + delay, data))
            busy = free_at - loop.time()
            if busy > 0:
                await asyncio.sleep(busy)  # the link is still sending: read no more yet
        await sender
    except (ConnectionError, OSError):
        sender.cancel()
    finally:
        if not sender.done():
            sender.cancel()
        with contextlib.suppress(Exception):
            await sender


async def _handle(
    client_r: asyncio.StreamReader,
    client_w: asyncio.StreamWriter,
    target: tuple[str, int],
    delay: float,
    links: tuple[Link, Link],
) -> None:
    try:
        server_r, server_w = await asyncio.open_connection(*target)
    except OSError as exc:
        print(f"wan_proxy: cannot connect to {target[0]}:{target[1]}: {exc}", file=sys.stderr)
        client_w.close()
        return
    try:
        await asyncio.gather(
            _pump(client_r, server_w, delay, links[0]),
            _pump(server_r, client_w, delay, links[1]),
            return_exceptions=True,
        )
    finally:
        for w in (client_w, server_w):
            with contextlib.suppress(Exception):
                w.close()


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
    return host, int(port)


async def serve(
    listen: tuple[str, int],
    target: tuple[str, int],
    delay_ms: float,
    mbit: float,
    ready_file: Path | None,
) -> None:
    delay, rate = delay_ms / 1000, link_bytes_per_s(mbit)
    links = (Link(rate), Link(rate))  # client -> target, target -> client: one line each
    server = await asyncio.start_server(
        lambda r, w: _handle(r, w, target, delay, links), listen[0], listen[1]
    )
    port = server.sockets[0].getsockname()[1]
    if ready_file is not None:
        tmp = ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"port": port, "pid": os.getpid()}))
        os.replace(tmp, ready_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.wan_proxy", description=__doc__)
    p.add_argument("--listen", type=_addr, default=("127.0.0.1", 0))
    p.add_argument("--target", type=_addr, required=True)
    p.add_argument("--delay-ms", type=float, default=DEFAULT_DELAY_MS, help="one-way (20)")
    p.add_argument("--mbit", type=float, default=DEFAULT_MBIT, help="per direction (100)")
    p.add_argument("--ready-file", type=Path)
    args = p.parse_args(argv)
    if args.delay_ms < 0 or args.mbit <= 0:
        p.error("--delay-ms must not be negative and --mbit must be positive")
    asyncio.run(serve(args.listen, args.target, args.delay_ms, args.mbit, args.ready_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
