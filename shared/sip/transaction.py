"""SIP transactions (RFC 3261 §17, amended by RFC 6026) and the layer that matches messages to them.

This module owns the four transaction state machines (INVITE client, non-INVITE client, INVITE
server, non-INVITE server) as tables, their timers A-M, and `TransactionLayer`, which matches
incoming messages to transactions (§17.1.3, §17.2.3), creates server transactions for new
requests, absorbs retransmissions, finds the INVITE a CANCEL is for, runs every timer and stays
within a bound. Everything is sans-I/O: messages and the time come in as arguments, and what
comes out is a list of events, some for the transaction user (TU) and some (`SendMessage`) for
the transport. Destinations are opaque: whatever the adapter passed in (an address tuple, a
connection) comes back in `SendMessage`.

It does not parse or validate bytes (messages must have passed `validate_request_untrusted` /
`validate_response_untrusted`), choose where a response goes (§18.2.2 `received`/`rport` is the
transport's business: a server transaction answers to the `source` its request came from),
retransmit a 2xx to an INVITE or its ACK (§13.3.1.4, §13.2.2.4: the TU's, see `dialog.py`), or
run Timer C / decide to CANCEL (the TU's).

RFC 6026 is followed where it corrects RFC 3261: a 2xx moves INVITE transactions to Accepted
instead of Terminated, so that retransmitted 2xx responses still reach the TU through the
client transaction (Timer M) and retransmitted INVITEs are absorbed by the server transaction
instead of looking like new calls (Timer L). Responses that match no transaction are dropped
and counted (RFC 6026 takes away RFC 3261's hand-over of stray responses to the core), ACKs
that match none go to the TU (they acknowledge a 2xx).

It is long (about 1000 lines, a quarter of them the RFC figures) on purpose: the four figures,
their tables, the one executor and the layer are one section of the RFC (§17), and splitting
them would separate each table from the code that reads it.
"""

from __future__ import annotations

import dataclasses
import enum
import heapq
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from shared.sip.errors import SipParseError
from shared.sip.headers import Via, split_comma_untrusted
from shared.sip.message import (
    Headers,
    SipMessage,
    SipRequest,
    SipResponse,
    make_response,
    parse_message_untrusted,
)

MAGIC_COOKIE = "z9hG4bK"


class TransactionError(Exception):
    """The TU used a transaction wrongly (our own bug, not the peer's fault): a response for a
    transaction that has none pending, a duplicate branch, an ACK sent as a transaction."""


class OverloadError(TransactionError):
    """The layer holds `max_transactions` already; a new client transaction was refused."""


@dataclass(frozen=True, slots=True)
class TimerConfig:
    """RFC 3261 §17.1.1.1 / Table 4 timer values, in seconds."""

    t1: float = 0.5
    """Round-trip estimate: first retransmission interval; 64*T1 bounds a transaction."""
    t2: float = 4.0
    """Longest retransmission interval for non-INVITE requests and INVITE responses."""
    t4: float = 5.0
    """Longest time a message stays in the network (Timers I and K)."""
    timer_d: float = 32.0
    """How long an INVITE client waits for response retransmissions (at least 32 s)."""


DEFAULT_TIMERS = TimerConfig()


class Timer(enum.Enum):
    A = "A"  # INVITE client: request retransmission, doubling (§17.1.1.2)
    B = "B"  # INVITE client: transaction timeout, 64*T1
    D = "D"  # INVITE client: wait for response retransmissions in Completed
    E = "E"  # non-INVITE client: request retransmission, doubling up to T2 (§17.1.2.2)
    F = "F"  # non-INVITE client: transaction timeout, 64*T1
    G = "G"  # INVITE server: final response retransmission, doubling up to T2 (§17.2.1)
    H = "H"  # INVITE server: wait for ACK, 64*T1
    I = "I"  # noqa: E741  INVITE server: absorb ACK retransmissions in Confirmed
    J = "J"  # non-INVITE server: absorb request retransmissions in Completed
    K = "K"  # non-INVITE client: absorb response retransmissions in Completed
    L = "L"  # RFC 6026: INVITE server in Accepted, 64*T1
    M = "M"  # RFC 6026: INVITE client in Accepted, 64*T1


class State(enum.Enum):
    CALLING = "calling"
    TRYING = "trying"
    PROCEEDING = "proceeding"
    COMPLETED = "completed"
    CONFIRMED = "confirmed"
    ACCEPTED = "accepted"
    TERMINATED = "terminated"


class Input(enum.Enum):
    """What can happen to a transaction, besides a timer firing."""

    REQUEST = "request"  # server: the request again (a retransmission)
    ACK = "ack"  # INVITE server: an ACK matching the transaction
    PROVISIONAL = "1xx"  # client: a 1xx received
    SUCCESS = "2xx"  # client: a 2xx received
    FAILURE = "3xx-6xx"  # client: a 300-699 received
    TU_PROVISIONAL = "TU 1xx"  # server: the TU sends 101-199
    TU_SUCCESS = "TU 2xx"  # server: the TU sends a 2xx
    TU_FAILURE = "TU 3xx-6xx"  # server: the TU sends 300-699
    TRANSPORT_ERROR = "transport error"


class Action(enum.Enum):
    SEND_REQUEST = "send request"  # (re)transmit our request
    SEND_ACK = "send ACK"  # §17.1.1.3 ACK for a non-2xx
    PASS_TO_TU = "pass to TU"  # the response (client) or the ACK (server) goes up
    SEND_RESPONSE = "send response"  # send the TU's response, remember it
    RESEND_RESPONSE = "resend response"  # send the last response again
    INFORM_TIMEOUT = "inform TU: timeout"
    INFORM_TRANSPORT_ERROR = "inform TU: transport error"


Stimulus = Input | Timer
Transition = tuple[State, tuple[Action, ...]]


