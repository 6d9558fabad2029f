"""Python client of Baton, the buffer ownership/lease service (wire protocol v1, revision 6).

See ``clients/python/README.md`` and ``docs/protocol.md``.
"""

from ._partition import fnv1a64, partition
from .aio import AsyncClient, AsyncLease, AsyncWatch
from .client import Client, redact_url
from .errors import (
    BatonConnectionError,
    BatonError,
    BatonTimeoutError,
    ClientClosedError,
    ForbiddenError,
    LeaseDeniedError,
    ProtocolError,
    RejectedError,
    UnroutableError,
)
from .lease import KeptMembership, Lease, LeaseChange, LeaseState
from .requests import Request, deadline_after, format_timestamp
from .types import (
    Description,
    ErrorInfo,
    Event,
    EventsPage,
    Holder,
    Member,
    Membership,
    Missed,
    ReleasedConnection,
    Reply,
    State,
    parse_event,
    parse_reply,
)
from .watch import Watch

PROTOCOL = 1
REVISION = 6

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "AsyncLease",
    "AsyncWatch",
    "PROTOCOL",
    "REVISION",
    "partition",
    "fnv1a64",
    "Client",
    "redact_url",
    "Request",
    "deadline_after",
    "format_timestamp",
    "Reply",
    "Holder",
    "ErrorInfo",
    "ReleasedConnection",
    "Description",
    "KeptMembership",
    "Member",
    "Membership",
    "State",
    "EventsPage",
    "Event",
    "Missed",
    "parse_reply",
    "parse_event",
    "Lease",
    "LeaseState",
    "LeaseChange",
    "Watch",
    "BatonError",
    "BatonConnectionError",
    "BatonTimeoutError",
    "UnroutableError",
    "ForbiddenError",
    "RejectedError",
    "ProtocolError",
    "ClientClosedError",
    "LeaseDeniedError",
]
