"""The call core: what a caller's call is, whichever front end (SIP or WebRTC) it came through.

Front ends only read and write their transport's frames and signalling; the core holds the rest once: the
lifecycle (``state``), who speaks first and the consent gate (``audio``), escalation to a human
(``escalation``), recording (``recording``), the media watch and the call record (``core``), and the metrics,
labelled by ``front_end`` (``metrics``). Nothing here imports pjsua2 or aiortc.

Details: docs/calls.md#the-call-core.
"""