# RFC 3261 Figure 5: INVITE client transaction (with RFC 6026 §7.2: 2xx -> Accepted, Timer M).
#
#                                |INVITE from TU
#              Timer A fires     |INVITE sent
#              Reset A,          V                      Timer B fires
#              INVITE sent +-----------+                or Transport Err.
#                +---------|           |---------------+inform TU
#                |         |  Calling  |               |
#                +-------->|           |-------------->|
#                          +-----------+ 2xx           |
#                             |  |       2xx to TU     |
#                             |  |1xx                  |
#     300-699 +---------------+  |1xx to TU            |
#    ACK sent |                  |                     |
# resp. to TU |  1xx             V                     |
#             |  1xx to TU  -----------+               |
#             |  +---------|           |               |
#             |  |         |Proceeding |-------------->|
#             |  +-------->|           | 2xx           |
#             |            +-----------+ 2xx to TU     |
#             |       300-699    |                     |
#             |       ACK sent,  |                     |
#             |       resp. to TU|                     |
#             |                  |                     |      NOTE:
#             |  300-699         V                     |
#             |  ACK sent  +-----------+Transport Err.  |  transitions
#             |  +---------|           |Inform TU      |  labeled with
#             |  |         | Completed |-------------->|  the event
#             |  +-------->|           |               |  over the action
#             |            +-----------+               |  to take
#             |              ^   |                     |
#             |              |   | Timer D fires       |
#             +--------------+   | -                   |
#                                |                     |
#                                V                     |
#                          +-----------+               |
#                          |           |               |
#                          | Terminated|<--------------+
#                          |           |
#                          +-----------+
#
# RFC 6026 replaces "2xx -> Terminated" by "2xx -> Accepted (2xx to TU)", where further 2xx go
# to the TU and Timer M (64*T1) leads to Terminated.
INVITE_CLIENT: dict[tuple[State, Stimulus], Transition] = {
    (State.CALLING, Timer.A): (State.CALLING, (Action.SEND_REQUEST,)),
    (State.CALLING, Timer.B): (State.TERMINATED, (Action.INFORM_TIMEOUT,)),
    (State.CALLING, Input.TRANSPORT_ERROR): (State.TERMINATED, (Action.INFORM_TRANSPORT_ERROR,)),
    (State.CALLING, Input.PROVISIONAL): (State.PROCEEDING, (Action.PASS_TO_TU,)),
    (State.CALLING, Input.SUCCESS): (State.ACCEPTED, (Action.PASS_TO_TU,)),
    (State.CALLING, Input.FAILURE): (State.COMPLETED, (Action.SEND_ACK, Action.PASS_TO_TU)),
    (State.PROCEEDING, Input.PROVISIONAL): (State.PROCEEDING, (Action.PASS_TO_TU,)),
    (State.PROCEEDING, Input.SUCCESS): (State.ACCEPTED, (Action.PASS_TO_TU,)),
    (State.PROCEEDING, Input.FAILURE): (State.COMPLETED, (Action.SEND_ACK, Action.PASS_TO_TU)),
    (State.COMPLETED, Input.FAILURE): (State.COMPLETED, (Action.SEND_ACK,)),
    (State.COMPLETED, Input.TRANSPORT_ERROR): (State.TERMINATED, (Action.INFORM_TRANSPORT_ERROR,)),
    (State.COMPLETED, Timer.D): (State.TERMINATED, ()),
    (State.ACCEPTED, Input.SUCCESS): (State.ACCEPTED, (Action.PASS_TO_TU,)),
    (State.ACCEPTED, Timer.M): (State.TERMINATED, ()),
}

# RFC 3261 Figure 6: non-INVITE client transaction.
#
#                                    |Request from TU
#                                    |send request
#                Timer E             V
#                send request  +-----------+
#                    +---------|           |-------------------+
#                    |         |  Trying   |  Timer F          |
#                    +-------->|           |  or Transport Err.|
#                              +-----------+  inform TU        |
#                 200-699         |  |                         |
#                 resp. to TU     |  |1xx                      |
#                 +---------------+  |resp. to TU              |
#                 |                  |                         |
#                 |   Timer E        V       Timer F           |
#                 |   send req +-----------+ or Transport Err. |
#                 |  +---------|           | inform TU         |
#                 |  |         |Proceeding |------------------>|
#                 |  +-------->|           |-----+             |
#                 |            +-----------+     |1xx          |
#                 |              |      ^        |resp to TU   |
#                 | 200-699      |      +--------+             |
#                 | resp. to TU  |                             |
#                 |              |                             |
#                 |              V                             |
#                 |            +-----------+                   |
#                 |            |           |                   |
#                 |            | Completed |                   |
#                 |            |           |                   |
#                 |            +-----------+                   |
#                 |              ^   |                         |
#                 |              |   | Timer K                 |
#                 +--------------+   | -                       |
#                                    |                         |
#                                    V                         |
#              NOTE:           +-----------+                   |
#                              |           |                   |
#          transitions         | Terminated|<------------------+
#          labeled with        |           |
#          the event           +-----------+
#          over the action
#          to take
#
# In Completed, retransmitted final responses are absorbed (§17.1.2.2): no row, dropped.
NON_INVITE_CLIENT: dict[tuple[State, Stimulus], Transition] = {
    (State.TRYING, Timer.E): (State.TRYING, (Action.SEND_REQUEST,)),
    (State.TRYING, Timer.F): (State.TERMINATED, (Action.INFORM_TIMEOUT,)),
    (State.TRYING, Input.TRANSPORT_ERROR): (State.TERMINATED, (Action.INFORM_TRANSPORT_ERROR,)),
    (State.TRYING, Input.PROVISIONAL): (State.PROCEEDING, (Action.PASS_TO_TU,)),
    (State.TRYING, Input.SUCCESS): (State.COMPLETED, (Action.PASS_TO_TU,)),
    (State.TRYING, Input.FAILURE): (State.COMPLETED, (Action.PASS_TO_TU,)),
    (State.PROCEEDING, Timer.E): (State.PROCEEDING, (Action.SEND_REQUEST,)),
    (State.PROCEEDING, Timer.F): (State.TERMINATED, (Action.INFORM_TIMEOUT,)),
    (State.PROCEEDING, Input.TRANSPORT_ERROR): (State.TERMINATED, (Action.INFORM_TRANSPORT_ERROR,)),
    (State.PROCEEDING, Input.PROVISIONAL): (State.PROCEEDING, (Action.PASS_TO_TU,)),
    (State.PROCEEDING, Input.SUCCESS): (State.COMPLETED, (Action.PASS_TO_TU,)),
    (State.PROCEEDING, Input.FAILURE): (State.COMPLETED, (Action.PASS_TO_TU,)),
    (State.COMPLETED, Timer.K): (State.TERMINATED, ()),
}

