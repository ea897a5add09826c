"""The link between the proxy and one of its wire worker processes: a Unix socket pair carrying
length-prefixed pickled messages, both ways.

Pickle is safe here only because both ends are the same program: the socket pair is made by the
proxy and inherited by the child it starts, and no one else can connect to it. Messages are tuples
whose first item names the kind (see :mod:`sqlproxy.wire.workers`)."""

from __future__ import annotations

import asyncio
import pickle
import socket
import struct
from typing import Any

_LEN = struct.Struct(">I")
# A frame longer than this means the stream is corrupt, not a big batch: a batch of audit records
# is at most a few MiB.
MAX_FRAME = 256 * 1024 * 1024
# Past this many bytes waiting in the socket's send buffer a sender should wait (drain).
HIGH_WATER = 4 * 1024 * 1024


class ChannelClosed(Exception):
    """The other end has gone (or sent something that is not a frame)."""


class Channel:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._closed = False

    @classmethod
    async def open(cls, sock: socket.socket) -> Channel:
        # The reader's limit is how much it reads ahead of recv() before it stops reading the
        # socket (twice the limit): small, so that a receiver that stops calling recv (the
        # proxy's audit queue is full) holds the sender back within a few MiB. readexactly
        # reads frames larger than that all the same.
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=HIGH_WATER)
        writer.transport.set_write_buffer_limits(high=HIGH_WATER)
        return cls(reader, writer)

    @property
    def closed(self) -> bool:
        return self._closed or self._writer.is_closing()

    @property
    def buffered(self) -> int:
        """Bytes written and not yet taken by the other end's socket."""
        return self._writer.transport.get_write_buffer_size()

    def send(self, message: tuple[Any, ...]) -> None:
        """Queue ``message`` (never blocks; see ``buffered`` and ``drain``). Dropped silently once
        the other end has gone: the reader of this channel learns that from ``recv``."""
        if self.closed:
            return
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self._writer.write(_LEN.pack(len(data)) + data)

    async def drain(self) -> None:
        if self.closed:
            raise ChannelClosed
        try:
            await self._writer.drain()
        except (ConnectionError, OSError) as e:
            raise ChannelClosed from e

    async def recv(self) -> tuple[Any, ...]:
        try:
            head = await self._reader.readexactly(_LEN.size)
            (n,) = _LEN.unpack(head)
            if n > MAX_FRAME:
                raise ChannelClosed(f"frame of {n} bytes")
            data = await self._reader.readexactly(n)
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            self._closed = True
            raise ChannelClosed from e
        message = pickle.loads(data)  # noqa: S301 - our own child process, see the module doc
        if not isinstance(message, tuple) or not message:
            raise ChannelClosed("not a message")
        return message

    def close(self) -> None:
        self._closed = True
        self._writer.close()
