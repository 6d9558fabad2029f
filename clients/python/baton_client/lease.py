"""The lease keeper (protocol section 9, "Keeping a lease").

All times are measured on the local monotonic clock (``time.monotonic``) from the moment the claim
or renewal was **first published**; ``expires_at`` of the replies (the database's clock) is never
compared with it. A lease is

* ``HELD`` while the last confirmed grant or renewal leaves more than the margin,
* ``RENEWING_LATE`` while a renewal has not been answered and less than half the lease is left
  (keep writing only if you can tolerate the fencing token rejecting your writes),
* ``LOST`` once a renewal was answered ``not_owner`` (or rejected), or once
  ``send_time + lease_ms - margin`` passed without an answer: stop writing at once,
* ``RELEASED`` after ``release()`` (or leaving the ``with`` block).

A keeper with ``wait_ms`` claims with a waiting claim (section 19). Its grant comes at an unknown
moment of the wait, so the claim's send time says little about when the lease began (and may lie a
whole lease or more in the past). The keeper therefore confirms such a grant at once with a renewal
and counts the lease from the moment that renewal was first sent (section 9: "a renewal that is
answered ``renewed`` moves ``t0`` to the moment it was first sent"); ``acquire()`` returns once it
is answered.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

from ._calls import CallSite
from .errors import (
    BatonError,
    BatonTimeoutError,
    ClientClosedError,
    LeaseDeniedError,
    ProtocolError,
    RejectedError,
)
from .requests import Request, check_wait_ms
from .types import Reply, parse_reply


log = logging.getLogger("baton_client")

__all__ = ["Lease", "LeaseState", "LeaseChange", "KeptMembership"]


class LeaseState(str, enum.Enum):
    PENDING = "pending"  # not claimed yet
    HELD = "held"
    RENEWING_LATE = "renewing_late"
    LOST = "lost"
    RELEASED = "released"

    def __str__(self) -> str:  # pragma: no cover - cosmetic
        return self.value


@dataclass(frozen=True)
class LeaseChange:
    """One state change: the new ``state``, why (``reason``), the token, and when it happened on
    the local monotonic clock (``at``)."""

    state: LeaseState
    reason: str
    token: Optional[int]
    at: float


class Lease:
    """Claims a buffer, keeps it renewed in a background thread and releases it at the end.

    :param lease_ms: the lease length asked for in every claim and renewal (1000-3600000).
    :param margin_ms: safety margin for clock drift; the lease counts as lost at
        ``send_time + lease_ms - margin_ms``. Default: a tenth of the lease.
    :param renew_fraction: renew when this fraction of the lease has passed since the send time
        of the last confirmed claim/renewal (default 1/3, as the Swift client).
    :param on_change: ``callback(change: LeaseChange)``, called from the keeper's thread (keep it
        short; it must not call ``release()``).
    :param claim_timeout: timeout of the claim (default: the client's timeout); with ``wait_ms``
        the claim waits ``wait_ms`` plus this for its answer.
    :param wait_ms: wait up to this many milliseconds (1-300000) in the buffer's line when it is
        held (section 19, revision 4) instead of being denied. The grant is then confirmed with an
        immediate renewal, and the lease is measured from that renewal's first send.
    """

    def __init__(self, client: CallSite, buffer: str, *, user: str, connection: str,
                 lease_ms: int = 30000, margin_ms: Optional[int] = None,
                 renew_fraction: float = 1 / 3,
                 on_change: Optional[Callable[[LeaseChange], None]] = None,
                 claim_timeout: Optional[float] = None, wait_ms: Optional[int] = None):
        if isinstance(lease_ms, bool) or not isinstance(lease_ms, int) or \
                not 1000 <= lease_ms <= 3_600_000:
            raise ValueError(f"lease_ms must be an integer from 1000 to 3600000, got {lease_ms!r}")
        if not 0 < renew_fraction < 0.5:
            raise ValueError("renew_fraction must be between 0 and 0.5")
        self.wait_ms = None if wait_ms is None else check_wait_ms(wait_ms)
        self.client = client
        self.buffer = buffer
        self.user = user
        self.connection = connection
        self.lease_ms = lease_ms
        self.margin = (lease_ms / 10 if margin_ms is None else margin_ms) / 1000.0
        if not 0 <= self.margin < lease_ms / 2000.0:
            raise ValueError("margin_ms must be below half the lease")
        self.renew_fraction = renew_fraction
        self.claim_timeout = claim_timeout
        # Resend interval of renewals: the client's, but often enough for short leases.
        base = client.resend_after if client.resend_after is not None else 1.5
        self.renew_resend = max(0.1, min(base, lease_ms / 4000.0))
        self._callbacks: List[Callable[[LeaseChange], None]] = [on_change] if on_change else []
        self.changes: "queue.Queue[LeaseChange]" = queue.Queue()
        self._cond = threading.Condition()
        self._state = LeaseState.PENDING
        self._reason = "not claimed yet"
        self._token: Optional[int] = None
        self._expiry: Optional[float] = None  # local monotonic end of the confirmed lease
        self._confirmed_send: Optional[float] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._owner_lost = False  # the worker said not_owner: nothing to release
        self.grant: Optional[Reply] = None
        self.renewals = 0

    # ------------------------------------------------------------------ observation

    @property
    def state(self) -> LeaseState:
        return self._state

    @property
    def reason(self) -> str:
        return self._reason

    @property
    def token(self) -> Optional[int]:
        """The fencing token to send with every write (section 8)."""
        return self._token

    @property
    def held(self) -> bool:
        return self._state is LeaseState.HELD

    def remaining(self) -> float:
        """Seconds the lease is still safe on the local clock (``send + lease - margin - now``);
        0 when lost or released."""
        if self._expiry is None or self._state in (LeaseState.LOST, LeaseState.RELEASED):
            return 0.0
        return max(0.0, self._expiry - self.margin - time.monotonic())

    def add_callback(self, fn: Callable[[LeaseChange], None]) -> None:
        self._callbacks.append(fn)

    def wait_for(self, *states: LeaseState, timeout: Optional[float] = None) -> bool:
        """Block until the state is one of ``states``; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._state in states, timeout)

    def _set(self, state: LeaseState, reason: str) -> None:
        with self._cond:
            if self._state is state:
                self._reason = reason
                return
            if self._state is LeaseState.RELEASED:
                return  # final
            if self._state is LeaseState.LOST and state is not LeaseState.RELEASED:
                return  # lost stays lost until released
            self._state = state
            self._reason = reason
            self._cond.notify_all()
        ch = LeaseChange(state, reason, self._token, time.monotonic())
        self.changes.put(ch)
        for fn in list(self._callbacks):
            try:
                fn(ch)
            except Exception:
                log.exception("lease callback failed")

    # ------------------------------------------------------------------ life cycle

    def __enter__(self) -> "Lease":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> "Lease":
        """Claim the buffer and start renewing it. Raises :class:`LeaseDeniedError` when another
        holder has it (with ``wait_ms``: when the wait ran out),
        :class:`~baton_client.errors.BatonTimeoutError` when no answer came (the client then
        cleans up a possible grant in the background). With ``wait_ms`` it blocks while the claim
        waits in line, then confirms the grant with a renewal (see the module's documentation);
        the lease is returned ``HELD``, or ``LOST`` if that confirmation failed."""
        if self._state is not LeaseState.PENDING:
            raise BatonError(f"this lease is already {self._state.value}")
        req = Request.claim(self.buffer, self.user, self.connection, self.lease_ms,
                            wait_ms=self.wait_ms)
        reply, call = self.client._claim(req, self.claim_timeout)
        if reply.status != "granted":
            raise LeaseDeniedError(reply)
        assert call.first_sent is not None
        if reply.token is None:
            raise ProtocolError(f"a granted reply without a token: {reply.raw!r}")
        self.grant = reply
        self._token = reply.token
        if self.wait_ms is not None:
            self._confirm_waiting_grant(reply)
            self._start_keeper()
        else:
            self._keep_from(call.first_sent, f"granted token {reply.token}")
        return self

    def _keep_from(self, first_sent: float, reason: str) -> None:
        """Count the grant (or membership) from ``first_sent`` on the local clock, then renew it."""
        self._confirmed_send = first_sent
        self._expiry = first_sent + self.lease_ms / 1000.0
        if time.monotonic() >= self._expiry - self.margin:
            self._owner_lost = False
            self._set(LeaseState.LOST, "the answer came after the lease had run out on the local clock")
        else:
            self._set(LeaseState.HELD, reason)
        self._start_keeper()

    def _start_keeper(self) -> None:
        if self.state is not LeaseState.LOST:  # (a lost lease keeps its reason; nothing to renew)
            self._thread = threading.Thread(target=self._run, name=f"baton-lease:{self.buffer}",
                                            daemon=True)
            self._thread.start()

    def _end(self, token: int, timeout: Optional[float]) -> Reply:
        """What ``release()`` sends: a lease's release."""
        return self.client.release(self.buffer, self.connection, token, timeout=timeout)

    def _confirm_waiting_grant(self, grant: Reply) -> None:
        """A waiting claim was granted at some moment between its first send and its answer
        (section 19), which may be far more than a lease ago: renew at once and count the lease
        from the renewal's first send, which the renewal's ``renewed`` bounds from below
        (section 9). Sets HELD, or LOST when the renewal was refused or got no answer."""
        timeout = self.client._timeout(self.claim_timeout)
        token = grant.token
        assert token is not None  # acquire() checked it
        req = Request.renew(self.buffer, self.connection, token, self.lease_ms)
        call = self.client._submit(self.client._make_call(
            req, self.client._route(req), timeout, self.renew_resend,
            "renew (confirming a waiting grant)", max_resend_interval=self.renew_resend))
        # Until the renewal is answered the lease is confirmed by nothing; start the clocks now so
        # that remaining() and the keeper have a value (replaced below when it is answered).
        self._confirmed_send = self._expiry = time.monotonic()
        try:
            reply: Optional[Reply] = parse_reply(self.client._wait(call))
        except BatonTimeoutError:
            reply = None
        except BaseException as exc:  # interrupted, client closed: acquire() raises
            self.client._io.cancel(call)
            self._owner_lost = True  # the release below is the only one
            self._set(LeaseState.LOST, f"confirming the waiting grant failed: {exc!r}")
            self.client._release_in_background(self.buffer, self.connection, token)
            raise
        if reply is not None and reply.status == "renewed":
            assert call.first_sent is not None
            self.renewals += 1
            self._confirmed_send = call.first_sent
            self._expiry = call.first_sent + self.lease_ms / 1000.0
            if time.monotonic() >= self._expiry - self.margin:
                self._set(LeaseState.LOST, "the renewal confirming the waiting grant was answered "
                                           "after the lease had run out on the local clock")
            else:
                self._set(LeaseState.HELD, f"granted token {grant.token} after waiting in line; "
                                           f"confirmed by a renewal")
            return
        if reply is None:
            self._set(LeaseState.LOST, f"granted token {grant.token} after waiting in line, but "
                                       f"the renewal confirming it got no answer within "
                                       f"{timeout:g} s")
        elif reply.status == "not_owner":
            self._owner_lost = True
            self._set(LeaseState.LOST, f"granted token {grant.token} after waiting in line, but "
                                       f"the renewal confirming it was answered not_owner (the "
                                       f"lease had already ended; token now {reply.token})")
        else:
            self._set(LeaseState.LOST, f"granted token {grant.token} after waiting in line, but "
                                       f"the renewal confirming it was answered {reply.status}"
                                       + (f" ({reply.error.code}: {reply.error.message})"
                                          if reply.error else ""))

    def release(self, timeout: Optional[float] = None) -> Optional[Reply]:
        """Stop renewing and release the buffer (unless the worker already said it is not ours).
        Idempotent. Returns the ``released`` / ``not_owner`` reply, or ``None``."""
        if self._state in (LeaseState.PENDING, LeaseState.RELEASED):
            return None
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        reply: Optional[Reply] = None
        if not self._owner_lost and self._token is not None:
            try:
                reply = self._end(self._token, timeout)
            except ClientClosedError:
                pass
            except BatonError as exc:
                log.warning("release of %r (token %s) failed: %s; the lease expires on its own",
                            self.buffer, self._token, exc)
        self._set(LeaseState.RELEASED, "released" if reply is None or
                  reply.status in ("released", "left") else f"release answered {reply.status}")
        return reply

    # ------------------------------------------------------------------ keeper thread

    def _run(self) -> None:
        try:
            self._keep()
        except Exception as exc:  # never let the keeper die silently
            log.exception("lease keeper of %r failed", self.buffer)
            self._set(LeaseState.LOST, f"lease keeper failed: {exc!r}")

    def _keep(self) -> None:
        period = self.lease_ms / 1000.0 * self.renew_fraction
        while not self._stop.is_set():
            assert self._expiry is not None and self._confirmed_send is not None
            lost_at = self._expiry - self.margin
            next_renew = self._confirmed_send + period
            now = time.monotonic()
            if now >= lost_at:
                self._set(LeaseState.LOST, "no renewal was answered before the lease ran out "
                                           "on the local clock")
                return
            if now < next_renew:
                if self._stop.wait(min(next_renew, lost_at) - now):
                    return
                continue
            if not self._renew_once(lost_at):
                return

    def _renew_once(self, lost_at: float) -> bool:
        """One renewal (resent until answered or lost). False when the keeper must stop."""
        assert self._token is not None and self._expiry is not None  # the keeper runs once granted
        req = Request.renew(self.buffer, self.connection, self._token, self.lease_ms)
        late_at = self._expiry - self.lease_ms / 2000.0
        timeout = min(max(0.05, lost_at - time.monotonic()), 300.0)
        call = self.client._submit(self.client._make_call(
            req, self.client._route(req), timeout, self.renew_resend, "renew",
            max_resend_interval=self.renew_resend))
        while True:
            now = time.monotonic()
            if self._stop.is_set():
                self.client._io.cancel(call)
                return False
            if now >= lost_at:
                self.client._io.cancel(call)
                self._set(LeaseState.LOST, "no renewal was answered before the lease ran out on "
                                           "the local clock")
                return False
            if now >= late_at and self._state is LeaseState.HELD:
                self._set(LeaseState.RENEWING_LATE, "a renewal is unanswered and less than half "
                                                    "the lease is left")
            wake = lost_at if now >= late_at else late_at
            try:
                obj = call.future.result(timeout=max(0.0, min(wake - now, 0.05)))
            except BatonTimeoutError:
                # Timed out exactly at lost_at (or the worker side is down): lost.
                self._set(LeaseState.LOST, "no renewal was answered before the lease ran out on "
                                           "the local clock")
                return False
            except (ClientClosedError, BatonError) as exc:
                self._set(LeaseState.LOST, f"renewal failed: {exc}")
                return False
            except FuturesTimeout:  # not answered yet
                continue
            break
        reply = parse_reply(obj)
        if reply.status == "renewed":
            assert call.first_sent is not None
            self.renewals += 1
            self._confirmed_send = call.first_sent
            self._expiry = call.first_sent + self.lease_ms / 1000.0
            self._set(LeaseState.HELD, f"renewed token {self._token}")
            return True
        if reply.status == "not_owner":
            self._owner_lost = True
            h = reply.holder
            who = f"; the holder is now {h.user!r} on {h.connection!r}" if h else ""
            self._set(LeaseState.LOST, f"renewal answered not_owner (token now "
                                       f"{reply.token}){who}")
            return False
        if reply.status == "error" and reply.error and reply.error.code == "deadline_exceeded":
            return True  # not decided: try again while the lease lasts
        err = RejectedError(reply.error.code, reply.error.message, reply) if reply.error \
            else None
        self._set(LeaseState.LOST, f"renewal answered {reply.status}"
                                   + (f" ({err})" if err else ""))
        return False