# RFC 3261 Figure 7: INVITE server transaction (with RFC 6026 §7.1: 2xx -> Accepted, Timer L).
#
#                                |INVITE
#                                |pass INV to TU
#             INVITE             V send 100 if TU won't in 200ms
#             send response+-----------+
#                 +--------|           |--------+101-199 from TU
#                 |        | Proceeding|        |send response
#                 +------->|           |<-------+
#                          |           |          Transport Err.
#                          |           |          Inform TU
#                          |           |--------------->+
#                          +-----------+                |
#             300-699 from TU |     |2xx from TU        |
#             send response   |     |send response      |
#                             |     +------------------>+
#                             |                         |
#             INVITE          V          Timer G fires  |
#             send response+-----------+ send response  |
#                 +--------|           |--------+       |
#                 |        | Completed |        |       |
#                 +------->|           |<-------+       |
#                          +-----------+                |
#                             |     |                   |
#                         ACK |     |                   |
#                         -   |     +------------------>+
#                             |        Timer H fires    |
#                             V        or Transport Err.|
#                          +-----------+  Inform TU     |
#                          |           |                |
#                          | Confirmed |                |
#                          |           |                |
#                          +-----------+                |
#                                |                      |
#                                |Timer I fires         |
#                                |-                     |
#                                |                      |
#                                V                      |
#                          +-----------+                |
#                          |           |                |
#                          | Terminated|<---------------+
#                          |           |
#                          +-----------+
#
# RFC 6026 replaces "2xx from TU -> Terminated" by "-> Accepted": the TU sends the 2xx and its
# retransmissions through the transaction, retransmitted INVITEs are absorbed, a matching ACK
# goes to the TU, and Timer L (64*T1) leads to Terminated. A transport error in Accepted is
# reported and the transaction stays (RFC 6026 §8.8: the TU may still retransmit). The 100 Trying
# is always sent at once (allowed: "send 100 if TU won't in 200ms").
INVITE_SERVER: dict[tuple[State, Stimulus], Transition] = {
    (State.PROCEEDING, Input.REQUEST): (State.PROCEEDING, (Action.RESEND_RESPONSE,)),
    (State.PROCEEDING, Input.TU_PROVISIONAL): (State.PROCEEDING, (Action.SEND_RESPONSE,)),
    (State.PROCEEDING, Input.TU_SUCCESS): (State.ACCEPTED, (Action.SEND_RESPONSE,)),
    (State.PROCEEDING, Input.TU_FAILURE): (State.COMPLETED, (Action.SEND_RESPONSE,)),
    (State.PROCEEDING, Input.TRANSPORT_ERROR): (State.TERMINATED, (Action.INFORM_TRANSPORT_ERROR,)),
    (State.COMPLETED, Input.REQUEST): (State.COMPLETED, (Action.RESEND_RESPONSE,)),
    (State.COMPLETED, Timer.G): (State.COMPLETED, (Action.RESEND_RESPONSE,)),
    (State.COMPLETED, Input.ACK): (State.CONFIRMED, ()),
    (State.COMPLETED, Timer.H): (State.TERMINATED, (Action.INFORM_TIMEOUT,)),
    (State.COMPLETED, Input.TRANSPORT_ERROR): (State.TERMINATED, (Action.INFORM_TRANSPORT_ERROR,)),
    (State.CONFIRMED, Input.ACK): (State.CONFIRMED, ()),
    (State.CONFIRMED, Timer.I): (State.TERMINATED, ()),
    (State.ACCEPTED, Input.REQUEST): (State.ACCEPTED, ()),
    (State.ACCEPTED, Input.ACK): (State.ACCEPTED, (Action.PASS_TO_TU,)),
    (State.ACCEPTED, Input.TU_SUCCESS): (State.ACCEPTED, (Action.SEND_RESPONSE,)),
    (State.ACCEPTED, Input.TRANSPORT_ERROR): (State.ACCEPTED, (Action.INFORM_TRANSPORT_ERROR,)),
    (State.ACCEPTED, Timer.L): (State.TERMINATED, ()),
}

# RFC 3261 Figure 8: non-INVITE server transaction.
#
#                                   |Request received
#                                   |pass to TU
#                                   V
#                             +-----------+
#                             |           |
#                             | Trying    |-------------+
#                             |           |             |
#                             +-----------+             |200-699 from TU
#                                   |                   |send response
#                                   |1xx from TU        |
#                                   |send response      |
#                                   |                   |
#                Request            V      1xx from TU  |
#                send response+-----------+send response|
#                    +--------|           |--------+    |
#                    |        | Proceeding|        |    |
#                    +------->|           |<-------+    |
#             +<--------------|           |             |
#             |Trnsprt Err    +-----------+             |
#             |Inform TU            |                   |
#             |                     |                   |
#             |                     |200-699 from TU    |
#             |                     |send response      |
#             |  Request            V                   |
#             |  send response+-----------+             |
#             |      +--------|           |             |
#             |      |        | Completed |<------------+
#             |      +------->|           |
#             +<--------------|           |
#             |Trnsprt Err    +-----------+
#             |Inform TU            |
#             |                     |Timer J fires
#             |                     |-
#             |                     |
#             |                     V
#             |               +-----------+
#             |               |           |
#             +-------------->| Terminated|
#                             |           |
#                             +-----------+
#
# In Trying a retransmitted request is absorbed (§17.2.2: no response to resend yet): no row.
NON_INVITE_SERVER: dict[tuple[State, Stimulus], Transition] = {
    (State.TRYING, Input.TU_PROVISIONAL): (State.PROCEEDING, (Action.SEND_RESPONSE,)),
    (State.TRYING, Input.TU_SUCCESS): (State.COMPLETED, (Action.SEND_RESPONSE,)),
    (State.TRYING, Input.TU_FAILURE): (State.COMPLETED, (Action.SEND_RESPONSE,)),
    (State.PROCEEDING, Input.REQUEST): (State.PROCEEDING, (Action.RESEND_RESPONSE,)),
    (State.PROCEEDING, Input.TU_PROVISIONAL): (State.PROCEEDING, (Action.SEND_RESPONSE,)),
    (State.PROCEEDING, Input.TU_SUCCESS): (State.COMPLETED, (Action.SEND_RESPONSE,)),
    (State.PROCEEDING, Input.TU_FAILURE): (State.COMPLETED, (Action.SEND_RESPONSE,)),
    (State.PROCEEDING, Input.TRANSPORT_ERROR): (State.TERMINATED, (Action.INFORM_TRANSPORT_ERROR,)),
    (State.COMPLETED, Input.REQUEST): (State.COMPLETED, (Action.RESEND_RESPONSE,)),
    (State.COMPLETED, Input.TRANSPORT_ERROR): (State.TERMINATED, (Action.INFORM_TRANSPORT_ERROR,)),
    (State.COMPLETED, Timer.J): (State.TERMINATED, ()),
}

