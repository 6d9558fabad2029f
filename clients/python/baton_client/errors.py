"""Exceptions raised by the Baton client.

No message of these exceptions contains the broker password: URLs are always shown redacted
(``amqp://user:********@host:port/vhost``).
"""

from __future__ import annotations

from typing import Any, Optional


__all__ = [
    "BatonError",
    "BatonConnectionError",
    "BatonTimeoutError",
    "UnroutableError",
    "ForbiddenError",
    "RejectedError",
    "ProtocolError",
    "ClientClosedError",
    "LeaseDeniedError",
    "KNOWN_ERROR_CODES",
]

#: Error codes of protocol version 1 revision 6 (section 5, "Error codes"). A code that is not in
#: this set is to be treated like ``internal_error`` (compatibility rules).
KNOWN_ERROR_CODES = frozenset(
    {
        "payload_too_large",
        "invalid_request",
        "unsupported_version",
        "unknown_op",
        "misrouted",
        "unauthenticated",
        "request_id_reused",
        "deadline_exceeded",
        "internal_error",
        "members_full",
    }
)


class BatonError(Exception):
    """Base class of every error of this package."""


class BatonConnectionError(BatonError, ConnectionError):
    """The client could not connect to the broker (wrong URL, credentials, broker down)."""


class BatonTimeoutError(BatonError, TimeoutError):
    """No reply arrived within the call's timeout.

    The request may still have been decided; a retry with the same ``request_id`` and the same
    fields gets the original answer (protocol section 9). ``request_id`` names it.
    ``partial`` holds the replies that did arrive (``release_connection`` broadcasts, batches).
    """

    def __init__(self, message: str, request_id: Optional[str] = None, partial: Any = None):
        super().__init__(message)
        self.request_id = request_id
        self.partial = partial


class UnroutableError(BatonError):
    """The broker returned the request (``basic.return``, usually 312 NO_ROUTE): no queue is bound
    for its routing key. A configuration error: the topology is missing or N is wrong (check it
    with ``describe``). The call is not resent."""

    def __init__(self, message: str, reply_code: int = 0, reply_text: str = "",
                 exchange: str = "", routing_key: str = ""):
        super().__init__(message)
        self.reply_code = reply_code
        self.reply_text = reply_text
        self.exchange = exchange
        self.routing_key = routing_key


class ForbiddenError(BatonError):
    """The broker refused the publish itself (channel closed with 403 ACCESS_REFUSED or 406
    PRECONDITION_FAILED), for example ``force_release`` by a user without write permission on
    ``baton.admin``, or a ``user_id`` that is not the connection's user. The call is not resent."""

    def __init__(self, message: str, reply_code: int = 0, reply_text: str = ""):
        super().__init__(message)
        self.reply_code = reply_code
        self.reply_text = reply_text


class RejectedError(BatonError):
    """The worker answered ``status: error``; ``code`` is the protocol error code.

    ``reply`` is the whole typed reply. A code this client does not know is kept as sent, and
    ``effective_code`` is then ``internal_error`` (compatibility rules)."""

    def __init__(self, code: str, message: str, reply: Optional[Any] = None):  # reply: a types.Reply
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.reply = reply

    @property
    def effective_code(self) -> str:
        return self.code if self.code in KNOWN_ERROR_CODES else "internal_error"


class ProtocolError(BatonError):
    """A reply this client cannot make sense of (not JSON, wrong shape)."""


class ClientClosedError(BatonError):
    """The client was closed."""


class LeaseDeniedError(BatonError):
    """``Client.lease(...)`` could not claim the buffer: another holder has it (or, with
    ``wait_ms``, still had it when the wait ran out).

    ``reply`` is the ``denied`` reply (``reply.holder``, ``reply.token``, ``reply.expires_at``)."""

    def __init__(self, reply: Any):
        h = reply.holder
        if h is not None:
            msg = (f"buffer {reply.buffer!r} is held by {h.user!r} on connection "
                   f"{h.connection!r} (token {reply.token})")
        else:
            # A waiting claim whose wait ran out while the buffer was free at that moment
            # (section 19, rule 1), or a holder the reply does not name.
            msg = f"buffer {reply.buffer!r} was not granted: {reply.status} (token {reply.token})"
        super().__init__(msg)
        self.reply = reply
