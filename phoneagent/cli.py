"""The `phoneagent` command: our command-line softphone.

Calls, audio and DTMF come with the calls issue; until then the command only says so, clearly,
instead of pretending.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phoneagent", description="branchpbx softphone")
    parser.add_argument("--server", metavar="HOST[:PORT]", help="the office's remote host")
    parser.add_argument("--ext", help="extension")
    parser.add_argument("--password", help="SIP password")
    return parser


def main(argv: list[str] | None = None) -> None:
    build_parser().parse_args(argv)
    print("phoneagent: calling is not available in this version yet", file=sys.stderr)
    sys.exit(2)
