"""The WebRTC front end: browser calls to a tenant's persona, signalled over the gateway's HTTP port and
routed, admitted and primed exactly as SIP calls are (``gateway/calls.py``).

``api.py`` (the page, the personas a client may call, offer → answer, hang-up; rate limits and refusals as
HTTP statuses), ``offer.py`` (what an offer must say), ``call.py`` (a call's state machine and its data
channel events), ``media.py`` (aiortc tracks ⇄ 80 ms agent frames: resampling, pacing, bounded queues),
``ice.py`` (host candidate interfaces, STUN/TURN), ``metrics.py``, ``static/`` (the page). See docs/webrtc.md.
"""
