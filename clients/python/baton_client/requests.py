"""Request bodies (protocol section 3.2, 12, 15, 17, 18, 19).

A :class:`Request` is one request object without its ``deadline``; the client adds the deadline
of the call when it sends it. Build them with the class methods (``Request.claim(...)`` ...) to use
them in ``Client.batch``.
"""

from __future__ import annotations

import unicodedata
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Dict, Optional

__all__ = ["Request", "format_timestamp", "deadline_after", "new_request_id", "ADMIN_EXCHANGE",
           "REQUESTS_EXCHANGE", "EVENTS_EXCHANGE", "MAX_BODY_BYTES", "MAX_WAIT_MS",
           "WAIT_DEADLINE_CAP", "check_wait_ms", "waiting_claim_times"]

REQUESTS_EXCHANGE = "baton.requests"
ADMIN_EXCHANGE = "baton.admin"
EVENTS_EXCHANGE = "baton.events"
MAX_BODY_BYTES = 65536
MAX_TOKEN = 2**63 - 1
#: ``wait_ms`` of a waiting claim: 1 to 300000 (section 3.2, section 19; revision 4).
MAX_WAIT_MS = 300_000
#: How far ahead a waiting claim's ``deadline`` (and ``expiration``) may lie, in seconds. The
#: protocol allows at most 300 s after the *database's* time (section 3.2); one second is left for
#: the difference between this host's clock and the database's.
WAIT_DEADLINE_CAP = 299.0


def new_request_id() -> str:
    return str(uuid.uuid4())


