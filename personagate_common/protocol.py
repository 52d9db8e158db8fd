"""The worker protocol's constants, written once for both ends (docs/worker-protocol.md).

The worker (``agent_runtime.server``) serves it and the gateway (``gateway.worker_client``) speaks it: audio
frames, close codes and message types. The persona object and its key are in ``persona.py``; a worker's
state as the routing store knows it is ``routing.WorkerState``.
"""

from __future__ import annotations

import enum

SAMPLE_RATE = 24_000  # Hz: Mimi's rate, and the audio on the wire both ways
FRAME_RATE = 12.5  # model steps per second
FRAME_SAMPLES = 1920  # 80 ms at 24 kHz: one model step
FRAME_BYTES = FRAME_SAMPLES * 2  # s16le on the wire: 3840
FRAME_SECONDS = 0.08  # 1 / FRAME_RATE, written out


class CloseCode(enum.IntEnum):
    """The WebSocket close codes of a session (docs/worker-protocol.md §4)."""

    NORMAL = 1000  # the session ended (by the client's "end" or by the worker)
    GOING_AWAY = 1001  # the worker is shutting down: a drain's deadline passed, or it was told to stop at once
    POLICY_VIOLATION = 1008  # no or a wrong shared secret (where the server cannot answer the upgrade 401)
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013  # the worker takes no sessions now: loading its model, or draining
    BAD_REQUEST = 4400  # malformed start message or audio frame
    UNAUTHORIZED = 4401  # never sent: the client's code for an upgrade the worker answered 401 (its credential)
    START_TIMEOUT = 4408  # no start message in time
    PERSONA_REJECTED = 4422  # the persona cannot be primed (unknown voice, bad clip, prompt too long)
    NO_FREE_SLOT = 4503  # every slot is in use: try another worker


class MessageType(enum.StrEnum):
    """The ``type`` of a session's JSON text messages."""

    START = "start"  # client -> worker, first message: the persona and the session id
    READY = "ready"  # worker -> client: the session is primed and stepping
    TEXT = "text"  # worker -> client: the agent's text tokens
    END = "end"  # client -> worker: end the session
