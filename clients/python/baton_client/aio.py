"""The asyncio face of :class:`~baton_client.client.Client` (issue 24): the same connection, I/O
thread and protocol behaviour, awaited instead of blocked on.

A single call (``claim``, ``renew``, ``release``, ``inspect``, ``force_release``, ``describe``) awaits
its reply's future directly, with no thread per call, so thousands of concurrent calls share the
client's coalesced messages as the threaded API's calls do. The rarer operations that loop or keep
state on threads (a claim that waits in line, ``release_connection`` over all N partitions,
``events``, a lease keeper's claim and release, a watch) run the threaded code in a worker thread.

    async with await AsyncClient.connect(url) as client:
        reply = await client.claim("doc:1", "ann", conn)
        async with client.lease("doc:2", user="ann", connection=conn) as lease:
            ...  # write with lease.token while lease.state is LeaseState.HELD
        async for change in client.watch("doc:1"):
            ...
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import AsyncIterator, Callable, Iterable, Mapping, Optional, Type

from .client import Client
from .errors import BatonTimeoutError, ClientClosedError
from .lease import Lease, LeaseChange
from .requests import Request
from .types import Description, EventsPage, Membership, ReleasedConnection, Reply
from .watch import Watch, WatchItem

__all__ = ["AsyncClient", "AsyncLease", "AsyncWatch"]


class AsyncClient:
    """Wraps a connected :class:`Client`; make one with :meth:`connect`."""

    def __init__(self, client: Client) -> None:
        self.client = client

    @classmethod
    async def connect(cls, url: str, partitions: Optional[int] = None, timeout: float = 5.0,
                      resend_after: Optional[float] = 1.5, *, confirms: bool = True,
                      stale_after: float = 1.0, connection_name: Optional[str] = None,
                      connect_timeout: Optional[float] = None) -> "AsyncClient":
        """Connects (and asks ``describe``) without blocking the event loop."""
        client = await asyncio.to_thread(
            Client, url, partitions, timeout, resend_after, confirms=confirms, stale_after=stale_after,
            connection_name=connection_name, connect_timeout=connect_timeout)
        return cls(client)

    @property
    def partitions(self) -> int:
        return self.client.partitions

    async def close(self, wait_background: Optional[float] = None) -> None:
        """:meth:`Client.close`, off the event loop."""
        await asyncio.to_thread(self.client.close, wait_background)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, kind: Optional[Type[BaseException]], error: Optional[BaseException],
                        trace: Optional[TracebackType]) -> None:
        await self.close()

    # ------------------------------------------------------------------ single calls

    async def _single(self, req: Request, timeout: Optional[float], *, claim: bool = False) -> Reply:
        c = self.client
        c._check_open()
        call = c._submit(c._make_call(req, c._route(req), c._timeout(timeout), c.resend_after, req.op))
        try:
            obj = await asyncio.wait_for(asyncio.wrap_future(call.future), call.timeout + 5.0)
        except asyncio.TimeoutError:
            c._io.cancel(call)
            if claim:
                c._resolve_orphan_claim(req, call)
            raise BatonTimeoutError(f"no reply to {call.label} within {call.timeout:g} s", call.request_id) from None
        except (BatonTimeoutError, ClientClosedError, asyncio.CancelledError):
            # Section 9, "Cancelled calls": a claim may still be granted; it is asked again and
            # released in the background, as the threaded API does.
            c._io.cancel(call)
            if claim:
                c._resolve_orphan_claim(req, call)
            raise
        return c._finish_single_obj(obj)

    async def claim(self, buffer: str, user: str, connection: str, lease_ms: Optional[int] = None, *,
                    wait_ms: Optional[int] = None, request_id: Optional[str] = None,
                    timeout: Optional[float] = None) -> Reply:
        """:meth:`Client.claim`. With ``wait_ms`` the claim waits in line on a worker thread."""
        if wait_ms is not None:
            return await asyncio.to_thread(self.client.claim, buffer, user, connection, lease_ms,
                                           wait_ms=wait_ms, request_id=request_id, timeout=timeout)
        req = Request.claim(buffer, user, connection, lease_ms, request_id=request_id)
        return await self._single(req, timeout, claim=True)

    async def renew(self, buffer: str, connection: str, token: int, lease_ms: Optional[int] = None, *,
                    request_id: Optional[str] = None, timeout: Optional[float] = None) -> Reply:
        """:meth:`Client.renew`."""
        return await self._single(Request.renew(buffer, connection, token, lease_ms, request_id=request_id), timeout)

    async def release(self, buffer: str, connection: str, token: int, *,
                      request_id: Optional[str] = None, timeout: Optional[float] = None) -> Reply:
        """:meth:`Client.release`."""
        return await self._single(Request.release(buffer, connection, token, request_id=request_id), timeout)

    async def join(self, buffer: str, user: str, connection: str, lease_ms: Optional[int] = None, *,
                   request_id: Optional[str] = None, timeout: Optional[float] = None) -> Membership:
        """:meth:`Client.join` (on a worker thread: it may ask the partition's revision first)."""
        return await asyncio.to_thread(self.client.join, buffer, user, connection, lease_ms, request_id=request_id, timeout=timeout)

    async def leave(self, buffer: str, connection: str, token: int, *,
                    request_id: Optional[str] = None, timeout: Optional[float] = None) -> Reply:
        """:meth:`Client.leave`."""
        return await asyncio.to_thread(self.client.leave, buffer, connection, token, request_id=request_id, timeout=timeout)

    async def inspect(self, buffer: str, *, timeout: Optional[float] = None) -> Reply:
        """:meth:`Client.inspect`."""
        return await self._single(Request.inspect(buffer), timeout)

    async def force_release(self, buffer: str, reason: Optional[str] = None, *,
                            request_id: Optional[str] = None, timeout: Optional[float] = None) -> Reply:
        """:meth:`Client.force_release`."""
        return await self._single(Request.force_release(buffer, reason, request_id=request_id), timeout)

    async def describe(self, *, partition: int = 0, timeout: Optional[float] = None) -> Description:
        """:meth:`Client.describe`."""
        return await asyncio.to_thread(self.client.describe, partition=partition, timeout=timeout)

    async def release_connection(self, connection: str, *, request_id: Optional[str] = None,
                                 timeout: Optional[float] = None) -> ReleasedConnection:
        """:meth:`Client.release_connection` (all N partitions)."""
        return await asyncio.to_thread(self.client.release_connection, connection, request_id=request_id, timeout=timeout)

    async def events(self, partition: Optional[int] = None, *, buffer: Optional[str] = None,
                     after: Optional[int] = None, limit: Optional[int] = None,
                     timeout: Optional[float] = None) -> EventsPage:
        """:meth:`Client.events`."""
        return await asyncio.to_thread(self.client.events, partition, buffer=buffer, after=after, limit=limit, timeout=timeout)

    # ------------------------------------------------------------------ leases and watches

    def lease(self, buffer: str, user: str, connection: str, lease_ms: int = 30000, *,
              margin_ms: Optional[int] = None, renew_fraction: float = 1 / 3,
              on_change: Optional[Callable[[LeaseChange], None]] = None,
              claim_timeout: Optional[float] = None, wait_ms: Optional[int] = None) -> "AsyncLease":
        """A lease keeper as an async context manager (:meth:`Client.lease`): entering claims and
        starts renewing; leaving releases. ``on_change`` runs on the keeper's thread."""
        return AsyncLease(self.client.lease(
            buffer, user, connection, lease_ms, margin_ms=margin_ms, renew_fraction=renew_fraction,
            on_change=on_change, claim_timeout=claim_timeout, wait_ms=wait_ms))

    def watch(self, buffer: Optional[str] = None, *, partition: Optional[int] = None,
              partitions: Optional[Iterable[int]] = None, positions: Optional[Mapping[int, int]] = None,
              limit: Optional[int] = None) -> "AsyncWatch":
        """:meth:`Client.watch` as an async iterator (``async for item in client.watch(...)``)."""
        return AsyncWatch(self.client.watch(buffer, partition=partition, partitions=partitions,
                                            positions=positions, limit=limit))


class AsyncLease:
    """``async with`` around a :class:`~baton_client.lease.Lease` (its state, token and keeper are
    the threaded lease's)."""

    def __init__(self, lease: Lease) -> None:
        self.lease = lease

    async def __aenter__(self) -> Lease:
        await asyncio.to_thread(self.lease.acquire)
        return self.lease

    async def __aexit__(self, kind: Optional[Type[BaseException]], error: Optional[BaseException],
                        trace: Optional[TracebackType]) -> None:
        await asyncio.to_thread(self.lease.release)


class AsyncWatch:
    """``async for`` over a :class:`~baton_client.watch.Watch`; ``await close()`` (or leaving
    ``async with``) ends it."""

    #: How long one wait for the next item blocks its worker thread.
    poll: float = 0.25

    def __init__(self, watch: Watch) -> None:
        self.watch = watch

    @property
    def positions(self) -> Mapping[int, int]:
        return self.watch.positions

    def __aiter__(self) -> AsyncIterator[WatchItem]:
        return self._items()

    async def _items(self) -> AsyncIterator[WatchItem]:
        while True:
            item = await asyncio.to_thread(self.watch.get, self.poll)
            if item is not None:
                yield item
            elif self.watch._closed:
                return

    async def close(self) -> None:
        await asyncio.to_thread(self.watch.close)

    async def __aenter__(self) -> "AsyncWatch":
        return self

    async def __aexit__(self, kind: Optional[Type[BaseException]], error: Optional[BaseException],
                        trace: Optional[TracebackType]) -> None:
        await self.close()