def format_timestamp(t: datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SS.mmmZ`` (UTC, three fractional digits; section 5)."""
    t = t.astimezone(timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def deadline_after(seconds: float) -> str:
    """The ``deadline`` string for ``seconds`` from now on the local (NTP-synced) UTC clock."""
    return format_timestamp(datetime.now(timezone.utc) + timedelta(seconds=seconds))


def _nfc(s: str, name: str) -> str:
    if not isinstance(s, str):
        raise TypeError(f"{name} must be a str, got {type(s).__name__}")
    return unicodedata.normalize("NFC", s)


def _int(v: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be from {lo} to {hi}, got {v}")
    return v


def check_wait_ms(wait_ms: Any) -> int:
    """``wait_ms`` if it is an integer from 1 to 300000 (section 19), else :class:`ValueError`
    naming the value and the allowed range."""
    if isinstance(wait_ms, bool) or not isinstance(wait_ms, int) or not 1 <= wait_ms <= MAX_WAIT_MS:
        raise ValueError(f"wait_ms must be an integer number of milliseconds from 1 to "
                         f"{MAX_WAIT_MS} (section 19), got {wait_ms!r}")
    return wait_ms


def waiting_claim_times(wait_ms: int, timeout: float) -> "tuple[float, float]":
    """``(wait, publish)`` in seconds for a claim that waits ``wait_ms`` with the call timeout
    ``timeout`` (section 19, "Limits"): the caller waits ``wait_ms`` plus the timeout for the
    answer, and the request's ``deadline`` and ``expiration`` are that too, but at most
    :data:`WAIT_DEADLINE_CAP` ahead (the protocol's 300 s). When the cap applies, the worker lets
    the claim wait only until the deadline (section 19: ``wait_until`` is the earlier of
    ``now + wait_ms`` and the deadline) and the caller still listens a full timeout after it for
    the answer."""
    wait = check_wait_ms(wait_ms) / 1000.0 + float(timeout)
    return wait, min(wait, WAIT_DEADLINE_CAP)


@dataclass(frozen=True)
class Request:
    """One request object. ``fields`` holds the op's own fields (no ``v``, ``op``, ``request_id``,
    ``deadline``). Strings are NFC-normalized (section 3.2)."""

    op: str
    fields: Dict[str, Any]
    request_id: str = field(default_factory=new_request_id)

    @property
    def buffer(self) -> Optional[str]:
        return self.fields.get("buffer")

    @property
    def exchange(self) -> str:
        return ADMIN_EXCHANGE if self.op == "force_release" else REQUESTS_EXCHANGE

    @property
    def waiting(self) -> bool:
        """A claim that waits in line (``wait_ms``, section 19): it must be sent alone."""
        return self.op == "claim" and "wait_ms" in self.fields

    @property
    def needs_principal(self) -> bool:
        return self.op in ("claim", "renew", "release", "release_connection")

    def body(self, deadline: Optional[str] = None) -> Dict[str, Any]:
        """The request object in the documented field order, with ``deadline`` if given."""
        b: Dict[str, Any] = {"v": 1, "op": self.op, "request_id": self.request_id}
        b.update(self.fields)
        if deadline is not None:
            b["deadline"] = deadline
        return b

    # -- constructors -------------------------------------------------------------------------

    @classmethod
    def claim(cls, buffer: str, user: str, connection: str, lease_ms: Optional[int] = None,
              request_id: Optional[str] = None, *, wait_ms: Optional[int] = None) -> "Request":
        """A claim; with ``wait_ms`` (revision 4) one that waits in the buffer's line (section 19).
        A waiting claim must be sent alone (``Client.claim(..., wait_ms=...)``), never in a batch."""
        f: Dict[str, Any] = {"buffer": _nfc(buffer, "buffer"), "user": _nfc(user, "user"),
                             "connection": _nfc(connection, "connection")}
        if lease_ms is not None:
            f["lease_ms"] = _int(lease_ms, "lease_ms", 1000, 3_600_000)
        if wait_ms is not None:
            f["wait_ms"] = check_wait_ms(wait_ms)
        return cls._make("claim", f, request_id)

    @classmethod
    def renew(cls, buffer: str, connection: str, token: int, lease_ms: Optional[int] = None,
              request_id: Optional[str] = None) -> "Request":
        f: Dict[str, Any] = {"buffer": _nfc(buffer, "buffer"),
                             "connection": _nfc(connection, "connection"),
                             "token": _int(token, "token", 1, MAX_TOKEN)}
        if lease_ms is not None:
            f["lease_ms"] = _int(lease_ms, "lease_ms", 1000, 3_600_000)
        return cls._make("renew", f, request_id)

    @classmethod
    def release(cls, buffer: str, connection: str, token: int,
                request_id: Optional[str] = None) -> "Request":
        f = {"buffer": _nfc(buffer, "buffer"), "connection": _nfc(connection, "connection"),
             "token": _int(token, "token", 1, MAX_TOKEN)}
        return cls._make("release", f, request_id)

    @classmethod
    def inspect(cls, buffer: str, request_id: Optional[str] = None) -> "Request":
        return cls._make("inspect", {"buffer": _nfc(buffer, "buffer")}, request_id)

    @classmethod
    def release_connection(cls, connection: str, request_id: Optional[str] = None) -> "Request":
        return cls._make("release_connection", {"connection": _nfc(connection, "connection")},
                         request_id)

    @classmethod
    def join(cls, buffer: str, user: str, connection: str, lease_ms: Optional[int] = None,
             request_id: Optional[str] = None) -> "Request":
        """Join a buffer's collaborators (section 20, revision 6)."""
        f: Dict[str, Any] = {"buffer": _nfc(buffer, "buffer"), "user": _nfc(user, "user"),
                             "connection": _nfc(connection, "connection")}
        if lease_ms is not None:
            f["lease_ms"] = _int(lease_ms, "lease_ms", 1000, 3_600_000)
        return cls._make("join", f, request_id)

    @classmethod
    def leave(cls, buffer: str, connection: str, token: int,
              request_id: Optional[str] = None) -> "Request":
        """End a membership at once (section 20, revision 6)."""
        f = {"buffer": _nfc(buffer, "buffer"), "connection": _nfc(connection, "connection"),
             "token": _int(token, "token", 1, MAX_TOKEN)}
        return cls._make("leave", f, request_id)

    @classmethod
    def describe(cls, request_id: Optional[str] = None) -> "Request":
        return cls._make("describe", {}, request_id)

    @classmethod
    def events(cls, buffer: Optional[str] = None, after: Optional[int] = None,
               limit: Optional[int] = None, request_id: Optional[str] = None) -> "Request":
        f: Dict[str, Any] = {}
        if buffer is not None:
            f["buffer"] = _nfc(buffer, "buffer")
        if after is not None:
            f["after"] = _int(after, "after", 0, MAX_TOKEN)
        if limit is not None:
            f["limit"] = _int(limit, "limit", 1, 256)
        return cls._make("events", f, request_id)

    @classmethod
    def force_release(cls, buffer: str, reason: Optional[str] = None,
                      request_id: Optional[str] = None) -> "Request":
        f: Dict[str, Any] = {"buffer": _nfc(buffer, "buffer")}
        if reason is not None:
            f["reason"] = _nfc(reason, "reason")
        return cls._make("force_release", f, request_id)

    @classmethod
    def _make(cls, op: str, f: Dict[str, Any], request_id: Optional[str]) -> "Request":
        rid = new_request_id() if request_id is None else _nfc(request_id, "request_id")
        return cls(op=op, fields=f, request_id=rid)
