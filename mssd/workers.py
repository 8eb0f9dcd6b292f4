"""Extra IMAP processes (``imap.workers``): one Python process uses one core,
and an IMAP server spends most of its time in Python, so a machine with more
cores serves more IMAP commands with more processes (bench/README.md).

The ``mssd serve`` process binds the IMAP listening sockets itself, with
``SO_REUSEPORT``, and starts ``imap.workers - 1`` children that bind their own
sockets to the same addresses: the kernel spreads new connections over the
processes (by a hash of their addresses), where one socket shared by all
would hand most of them to whichever process wakes first. Each child
runs only IMAP, with its own connection pool, change bus and audit writer, on
the same store. On PostgreSQL, LISTEN/NOTIFY carries every change between
processes (DESIGN.md "Scale-out"). On a SQLite file, the parent is the hub of
the change bus (``mssd.store.change_links``): each child gets its end of a
socket pair of its own (``--changes-fd``), and the parent forwards what one
child sends to the others; the writers of all processes take turns on the
database's writer lock (``mssd.store.engine.WriterLock``). An in-memory SQLite
store cannot be shared: ``config.validate`` refuses workers there.

Invariants:
- a child never outlives the parent: it watches a pipe whose other end only
  the parent holds, and stops when it reads end-of-file (the parent exited,
  whatever the way);
- a child that dies while the parent runs is started again, at most once per
  :data:`_RESTART_DELAY` seconds, and the parent says so in its log; on
  SQLite it gets a new socket pair, and the old link is closed once the child
  has exited (whereupon the other processes re-read every folder: the child
  may have committed changes it had not sent);
- at stop, children get SIGTERM (they finish their commits as ``serve``
  does) and are killed after :data:`_STOP_GRACE` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Sequence

from mssd import background
from mssd.store.change_links import Link
from mssd.store.changes import ChangeBus

log = logging.getLogger(__name__)

_RESTART_DELAY = 1.0
_STOP_GRACE = 10.0
_START_TIMEOUT = 60.0
READY_LINE = b"mssd imap worker ready\n"
"""What a worker prints on its standard output once it accepts connections."""


def bind_listening_socket(name: str, address: str, *, backlog: int = 512) -> socket.socket:
    """A listening TCP socket for ``host:port`` (``[v6]:port`` too) that other
    processes of this user may bind as well (``SO_REUSEPORT``)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server(
            (host, int(port)), family=family, backlog=backlog, reuse_port=True
        )
    except (OSError, ValueError) as error:
        raise OSError(f"cannot listen for imap.{name}_listen on {address}: {error}") from error


def bound_address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def worker_sockets(spec: str) -> dict[str, socket.socket]:
    """A worker's own sockets on the parent's addresses: ``imap=127.0.0.1:143,...``."""
    return {
        name: bind_listening_socket(name, address)
        for name, _, address in (item.partition("=") for item in spec.split(","))
    }


def watch_parent(fd: int, stop: asyncio.Event) -> None:
    """Set ``stop`` when the parent's end of the pipe closes."""
    loop = asyncio.get_running_loop()

    def readable() -> None:
        if not os.read(fd, 4096):
            loop.remove_reader(fd)
            stop.set()

    loop.add_reader(fd, readable)


class Workers:
    """The parent's side: starts, watches and stops the child processes."""

    def __init__(
        self,
        command: Sequence[str],
        sockets: dict[str, socket.socket],
        count: int,
        *,
        hub: ChangeBus | None = None,
    ) -> None:
        self._command = list(command)
        self._sockets = sockets
        self._count = count
        self._hub = hub
        """The parent's change bus when it links the children (SQLite)."""
        self._processes: dict[int, asyncio.subprocess.Process] = {}
        self._links: dict[int, Link] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._pipe_read, self._pipe_write = os.pipe()
        os.set_inheritable(self._pipe_read, True)
        self.restarts = 0

    def _args(self, changes_fd: int | None) -> list[str]:
        addresses = ",".join(f"{name}={bound_address(s)}" for name, s in self._sockets.items())
        return [
            *self._command,
            "serve",
            "--imap-worker",
            addresses,
            "--parent-fd",
            str(self._pipe_read),
            *(["--changes-fd", str(changes_fd)] if changes_fd is not None else []),
        ]

    async def _spawn(self, number: int) -> asyncio.subprocess.Process:
        theirs = None
        if self._hub is not None:
            # Linked before the child starts: what the parent publishes meanwhile
            # waits in the socket for the child to read it.
            ours, theirs = socket.socketpair()
            self._links[number] = await self._hub.attach(ours, f"to IMAP worker {number}")
        try:
            process = await asyncio.create_subprocess_exec(
                *self._args(None if theirs is None else theirs.fileno()),
                pass_fds=[self._pipe_read, *([] if theirs is None else [theirs.fileno()])],
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                # Terminal signals reach the parent only; it stops the children itself.
                start_new_session=True,
            )
        finally:
            if theirs is not None:
                theirs.close()  # the child's now; a restarted child gets a new pair
        self._processes[number] = process
        assert process.stdout is not None
        try:
            line = await asyncio.wait_for(process.stdout.readline(), _START_TIMEOUT)
        except TimeoutError:
            line = b""
        if line == READY_LINE:
            log.info("IMAP worker %d started (pid %d)", number, process.pid)
        else:
            log.error("IMAP worker %d (pid %d) did not start", number, process.pid)
        return process

    async def _keep(self, number: int, started: asyncio.Future[None]) -> None:
        while not self._stopping:
            process = await self._spawn(number)
            if not started.done():
                started.set_result(None)
            status = await process.wait()
            link = self._links.pop(number, None)
            if link is not None:
                link.close()
            if self._stopping:
                return
            self.restarts += 1
            log.error(
                "IMAP worker %d (pid %d) exited with %s; restarting", number, process.pid, status
            )
            await asyncio.sleep(_RESTART_DELAY)

    async def start(self) -> None:
        """Start the workers; returns once each accepts connections (or failed to)."""
        loop = asyncio.get_running_loop()
        started: list[asyncio.Future[None]] = []
        for number in range(1, self._count + 1):
            started.append(loop.create_future())
            task = asyncio.create_task(
                self._keep(number, started[-1]), name=f"imap-worker-{number}"
            )
            self._tasks.append(task)
        await asyncio.gather(*started)

    async def stop(self) -> None:
        self._stopping = True
        for process in self._processes.values():
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
        for process in self._processes.values():
            try:
                await asyncio.wait_for(process.wait(), _STOP_GRACE)
            except TimeoutError:
                log.warning("IMAP worker pid %d did not stop in time; killing it", process.pid)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        await background.cancel(*self._tasks)
        for link in self._links.values():
            link.close()
        os.close(self._pipe_write)
        os.close(self._pipe_read)
