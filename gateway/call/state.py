"""A call's lifecycle, one state machine for both front ends.

    ringing ─► connecting ─► answered ─► live ─► bridged ─► ending ─► ended
       │            │            │         └──────────────────►┘
       └► refused ◄─┘            └► cancelled (SIP: CANCEL before the ACK)

``ringing``: the call arrived and was routed (SIP: 180 sent; WebRTC: the offer taken). ``connecting``: its agent
session is being claimed and primed (SIP: 183; WebRTC: the answer sent, the media connecting). ``answered``: SIP
only, 200 OK sent and not yet acknowledged. ``live``: caller and agent talk. ``bridged``: the caller is with a
human and the agent released. ``refused`` and ``cancelled`` end a call that was never answered.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping
from typing import Generic, TypeVar


class CallState(enum.StrEnum):
    RINGING = "ringing"
    CONNECTING = "connecting"
    ANSWERED = "answered"
    LIVE = "live"
    BRIDGED = "bridged"
    ENDING = "ending"
    ENDED = "ended"
    REFUSED = "refused"
    CANCELLED = "cancelled"


TRANSITIONS: dict[CallState, frozenset[CallState]] = {
    CallState.RINGING: frozenset({CallState.CONNECTING, CallState.REFUSED, CallState.CANCELLED}),
    CallState.CONNECTING: frozenset({CallState.ANSWERED, CallState.LIVE, CallState.ENDING, CallState.REFUSED,
                                     CallState.CANCELLED}),
    CallState.ANSWERED: frozenset({CallState.LIVE, CallState.BRIDGED, CallState.ENDING, CallState.CANCELLED}),
    CallState.LIVE: frozenset({CallState.BRIDGED, CallState.ENDING}),
    CallState.BRIDGED: frozenset({CallState.ENDING}),
    CallState.ENDING: frozenset({CallState.ENDED}),
    CallState.ENDED: frozenset(),
    CallState.REFUSED: frozenset(),
    CallState.CANCELLED: frozenset(),
}
OVER = frozenset({CallState.ENDING, CallState.ENDED, CallState.REFUSED, CallState.CANCELLED})
FINAL = frozenset({CallState.ENDED, CallState.REFUSED, CallState.CANCELLED})

S = TypeVar("S", bound=enum.Enum)


class StateMachine(Generic[S]):
    """A state and when it entered each (``history``, monotonic seconds); a move not in ``transitions`` is a bug and
    raises. Calls (``Lifecycle``) and agent sessions (``calls.AgentCall``) each have one."""

    def __init__(self, name: str, initial: S, transitions: Mapping[S, frozenset[S]]) -> None:
        self.name = name  # for the error: what the machine is of
        self.transitions = transitions
        self.state = initial
        self.history: list[tuple[S, float]] = [(initial, time.monotonic())]

    @property
    def began(self) -> float:
        return self.history[0][1]

    def to(self, state: S) -> None:
        if state not in self.transitions[self.state]:
            raise RuntimeError(f"{self.name}: no transition {self.state} -> {state}")
        self.state = state
        self.history.append((state, time.monotonic()))

    def reached(self, state: S) -> bool:
        """The machine has been in ``state`` (now or before)."""
        return any(entered is state for entered, _ in self.history)


class Lifecycle(StateMachine[CallState]):
    """A caller's call's lifecycle."""

    def __init__(self, name: str) -> None:
        super().__init__(name, CallState.RINGING, TRANSITIONS)

    @property
    def over(self) -> bool:
        return self.state in OVER

    @property
    def done(self) -> bool:
        return self.state in FINAL
