"""The I/O thread: one pika ``SelectConnection`` owned by one thread.

Every other thread talks to it only through ``IOLoop.add_callback_threadsafe`` (the one thread-safe
entry point of pika) and ``concurrent.futures.Future`` objects. It

* publishes requests (section 3.1) with ``mandatory=true``, ``delivery_mode=2``, ``user_id``,
  ``correlation_id``, ``reply_to=amq.rabbitmq.reply-to`` and ``expiration`` = the call's remaining
  milliseconds, optionally in publisher-confirm mode;
* resends each unanswered call's unchanged body as ``_schedule.CallSchedule`` says (the Swift
  client's schedule: intervals doubling with jitter up to twice the resend interval, at once on a new
  channel, never past the call's publishing deadline);
* fails a call whose message the broker returned (``basic.return``) as unroutable, and a call
  whose publish the broker refused (channel closed with 403/406) as forbidden, without resending;
* keeps calls across a dropped channel or connection: it reconnects (with backoff), consumes
  direct reply-to on the new channel and publishes every waiting call again (section 9);
* does not publish while the broker has blocked the connection (resource alarm);
* when a request has had no broker confirm for ``stale_after`` seconds, publishes every waiting call
  again on a new channel (section 9, "Publisher confirms": a RabbitMQ 3.10 channel keeps sending to a
  quorum queue leader whose node froze, and the broker confirms whatever the workers do, so a missing
  confirm is never a slow worker); the old channel stays open a while for late replies; a nack gets
  the same at once, at most every ``NACK_SPACING`` seconds (a RabbitMQ 3.10 channel that could not
  register with a quorum queue's new leader nacks everything it sends to it, and a channel whose queue
  rejected publishes keeps that status, while a new channel starts afresh); within ``stale_after``
  of a channel opened over nacks, a request unconfirmed for ``NACK_SPACING`` gets a new one too;
* runs the event subscriptions of watches (section 18), each on a channel of its own, and
  re-declares them after a reconnect.
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
import uuid
from concurrent.futures import Future
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pika
from pika.adapters.select_connection import IOLoop
from pika.exceptions import (
    ChannelClosedByBroker,
    ProbableAccessDeniedError,
    ProbableAuthenticationError,
)

from .errors import (
    BatonConnectionError,
    BatonTimeoutError,
    ClientClosedError,
    ForbiddenError,
    ProtocolError,
    UnroutableError,
)
from ._schedule import JITTER, SEND, CallSchedule
from .requests import EVENTS_EXCHANGE

log = logging.getLogger("baton_client")

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
_TICK = 0.05  # seconds between resend/timeout scans
NACK_SPACING = 0.25  # least seconds between two new channels opened for nacked requests


class Call:
    """One logical call: a message body published (and resent) until its reply or timeout."""

    def __init__(self, *, exchange: str, routing_key: str, body: bytes, timeout: float,
                 resend_after: Optional[float], with_user_id: bool = True, expected: int = 0,
                 label: str = "request", request_id: Optional[str] = None,
                 first_message_only: bool = False, publish_for: Optional[float] = None,
                 waiting: bool = False, max_resend_interval: Optional[float] = None):
        self.correlation_id = str(uuid.uuid4())
        self.exchange = exchange
        self.routing_key = routing_key
        self.body = body
        self.timeout = timeout
        self.with_user_id = with_user_id
        # expected == 0: a single reply object completes the call; expected > 0: a batch of that
        # many elements, completed when every element's reply arrived (section 15).
        self.expected = expected
        self.label = label
        self.request_id = request_id
        self.first_message_only = first_message_only
        self.created = time.monotonic()
        # deadline: when the caller stops waiting for the reply. publish_until: after it the
        # request is no longer published (its ``expiration`` and body ``deadline`` end there).
        # They differ only for a waiting claim whose deadline was capped (section 19).
        self.deadline = self.created + timeout
        self.publish_until = self.created + (timeout if publish_for is None
                                             else min(publish_for, timeout))
        self.first_sent: Optional[float] = None
        self.sends = 0
        # When to publish, in milliseconds since ``created`` (a waiting claim backs off further).
        self.schedule = CallSchedule(
            None if resend_after is None else max(1, int(resend_after * 1000)),
            max(1, int((self.publish_until - self.created) * 1000)), waiting,
            None if max_resend_interval is None else max(1, int(max_resend_interval * 1000)))
        self.channel_gen = -1
        self.parts: Dict[int, Any] = {}
        self.messages = 0  # reply messages received (a batch reply may be split)
        self.future: "Future[Any]" = Future()

    @property
    def done(self) -> bool:
        return self.future.done()

    def ms(self, now: float) -> int:
        """``now`` (``time.monotonic()``) as the schedule's milliseconds since the call began."""
        return int((now - self.created) * 1000)

    def _complete(self, value: Any) -> None:
        if not self.future.done():
            try:
                self.future.set_result(value)
            except Exception:  # cancelled meanwhile
                pass

    def _fail(self, exc: BaseException) -> None:
        if not self.future.done():
            try:
                self.future.set_exception(exc)
            except Exception:
                pass