# Timers started when a state is entered; leaving a state cancels every timer not listed for
# the new state in _LIVE (Trying -> Proceeding keeps E and F running, §17.1.2.2).
_ENTRY_TIMERS: dict[State, tuple[Timer, ...]] = {
    State.CALLING: (Timer.A, Timer.B),
    State.TRYING: (Timer.E, Timer.F),
    State.COMPLETED: (Timer.D, Timer.K, Timer.G, Timer.H, Timer.J),
    State.CONFIRMED: (Timer.I,),
    State.ACCEPTED: (Timer.L, Timer.M),
}
_LIVE: dict[State, frozenset[Timer]] = {
    State.CALLING: frozenset({Timer.A, Timer.B}),
    State.TRYING: frozenset({Timer.E, Timer.F}),
    State.PROCEEDING: frozenset({Timer.E, Timer.F}),
    State.COMPLETED: frozenset({Timer.D, Timer.K, Timer.G, Timer.H, Timer.J}),
    State.CONFIRMED: frozenset({Timer.I}),
    State.ACCEPTED: frozenset({Timer.L, Timer.M}),
    State.TERMINATED: frozenset(),
}
# Retransmission timers exist only over unreliable transports (§17.1.1.2, §17.1.2.2, §17.2.1).
_RETRANSMIT_TIMERS = frozenset({Timer.A, Timer.E, Timer.G})
# Timers whose only purpose is to absorb retransmissions: zero over reliable transports.
_ABSORB_TIMERS = frozenset({Timer.D, Timer.I, Timer.J, Timer.K})


# --- Keys and events -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TransactionKey:
    """What identifies a transaction. Clients: branch + CSeq method (§17.1.3). Servers: branch
    + sent-by + method, with ACK folded into INVITE (§17.2.3); for an RFC 2543 peer (no magic
    cookie) `branch` holds the fallback identity instead (Request-URI, Call-ID, From tag, CSeq
    number, top Via), which no real branch can equal since those start with the cookie."""

    server: bool
    method: str
    branch: str
    sent_by: str = ""


@dataclass(frozen=True, slots=True)
class SendMessage:
    """Transport: send `message` to `destination` (opaque: what the adapter gave us)."""

    key: TransactionKey | None
    message: SipMessage
    destination: object
    reliable: bool


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """TU: a new request with its server transaction. For a CANCEL, `cancels` is the key of
    the INVITE server transaction it matches (§9.2), or None (answer 481)."""

    key: TransactionKey
    request: SipRequest
    source: object
    cancels: TransactionKey | None = None


@dataclass(frozen=True, slots=True)
class AckReceived:
    """TU: an ACK for a 2xx (§13.3.1.4), either outside any transaction (`key` None, the
    RFC 3261 case: the ACK for a 2xx has its own branch) or matching an Accepted one."""

    key: TransactionKey | None
    request: SipRequest
    source: object


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    """TU: a response for client transaction `key` (1xx, the final one, 2xx retransmissions)."""

    key: TransactionKey
    response: SipResponse


@dataclass(frozen=True, slots=True)
class TransactionTimeout:
    """TU: a timer gave up. Client (B, F): `response` is a local 408, to be treated as if
    received (§8.1.3.1). INVITE server (H): no ACK came; `response` is None."""

    key: TransactionKey
    response: SipResponse | None


@dataclass(frozen=True, slots=True)
class TransportFailure:
    """TU: the transport could not send. Client: `response` is a local 503 (§8.1.3.1)."""

    key: TransactionKey
    response: SipResponse | None


@dataclass(frozen=True, slots=True)
class TransactionTerminated:
    key: TransactionKey


Event = (
    SendMessage
    | RequestReceived
    | AckReceived
    | ResponseReceived
    | TransactionTimeout
    | TransportFailure
    | TransactionTerminated
)


@dataclass(slots=True)
class TransactionStatistics:
    """Counters since the layer was created. `active` is the current number of transactions,
    of which `completed` are non-INVITE server transactions kept only to answer retransmissions
    (see `TransactionLayer`); `completed_evicted` counts those ended early to stay in bounds."""

    active: int = 0
    completed: int = 0
    completed_evicted: int = 0
    client_created: int = 0
    server_created: int = 0
    terminated: int = 0
    retransmissions_sent: int = 0
    retransmissions_absorbed: int = 0
    stray_responses: int = 0
    stray_acks: int = 0
    ignored: int = 0
    timeouts: int = 0
    transport_errors: int = 0
    overload_refused: int = 0
    malformed: int = 0


def make_branch(random_bytes: Callable[[int], bytes] = secrets.token_bytes) -> str:
    """A Via branch with the magic cookie (§8.1.1.7) and 80 random bits from `random_bytes`."""
    return MAGIC_COOKIE + random_bytes(10).hex()


def _response_input(status: int) -> Input:
    if status < 200:
        return Input.PROVISIONAL
    return Input.SUCCESS if status < 300 else Input.FAILURE


def _tu_input(status: int) -> Input:
    if status < 200:
        return Input.TU_PROVISIONAL
    return Input.TU_SUCCESS if status < 300 else Input.TU_FAILURE


# --- The machines ----------------------------------------------------------------------------


