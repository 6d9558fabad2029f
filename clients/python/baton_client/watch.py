"""Watching the history in order and without gaps (protocol section 18).

1. A server-named, exclusive queue is bound to ``baton.events`` (``<p>.*`` per watched partition,
   ``#`` for all) and consumed, on a channel of its own.
2. Once it consumes, every watched partition is read with ``events`` from the saved position (or,
   without one, from the current position); the reply's events are delivered, ``position`` is
   kept, and while ``more`` is true the partition is read again.
3. A live message is only a signal: when it holds a change of a watched partition (of the buffer,
   for a one-buffer watch) with ``seq`` above the partition's position, the partition is read
   again from its position. Nothing is ever delivered from a live message.
4. After a dropped connection or channel the queue is declared again and every partition is read
   from its position, so nothing is lost.

Each change is delivered once, in commit order per partition. ``watch.positions`` are the
positions to save and pass back as ``positions=`` to resume.
"""

from __future__ import annotations

import logging
import queue
import time
import unicodedata
import weakref
from collections import deque
from concurrent.futures import TimeoutError as FuturesTimeout
from typing import (Any, Deque, Dict, Iterable, List, Mapping, Optional, Set,
                    Tuple, Union)

from ._calls import CallSite
from ._io import Subscription
from .errors import BatonError, BatonTimeoutError, ClientClosedError, RejectedError
from .types import Event, EventsPage, Missed, events_of_message, parse_reply


log = logging.getLogger("baton_client")

__all__ = ["Watch"]

WatchItem = Union[Event, Missed]


