"""The `phoneagent` command: a softphone for people without a desk phone, and for scripts.

    phoneagent --server 192.0.2.10 --ext 2001 --password pw call 2002 --tone 440 --json
    phoneagent --server 192.0.2.10 --ext 2002 --password pw answer --count 2 --record in.wav
    phoneagent call sip:2002@127.0.0.1:5070 --duration 3        (no server: call directly)

The command line is a contract for scripts: exit status 0 when every call was answered and
ended normally; 1 when a call failed (its final SIP status, e.g. `486 Busy Here`, is printed,
with any Warning text); 2 for an operator's mistake (bad server, wrong password, port in use,
unreadable WAV file), said in one line without a traceback. `--json` prints one JSON object
per call on stdout (statistics, DTMF digits and MESSAGE texts received), nothing else.
Global options may come before or after the subcommand.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import signal
import sys
from pathlib import Path
from typing import Any

import trio

from phoneagent.audio import AudioFileError
from phoneagent.phone import CallFailedError, CallStats, Phone, PhoneError, open_phone
from shared.cli import run_main, setup_logging

EXIT_CALL_FAILED = 1


class _Failed(Exception):
    """A call ended with a failure status: printed, exit status 1."""


class _Terminated(Exception):
    """SIGTERM: calls hung up, unregistered; exit status 143 (128 + SIGTERM)."""


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {text!r}")
    return value


def _global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    default: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--server", metavar="HOST[:PORT]", default=default, help="the office's remote host"
    )
    parser.add_argument("--ext", default=default, help="our extension (default: phoneagent)")
    parser.add_argument("--password", default=default, help="our SIP password")
    parser.add_argument(
        "--local-ip",
        default=argparse.SUPPRESS if suppress else "127.0.0.1",
        help="our address for SIP and RTP (default 127.0.0.1)",
    )
    parser.add_argument(
        "--sip-port",
        type=int,
        default=argparse.SUPPRESS if suppress else 0,
        help="our SIP port (default: any free one)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="log every step",
    )


def _media_options(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--play", metavar="FILE", help="play a WAV file (16-bit PCM)")
    source.add_argument("--tone", metavar="HZ", type=_positive, help="play a sine tone")
    parser.add_argument("--record", metavar="FILE", help="record what we hear to a WAV file")
    parser.add_argument("--json", action="store_true", help="print each call as a JSON object")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phoneagent", description="branchpbx softphone")
    _global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True)

    call = sub.add_parser("call", help="call a number, play, hang up")
    _global_options(call, suppress=True)
    call.add_argument("number", help="an extension at the server, or sip:EXT@IP:PORT")
    _media_options(call)
    call.add_argument(
        "--duration", type=_positive, default=5.0, help="seconds to talk after answer (5)"
    )
    call.add_argument("--dtmf", metavar="DIGITS", help="send these DTMF digits after answer")

    answer = sub.add_parser("answer", help="answer incoming calls")
    _global_options(answer, suppress=True)
    _media_options(answer)
    answer.add_argument("--count", type=int, default=1, help="calls to take (1)")
    answer.add_argument("--busy", action="store_true", help="refuse each call with 486")
    answer.add_argument(
        "--ring", type=_positive, default=0.0, metavar="S", help="ring this long before answer"
    )
    answer.add_argument(
        "--duration", type=_positive, default=None, help="hang up after this long (seconds)"
    )
    answer.add_argument("--dtmf", metavar="DIGITS", help="send these DTMF digits after answer")
    return parser


def _describe(stats: CallStats) -> str:
    if not stats.answered:
        return f"call {stats.remote}: not answered ({stats.status} {stats.reason})"
    parts = [
        f"call {stats.remote}: {stats.duration:.1f} s",
        stats.codec or "no media",
        f"sent {stats.packets_sent}",
        f"received {stats.packets_received}",
        f"lost {stats.packets_lost}",
        f"jitter {stats.jitter_ms:.1f} ms",
    ]
    if stats.dtmf_received:
        parts.append(f"DTMF received {stats.dtmf_received}")
    return ", ".join(parts)


class _Output:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def call(self, stats: CallStats) -> None:
        if self.as_json:
            print(json.dumps(stats.to_json(), sort_keys=True), flush=True)
        else:
            print(_describe(stats), flush=True)

    async def show_messages(self, phone: Phone) -> None:
        shown = 0
        while True:
            kept = await phone.wait_message(shown + 1)
            fresh = phone.messages_received - shown
            for message in kept[-fresh:]:
                if not self.as_json:
                    print(f"MESSAGE from {message.sender}: {message.text}", flush=True)
            shown = phone.messages_received


def _record_path(record: str | None, index: int, count: int) -> Path | None:
    if record is None:
        return None
    path = Path(record)
    if count <= 1:
        return path
    return path.with_name(f"{path.stem}-{index + 1}{path.suffix}")


async def _run_call(phone: Phone, args: argparse.Namespace, out: _Output) -> None:
    call = await phone.call(args.number, tone=args.tone, play=args.play, record=args.record)
    try:
        await call.wait_answered()
    except CallFailedError as exc:
        out.call(call.stats())
        raise _Failed(f"call failed: {exc}") from None
    with trio.move_on_after(args.duration):
        if args.dtmf:
            await call.send_dtmf(args.dtmf)
        await call.wait_ended()
    stats = await call.hangup()
    out.call(stats)


async def _run_answer(phone: Phone, args: argparse.Namespace, out: _Output) -> None:
    taken = 0
    while taken < args.count:
        call = await phone.next_call()
        if args.busy:
            await call.reject(486)
            out.call(call.stats())
            taken += 1
            continue
        await call.ring()
        await trio.sleep(args.ring)
        if call.ended:
            logging.getLogger("phoneagent").info("the caller gave up before answer")
            continue
        record = _record_path(args.record, taken, args.count)
        try:
            await call.answer(tone=args.tone, play=args.play, record=record)
        except PhoneError:
            if call.ended:
                continue  # cancelled while we answered
            raise
        taken += 1
        with trio.move_on_after(math.inf if args.duration is None else args.duration):
            if args.dtmf:
                await call.send_dtmf(args.dtmf)
            await call.wait_ended()
        out.call(await call.hangup())


async def _run(args: argparse.Namespace) -> None:
    out = _Output(args.json)
    terminated = False
    # A service manager's stop (SIGTERM) hangs up and unregisters (open_phone does both on
    # the way out) instead of leaving a binding at the registrar. The receiver is installed
    # before anything else, so no SIGTERM finds the default handler.
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        try:
            async with (
                open_phone(
                    ext=args.ext or "phoneagent",
                    password=args.password,
                    server=args.server,
                    local_ip=args.local_ip,
                    sip_port=args.sip_port,
                    register_timeout=10.0,
                ) as phone,
                trio.open_nursery() as nursery,
            ):

                async def stop_on_sigterm() -> None:
                    nonlocal terminated
                    async for _ in signals:
                        terminated = True
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(stop_on_sigterm)
                nursery.start_soon(out.show_messages, phone)
                # Scripts (and tests) read our address from this line: with --sip-port 0
                # it is the only way to learn the port.
                how = f"registered at {args.server}" if args.server else "not registered"
                print(f"phoneagent: listening on {phone.uri} ({how})", file=sys.stderr, flush=True)
                if args.command == "call":
                    await _run_call(phone, args, out)
                else:
                    await _run_answer(phone, args, out)
                nursery.cancel_scope.cancel()
        except* OSError as group:
            raise PhoneError(_os_error(group.exceptions[0], args)) from None
    if terminated:
        raise _Terminated


def _os_error(exc: BaseException, args: argparse.Namespace) -> str:
    if isinstance(exc, OSError) and exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
        return f"cannot use {args.local_ip}:{args.sip_port} for SIP: {exc.strerror}"
    if isinstance(exc, OSError):
        return f"network error: {exc.strerror or exc}"
    return str(exc)


def _unwrap(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(bool(args.verbose))
    if not args.verbose:
        logging.getLogger().setLevel(logging.WARNING)
    if args.command == "answer" and args.count < 1:
        raise PhoneError("--count must be 1 or more")
    try:
        trio.run(_run, args)
    except BaseException as exc:  # trio wraps what a nursery raised in groups
        inner = _unwrap(exc)
        if isinstance(inner, _Failed):
            print(f"phoneagent: {inner}", file=sys.stderr)
            return EXIT_CALL_FAILED
        if isinstance(inner, _Terminated):
            return 128 + signal.SIGTERM
        if isinstance(inner, (PhoneError, AudioFileError, ValueError)):
            raise PhoneError(str(inner)) from None
        if inner is not exc:
            raise inner from None
        raise
    return 0


def main(argv: list[str] | None = None) -> None:
    sys.exit(run_main("phoneagent", _main, argv, (PhoneError, AudioFileError)))