class Transaction:
    """One transaction: the executor of a table. Use the four subclasses.

    Every method returns the events it caused, in order. A remote input that the table has no
    row for (a late retransmission, a 1xx after the final response) is dropped and counted in
    `ignored`; a TU input without a row is a `TransactionError`.
    """

    TABLE: ClassVar[dict[tuple[State, Stimulus], Transition]]
    INITIAL: ClassVar[State]
    TIMERS: ClassVar[frozenset[Timer]]
    server: ClassVar[bool]

    def __init__(
        self,
        key: TransactionKey,
        request: SipRequest,
        peer: object,
        *,
        reliable: bool,
        timers: TimerConfig = DEFAULT_TIMERS,
    ) -> None:
        self.key = key
        self.request = request
        self.peer = peer
        """Client: where the request goes. Server: where the request came from."""
        self.reliable = reliable
        self.timers = timers
        self.state = self.INITIAL
        self.last_response: SipResponse | None = None
        self.retransmissions = 0
        self.ignored = 0
        self._deadlines: dict[Timer, float] = {}
        self._intervals: dict[Timer, float] = {}
        self._ack: SipRequest | None = None
        self._out: list[Event] = []

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.key.method} {self.key.branch} {self.state.name}>"

    @property
    def terminated(self) -> bool:
        return self.state is State.TERMINATED

    def get_timer(self) -> float | None:
        """When `handle_timer` must next be called, or None."""
        return min(self._deadlines.values()) if self._deadlines else None

    def deadline(self, timer: Timer) -> float | None:
        """When `timer` fires, or None when it is not running."""
        return self._deadlines.get(timer)

    def handle_timer(self, now: float) -> list[Event]:
        """Fire every timer due at `now`, earliest first."""
        while self._deadlines:
            timer, deadline = min(self._deadlines.items(), key=lambda item: item[1])
            if deadline > now:
                break
            del self._deadlines[timer]
            self._step(timer, now, None)
        return self._flush()

    def transport_error(self, now: float) -> list[Event]:
        """The transport failed to send one of this transaction's messages."""
        self._step(Input.TRANSPORT_ERROR, now, None)
        return self._flush()

    # -- the executor --

    def _flush(self) -> list[Event]:
        out, self._out = self._out, []
        return out

    def _step(self, stimulus: Stimulus, now: float, message: SipMessage | None) -> bool:
        row = self.TABLE.get((self.state, stimulus))
        if row is None:
            return False
        new_state, actions = row
        for action in actions:
            self._act(action, message)
        if isinstance(stimulus, Timer) and new_state is self.state:
            self._rearm(stimulus, now)
        if new_state is not self.state:
            self._enter(new_state, now)
        return True

    def _enter(self, state: State, now: float) -> None:
        self.state = state
        live = _LIVE[state]
        for timer in [t for t in self._deadlines if t not in live]:
            del self._deadlines[timer]
        if state is State.TERMINATED:
            self._out.append(TransactionTerminated(self.key))
            return
        immediate: list[Timer] = []
        for timer in _ENTRY_TIMERS.get(state, ()):
            if timer not in self.TIMERS:
                continue
            if timer in _RETRANSMIT_TIMERS and self.reliable:
                continue
            duration = self._duration(timer)
            if duration <= 0:
                immediate.append(timer)
                continue
            self._intervals[timer] = duration
            self._deadlines[timer] = now + duration
        for timer in immediate:
            # §17: "Timer D/I/J/K ... zero seconds for reliable transports": leave at once.
            if self.state is state:
                self._step(timer, now, None)

    def _duration(self, timer: Timer) -> float:
        t = self.timers
        if timer in _ABSORB_TIMERS and self.reliable:
            return 0.0
        if timer in (Timer.A, Timer.E, Timer.G):
            return t.t1
        if timer is Timer.D:
            return t.timer_d
        if timer in (Timer.I, Timer.K):
            return t.t4
        return 64 * t.t1  # B, F, H, J, L, M

    def _rearm(self, timer: Timer, now: float) -> None:
        interval = self._intervals.get(timer, self.timers.t1)
        if timer is Timer.A:
            # §17.1.1.2: Timer A doubles each time, without cap (Timer B ends it).
            interval *= 2
        elif timer is Timer.E and self.state is State.PROCEEDING:
            # §17.1.2.2: in Proceeding, retransmit every T2.
            interval = self.timers.t2
        else:
            # §17.1.2.2 (E) and §17.2.1 (G): double up to T2.
            interval = min(interval * 2, self.timers.t2)
        self._intervals[timer] = interval
        self._deadlines[timer] = now + interval

    def _act(self, action: Action, message: SipMessage | None) -> None:
        key = self.key
        if action is Action.SEND_REQUEST:
            self.retransmissions += 1
            self._send(self.request)
        elif action is Action.SEND_ACK:
            assert isinstance(message, SipResponse)
            if self._ack is None or self._ack.to_tag != message.to_tag:
                self._ack = make_ack_for_failure(self.request, message)
            else:
                self.retransmissions += 1
            self._send(self._ack)
        elif action is Action.PASS_TO_TU:
            if isinstance(message, SipResponse):
                self._out.append(ResponseReceived(key, message))
            else:
                assert isinstance(message, SipRequest)
                self._out.append(AckReceived(key, message, self.peer))
        elif action is Action.SEND_RESPONSE:
            assert isinstance(message, SipResponse)
            self.last_response = message
            self._send(message)
        elif action is Action.RESEND_RESPONSE:
            if self.last_response is not None:
                self.retransmissions += 1
                self._send(self.last_response)
        elif action is Action.INFORM_TIMEOUT:
            response = None if self.server else make_response(self.request, 408)
            self._out.append(TransactionTimeout(key, response))
        elif action is Action.INFORM_TRANSPORT_ERROR:
            response = None if self.server else make_response(self.request, 503)
            self._out.append(TransportFailure(key, response))

    def _send(self, message: SipMessage) -> None:
        self._out.append(SendMessage(self.key, message, self.peer, self.reliable))


class ClientTransaction(Transaction):
    server = False

    def start(self, now: float) -> list[Event]:
        """Send the request and start the timers of the initial state."""
        self._send(self.request)
        self._enter(self.INITIAL, now)
        return self._flush()

    def receive(self, response: SipResponse, now: float) -> list[Event]:
        """A response matched to this transaction."""
        if not self._step(_response_input(response.status), now, response):
            self.ignored += 1
        return self._flush()


class ServerTransaction(Transaction):
    server = True

    def start(self, now: float, source: object) -> list[Event]:
        """Hand the request to the TU (and, for an INVITE, answer 100 Trying at once)."""
        self._enter(self.INITIAL, now)
        self._out.append(RequestReceived(self.key, self.request, source))
        return self._flush()

    def receive(self, request: SipRequest, now: float) -> list[Event]:
        """The request again, or (INVITE) its ACK."""
        stimulus = Input.ACK if request.method == "ACK" else Input.REQUEST
        if not self._step(stimulus, now, request):
            self.ignored += 1
        return self._flush()

    def send_response(self, response: SipResponse, now: float) -> list[Event]:
        """The TU answers. Raises `TransactionError` when this state takes no such response."""
        if response.status == 100 and self.key.method == "INVITE":
            raise TransactionError("the INVITE server transaction sends 100 Trying itself")
        if not self._step(_tu_input(response.status), now, response):
            raise TransactionError(
                f"{self!r} cannot send a {response.status} in state {self.state.name}"
            )
        return self._flush()


