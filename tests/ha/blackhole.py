"""A TCP proxy that can turn into a black hole: a server whose machine vanished, seen from a client.

Forwards both ways until :meth:`BlackHole.swallow`; from then on nothing more is forwarded in
either direction, not even a close (the client's sockets stay open, its reads wait), and new
connections are accepted and then never answered. That is what a client sees when the machine
behind an address is lost or partitioned away: no RST, no FIN, only silence; unlike a crashed
server on a live machine, whose kernel refuses and resets at once.
"""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["BlackHole"]


class BlackHole:
    """Listens on a free loopback port; forwards to ``target_host:target_port`` (a directory:
    PostgreSQL's unix socket in it) until :meth:`swallow`."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.swallowing = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self.port

    def swallow(self) -> None:
        self.swallowing.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        if self.swallowing.is_set():
            return  # accepted, never answered (the socket is closed only by close())
        try:
            host, port = self.target
            if host.startswith("/"):  # a PostgreSQL unix socket directory (the embedded server's)
                up_reader, up_writer = await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
            else:
                up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            writer.close()
            return
        self.writers.append(up_writer)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await src.read(65536):
                if self.swallowing.is_set():
                    await asyncio.Event().wait()  # silence until close()
                dst.write(data)
                await dst.drain()
        if self.swallowing.is_set():
            await asyncio.Event().wait()  # the end is not passed on either
        with contextlib.suppress(Exception):
            dst.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for w in self.writers:
            with contextlib.suppress(Exception):
                w.close()
