"""The phone agent: a command-line softphone with real audio, and its Python API.

Layers, each consuming the one below (STYLE.md):

- `useragent`: the SIP user agent as a pure state machine (registration, calls, re-INVITE,
  MESSAGE, OPTIONS) on the project's transaction layer and dialogs.
- `negotiation`: our SDP offers and answers, and the media plan they lead to.
- `rtpsession`: one call's RTP both ways, pure (G.711, RFC 4733 DTMF, statistics), with
  `jitter` (the receive jitter buffer).
- `audio` and `tone`: WAV files, sources, recording; tones and Goertzel detection.
- `media` and `phone`: the trio adapters (RTP socket and clock; `open_phone`, `Phone`, `Call`).
- `cli`: the `phoneagent` command.
"""
