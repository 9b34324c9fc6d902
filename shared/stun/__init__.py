"""STUN (RFC 5389 with the RFC 3489 and RFC 5780 attributes): a pure codec and a pure server.

Sockets live elsewhere: `mainhost.stun` serves, `remotehost.natprobe` asks.
"""
