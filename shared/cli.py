"""What the three command-line programs share: logging, error reporting, formatting.

Operator mistakes (bad config, bad token, port in use, missing data directory) are raised as one
of `OPERATOR_ERRORS` and printed as one line, `PROGRAM: error: ...`, with exit status 2; never a
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio
from rich.console import Console
from rich.logging import RichHandler

from shared.config import ConfigError
from shared.token import TokenError


class CliError(Exception):
    """An operator's mistake, said in one line."""


OPERATOR_ERRORS: tuple[type[Exception], ...] = (CliError, ConfigError, TokenError)


def add_data_argument(parser: argparse.ArgumentParser, env: str, default: str) -> None:
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get(env, default)),
        metavar="DIR",
        help=f"data directory (default: ${env} or {default})",
    )


def setup_logging(verbose: bool) -> None:
    """Coloured logs on a terminal; one plain line per record anywhere else (journald, files),
    so that logs can be searched with grep."""
    handler: logging.Handler
    if sys.stderr.isatty():
        handler = RichHandler(
            console=Console(stderr=True),
            show_path=False,
            rich_tracebacks=False,
            log_time_format="%H:%M:%S",
        )
        fmt = "%(name)s: %(message)s"
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format=fmt,
        handlers=[handler],
        force=True,
    )


def run_main(
    program: str,
    main: Callable[[list[str] | None], int],
    argv: list[str] | None,
    extra_errors: tuple[type[Exception], ...] = (),
) -> int:
    try:
        return main(argv)
    except OPERATOR_ERRORS + extra_errors as exc:
        print(f"{program}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def when(timestamp: float | None) -> str:
    if not timestamp:
        return "never"
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat(timespec="seconds")


def ago(timestamp: float | None, now: float) -> str:
    if not timestamp:
        return "never"
    seconds = max(0.0, now - timestamp)
    if seconds < 2:
        return "now"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def make_private_dir(path: Path) -> None:
    """Create a data directory (mode 0700) or raise CliError naming it.

    An existing directory is made private too: it will hold secrets (keys, the office secret).
    """
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"cannot create data directory {path}: {exc.strerror}") from None
    with contextlib.suppress(OSError):  # not ours to change: the check below says what matters
        path.chmod(0o700)
    if not os.access(path, os.W_OK):
        raise CliError(f"data directory {path} is not writable")


def write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # the mode above applies only to a new file, not to one left behind
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def leaf_exceptions(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in leaf_exceptions(sub)]
    return [exc]


def unwrap_group(
    exc: BaseExceptionGroup[BaseException], wanted: tuple[type[Exception], ...]
) -> None:
    """Re-raise the first operator error inside a trio exception group, so it prints as one line."""
    for leaf in leaf_exceptions(exc):
        if isinstance(leaf, wanted):
            raise leaf from None
        if isinstance(leaf, KeyboardInterrupt):
            raise leaf from None


async def serve_until_signal(serve: Callable[..., Awaitable[object]], name: str) -> None:
    """Run a host's `serve` (a `nursery.start`-style task) until SIGTERM or SIGINT."""
    log = logging.getLogger(name)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("%s: shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
