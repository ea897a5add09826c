"""A wire worker's audit forwarder over a real Unix socket pair: batches arrive whole and in
order, and when the proxy's process stops reading (its audit queue is full) the worker is held
back instead of buffering without end or dropping records."""

from __future__ import annotations

import asyncio
import socket

from sqlproxy.audit.record import AuditRecord
from sqlproxy.wire.channel import HIGH_WATER, Channel
from sqlproxy.wire.worker import AuditForwarder


def _record(i: int) -> AuditRecord:
    # 64 KiB of SQL each, so that the socket's and the channel's buffers fill after a few dozen.
    sql = f"SELECT {i} /* " + "x" * 65536 + " */"
    return AuditRecord.new(
        user="u", source="127.0.0.1:1", door="wire", decision="allow", duration_ms=1, sql=sql
    )


async def test_records_arrive_in_order_and_a_reader_that_stops_holds_the_sender_back() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    worker, proxy = await Channel.open(a), await Channel.open(b)
    fwd = AuditForwarder(worker)
    sent = 0
    # The proxy's side calls recv no more: its reader reads ahead a little, then stops reading
    # the socket, and the forwarder refuses once HIGH_WATER bytes wait in its own buffer.
    while True:
        if fwd.try_enqueue(_record(sent)):
            sent += 1
            if sent % 16 == 0:
                await asyncio.sleep(0)  # the event loop sends what it can meanwhile
        else:
            await asyncio.sleep(0.1)
            if worker.buffered > HIGH_WATER:
                break  # still refused after the loop had time to send: held back for good
        # Within a few MiB (the reader reads ahead 2 x HIGH_WATER): 1,000 records are 64 MiB.
        assert sent < 1_000, "the forwarder never stopped taking records"
    held = asyncio.create_task(fwd.enqueue(_record(sent)))
    await asyncio.sleep(0.2)
    assert not held.done()  # waiting for the proxy, not dropping and not growing
    received: list[AuditRecord] = []

    async def read_until(n: int) -> None:
        while len(received) < n:
            msg = await proxy.recv()
            assert msg[0] == "audit"
            received.extend(msg[1])

    reader = asyncio.create_task(read_until(sent + 1))
    await asyncio.wait_for(held, 10)
    await fwd.flush()
    await asyncio.wait_for(reader, 10)
    assert [r.sql for r in received] == [_record(i).sql for i in range(sent + 1)]
    assert fwd.forwarded == sent + 1
    worker.close()
    proxy.close()
