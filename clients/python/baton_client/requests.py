"""Request bodies (protocol section 3.2, 12, 15, 17, 18).

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
           "REQUESTS_EXCHANGE", "EVENTS_EXCHANGE", "MAX_BODY_BYTES"]

REQUESTS_EXCHANGE = "baton.requests"
ADMIN_EXCHANGE = "baton.admin"
EVENTS_EXCHANGE = "baton.events"
MAX_BODY_BYTES = 65536
MAX_TOKEN = 2**63 - 1


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
              request_id: Optional[str] = None) -> "Request":
        f: Dict[str, Any] = {"buffer": _nfc(buffer, "buffer"), "user": _nfc(user, "user"),
                             "connection": _nfc(connection, "connection")}
        if lease_ms is not None:
            f["lease_ms"] = _int(lease_ms, "lease_ms", 1000, 3_600_000)
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