class InviteClientTransaction(ClientTransaction):
    TABLE = INVITE_CLIENT
    INITIAL = State.CALLING
    TIMERS = frozenset({Timer.A, Timer.B, Timer.D, Timer.M})


class NonInviteClientTransaction(ClientTransaction):
    TABLE = NON_INVITE_CLIENT
    INITIAL = State.TRYING
    TIMERS = frozenset({Timer.E, Timer.F, Timer.K})


class InviteServerTransaction(ServerTransaction):
    TABLE = INVITE_SERVER
    INITIAL = State.PROCEEDING
    TIMERS = frozenset({Timer.G, Timer.H, Timer.I, Timer.L})

    def start(self, now: float, source: object) -> list[Event]:
        # §17.2.1: a 100 Trying stops the client's INVITE retransmissions; sending it at once
        # means the TU never needs to answer within 200 ms.
        trying = make_response(self.request, 100)
        self.last_response = trying
        self._send(trying)
        return super().start(now, source)


class NonInviteServerTransaction(ServerTransaction):
    TABLE = NON_INVITE_SERVER
    INITIAL = State.TRYING
    TIMERS = frozenset({Timer.J})


def _top_via_text(request: SipRequest) -> str:
    # §17.1.1.3 / §9.1: the top Via "equal to" the request's: its text as sent, not re-encoded.
    first = request.headers.get("Via")
    assert first is not None  # validated messages
    return split_comma_untrusted(first)[0].strip(" \t")


def make_ack_for_failure(invite: SipRequest, response: SipResponse) -> SipRequest:
    """The ACK an INVITE client transaction sends for a 300-699 (§17.1.1.3): Request-URI,
    Call-ID, From, top Via, Route and CSeq number of the INVITE, To of the response."""
    headers = Headers()
    headers.add("Via", _top_via_text(invite))
    for name in ("Route",):
        for value in invite.headers.get_all(name):
            headers.add(name, value)
    headers.add("Max-Forwards", "70")
    from_ = invite.headers.get("From")
    to = response.headers.get("To")
    assert from_ is not None and to is not None  # validated messages
    headers.add("From", from_)
    headers.add("To", to)
    headers.add("Call-ID", invite.call_id)
    headers.add("CSeq", f"{invite.cseq.seq} ACK")
    return SipRequest("ACK", invite.uri, headers)


def make_cancel(request: SipRequest) -> SipRequest:
    """The CANCEL for a pending request (§9.1): same Request-URI, Call-ID, From, To, CSeq
    number, Route and top Via (so the same branch) as the request it cancels."""
    headers = Headers()
    headers.add("Via", _top_via_text(request))
    for value in request.headers.get_all("Route"):
        headers.add("Route", value)
    headers.add("Max-Forwards", "70")
    for name in ("From", "To"):
        copied = request.headers.get(name)
        assert copied is not None  # validated messages
        headers.add(name, copied)
    headers.add("Call-ID", request.call_id)
    headers.add("CSeq", f"{request.cseq.seq} CANCEL")
    return SipRequest("CANCEL", request.uri, headers)


# --- The layer -------------------------------------------------------------------------------


def _sent_by(via: Via) -> str:
    return f"{via.host.lower()}:{via.port or ''}"


def server_key(request: SipRequest) -> TransactionKey:
    """The server transaction a request belongs to (§17.2.3). ACK maps to its INVITE."""
    via = request.top_via
    method = "INVITE" if request.method == "ACK" else request.method
    branch = via.branch
    if branch is not None and branch.startswith(MAGIC_COOKIE):
        return TransactionKey(True, method, branch, _sent_by(via))
    # §17.2.3 RFC 2543 fallback: same Request-URI, From tag, Call-ID, CSeq number and top Via
    # (the To tag is checked separately for an ACK, which carries the tag of our response).
    cseq = request.cseq
    legacy = "\x00".join(
        (request.uri, request.call_id, request.from_tag or "", str(cseq.seq), str(via))
    )
    return TransactionKey(True, method, legacy, "")


def client_key(message: SipMessage) -> TransactionKey:
    """The client transaction a response (or our own request) belongs to (§17.1.3)."""
    return TransactionKey(False, message.cseq.method, message.branch or "", "")


_CLASSES: dict[tuple[bool, bool], type[Transaction]] = {
    (False, True): InviteClientTransaction,
    (False, False): NonInviteClientTransaction,
    (True, True): InviteServerTransaction,
    (True, False): NonInviteServerTransaction,
}


class _Kind(enum.Enum):
    ANSWERED = "non-INVITE server, Completed"  # until Timer J (§17.2.2)
    ACCEPTED_SERVER = "INVITE server, Accepted"  # until Timer L (RFC 6026 §8.7)
    ACCEPTED_CLIENT = "INVITE client, Accepted"  # until Timer M (RFC 6026 §8.4)


@dataclass(slots=True)
class _Completed:
    """What is left of a transaction that only waits to absorb retransmissions, for 64*T1:
    the final response to send again (ANSWERED: as the bytes it was sent as, parsed back only
    for a retransmission, which is rare), the peer, the transport and the expiry."""

    kind: _Kind
    response: bytes | None
    peer: object
    reliable: bool
    expires: float


def _lingering_kind(transaction: Transaction) -> _Kind | None:
    """What `transaction` is, if all it does now is wait for retransmissions for 64*T1."""
    state = transaction.state
    if state is State.COMPLETED and isinstance(transaction, NonInviteServerTransaction):
        return _Kind.ANSWERED  # over UDP (over TCP Timer J is zero: it ended already)
    if state is State.ACCEPTED:
        if isinstance(transaction, InviteClientTransaction):
            return _Kind.ACCEPTED_CLIENT
        if transaction.key.sent_by:
            # (An RFC 2543 peer's ACK is matched by the To tag of our response: kept whole.)
            return _Kind.ACCEPTED_SERVER
    return None


@dataclass(slots=True)
class _Deadline:
    when: float
    order: int
    key: TransactionKey = field(compare=False)

    def __lt__(self, other: _Deadline) -> bool:
        return (self.when, self.order) < (other.when, other.order)