class Watch:
    """An iterator of :class:`Event` (and :class:`Missed`) items. Iterate it from one thread;
    ``close()`` may be called from any thread and ends the iteration."""

    def __init__(self, client: CallSite, *, buffer: Optional[str] = None,
                 partition: Optional[int] = None, partitions: Optional[Iterable[int]] = None,
                 positions: Optional[Mapping[int, int]] = None, limit: Optional[int] = None,
                 read_timeout: Optional[float] = None):
        n = client.partitions
        self.client = client
        # NFC, as requests carry it (section 3.2): the partition and the filter must match the worker's.
        self.buffer = unicodedata.normalize("NFC", buffer) if buffer is not None else None
        self.limit = limit
        self.read_timeout = read_timeout
        if buffer is not None:
            p = client.partition_of(buffer)
            if partition is not None and partition != p:
                raise ValueError(f"buffer {buffer!r} is in partition {p}, not {partition}")
            parts = [p]
        elif partition is not None:
            parts = [int(partition)]
        elif partitions is not None:
            parts = sorted({int(p) for p in partitions})
        else:
            parts = list(range(n))
        for p in parts:
            if not 0 <= p < n:
                raise ValueError(f"partition {p} is not in 0..{n - 1}")
        if not parts:
            raise ValueError("no partition to watch")
        self.partitions: List[int] = parts
        self._watched: Set[int] = set(parts)
        everything = buffer is None and partition is None and partitions is None
        keys = ["#"] if everything else [f"{p}.*" for p in parts]
        # _positions: where the next read starts; _delivered: what the consumer has been given
        # (the positions to save). They differ while read events wait in _pending.
        self._positions: Dict[int, int] = {int(p): int(v) for p, v in (positions or {}).items()
                                           if int(p) in self._watched}
        self._delivered: Dict[int, int] = dict(self._positions)
        self._live_max: Dict[int, int] = {}
        self._dirty: Set[int] = set()
        # (item or None for a bare position update, partition, position once it is delivered)
        self._pending: Deque[Tuple[Optional[WatchItem], int, int]] = deque()
        self._signals: "queue.Queue[Any]" = queue.Queue()
        self._closed = False
        self._error: Optional[BaseException] = None
        self._started = False
        self.reads = 0  # events reads sent (diagnostics)
        self.subscriptions = 0  # times the queue was (re)declared
        # The I/O thread holds the subscription, and the subscription only weak references to this
        # watch: a watch dropped without close() is collected, and its finalizer ends the
        # subscription (its queue and channel) instead of leaking it and its signals.
        def weakly(method: Any) -> Any:
            ref = weakref.WeakMethod(method)

            def call(*args: Any) -> None:
                target = ref()
                if target is not None:
                    target(*args)
            return call

        self._sub = Subscription(keys, weakly(self._on_live), weakly(self._on_ready), weakly(self._on_error))
        client._io.subscribe(self._sub)
        self._finalizer = weakref.finalize(self, client._io.unsubscribe, self._sub)
        try:
            self._start(read_timeout or client.timeout)
        except BaseException:
            self.close()
            raise

    def _start(self, timeout: float) -> None:
        """Wait until the queue consumes (step 1) and read the current position of every
        partition without a saved one, so that the watch starts at the moment it was created."""
        end = time.monotonic() + timeout
        while not self._started:
            if self._error is not None:
                raise self._error
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise BatonTimeoutError(f"the event subscription was not ready within "
                                        f"{timeout:g} s")
            try:
                self._handle(self._signals.get(timeout=remaining))
            except queue.Empty:
                continue
        fresh = {p for p in self.partitions if p not in self._positions}
        saved = self._dirty - fresh
        self._dirty = set(fresh)
        while self._dirty & fresh:
            if self._error is not None:
                raise self._error
            if time.monotonic() >= end:
                raise BatonTimeoutError(f"the first events read did not succeed within "
                                        f"{timeout:g} s")
            self._drain_signals()
            self._read(end)
        self._dirty |= saved
        while self._pending and self._pending[0][0] is None:
            _, p, pos = self._pending.popleft()
            self._delivered[p] = pos

    # ------------------------------------------------------------------ I/O thread callbacks

    def _on_ready(self) -> None:
        self._signals.put(("ready",))

    def _on_error(self, exc: BaseException) -> None:
        self._signals.put(("error", exc))

    def _on_live(self, obj: Any, routing_key: str) -> None:
        hits = []
        env_p = obj.get("partition") if isinstance(obj, dict) else None
        for e in events_of_message(obj):
            p = e.get("partition", env_p)
            if not isinstance(p, int):
                try:
                    p = int(routing_key.split(".", 1)[0])
                except ValueError:
                    continue
            if self.buffer is not None and e.get("buffer") != self.buffer:
                continue
            seq = e.get("seq")
            hits.append((p, seq if isinstance(seq, int) else None))
        if hits:
            self._signals.put(("live", hits))

    # ------------------------------------------------------------------ consumer side

    @property
    def positions(self) -> Dict[int, int]:
        """Position per partition up to which every change was delivered by ``get``/``next``:
        save it to resume with ``positions=``."""
        return dict(self._delivered)

    def __iter__(self) -> "Watch":
        return self

    def __next__(self) -> WatchItem:
        item = self.get(None)
        if item is None:
            raise StopIteration
        return item

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._finalizer()  # unsubscribes, once
        self._signals.put(("closed",))

    def get(self, timeout: Optional[float] = None) -> Optional[WatchItem]:
        """The next item; ``None`` when ``timeout`` passed without one or the watch is closed.
        Raises :class:`~baton_client.errors.ForbiddenError` when the broker refused the
        subscription."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            while self._pending:
                item, p, pos = self._pending.popleft()
                self._delivered[p] = pos
                if item is not None:
                    return item
            if self._closed:
                return None
            if self._error is not None:
                raise self._error
            remaining = None if end is None else end - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            if not self._dirty:
                try:
                    sig = self._signals.get(timeout=remaining)
                except queue.Empty:
                    return None
                self._handle(sig)
            self._drain_signals()
            if self._dirty and not self._closed and self._error is None:
                self._read(end)

    def _drain_signals(self) -> None:
        while True:
            try:
                self._handle(self._signals.get_nowait())
            except queue.Empty:
                return

    def _handle(self, sig: Any) -> None:
        kind = sig[0]
        if kind == "ready":
            self.subscriptions += 1
            self._started = True
            self._dirty |= self._watched  # step 2, and step 4 after a reconnect
        elif kind == "live":
            for p, seq in sig[1]:
                if p not in self._watched:
                    continue
                if seq is None:
                    if self._started:
                        self._dirty.add(p)  # a worker without positions: read to be sure
                    continue
                if seq > self._live_max.get(p, 0):
                    self._live_max[p] = seq
                pos = self._positions.get(p)
                if self._started and pos is not None and seq > pos:
                    self._dirty.add(p)
        elif kind == "error":
            self._error = sig[1]
        elif kind == "closed":
            pass

    def _read(self, end: Optional[float]) -> None:
        """Read every dirty partition once (concurrently, one read per partition)."""
        timeout = self.read_timeout or self.client.timeout
        calls = {}
        for p in sorted(self._dirty):
            try:
                calls[p] = self.client._events_call(p, self.buffer, self._positions.get(p),
                                                    self.limit, timeout)
                self.reads += 1
            except ClientClosedError:
                self._closed = True
                return
        failed = False
        for p, call in calls.items():
            try:
                obj = call.future.result(timeout=timeout + 5.0)
                page = parse_reply(obj).raise_for_error()
            except RejectedError as exc:
                # A request the worker refuses (e.g. unknown_op from an old worker) will be
                # refused again: give up on this watch.
                self._error = exc
                return
            except ClientClosedError:
                self._closed = True
                return
            except (BatonError, FuturesTimeout) as exc:
                log.warning("events read of partition %d failed (%s); retrying", p, exc)
                failed = True
                continue
            if not isinstance(page, EventsPage):
                log.warning("events read of partition %d answered %s", p, page.status)
                failed = True
                continue
            after = self._positions.get(p)
            if after is not None and page.position < after and not page.more:
                # docs/protocol.md, section 18: the saved position is beyond this partition's history
                # (another deployment, a restored database). Report it and go on from the current one.
                self._pending.append((Missed(partition=p, after=after), p, page.position))
                self._positions[p] = page.position
                self._dirty.discard(p)
                continue
            if page.missed:
                self._pending.append((Missed(partition=p, after=after), p,
                                      after if after is not None else 0))
            for ev in page.events:
                if after is not None and ev.seq is not None and ev.seq <= after:
                    continue  # never deliver twice
                self._pending.append((ev, p, ev.seq if ev.seq is not None else
                                      (after if after is not None else 0)))
            self._pending.append((None, p, page.position))
            self._positions[p] = page.position
            if not page.more and self._live_max.get(p, 0) <= page.position:
                self._dirty.discard(p)
        if failed and not self._pending:
            # Back off a little before the next attempt (bounded by the caller's timeout).
            wait = 0.5 if end is None else max(0.0, min(0.5, end - time.monotonic()))
            try:
                self._handle(self._signals.get(timeout=wait))
            except queue.Empty:
                pass