class KeptMembership(Lease):
    """A replica membership kept as a lease is kept (section 20, revision 6): entering joins the
    buffer's collaborators, a background thread renews the membership with its token on the local clock
    (``RENEWING_LATE`` at half the lease, ``LOST`` at the safe end or when a renewal finds no membership,
    for example after ``release_connection``), and ``release()`` (leaving the ``with`` block) sends
    ``leave``. ``replica_id`` is the membership's id; ``grant`` the ``joined`` reply."""

    def __init__(self, client: CallSite, buffer: str, *, user: str, connection: str,
                 lease_ms: int = 30000, margin_ms: Optional[int] = None,
                 renew_fraction: float = 1 / 3,
                 on_change: Optional[Callable[[LeaseChange], None]] = None,
                 claim_timeout: Optional[float] = None):
        super().__init__(client, buffer, user=user, connection=connection, lease_ms=lease_ms,
                         margin_ms=margin_ms, renew_fraction=renew_fraction, on_change=on_change,
                         claim_timeout=claim_timeout)
        self.replica_id: Optional[int] = None

    def __enter__(self) -> "KeptMembership":
        return self.acquire()

    def acquire(self) -> "KeptMembership":
        """Join and start renewing. Raises :class:`~baton_client.errors.RejectedError` for
        ``members_full`` or a connection that is a member under another user."""
        if self._state is not LeaseState.PENDING:
            raise BatonError(f"this membership is already {self._state.value}")
        req = Request.join(self.buffer, self.user, self.connection, self.lease_ms)
        partition = self.client._route(req)
        self.client._require_partition_revision(partition, 6, "join")
        call = self.client._submit(self.client._make_call(
            req, partition, self.client._timeout(self.claim_timeout), self.renew_resend, "join",
            max_resend_interval=self.renew_resend))
        reply = parse_reply(self.client._wait(call)).raise_for_error()
        replica_id = reply.raw.get("replica_id")
        if reply.status != "joined" or reply.token is None or not isinstance(replica_id, int):
            raise ProtocolError(f"join was answered {reply.status!r}: {reply.raw!r}")
        assert call.first_sent is not None
        self.grant = reply
        self._token = reply.token
        self.replica_id = replica_id
        self._keep_from(call.first_sent, f"joined as replica {replica_id} (token {reply.token})")
        return self

    def _end(self, token: int, timeout: Optional[float]) -> Reply:
        """What ``release()`` sends: a leave (the id is free at once)."""
        return self.client.leave(self.buffer, self.connection, token, timeout=timeout)