class TransactionLayer:
    """All transactions of one SIP endpoint, keyed for O(1) matching, with one timer heap.

    A non-INVITE server transaction that has answered over UDP has nothing left to do but
    send its final response again to each retransmission of the request, for Timer J (64*T1 =
    32 s, §17.2.2); an INVITE transaction in Accepted (RFC 6026) only passes ACKs or 2xx
    retransmissions on, for Timer L or M (64*T1 too). Those are most of the transactions of a
    busy registrar (two per registration) or PBX (two per call), so the layer keeps only the
    response's bytes (non-INVITE), the peer and the expiry of each, in completion order, which
    is also expiry order (the timers are all 64*T1): no timer heap entry, under a kilobyte
    instead of the whole machine (about 15 KB, more with an SDP body). Up to
    `max_completed` are kept (20,000: 32 s of 625 answered requests a second, about 19 MB);
    beyond that the oldest is dropped (counted in `completed_evicted`): a retransmission that
    late is then taken as a new request, which costs a parse, not a refusal.

    When `max_transactions` are live (not counting the completed ones above), a new request
    (except ACK, which is never answered) gets a stateless 503 with Retry-After instead of a
    transaction: the client learns to back off (§21.5.4) instead of retransmitting at us for
    32 s, and the answer is no larger than the request, so it amplifies nothing. Dropping would
    cost us the same parse on every retransmission. A TU that starts a client transaction then
    gets `OverloadError`.
    """

    def __init__(
        self,
        *,
        timers: TimerConfig = DEFAULT_TIMERS,
        max_transactions: int = 10_000,
        max_completed: int = 20_000,
        retry_after: int = 5,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
        logger: logging.Logger | None = None,
    ) -> None:
        self.timers = timers
        self.max_transactions = max_transactions
        self.max_completed = max_completed
        self.retry_after = retry_after
        self._random_bytes = random_bytes
        self._logger = logger or logging.getLogger(__name__)
        self._transactions: dict[TransactionKey, Transaction] = {}
        self._completed: dict[TransactionKey, _Completed] = {}  # oldest first
        self._heap: list[_Deadline] = []
        self._scheduled: dict[TransactionKey, float] = {}
        self._order = 0
        self._stats = TransactionStatistics()

    def __len__(self) -> int:
        return len(self._transactions) + len(self._completed)

    def __contains__(self, key: object) -> bool:
        """Whether a transaction (a completed one kept for retransmissions too) has `key`."""
        return key in self._transactions or key in self._completed

    def get(self, key: TransactionKey) -> Transaction | None:
        """The state machine of transaction `key`; None for a completed non-INVITE server
        transaction, which is kept only as its response (`in` tells it exists)."""
        return self._transactions.get(key)

    def new_branch(self) -> str:
        return make_branch(self._random_bytes)

    def statistics(self) -> TransactionStatistics:
        stats = self._stats
        stats.active = len(self)
        stats.completed = len(self._completed)
        return dataclasses.replace(stats)

    # -- TU side --

    def send_request(
        self, request: SipRequest, now: float, destination: object, *, reliable: bool
    ) -> tuple[TransactionKey, list[Event]]:
        """Start a client transaction for `request`, whose top Via must carry a fresh branch
        (`new_branch()`). An ACK is no transaction: send it directly (§17.1.1.3)."""
        if request.method == "ACK":
            raise TransactionError("ACK is not sent through a client transaction")
        branch = request.branch
        if branch is None or not branch.startswith(MAGIC_COOKIE):
            raise TransactionError("a client request needs a branch with the magic cookie")
        key = client_key(request)
        if key in self._transactions:
            raise TransactionError(f"branch {branch} is already in use for {key.method}")
        if len(self._transactions) >= self.max_transactions:
            raise OverloadError(f"{len(self._transactions)} transactions already")
        cls = _CLASSES[(False, request.method == "INVITE")]
        transaction = cls(key, request, destination, reliable=reliable, timers=self.timers)
        assert isinstance(transaction, ClientTransaction)
        self._transactions[key] = transaction
        self._stats.client_created += 1
        return key, self._after(transaction, transaction.start(now))

    def send_response(self, key: TransactionKey, response: SipResponse, now: float) -> list[Event]:
        """The TU answers server transaction `key`."""
        transaction = self._transactions.get(key)
        if transaction is None:
            completed = self._completed.get(key)
            if completed is not None and completed.kind is _Kind.ACCEPTED_SERVER:
                if not 200 <= response.status < 300:
                    raise TransactionError(
                        f"INVITE {key.branch} was accepted: only a 2xx again, not a "
                        f"{response.status}"
                    )
                # RFC 6026 §8.6: the TU's retransmissions of its 2xx go out through Accepted.
                return [SendMessage(key, response, completed.peer, completed.reliable)]
        if not isinstance(transaction, ServerTransaction):
            raise TransactionError(f"no server transaction {key}")
        return self._after(transaction, transaction.send_response(response, now))

    def transport_error(self, key: TransactionKey, now: float) -> list[Event]:
        """The transport failed to send a message of transaction `key` (from `SendMessage`)."""
        transaction = self._transactions.get(key)
        if transaction is None:
            completed = self._completed.get(key)
            if completed is None or completed.kind is _Kind.ACCEPTED_CLIENT:
                return []
            self._stats.transport_errors += 1
            if completed.kind is _Kind.ACCEPTED_SERVER:
                # RFC 6026 §8.7: Accepted informs the TU and stays.
                return [TransportFailure(key, None)]
            # Completed + transport error: Terminated, the TU informed (§17.2.4, figure 8).
            del self._completed[key]
            self._stats.terminated += 1
            return [TransportFailure(key, None), TransactionTerminated(key)]
        self._stats.transport_errors += 1
        return self._after(transaction, transaction.transport_error(now))

    # -- network side --

    def receive(
        self, message: SipMessage, now: float, source: object, *, reliable: bool
    ) -> list[Event]:
        """A validated message from `source`, which is where responses to it will go."""
        try:
            if isinstance(message, SipResponse):
                return self._receive_response(message, now)
            return self._receive_request(message, now, source, reliable)
        except SipParseError as exc:
            # Not validated by the adapter; a transaction layer never answers for that.
            self._stats.malformed += 1
            self._logger.debug("SIP transaction layer dropped a malformed message: %s", exc)
            return []

    def _receive_response(self, response: SipResponse, now: float) -> list[Event]:
        key = client_key(response)
        transaction = self._transactions.get(key)
        if transaction is None:
            completed = self._completed.get(key)
            if completed is not None and completed.kind is _Kind.ACCEPTED_CLIENT:
                if 200 <= response.status < 300:
                    # RFC 6026 §8.4: a retransmitted 2xx goes to the TU, which ACKs it again.
                    return [ResponseReceived(key, response)]
                self._stats.ignored += 1
                return []
        if not isinstance(transaction, ClientTransaction):
            # RFC 6026: a response matching no client transaction is discarded, not handed to
            # the core (the 2xx retransmissions it used to carry now match Accepted).
            self._stats.stray_responses += 1
            return []
        return self._after(transaction, transaction.receive(response, now))

    def _receive_request(
        self, request: SipRequest, now: float, source: object, reliable: bool
    ) -> list[Event]:
        key = server_key(request)
        transaction = self._transactions.get(key)
        completed = self._completed.get(key) if transaction is None else None
        if completed is not None and completed.kind is _Kind.ACCEPTED_SERVER:
            # RFC 6026 §8.7: in Accepted an ACK goes to the TU, a retransmitted INVITE is
            # absorbed (the TU retransmits its 2xx itself).
            if request.method == "ACK":
                return [AckReceived(key, request, completed.peer)]
            self._stats.retransmissions_absorbed += 1
            return []
        if request.method == "ACK" and (
            transaction is None or not self._ack_matches(transaction, request)
        ):
            # §17.2.3: the ACK for a 2xx has its own branch and belongs to the TU.
            self._stats.stray_acks += 1
            return [AckReceived(None, request, source)]
        if transaction is not None:
            assert isinstance(transaction, ServerTransaction)
            if request.method != "ACK":
                self._stats.retransmissions_absorbed += 1
            return self._after(transaction, transaction.receive(request, now))
        if completed is not None and completed.response is not None:
            # §17.2.2: in Completed, a retransmission gets the final response again.
            self._stats.retransmissions_absorbed += 1
            self._stats.retransmissions_sent += 1
            response = parse_message_untrusted(completed.response)  # our own bytes
            return [SendMessage(key, response, completed.peer, completed.reliable)]
        if len(self._transactions) >= self.max_transactions:
            self._stats.overload_refused += 1
            self._logger.debug("SIP transaction limit reached: 503 to %s", request.method)
            refusal = make_response(request, 503, headers=[("Retry-After", str(self.retry_after))])
            return [SendMessage(None, refusal, source, reliable)]
        cls = _CLASSES[(True, request.method == "INVITE")]
        transaction = cls(key, request, source, reliable=reliable, timers=self.timers)
        assert isinstance(transaction, ServerTransaction)
        self._transactions[key] = transaction
        self._stats.server_created += 1
        events = transaction.start(now, source)
        if request.method == "CANCEL":
            # §9.2: the CANCEL matches the INVITE whose transaction its own key would name.
            invite_key = TransactionKey(True, "INVITE", key.branch, key.sent_by)
            if invite_key in self:
                events = [
                    RequestReceived(e.key, e.request, e.source, invite_key)
                    if isinstance(e, RequestReceived)
                    else e
                    for e in events
                ]
        return self._after(transaction, events)

    @staticmethod
    def _ack_matches(transaction: Transaction, ack: SipRequest) -> bool:
        if transaction.key.sent_by:  # cookie branch: the key says it all
            return True
        # §17.2.3 RFC 2543: the ACK's To tag must be the one of the response we sent.
        sent = transaction.last_response
        return sent is not None and sent.to_tag == ack.to_tag

    # -- timers --

    def get_timer(self) -> float | None:
        """The earliest timer of any transaction, or None."""
        when = self._heap_timer()
        if self._completed:
            first = next(iter(self._completed.values())).expires
            if when is None or first < when:
                return first
        return when

    def _heap_timer(self) -> float | None:
        heap = self._heap
        while heap:
            head = heap[0]
            if self._scheduled.get(head.key) == head.when:
                return head.when
            heapq.heappop(heap)  # stale: rescheduled or gone
        return None

    def handle_timer(self, now: float) -> list[Event]:
        """Run every transaction timer due at `now`."""
        events: list[Event] = []
        completed = self._completed
        while completed:
            key, first = next(iter(completed.items()))
            if first.expires > now:
                break
            # Timer J: Completed -> Terminated.
            del completed[key]
            self._stats.terminated += 1
            events.append(TransactionTerminated(key))
        while True:
            when = self._heap_timer()
            if when is None or when > now:
                return events
            key = heapq.heappop(self._heap).key
            del self._scheduled[key]
            transaction = self._transactions[key]
            events.extend(self._after(transaction, transaction.handle_timer(now)))

    def _after(self, transaction: Transaction, events: list[Event]) -> list[Event]:
        """Book-keeping after a transaction moved: counters, timer heap, removal."""
        key = transaction.key
        stats = self._stats
        stats.retransmissions_sent += transaction.retransmissions
        transaction.retransmissions = 0
        stats.ignored += transaction.ignored
        transaction.ignored = 0
        for event in events:
            if isinstance(event, TransactionTimeout):
                stats.timeouts += 1
        if transaction.terminated:
            if self._transactions.pop(key, None) is not None:
                stats.terminated += 1
            self._scheduled.pop(key, None)
            return events
        kind = _lingering_kind(transaction)
        if kind is not None:
            self._keep_completed(transaction, kind)
            return events
        when = transaction.get_timer()
        if when is None:
            self._scheduled.pop(key, None)
        elif self._scheduled.get(key) != when:
            self._scheduled[key] = when
            self._order += 1
            heapq.heappush(self._heap, _Deadline(when, self._order, key))
            if len(self._heap) > 4 * len(self._scheduled) + 64:
                self._compact()
        return events

    def _keep_completed(self, transaction: Transaction, kind: _Kind) -> None:
        """Replace a transaction that only waits for retransmissions by its `_Completed`."""
        key = transaction.key
        timer = {_Kind.ANSWERED: Timer.J, _Kind.ACCEPTED_SERVER: Timer.L}.get(kind, Timer.M)
        expires = transaction.deadline(timer)
        response = transaction.last_response
        assert expires is not None  # Completed over UDP, or Accepted
        encoded = None
        if kind is _Kind.ANSWERED:
            assert response is not None
            encoded = response.encode()
        del self._transactions[key]
        self._scheduled.pop(key, None)
        completed = self._completed
        while len(completed) >= max(1, self.max_completed):
            del completed[next(iter(completed))]
            self._stats.completed_evicted += 1
            self._stats.terminated += 1
        completed[key] = _Completed(kind, encoded, transaction.peer, transaction.reliable, expires)

    def _compact(self) -> None:
        self._heap = [d for d in self._heap if self._scheduled.get(d.key) == d.when]
        heapq.heapify(self._heap)
