"""Typed replies and events (protocol sections 5, 7, 17, 18).

Every parser ignores fields it does not know (compatibility rules); the original JSON object is
kept in ``raw``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, TypedDict

from .errors import ProtocolError, RejectedError

__all__ = [
    "Holder",
    "ErrorInfo",
    "Reply",
    "ReleasedConnection",
    "Description",
    "Member",
    "Membership",
    "State",
    "EventsPage",
    "Event",
    "Missed",
    "KNOWN_STATUSES",
    "parse_reply",
    "parse_event",
    "events_of_message",
]

KNOWN_STATUSES = frozenset(
    {
        "granted",
        "denied",
        "renewed",
        "released",
        "not_owner",
        "state",
        "released_connection",
        "description",
        "events",
        "joined",
        "left",
        "not_member",
        "error",
    }
)


@dataclass(frozen=True)
class Holder:
    user: str
    connection: str

    @classmethod
    def parse(cls, value: Any) -> "Optional[Holder]":
        if isinstance(value, dict):
            user, connection = value.get("user"), value.get("connection")
            return cls(user=user if isinstance(user, str) else "", connection=connection if isinstance(connection, str) else "")
        return None


@dataclass(frozen=True)
class ErrorInfo:
    code: str
    message: str


@dataclass(frozen=True)
class Reply:
    """A reply (section 5). ``status`` is one of ``KNOWN_STATUSES``; a status this client does not
    know is turned into ``error`` / ``internal_error`` by :func:`parse_reply`.

    ``at`` and ``expires_at`` are the database's clock: never compare them with the local clock.
    """

    status: str
    request_id: Optional[str]
    buffer: Optional[str]
    holder: Optional[Holder]
    token: Optional[int]
    expires_at: Optional[str]
    at: Optional[str]
    partition: Optional[int]
    error: Optional[ErrorInfo] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def granted(self) -> bool:
        return self.status == "granted"

    @property
    def is_error(self) -> bool:
        return self.status == "error"

    def raise_for_error(self) -> "Reply":
        """Raise :class:`~baton_client.errors.RejectedError` if this is an ``error`` reply."""
        if self.status == "error":
            info = self.error or ErrorInfo("internal_error", "error reply without an error object")
            raise RejectedError(info.code, info.message, self)
        return self


@dataclass(frozen=True)
class ReleasedConnection(Reply):
    """``released_connection`` (sections 4, 13). From ``Client.release_connection`` this is the
    merge of all N partitions' replies: ``buffers`` is the union (sorted), ``released_count`` the
    sum, ``partition`` is ``None`` and ``replies`` holds each partition's reply."""

    buffers: Tuple[str, ...] = ()
    released_count: int = 0
    replies: Tuple[Reply, ...] = field(default=(), repr=False)
    #: How many replica memberships of the connection ended, into their grace (revision 6; 0 from
    #: earlier workers).
    ended_memberships: int = 0

    @property
    def complete(self) -> bool:
        """False when some partition listed only a prefix of its buffers (section 13)."""
        return self.released_count == len(self.buffers)


@dataclass(frozen=True)
class Description(Reply):
    """``description`` (section 17)."""

    protocol: int = 0
    revision: int = 0
    partitions: int = 0
    ops: Tuple[str, ...] = ()
    #: How long a replica id stays reserved for its user after the membership expired or its
    #: connection was released (revision 6; ``None`` from earlier workers).
    member_grace_ms: Optional[int] = None


@dataclass(frozen=True)
class Member:
    """A live member of a buffer as ``inspect`` lists it (section 20)."""

    replica_id: int
    user: str
    connection: str
    expires_at: str


@dataclass(frozen=True)
class State(Reply):
    """``state`` (section 4): the holder in the common fields; from revision 6 workers also the
    buffer's live members: ``members`` (the count) and ``roster`` (the first 64 by replica id)."""

    members: int = 0
    roster: Tuple[Member, ...] = ()


@dataclass(frozen=True)
class Membership(Reply):
    """``joined``, ``left``, or a membership's ``renewed`` (section 20, revision 6): ``token`` and
    ``expires_at`` are the membership's; ``replica_id`` is unique among the buffer's live members."""

    replica_id: int = 0
    members: int = 0
    reclaimed: bool = False


@dataclass(frozen=True)
class Event:
    """An ownership change (section 7), or from revision 6 a change of a buffer's members (a
    ``member_`` kind, with ``replica_id``; section 20). ``seq`` and ``partition`` are ``None`` from
    workers of revision < 3. ``kind`` may be a kind this client does not know (ignore it)."""

    kind: str
    buffer: str
    holder: Optional[Holder]
    token: Optional[int]
    at: Optional[str]
    partition: Optional[int]
    seq: Optional[int]
    forced: bool = False
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    #: The member's replica id, for the ``member_`` kinds (revision 6, section 20); else ``None``.
    replica_id: Optional[int] = None


@dataclass(frozen=True)
class Missed:
    """Yielded by a watch when changes of ``partition`` after position ``after`` were already
    pruned from the history (``missed: true``, section 18): re-read the state you care about with
    ``inspect``. The events that follow start at the oldest change kept."""

    partition: int
    after: Optional[int]


