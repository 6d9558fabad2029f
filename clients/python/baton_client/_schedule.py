"""When one call publishes its request: the same rules as the Swift client's ``CallSchedule``
(BatonCore), checked by the cases of ``docs/conformance/call-schedule.json`` that both clients' tests
replay.

The first attempt goes as soon as a channel is ready and the broker does not block publishing; each
resend after an interval that doubles (times a jitter drawn from 0.8-1.2) up to a cap (twice
``resend_after``; 15,000 ms for a claim that waits in line) and never past the deadline; an attempt at
once on a new channel, with the intervals started over (what went on the old one may be lost with it).
No I/O and no clock of its own: times are integer milliseconds on the caller's monotonic clock.
"""

from __future__ import annotations

from typing import Hashable, Optional, Tuple, Union

#: The longest interval between resends of a claim that waits in line.
WAITING_RESEND_CAP = 15_000
#: The range the jitter of each resend interval is drawn from.
JITTER = (0.8, 1.2)

SEND = "send"
TIMED_OUT = "timed_out"

#: ``SEND``, ``TIMED_OUT``, ``("wait_until", t)`` or ``("wait_for_channel_until", t)``.
Step = Union[str, Tuple[str, int]]


class CallSchedule:
    """One call's publishing schedule; ``step`` says what to do now, ``sent`` records a publish."""

    def __init__(self, resend_after: Optional[int], deadline: int, waiting: bool = False,
                 max_interval: Optional[int] = None) -> None:
        self.resend_after = resend_after
        self.deadline = deadline
        self.waiting = waiting
        #: The longest interval between resends when the caller sets one (a lease keeper's renewal
        #: resends at least every quarter of the lease): replaces ``cap``'s default.
        self.max_interval = max_interval
        self.attempts = 0
        self.last_blocked = False
        self._interval = self._first_interval()
        self._channel: Optional[Hashable] = None
        self._next_send: Optional[int] = None

    def _first_interval(self) -> Optional[int]:
        if self.resend_after is None or self.max_interval is None:
            return self.resend_after
        return min(self.resend_after, self.max_interval)

    @property
    def cap(self) -> Optional[int]:
        if self.resend_after is None:
            return None
        if self.max_interval is not None:
            return self.max_interval
        return max(self.resend_after, WAITING_RESEND_CAP) if self.waiting else self.resend_after * 2

    def step(self, now: int, channel: Optional[Hashable], blocked: bool = False) -> Step:
        """What to do at ``now`` with ``channel`` ready (None: none) and publishing blocked or not."""
        if now >= self.deadline:
            return TIMED_OUT
        if channel is None or blocked:
            self.last_blocked = blocked
            return ("wait_for_channel_until", self.deadline)
        if self.attempts > 0 and channel != self._channel:
            self._interval = self._first_interval()
            return SEND
        if self._next_send is not None and now < self._next_send:
            return ("wait_until", self._next_send)
        return SEND

    def sent(self, now: int, channel: Hashable, jitter: float) -> None:
        """The request was published at ``now`` on ``channel``; ``jitter`` spreads the next interval."""
        self.attempts += 1
        self.last_blocked = False
        self._channel = channel
        interval, cap = self._interval, self.cap
        if interval is None or cap is None:
            self._next_send = self.deadline
            return
        self._next_send = min(self.deadline, now + interval)
        # Rounded half away from zero, as Swift's ``rounded()``.
        scaled = min(interval * 2, cap) * jitter
        self._interval = int(scaled + 0.5) if scaled >= 0 else -int(-scaled + 0.5)
        if self.max_interval is not None:
            self._interval = min(self._interval, self.max_interval)
