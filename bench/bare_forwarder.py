"""A bare TCP forwarder in Python: the ceiling for any proxy written in Python on this machine.

Each client connection gets its own upstream connection (no pooling, no parsing, no policy, no
audit); bytes are relayed both ways with asyncio Protocols on uvloop, with flow control. The
benchmark (bench/pgbench_bench.py) runs pgbench through it beside PgBouncer and sqlproxy, so its
TPS says how much of the gap to PgBouncer is the language and how much is sqlproxy's work.

    python bench/bare_forwarder.py --port 7432 --upstream-port 5432
"""

from __future__ import annotations

import argparse
import asyncio

import uvloop


class _Half(asyncio.Protocol):
    """One side of a relayed connection; writes what it receives to its peer's transport."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Half | None = None
        self.buffer: list[bytes] = []  # bytes received before the peer connected
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.buffer.append(data)
            return
        peer.transport.write(data)

    def eof_received(self) -> bool | None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    # Flow control: when the peer cannot take more, stop reading from this side.
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class _Client(_Half):
    def __init__(self, host: str, port: int) -> None:
        super().__init__()
        self.host, self.port = host, port

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _t, upstream = await loop.create_connection(_Half, self.host, self.port)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        upstream.peer, self.peer = self, upstream
        if self.closed:
            upstream.transport.close()  # type: ignore[union-attr]
            return
        for chunk in self.buffer:
            upstream.transport.write(chunk)  # type: ignore[union-attr]
        self.buffer.clear()


async def serve(port: int, upstream_host: str, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Client(upstream_host, upstream_port), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True, help="loopback port to listen on")
    ap.add_argument("--upstream-port", type=int, required=True, help="PostgreSQL's port on 127.0.0.1")
    args = ap.parse_args()
    uvloop.run(serve(args.port, "127.0.0.1", args.upstream_port))


if __name__ == "__main__":
    main()
