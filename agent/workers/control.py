"""The control channel between the supervisor and one worker.

One AF_UNIX SOCK_STREAM socketpair per worker. A frame is a `!I` length, then a pickle
(protocol 5: both ends are this program's own processes, so pickle is no trust boundary). A
message is a tuple:

    ("q", id, op, args)            a request: the other end answers with ("r", id, ...)
    ("n", 0, op, args)             a notification: no answer
    ("r", id, True, value)         the handler's result
    ("r", id, False, (code, msg))  the handler raised

End of file is death: pending requests fail with `WorkerGone`, and `wait_closed` returns. A
worker treats it as "the supervisor is gone: drain and exit"; the supervisor as "the worker is
gone". Neither end needs a pidfd or SIGCHLD for it.
"""

from __future__ import annotations

import asyncio
import inspect
import pickle
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any, Final

from agent.errors import MeshagentError
from agent.logs import get_logger

log = get_logger("meshagent.workers")

HEADER: Final = struct.Struct("!I")
# A directory of 5,000 endpoints pickles to a few MB: this only catches a corrupt stream.
MAX_FRAME: Final = 256 * 2**20

Handler = Callable[[str, dict[str, Any]], "Awaitable[Any] | Any"]
"""Serves the other end's requests and notifications: `(op, args) -> result` (or an awaitable
of it). An exception is sent back to a request as `ChannelError`."""


class WorkerGone(MeshagentError):
    """The other end of a control channel closed it (the process exited or was killed)."""

    code = "worker_gone"


class ChannelError(MeshagentError):
    """The other end's handler failed on a request (its code and message are carried over)."""

    code = "worker_op_failed"


class _Frames(asyncio.Protocol):
    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Set here, not after `open`'s await: frames already waiting arrive before it resumes.
        self.channel._transport = transport  # type: ignore[assignment]  # a stream socket's

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        while len(buf) >= HEADER.size:
            (size,) = HEADER.unpack_from(buf)
            if size > MAX_FRAME:
                log.error("control.bad_frame", channel=self.channel.name, size=size)
                self.channel.close()
                return
            end = HEADER.size + size
            if len(buf) < end:
                return
            message = pickle.loads(memoryview(buf)[HEADER.size : end])  # noqa: S301 - our own processes
            del buf[:end]
            self.channel._received(message)

    def eof_received(self) -> bool:
        return False  # close the transport: EOF is death

    def connection_lost(self, exc: BaseException | None) -> None:
        self.channel._lost()


class Channel:
    """Requests and notifications over one socket of a socketpair; see the module docstring.
    Build it with `await Channel.open(sock)` inside the loop that will use it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._transport: asyncio.Transport | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._next_id = 0
        self._handler: Handler | None = None
        self._backlog: list[tuple[Any, ...]] = []  # frames that came before a handler was set
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @classmethod
    async def open(cls, sock: socket.socket, handler: Handler | None = None, name: str = "") -> Channel:
        """Take over `sock` (one end of a socketpair): from now on the channel owns it."""
        channel = cls(name)
        channel._handler = handler
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.connect_accepted_socket(lambda: _Frames(channel), sock=sock)
        return channel

    @property
    def closed(self) -> bool:
        return self._closed.done()

    async def wait_closed(self) -> None:
        """Until the other end closes (or `close`)."""
        await asyncio.shield(self._closed)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # --- sending -------------------------------------------------------------------------

    def _send(self, message: tuple[Any, ...]) -> None:
        if self._transport is None or self._transport.is_closing():
            raise WorkerGone(f"control channel {self.name} is closed", "the process has exited")
        payload = pickle.dumps(message, protocol=5)
        self._transport.write(HEADER.pack(len(payload)) + payload)

    def notify(self, op: str, **args: Any) -> None:
        """Send `op` without waiting for an answer. Raises WorkerGone once the channel closed."""
        self._send(("n", 0, op, args))

    async def request(self, op: str, timeout: float = 5.0, **args: Any) -> Any:  # noqa: ASYNC109
        """Send `op` and wait for the other end's answer. Raises WorkerGone (the channel
        closed, now or while waiting), ChannelError (the handler failed) or TimeoutError."""
        self._next_id += 1
        rid = self._next_id
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._send(("q", rid, op, args))
        self._pending[rid] = future
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._pending.pop(rid, None)

    # --- receiving -----------------------------------------------------------------------

    async def serve(self, handler: Handler) -> None:
        """Answer the other end with `handler` until the channel closes."""
        self._handler = handler
        backlog, self._backlog = self._backlog, []
        for message in backlog:
            self._received(message)
        await self.wait_closed()

    def _received(self, message: tuple[Any, ...]) -> None:
        kind, rid, a, b = message
        if kind == "r":
            future = self._pending.get(rid)
            if future is not None and not future.done():
                if a:
                    future.set_result(b)
                else:
                    future.set_exception(ChannelError(b[1], code=b[0]))
            return
        if self._handler is None:
            self._backlog.append(message)
            return
        try:
            result = self._handler(a, b)
        except Exception as exc:  # carried to the requester
            self._answer(kind, rid, op=a, error=exc)
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(self._finish(kind, rid, a, result))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            self._answer(kind, rid, op=a, value=result)

    async def _finish(self, kind: str, rid: int, op: str, result: Awaitable[Any]) -> None:
        try:
            value = await result
        except Exception as exc:  # carried to the requester
            self._answer(kind, rid, op=op, error=exc)
        else:
            self._answer(kind, rid, op=op, value=value)

    def _answer(
        self, kind: str, rid: int, op: str, value: Any = None, error: Exception | None = None
    ) -> None:
        if error is not None:
            code = error.code if isinstance(error, MeshagentError) else type(error).__name__
            log.warning("control.op_failed", channel=self.name, op=op, code=code, error=str(error))
        if kind != "q" or self.closed:
            return
        if error is None:
            reply: tuple[Any, ...] = ("r", rid, True, value)
        else:
            code = error.code if isinstance(error, MeshagentError) else type(error).__name__
            reply = ("r", rid, False, (code, str(error)))
        try:
            self._send(reply)
        except WorkerGone:
            pass
        except (pickle.PicklingError, TypeError, AttributeError) as exc:  # an unpicklable result
            self._send(("r", rid, False, ("unpicklable", f"{op}: {exc}")))

    def _lost(self) -> None:
        if self._closed.done():
            return
        self._closed.set_result(None)
        gone = f"control channel {self.name} closed by the other end"
        for future in self._pending.values():
            if not future.done():
                future.set_exception(WorkerGone(gone, "the process has exited"))
        self._pending.clear()