@dataclass(frozen=True)
class EventsPage(Reply):
    """``events`` (section 18)."""

    events: Tuple[Event, ...] = ()
    position: int = 0
    more: bool = False
    missed: bool = False


def _int_or_none(v: Any) -> Optional[int]:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _str_or_none(v: Any) -> Optional[str]:
    return v if isinstance(v, str) else None


def parse_event(obj: Dict[str, Any]) -> Event:
    return Event(
        kind=_str_or_none(obj.get("kind")) or "",
        buffer=_str_or_none(obj.get("buffer")) or "",
        holder=Holder.parse(obj.get("holder")),
        token=_int_or_none(obj.get("token")),
        at=_str_or_none(obj.get("at")),
        partition=_int_or_none(obj.get("partition")),
        seq=_int_or_none(obj.get("seq")),
        forced=obj.get("forced") is True,
        raw=obj,
        replica_id=_int_or_none(obj.get("replica_id")),
    )


def events_of_message(body: Any) -> List[Dict[str, Any]]:
    """The event objects of a live ``baton.events`` message: a per-commit envelope
    ``{"v":1,"partition":p,"events":[...]}`` or a single per-change event object (section 7.1)."""
    if isinstance(body, dict):
        evs = body.get("events")
        if isinstance(evs, list):
            return [e for e in evs if isinstance(e, dict)]
        if "kind" in body:
            return [body]
    return []


class _Common(TypedDict):
    """The fields every reply may carry, as :func:`parse_reply` passes them on."""

    request_id: Optional[str]
    buffer: Optional[str]
    holder: Optional[Holder]
    token: Optional[int]
    expires_at: Optional[str]
    at: Optional[str]
    partition: Optional[int]
    raw: Dict[str, Any]


def _list(v: Any) -> List[Any]:
    return v if isinstance(v, list) else []


def parse_reply(obj: Any) -> Reply:
    """Turn a reply object into the typed reply of its status."""
    if not isinstance(obj, dict):
        raise ProtocolError(f"a reply must be a JSON object, got {type(obj).__name__}")
    status = obj.get("status")
    common = _Common(
        request_id=_str_or_none(obj.get("request_id")),
        buffer=_str_or_none(obj.get("buffer")),
        holder=Holder.parse(obj.get("holder")),
        token=_int_or_none(obj.get("token")),
        expires_at=_str_or_none(obj.get("expires_at")),
        at=_str_or_none(obj.get("at")),
        partition=_int_or_none(obj.get("partition")),
        raw=obj,
    )
    if status == "error" or status not in KNOWN_STATUSES:
        err = obj.get("error")
        if status == "error" and isinstance(err, dict):
            info = ErrorInfo(str(err.get("code", "internal_error")), str(err.get("message", "")))
        else:
            info = ErrorInfo("internal_error", f"reply with unknown status {status!r}")
        return Reply(status="error", error=info, **common)
    if status == "released_connection":
        buffers = _list(obj.get("buffers"))
        count = _int_or_none(obj.get("released_count"))
        return ReleasedConnection(
            status=status,
            buffers=tuple(b for b in buffers if isinstance(b, str)),
            released_count=count if count is not None else len(buffers),
            ended_memberships=_int_or_none(obj.get("ended_memberships")) or 0,
            **common,
        )
    if status == "description":
        return Description(
            status=status,
            protocol=_int_or_none(obj.get("protocol")) or 0,
            revision=_int_or_none(obj.get("revision")) or 0,
            partitions=_int_or_none(obj.get("partitions")) or 0,
            ops=tuple(o for o in _list(obj.get("ops")) if isinstance(o, str)),
            member_grace_ms=_int_or_none(obj.get("member_grace_ms")),
            **common,
        )
    if status in ("joined", "left") or (status == "renewed" and "replica_id" in obj):
        return Membership(
            status=status,
            replica_id=_int_or_none(obj.get("replica_id")) or 0,
            members=_int_or_none(obj.get("members")) or 0,
            reclaimed=obj.get("reclaimed") is True,
            **common,
        )
    if status == "state":
        roster = []
        for m in _list(obj.get("roster")):
            if isinstance(m, dict) and _int_or_none(m.get("replica_id")) is not None:
                roster.append(Member(replica_id=m["replica_id"], user=_str_or_none(m.get("user")) or "",
                                     connection=_str_or_none(m.get("connection")) or "",
                                     expires_at=_str_or_none(m.get("expires_at")) or ""))
        return State(status=status, members=_int_or_none(obj.get("members")) or 0, roster=tuple(roster), **common)
    if status == "events":
        evs = _list(obj.get("events"))
        return EventsPage(
            status=status,
            events=tuple(parse_event(e) for e in evs if isinstance(e, dict)),
            position=_int_or_none(obj.get("position")) or 0,
            more=obj.get("more") is True,
            missed=obj.get("missed") is True,
            **common,
        )
    return Reply(status=status, **common)
