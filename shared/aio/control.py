"""The local control socket: how `status` (and other CLI commands) talk to a running host.

A Unix socket in the host's data directory (`DATA/run/control.sock`, mode 0600, so only the
operator who owns the data directory can use it). One JSON request per line, one JSON answer per
line. The server side is trio; the client side is plain blocking sockets, for the CLI.

It owns the transport only: what the commands mean is given as a dict of handlers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
MAX_REQUEST = 64 * 1024
log = logging.getLogger("shared.control")


class ControlError(Exception):
    """The host is not running, or answered with an error."""


def socket_path(data: Path) -> Path:
    return data / "run" / "control.sock"


async def serve_control(
    data: Path,
    handlers: dict[str, Handler],
    *,
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    path = socket_path(data)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a stale socket from a crashed run
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old_umask)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    task_status.started(path)

    async def handle(stream: trio.SocketStream) -> None:
        await _handle(stream, handlers)

    try:
        await trio.serve_listeners(handle, [listener])
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


async def _handle(stream: trio.SocketStream, handlers: dict[str, Handler]) -> None:
    async with stream:
        buffer = b""
        with trio.move_on_after(30):
            while b"\n" not in buffer and len(buffer) < MAX_REQUEST:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                buffer += chunk
        try:
            request = json.loads(buffer.split(b"\n", 1)[0])
            handler = handlers[request["cmd"]]
        except (ValueError, KeyError, TypeError):
            answer: dict[str, Any] = {"ok": False, "error": "bad control request"}
        else:
            try:
                answer = {"ok": True, "result": await handler(request)}
            except ControlError as exc:
                answer = {"ok": False, "error": str(exc)}
            except Exception as exc:
                # A handler's bug must not take the host down with it (serve_listeners would
                # let it escape): log it and answer, like any other failed request.
                log.exception("control command %r failed", request.get("cmd"))
                answer = {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}
        try:
            await stream.send_all(json.dumps(answer, default=str).encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def call(data: Path, cmd: str, timeout: float = 10.0, **args: Any) -> Any:
    """Blocking client: send one command; raise ControlError if no host answers."""
    path = socket_path(data)
    if not path.exists():
        raise ControlError("not running (no control socket)")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
            buffer = b""
            while not buffer.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buffer += chunk
        except OSError as exc:
            raise ControlError(f"not running ({exc.strerror or exc})") from None
    try:
        answer = json.loads(buffer)
    except ValueError:
        raise ControlError("the host gave no answer") from None
    if not answer.get("ok"):
        raise ControlError(answer.get("error", "unknown error"))
    return answer["result"]
