"""DSCP marking for voice sockets (F7): everything a media socket sends is Expedited Forwarding
(RFC 3246, DSCP 46), so routers that honour it send voice first. Used by the main host's relay
and the remote host's media anchor."""

from __future__ import annotations

import contextlib
import socket

DSCP_EF_TOS = 0xB8  # DSCP 46 in the upper six bits of the TOS / traffic class byte


def set_dscp_ef(sock: socket.socket) -> None:
    """Mark everything `sock` sends as Expedited Forwarding."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, DSCP_EF_TOS)
        # A dual-stack socket sends IPv4 too; Linux takes IP_TOS for those.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, DSCP_EF_TOS)
    else:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, DSCP_EF_TOS)