class Subscription:
    """An exclusive, server-named queue bound to ``baton.events`` (section 18, step 1).

    ``on_ready()`` is called (in the I/O thread) each time the queue has been (re)declared, bound
    and consumed; ``on_message(obj, routing_key)`` for each live message; ``on_error(exc)`` when the
    broker refused the subscription (it is then dropped)."""

    def __init__(self, keys: List[str], on_message: Callable[[Any, str], None],
                 on_ready: Callable[[], None], on_error: Callable[[BaseException], None]):
        self.keys = list(keys)
        self.on_message = on_message
        self.on_ready = on_ready
        self.on_error = on_error
        self.channel: Any = None
        self.queue: Optional[str] = None
        self.setting_up = False
        self.removed = False


class IOThread:
    def __init__(self, params: "pika.URLParameters | Sequence[pika.URLParameters]", *, user: str,
                 redacted_url: "str | Sequence[str]", secret: "str | Sequence[str]", confirms: bool = True,
                 stale_after: float = 1.0, name: str = "baton-io"):
        # The nodes of one broker (cluster): connect to the current one; when its connection fails or
        # dies, the next one is tried first (a frozen node still accepts TCP connections).
        self._nodes: List[pika.URLParameters] = [params] if isinstance(params, pika.URLParameters) else list(params)
        self._redacted: List[str] = [redacted_url] if isinstance(redacted_url, str) else list(redacted_url)
        if not self._nodes or len(self._redacted) != len(self._nodes):
            raise ValueError("one redacted URL per broker node is needed")
        self._node = 0
        self.user = user
        self._secrets: List[str] = [secret] if isinstance(secret, str) else list(secret)
        self._confirms = confirms
        self._stale_after = stale_after if confirms else 0.0
        self._refreshing = False
        self._nacks = 0  # nacked requests not yet sent again on a new channel
        self._nack_refresh_at: Optional[float] = None
        self._ioloop = IOLoop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._conn: Any = None
        self._channel: Any = None
        self._ready = False
        self._blocked = False
        self._closing = False
        self._stopped = threading.Event()
        self._channel_gen = 0
        self._next_tag = 0
        # Delivery tag -> (correlation id, when it was published), in publish order.
        self._unconfirmed: Dict[int, Tuple[str, float]] = {}
        self._calls: Dict[str, Call] = {}
        self._subs: Dict[int, Subscription] = {}
        self._backoff = 0.2
        self._ever_connected = threading.Event()
        self._first_outcome = threading.Event()  # connected, or refused for good (credentials)
        self._first_error: Optional[BaseException] = None
        self._state_lock = threading.Lock()
        self.connects = 0  # how many times a channel became ready (tests, diagnostics)
        self.fresh_channels = 0  # new channels opened for requests without a confirm (stale_after) or nacked
        self.last_close_reason: Optional[str] = None
        self.ignore_replies = False  # fault injection for tests: replies are lost
        self.stray_replies = 0  # replies to no waiting call (late repeats; tests, diagnostics)

    # ------------------------------------------------------------------ public (any thread)

    def start(self) -> None:
        self._thread.start()

    def wait_connected(self, timeout: float) -> None:
        self._first_outcome.wait(timeout)
        if self._ever_connected.is_set():
            return
        err = self._first_error
        if isinstance(err, (ProbableAuthenticationError, ProbableAccessDeniedError)):
            raise BatonConnectionError(
                f"the broker at {self.redacted_url} refused the login of user {self.user!r}: "
                f"{self.sanitize(repr(err))}")
        detail = f": {self.sanitize(repr(err))}" if err is not None else ""
        raise BatonConnectionError(
            f"could not connect to the broker at {self.redacted_url} within {timeout:g} s{detail}")

    @property
    def connected(self) -> bool:
        return self._ready

    @property
    def blocked(self) -> bool:
        return self._blocked

    def submit(self, call: Call) -> Call:
        if self._closing:
            call._fail(ClientClosedError("the client is closed"))
            return call
        self._threadsafe(lambda: self._start_call(call))
        return call

    def cancel(self, call: Call) -> None:
        call.future.cancel()

        def forget() -> None:
            self._calls.pop(call.correlation_id, None)

        self._threadsafe(forget)

    def subscribe(self, sub: Subscription) -> None:
        self._threadsafe(lambda: self._add_sub(sub))

    def unsubscribe(self, sub: Subscription) -> None:
        sub.removed = True
        self._threadsafe(lambda: self._remove_sub(sub))

    def drop_connection(self) -> None:
        """Tear the TCP connection down underneath the client (tests, fault injection)."""
        self._threadsafe(self._drop_connection)

    def close(self, timeout: float = 5.0) -> None:
        if self._closing:
            self._thread.join(timeout)
            return
        self._closing = True
        self._threadsafe(self._shutdown)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the I/O thread of %s did not end within %g s of close()", self.redacted_url, timeout)

    @property
    def redacted_url(self) -> str:
        """The URL of the node this client connects to now, its password redacted."""
        return self._redacted[self._node]

    def sanitize(self, text: str) -> str:
        for secret in self._secrets:
            if secret:
                text = text.replace(secret, "********")
        return text

    def _next_node(self) -> None:
        if len(self._nodes) > 1:
            self._node = (self._node + 1) % len(self._nodes)
            log.info("trying broker node %s next", self.redacted_url)

    # ------------------------------------------------------------------ I/O thread

    def _threadsafe(self, fn: Callable[[], None]) -> None:
        try:
            self._ioloop.add_callback_threadsafe(fn)
        except Exception:  # the loop is closed
            pass

    def _run(self) -> None:
        try:
            self._connect()
            self._ioloop.call_later(_TICK, self._tick)
            self._ioloop.start()
        except Exception:  # pragma: no cover - never expected
            log.exception("baton I/O thread crashed")
        finally:
            self._ready = False
            for call in list(self._calls.values()):
                call._fail(ClientClosedError("the client is closed"))
            self._calls.clear()
            self._stopped.set()
            try:
                self._ioloop.close()
            except Exception:
                pass

    def _connect(self) -> None:
        if self._closing:
            return
        try:
            pika.SelectConnection(
                parameters=self._nodes[self._node],
                on_open_callback=self._on_conn_open,
                on_open_error_callback=self._on_conn_open_error,
                on_close_callback=self._on_conn_closed,
                custom_ioloop=self._ioloop,
            )
        except Exception as exc:  # invalid parameters etc.
            self._first_error = exc
            self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        if self._closing:
            return
        delay = self._backoff
        self._backoff = min(self._backoff * 2, 5.0)
        self._ioloop.call_later(delay, self._connect)

    def _on_conn_open(self, conn: Any) -> None:
        if self._closing:
            conn.close()
            return
        self._conn = conn
        conn.add_on_connection_blocked_callback(self._on_blocked)
        conn.add_on_connection_unblocked_callback(self._on_unblocked)
        self._open_channel()

    def _on_conn_open_error(self, conn: Any, err: "str | Exception") -> None:
        self._first_error = err if isinstance(err, BaseException) else BatonConnectionError(err)
        self.last_close_reason = self.sanitize(repr(err))
        if isinstance(err, (ProbableAuthenticationError, ProbableAccessDeniedError)):
            log.error("broker refused the login at %s: %s", self.redacted_url,
                      self.sanitize(str(err)))
            if not self._ever_connected.is_set():
                self._first_outcome.set()  # the constructor fails now, not at its timeout
        else:
            log.warning("cannot connect to %s: %s", self.redacted_url, self.sanitize(repr(err)))
        self._next_node()
        self._schedule_reconnect()

    def _on_conn_closed(self, conn: Any, reason: BaseException) -> None:
        if conn is not self._conn:
            return
        self._conn = None
        self._channel = None
        self._ready = False
        self._blocked = False
        self._refreshing = False
        self._unconfirmed.clear()
        self.last_close_reason = self.sanitize(repr(reason))
        for sub in self._subs.values():
            sub.channel = None
            sub.queue = None
            sub.setting_up = False
        if self._closing:
            self._ioloop.stop()
            return
        log.warning("connection to %s closed (%s); reconnecting", self.redacted_url,
                    self.last_close_reason)
        self._next_node()
        self._schedule_reconnect()

    def _open_channel(self) -> None:
        if self._conn is None or self._closing:
            return
        try:
            self._conn.channel(on_open_callback=self._on_channel_open)
        except Exception as exc:
            log.warning("cannot open a channel: %s", self.sanitize(repr(exc)))

    def _on_channel_open(self, ch: Any) -> None:
        self._channel = ch
        ch.add_on_close_callback(self._on_channel_closed)
        ch.add_on_return_callback(self._on_return)
        if self._confirms:
            ch.confirm_delivery(ack_nack_callback=lambda frame: self._on_confirm(ch, frame),
                                callback=lambda _frame: self._consume_replies(ch))
        else:
            self._consume_replies(ch)

    def _consume_replies(self, ch: Any) -> None:
        ch.basic_consume(DIRECT_REPLY_TO, self._on_reply, auto_ack=True,
                         callback=lambda _frame: self._on_consume_ok(ch))

    def _on_consume_ok(self, ch: Any) -> None:
        if ch is not self._channel:
            return
        self._channel_gen += 1
        self._next_tag = 0
        self._unconfirmed.clear()
        self._nacks = 0  # every waiting call is published again below
        self._refreshing = False
        self._ready = True
        self._backoff = 0.2
        # Section 9: publish every request still waiting for a reply again, same body.
        for call in list(self._calls.values()):
            if not call.done:
                self._publish(call)
        # Counted once the waiting calls are out: a thread that sees the count see them sent.
        self.connects += 1
        self._ever_connected.set()
        self._first_outcome.set()
        for sub in list(self._subs.values()):
            if sub.channel is None and not sub.setting_up:
                self._setup_sub(sub)

    def _on_channel_closed(self, ch: Any, reason: BaseException) -> None:
        if ch is not self._channel:
            return
        gen = self._channel_gen
        self._channel = None
        self._ready = False
        self._unconfirmed.clear()
        # 403 (no permission), 404 (no such exchange, e.g. baton.admin on an older deployment) and
        # 406 close the channel for a publish the broker refused: resending it would only repeat that.
        if isinstance(reason, ChannelClosedByBroker) and reason.reply_code in (403, 404, 406):
            self._fail_refused(gen, reason.reply_code, reason.reply_text)
        if self._conn is not None and not self._closing and self._conn.is_open:
            log.warning("channel closed (%s); reopening", self.sanitize(repr(reason)))
            self._ioloop.call_later(0.1, self._open_channel)

    def _fail_refused(self, gen: int, code: int, text: str) -> None:
        """The broker closed the channel because it refused a publish (section 9): fail the calls
        it names instead of resending them."""
        text = self.sanitize(text or "")
        m = re.search(r"exchange '([^']*)'", text)
        inflight = [c for c in self._calls.values() if c.channel_gen == gen and not c.done]
        if m:
            victims = [c for c in inflight if c.exchange == m.group(1)]
        elif "user_id" in text:
            victims = inflight
        else:
            victims = [c for c in inflight if c.sends == 1] or inflight
        for c in victims:
            self._calls.pop(c.correlation_id, None)
            c._fail(ForbiddenError(
                f"the broker refused to publish {c.label} to exchange {c.exchange!r} "
                f"({code} {text}) as user {self.user!r}", code, text))

    def _on_blocked(self, _conn: Any, _frame: Any) -> None:
        log.warning("broker blocked publishing on %s (resource alarm)", self.redacted_url)
        self._blocked = True

    def _on_unblocked(self, _conn: Any, _frame: Any) -> None:
        log.info("broker unblocked publishing on %s", self.redacted_url)
        self._blocked = False

    def _start_call(self, call: Call) -> None:
        if call.done:
            return
        if self._closing:
            call._fail(ClientClosedError("the client is closed"))
            return
        self._calls[call.correlation_id] = call
        if self._ready and not self._blocked:
            self._publish(call)

    def _publish(self, call: Call) -> None:
        ch = self._channel
        if ch is None or not self._ready:
            return
        now = time.monotonic()
        remaining_ms = int((call.publish_until - now) * 1000)
        if remaining_ms <= 0:
            return
        props = pika.BasicProperties(
            content_type="application/json",
            delivery_mode=2,
            correlation_id=call.correlation_id,
            reply_to=DIRECT_REPLY_TO,
            user_id=self.user if call.with_user_id else None,
            expiration=str(remaining_ms),
        )
        try:
            ch.basic_publish(call.exchange, call.routing_key, call.body, props, mandatory=True)
        except Exception as exc:
            log.warning("publish failed: %s", self.sanitize(repr(exc)))
            return
        if call.first_sent is None:
            call.first_sent = now
        call.sends += 1
        call.channel_gen = self._channel_gen
        call.schedule.sent(call.ms(now), self._channel_gen, random.uniform(*JITTER))
        if self._confirms:
            self._next_tag += 1
            self._unconfirmed[self._next_tag] = (call.correlation_id, now)

    def _on_confirm(self, ch: Any, frame: Any) -> None:
        if ch is not self._channel:
            return  # a channel replaced by a fresh one: its tags are not this one's
        method = frame.method
        tag = method.delivery_tag
        tags = [t for t in self._unconfirmed if t <= tag] if method.multiple else [tag]
        nack = isinstance(method, pika.spec.Basic.Nack)
        for t in tags:
            entry = self._unconfirmed.pop(t, None)
            corr = entry[0] if entry is not None else None
            if nack and corr is not None:
                call = self._calls.get(corr)
                if call is not None and not call.done:
                    # Section 9: a nack means the broker did not store it: publish again, on a new
                    # channel (the tick opens it, spaced by NACK_SPACING).
                    self._nacks += 1

    def _on_return(self, _ch: Any, method: Any, props: Any, _body: bytes) -> None:
        call = self._calls.pop(getattr(props, "correlation_id", None) or "", None)
        if call is None:
            return
        call._fail(UnroutableError(
            f"the broker returned {call.label} ({method.reply_code} {method.reply_text}): no "
            f"queue is bound to exchange {method.exchange!r} with routing key "
            f"{method.routing_key!r}; the topology is missing or the partition count N is wrong "
            f"(check N with describe)",
            method.reply_code, method.reply_text, method.exchange, method.routing_key))

    def _on_reply(self, _ch: Any, _method: Any, props: Any, body: bytes) -> None:
        if self.ignore_replies:
            return
        corr = getattr(props, "correlation_id", None)
        call = self._calls.get(corr or "")
        if call is None or call.done:
            self._calls.pop(corr or "", None)
            self.stray_replies += 1
            return
        try:
            obj = json.loads(body.decode("utf-8"))
        except Exception as exc:
            self._calls.pop(call.correlation_id, None)
            call._fail(ProtocolError(f"reply to {call.label} is not JSON: {exc}"))
            return
        call.messages += 1
        if call.first_message_only or call.expected == 0:
            self._calls.pop(call.correlation_id, None)
            call._complete(obj)
            return
        # A coalesced message's reply (section 15), possibly split over several messages.
        if isinstance(obj, dict) and obj.get("status") == "batch" and \
                isinstance(obj.get("replies"), list):
            first_raw = obj.get("first")
            first = first_raw if isinstance(first_raw, int) else 0
            for i, r in enumerate(obj["replies"]):
                call.parts[first + i] = r
            if all(i in call.parts for i in range(call.expected)):
                self._calls.pop(call.correlation_id, None)
                call._complete([call.parts[i] for i in range(call.expected)])
            return
        # One error reply for the whole message.
        self._calls.pop(call.correlation_id, None)
        call._complete(obj)

    def _tick(self) -> None:
        now = time.monotonic()
        for corr, call in list(self._calls.items()):
            if call.done:
                self._calls.pop(corr, None)
                continue
            if now >= call.deadline:
                self._calls.pop(corr, None)
                call._fail(BatonTimeoutError(self._timeout_message(call), call.request_id,
                                             partial=self._partial(call)))
                continue
            if not self._ready or self._blocked:
                continue
            if call.schedule.step(call.ms(now), self._channel_gen) == SEND:
                self._publish(call)
        self._refresh_if_stale(now)
        if not self._closing:
            self._ioloop.call_later(_TICK, self._tick)

    def _refresh_if_stale(self, now: float) -> None:
        """Opens a new channel when the oldest request has had no confirm for ``stale_after``
        seconds, or requests were nacked (at most every ``NACK_SPACING`` seconds); every waiting call
        is published again on it once it consumes its replies."""
        if (not self._confirms or self._refreshing or not self._ready or self._blocked
                or self._conn is None or self._closing):
            return
        if self._stale_after > 0 and self._unconfirmed:
            after = self._stale_after
            # Right after nacks the queue's record may still name the old leader: a channel opened then
            # is stuck like the one before it, without nacks, and gets NACK_SPACING to prove itself.
            if self._nack_refresh_at is not None and now - self._nack_refresh_at < after:
                after = min(after, NACK_SPACING)
            _corr, sent = next(iter(self._unconfirmed.values()))
            if now - sent >= after:
                self._refresh_channel(f"a request had no broker confirm for {after:g} s")
                return
        if self._nacks and (self._nack_refresh_at is None or now - self._nack_refresh_at >= NACK_SPACING):
            count, self._nacks = self._nacks, 0
            self._nack_refresh_at = now
            self._refresh_channel(f"the broker nacked {count} request message{'' if count == 1 else 's'} "
                                  "(it did not store them)")

    def _refresh_channel(self, why: str) -> None:
        log.warning("%s: sending the waiting calls again on a new channel", why)
        old = self._channel
        conn = self._conn
        self._refreshing = True
        self._ready = False  # nothing is published until the new channel consumes its replies
        self.fresh_channels += 1
        try:
            self._conn.channel(on_open_callback=self._on_channel_open)
        except Exception as exc:
            self._refreshing = False
            self._ready = old is not None
            log.warning("cannot open a channel: %s", self.sanitize(repr(exc)))
            return

        def opened_in_time() -> None:
            # A channel that does not open within stale_after means the connection's own node froze: its
            # heartbeats would tell only much later. Drop the connection; the reconnect tries the next
            # node first and publishes every waiting call again (as the Swift client does).
            if self._refreshing and self._conn is conn and conn is not None and not self._closing:
                log.warning("cannot open a new channel within %g s; reconnecting", self._stale_after or 1.0)
                self._drop_connection()
        self._ioloop.call_later(self._stale_after or 1.0, opened_in_time)
        if old is not None:
            def close_old() -> None:
                if old.is_open:
                    try:
                        old.close()
                    except Exception:
                        pass
            self._ioloop.call_later(30.0, close_old)

    def _partial(self, call: Call) -> Any:
        if call.expected:
            return [call.parts.get(i) for i in range(call.expected)]
        return None

    def _timeout_message(self, call: Call) -> str:
        msg = f"no reply to {call.label}"
        if call.request_id:
            msg += f" (request_id {call.request_id})"
        msg += f" within {call.timeout:g} s"
        if call.expected and call.parts:
            msg += f" ({len(call.parts)} of {call.expected} element replies arrived)"
        if self._blocked:
            msg += "; the broker has blocked publishing on this connection (resource alarm)"
        elif not self._ready:
            msg += f"; not connected to the broker at {self.redacted_url}"
            if self.last_close_reason:
                msg += f" (last error: {self.last_close_reason})"
        elif call.sends == 0:
            msg += "; it could not be published"
        else:
            msg += f" after {call.sends} publish(es); is a worker serving partition " \
                   f"{call.routing_key}?"
        return msg

    def _drop_connection(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            # Shut the socket down rather than close the connection: a frozen node never answers the
            # closing handshake (also the tests' fault injection).
            sock = conn._transport._sock  # noqa: SLF001
            import socket

            sock.shutdown(socket.SHUT_RDWR)
        except Exception:
            try:
                conn.close(320, "dropped by baton_client")
            except Exception:
                pass

    def _shutdown(self) -> None:
        for call in list(self._calls.values()):
            call._fail(ClientClosedError("the client is closed"))
        self._calls.clear()
        if self._conn is not None and self._conn.is_open:
            try:
                self._conn.close()
                # _on_conn_closed stops the loop; a broker that never answers close (a partition, a
                # blocked connection, no heartbeats) must not keep this thread and its socket alive.
                self._ioloop.call_later(2.0, self._ioloop.stop)
                return
            except Exception:
                pass
        if self._conn is not None and (self._conn.is_closing or not self._conn.is_closed):
            # Opening or closing: stop once it reports closed, or after a grace period.
            self._ioloop.call_later(2.0, self._ioloop.stop)
            return
        self._ioloop.stop()

    # ------------------------------------------------------------------ subscriptions

    def _add_sub(self, sub: Subscription) -> None:
        if sub.removed:
            return
        self._subs[id(sub)] = sub
        if self._ready:
            self._setup_sub(sub)

    def _remove_sub(self, sub: Subscription) -> None:
        self._subs.pop(id(sub), None)
        ch = sub.channel
        sub.channel = None
        if ch is not None and ch.is_open:
            try:
                ch.close()  # the exclusive, auto-delete queue goes with its consumer
            except Exception:
                pass

    def _setup_sub(self, sub: Subscription) -> None:
        if self._conn is None or sub.removed:
            return
        sub.setting_up = True

        def on_open(ch: Any) -> None:
            if sub.removed or self._subs.get(id(sub)) is not sub:
                ch.close()
                return
            sub.channel = ch
            ch.add_on_close_callback(lambda c, r: self._on_sub_closed(sub, c, r))
            ch.queue_declare("", exclusive=True, auto_delete=True, callback=declared)

        def declared(frame: Any) -> None:
            sub.queue = frame.method.queue
            bind(0)

        def bind(i: int) -> None:
            ch = sub.channel
            if ch is None:
                return
            if i < len(sub.keys):
                ch.queue_bind(sub.queue, EVENTS_EXCHANGE, routing_key=sub.keys[i],
                              callback=lambda _f: bind(i + 1))
            else:
                ch.basic_consume(sub.queue, on_message, auto_ack=True, callback=consuming)

        def on_message(_ch: Any, method: Any, _props: Any, body: bytes) -> None:
            try:
                obj = json.loads(body.decode("utf-8"))
            except Exception:
                return
            try:
                sub.on_message(obj, method.routing_key)
            except Exception:
                log.exception("watch message handler failed")

        def consuming(_frame: Any) -> None:
            sub.setting_up = False
            try:
                sub.on_ready()
            except Exception:
                log.exception("watch ready handler failed")

        try:
            self._conn.channel(on_open_callback=on_open)
        except Exception as exc:
            sub.setting_up = False
            log.warning("cannot open a watch channel: %s", self.sanitize(repr(exc)))

    def _on_sub_closed(self, sub: Subscription, ch: Any, reason: BaseException) -> None:
        if sub.channel is not ch and sub.channel is not None:
            return
        was_setting_up = sub.setting_up
        sub.channel = None
        sub.queue = None
        sub.setting_up = False
        if sub.removed or self._subs.get(id(sub)) is not sub:
            return
        if isinstance(reason, ChannelClosedByBroker) and reason.reply_code in (403, 404, 406):
            if was_setting_up:
                self._subs.pop(id(sub), None)
                text = self.sanitize(reason.reply_text or "")
                sub.on_error(ForbiddenError(
                    f"the broker refused the event subscription ({reason.reply_code} {text}) "
                    f"for user {self.user!r}", reason.reply_code, text))
                return
        if self._conn is not None and self._conn.is_open and not self._closing:
            self._ioloop.call_later(0.2, lambda: self._setup_sub(sub)
                                    if sub.channel is None and not sub.setting_up else None)
