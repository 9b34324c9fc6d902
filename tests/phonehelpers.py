"""Helpers for the phone agent tests: a socket-free network of pure user agents, tone WAVs.

`Network` shuttles the messages of `phoneagent.useragent.UserAgent`s between them through real
bytes (encode, `parse_message_untrusted`, validate), as h11's ConnectionPair does for HTTP: each
agent is known by its `(ip, port)`, a Transmit to an address reaches the agent there, and
a reply to a request goes back to the address it came from. Messages can be dropped by a
predicate to exercise retransmission. Time is a number the test moves on.
"""

from __future__ import annotations

import wave
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from phoneagent.tone import ToneGenerator
from phoneagent.useragent import AgentConfig, Output, Transmit, UserAgent
from shared.sip.message import (
    SipMessage,
    SipRequest,
    parse_message_untrusted,
    validate_request_untrusted,
    validate_response_untrusted,
)
from shared.sip.transaction import TimerConfig

Address = tuple[str, int]


@dataclass
class Node:
    agent: UserAgent
    address: Address
    events: list[Output] = field(default_factory=list)
    received: list[SipMessage] = field(default_factory=list)

    def of(self, kind: type) -> list[object]:
        return [e for e in self.events if isinstance(e, kind)]


def make_agent(ext: str, port: int, **kwargs: object) -> UserAgent:
    config = AgentConfig(
        ext=ext,
        local_ip="127.0.0.1",
        local_port=port,
        timers=TimerConfig(),
        **kwargs,  # type: ignore[arg-type]
    )
    return UserAgent(config)


class Network:
    """Pure agents wired together; see the module docstring."""

    def __init__(self) -> None:
        self.nodes: dict[Address, Node] = {}
        self.now = 0.0
        self.drop: Callable[[SipMessage, Address, Address], bool] = lambda m, s, d: False
        self.dropped: list[SipMessage] = []
        self.outside: list[tuple[SipMessage, Address]] = []
        """Messages sent to an address no node has (a registrar the test plays itself)."""

    def add(self, ext: str, port: int, **kwargs: object) -> Node:
        node = Node(make_agent(ext, port, **kwargs), ("127.0.0.1", port))
        self.nodes[node.address] = node
        return node

    def feed(self, node: Node, outputs: list[Output]) -> None:
        """Deliver what `node` produced, and what that produces, until the network is quiet."""
        queue: list[tuple[Node, Output]] = [(node, o) for o in outputs]
        while queue:
            sender, output = queue.pop(0)
            if not isinstance(output, Transmit):
                sender.events.append(output)
                continue
            destination = output.destination
            assert isinstance(destination, tuple), destination
            if self.drop(output.message, sender.address, destination):
                self.dropped.append(output.message)
                continue
            message = parse_message_untrusted(output.message.encode())
            if isinstance(message, SipRequest):
                validate_request_untrusted(message)
            else:
                validate_response_untrusted(message)
            target = self.nodes.get(destination)
            if target is None:
                self.outside.append((message, destination))
                continue
            target.received.append(message)
            produced = target.agent.receive(message, sender.address, self.now)
            queue.extend((target, o) for o in produced)

    def advance(self, seconds: float, step: float = 0.05) -> None:
        """Move time on, running every agent's timers as they fall due."""
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + step)
            for node in list(self.nodes.values()):
                when = node.agent.get_timer()
                if when is not None and when <= self.now:
                    self.feed(node, node.agent.handle_timer(self.now))


def write_tone_wav(
    path: Path,
    frequency: float,
    seconds: float = 1.0,
    rate: int = 8000,
    channels: int = 1,
    width: int = 2,
) -> Path:
    """A WAV file of a sine (for --play tests), in any rate/channels/width."""
    generator = ToneGenerator(frequency, sample_rate=rate)
    pcm = generator.frame(int(seconds * rate))
    if width == 1:
        data = bytes((((int.from_bytes(pcm[i : i + 2], "little", signed=True) >> 8) + 128) & 0xFF)
                     for i in range(0, len(pcm), 2))  # fmt: skip
    else:
        data = pcm
    if channels == 2:
        step = width
        data = b"".join(data[i : i + step] * 2 for i in range(0, len(data), step))
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(width)
        wav.setframerate(rate)
        wav.writeframes(data)
    return path


def answer_from(network: Network, node: Node, response: SipMessage, source: Address) -> None:
    """Deliver `response` (made by the test, playing a server at `source`) to `node`."""
    message = parse_message_untrusted(response.encode())
    network.feed(node, node.agent.receive(message, source, network.now))
