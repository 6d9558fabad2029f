"""What a kept lease (``lease.py``) and a watch (``watch.py``) need of a client, as a protocol.

:class:`~baton_client.client.Client` implements it. The two modules depend on this interface, not on
``client.py``, so the package has no import cycle: ``client`` imports ``lease`` and ``watch``, which
import this module, ``_io``, ``requests``, ``types`` and ``errors`` only. The underscored members are
the client's call machinery, internal to the package (not part of the public API).
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, Sequence, Tuple, Union

from ._io import Call, Subscription
from .requests import Request
from .types import Reply


class CallIO(Protocol):
    """The client's I/O thread, as a lease and a watch use it."""

    def cancel(self, call: Call) -> None: ...

    def subscribe(self, sub: Subscription) -> None: ...

    def unsubscribe(self, sub: Subscription) -> None: ...


class CallSite(Protocol):
    """A client as a kept lease and a watch use it."""

    partitions: int
    timeout: float
    resend_after: Optional[float]

    @property
    def _io(self) -> CallIO: ...

    def partition_of(self, buffer: str) -> int: ...

    def release(self, buffer: str, connection: str, token: int, *, request_id: Optional[str] = None,
                timeout: Optional[float] = None) -> Reply: ...

    def leave(self, buffer: str, connection: str, token: int, *, request_id: Optional[str] = None,
              timeout: Optional[float] = None) -> Reply: ...

    def _route(self, req: Request) -> int: ...

    def _require_partition_revision(self, partition: int, rev: int, what: str) -> None: ...

    def _timeout(self, timeout: Optional[float]) -> float: ...

    def _make_call(self, requests: Union[Request, Sequence[Request]], routing_key: int, timeout: float,
                   resend_after: Optional[float], label: str, publish_for: Optional[float] = None,
                   waiting: bool = False, max_resend_interval: Optional[float] = None) -> Call: ...

    def _submit(self, call: Call) -> Call: ...

    def _wait(self, call: Call) -> Any: ...

    def _claim(self, req: Request, timeout: Optional[float], resend_after: Any = "default") -> Tuple[Reply, Call]: ...

    def _release_in_background(self, buffer: str, connection: str, token: int) -> None: ...

    def _events_call(self, partition: int, buffer: Optional[str], after: Optional[int], limit: Optional[int],
                     timeout: Optional[float] = None) -> Call: ...
