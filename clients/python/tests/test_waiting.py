"""Claims that wait in line (``wait_ms``, section 19, revision 4).

The pure tests (validation, timing, batch refusal, the revision check) need no broker; the others
run against the live worker. Every waiter has a client (an AMQP connection) of its own. No test
sleeps for a fixed time: each waits for an event or a condition, with a timeout.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timezone

import pytest

from baton_client import (
    BatonError,
    Client,
    Description,
    LeaseDeniedError,
    LeaseState,
    Request,
)
from baton_client.lease import Lease
from baton_client.requests import WAIT_DEADLINE_CAP, waiting_claim_times

WAIT = 60000  # long enough never to run out in a test that does not want it to


# ---------------------------------------------------------------- helpers

def wait_until(pred, timeout, what):
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= end:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.01)


def pending_claim(c):
    """The client's claim call that is waiting for its answer, once it has been published."""
    for call in list(c._io._calls.values()):
        if call.label.startswith("claim") and call.sends > 0 and not call.done:
            return call
    return None


def await_in_line(c, buf, timeout=15.0):
    """Block until the worker has decided ``c``'s waiting claim of ``buf`` (it joined the line):
    an ``inspect`` published after it on the same channel is decided after it (queue order,
    section 4). Returns the claim's call."""
    wait_until(lambda: pending_claim(c) is not None, timeout, "the waiting claim to be published")
    call = pending_claim(c)
    c.inspect(buf)
    return call


class Waiter:
    """A waiting claim on a client (connection) of its own, run in a thread."""

    def __init__(self, live, buf, user, conn, wait_ms=WAIT, lease_ms=30000, **client_kw):
        self.buf, self.user, self.conn = buf, user, conn
        self.client = Client(live["url"], partitions=live["partitions"], timeout=10.0,
                             **client_kw)
        self.done = threading.Event()
        self.reply = None
        self.error = None
        self.sent_at = None
        self.answered_at = None
        self._thread = threading.Thread(target=self._run, args=(wait_ms, lease_ms), daemon=True)
        self._thread.start()
        self.call = await_in_line(self.client, buf)

    def _run(self, wait_ms, lease_ms):
        try:
            self.reply = self.client.claim(self.buf, self.user, self.conn, lease_ms,
                                           wait_ms=wait_ms)
        except BaseException as exc:  # reported by result()
            self.error = exc
        finally:
            self.answered_at = time.monotonic()
            self.done.set()

    def result(self, timeout=15.0):
        assert self.done.wait(timeout), f"{self.conn}: no answer within {timeout} s"
        if self.error is not None:
            raise self.error
        return self.reply

    def close(self):
        self.client.close(wait_background=0.5)


def position(client, buf):
    """The current position of ``buf``'s partition (section 18)."""
    return client.events(partition=client.partition_of(buf)).position


def changes_since(client, buf, after):
    """``(kind, token, connection)`` of every change of ``buf`` after position ``after``,
    following ``more`` (a buffer's read stops after 4,096 changes of its partition)."""
    out = []
    while True:
        page = client.events(buffer=buf, after=after)
        out += [(e.kind, e.token, e.holder.connection) for e in page.events]
        after = page.position
        if not page.more:
            return out


def grants_since(client, buf, after):
    return [(conn, token) for kind, token, conn in changes_since(client, buf, after)
            if kind == "granted"]


def nudge_until(event, client, buf, timeout=15.0):
    """Wait for ``event`` while settling ``buf`` with an ``inspect`` every 200 ms: any request
    about a buffer settles its line (section 19), as the worker's sweep eventually would."""
    end = time.monotonic() + timeout
    while not event.wait(0.2):
        if time.monotonic() >= end:
            pytest.fail(f"no answer within {timeout} s")
        client.inspect(buf)


# ---------------------------------------------------------------- pure tests

def test_wait_ms_is_validated():
    assert Request.claim("b", "u", "c", wait_ms=1).body()["wait_ms"] == 1
    assert Request.claim("b", "u", "c", wait_ms=300000).fields["wait_ms"] == 300000
    assert Request.claim("b", "u", "c", wait_ms=5).waiting
    assert not Request.claim("b", "u", "c").waiting
    assert "wait_ms" not in Request.claim("b", "u", "c").body()  # left out, never null
    for bad in (0, -1, 300001, 1.5, 1000.0, "1000", True, False):
        with pytest.raises(ValueError) as ei:
            Request.claim("b", "u", "c", wait_ms=bad)
        msg = str(ei.value)
        assert "wait_ms" in msg and "1 to 300000" in msg and repr(bad) in msg
    stub = type("Stub", (), {"resend_after": 1.5, "timeout": 5.0})()
    with pytest.raises(ValueError, match=r"wait_ms .*1 to 300000.*got 0"):
        Lease(stub, "b", user="u", connection="c", wait_ms=0)
    assert Lease(stub, "b", user="u", connection="c", wait_ms=10).wait_ms == 10


def test_waiting_claim_times():
    # wait_ms plus the timeout, for the answer and for deadline/expiration ...
    assert waiting_claim_times(10000, 5.0) == (15.0, 15.0)
    assert waiting_claim_times(1, 0.5) == (0.501, 0.501)
    # ... but the deadline at most 299 s ahead (300 s is the protocol's limit); the caller still
    # listens wait_ms plus the timeout.
    assert WAIT_DEADLINE_CAP == 299.0
    assert waiting_claim_times(300000, 5.0) == (305.0, 299.0)
    assert waiting_claim_times(295000, 4.0) == (299.0, 299.0)
    with pytest.raises(ValueError):
        waiting_claim_times(0, 5.0)


DESCRIBE_OPS = ("claim", "renew", "release", "inspect", "release_connection", "force_release",
                "describe", "events")


def offline_client(revision, partitions=4, timeout=5.0):
    """A Client that never connects: describe answers ``revision``; a claim is recorded and
    answered ``granted`` at once."""
    c = Client.__new__(Client)
    c.partitions, c.timeout, c.resend_after, c.orphan_window = partitions, timeout, 1.5, 120.0
    c.revision, c._revisions, c._closed = revision, {}, False
    c.described, c.sent = [], []

    def single(req, partition, timeout=None, resend_after="default"):
        assert req.op == "describe"
        c.described.append(partition)
        return Description(status="description", request_id=req.request_id, buffer=None,
                           holder=None, token=None, expires_at=None, at=None,
                           partition=partition, protocol=1, revision=revision,
                           partitions=partitions, ops=DESCRIBE_OPS)

    def submit(call):
        c.sent.append(call)
        body = json.loads(call.body)
        call._complete({"v": 1, "request_id": body["request_id"], "status": "granted",
                        "buffer": body["buffer"], "holder": {"user": body["user"],
                                                             "connection": body["connection"]},
                        "token": 1, "expires_at": "2026-11-28T00:15:44.123Z",
                        "at": "2026-11-28T00:15:14.123Z", "partition": 0})
        return call

    c._single, c._submit = single, submit
    return c


def test_a_waiting_claim_needs_revision_4():
    c = offline_client(revision=3)
    with pytest.raises(BatonError, match=r"wait_ms needs protocol revision 4; the worker of "
                                         r"partition \d+ speaks revision 3"):
        c.claim("doc:1", "ann", "c1", wait_ms=1000)
    assert c.sent == []  # nothing was sent
    assert c.described == [c.partition_of("doc:1")]
    # A plain claim is still fine with revision 3.
    assert c.claim("doc:1", "ann", "c1").granted and len(c.sent) == 1
    with pytest.raises(ValueError, match="wait_ms"):
        c.claim("doc:1", "ann", "c1", wait_ms=0)


def _deadline_in(body):
    d = datetime.strptime(body["deadline"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    return (d - datetime.now(timezone.utc)).total_seconds()


def test_a_waiting_claim_is_sent_alone_with_its_deadline():
    c = offline_client(revision=4, timeout=5.0)
    r = c.claim("doc:1", "ann", "c1", 30000, wait_ms=10000)
    assert r.granted
    call = c.sent[-1]
    body = json.loads(call.body)
    assert "batch" not in body and body["op"] == "claim" and body["wait_ms"] == 10000
    assert call.timeout == 15.0
    assert call.publish_until - call.created == pytest.approx(15.0)
    assert 14.0 < _deadline_in(body) <= 15.0
    # The partition's revision is remembered: no second describe.
    c.claim("doc:1", "ann", "c1", wait_ms=10000, timeout=2.0)
    assert c.described == [c.partition_of("doc:1")]
    assert c.sent[-1].timeout == 12.0
    # wait_ms + timeout > 300 s: the deadline (and expiration) are capped at 299 s, wait_ms is
    # sent as asked, and the call listens wait_ms + timeout.
    c.claim("doc:1", "ann", "c1", wait_ms=300000)
    call = c.sent[-1]
    body = json.loads(call.body)
    assert body["wait_ms"] == 300000
    assert call.timeout == 305.0
    assert call.publish_until - call.created == pytest.approx(299.0)
    assert 298.0 < _deadline_in(body) <= 299.0


def test_a_waiting_claim_in_a_batch_is_refused_client_side():
    c = offline_client(revision=4)
    with pytest.raises(ValueError, match=r"element\(s\) \[1\].*wait_ms.*sent alone"):
        c.batch([Request.inspect("doc:1"), Request.claim("doc:1", "ann", "c1", wait_ms=1000)])
    assert c.sent == []


# ---------------------------------------------------------------- live tests

@pytest.mark.live
def test_ten_waiters_are_granted_in_arrival_order(client, live, buf, conn):
    start = position(client, buf)
    assert client.claim(buf, "holder", conn, 30000).token == 1
    waiters = []
    try:
        for i in range(10):
            waiters.append(Waiter(live, buf, f"user{i}", f"{conn}-w{i}"))
        # All ten are in line and none was answered (a waiting claim gets no reply now).
        assert not any(w.done.is_set() for w in waiters)
        assert client.inspect(buf).holder.connection == conn
        assert client.release(buf, conn, 1).status == "released"
        token = 1
        for i, w in enumerate(waiters):
            r = w.result()
            assert r.status == "granted", r
            assert (r.holder.user, r.holder.connection) == (f"user{i}", f"{conn}-w{i}")
            assert r.token == token + 1  # strictly increasing, in arrival order
            token = r.token
            assert not any(x.done.is_set() for x in waiters[i + 1:])  # the rest still wait
            assert w.client.release(buf, w.conn, r.token).status == "released"
        s = client.inspect(buf)
        assert s.holder is None and s.token == 11
        assert grants_since(client, buf, start) == \
            [(conn, 1)] + [(f"{conn}-w{i}", i + 2) for i in range(10)]
    finally:
        for w in waiters:
            w.close()


@pytest.mark.live
def test_a_wait_that_runs_out_is_denied_and_leaves_the_line(client, live, buf, conn):
    start = position(client, buf)
    assert client.claim(buf, "holder", conn, 30000).token == 1
    short = Waiter(live, buf, "short", f"{conn}-short", wait_ms=1000)
    long = Waiter(live, buf, "long", f"{conn}-long", wait_ms=WAIT)
    try:
        nudge_until(short.done, client, buf)
        d = short.result(0)
        assert d.status == "denied"
        assert d.holder.connection == conn and d.token == 1  # the current holder
        # Not before the wait ran out (the worker's clock; 0.1 s for the clocks' rates).
        assert short.answered_at - short.call.first_sent >= 0.9
        assert not long.done.is_set()
        assert client.release(buf, conn, 1).status == "released"
        g = long.result()
        assert g.status == "granted" and g.holder.connection == f"{conn}-long" and g.token == 2
        s = client.inspect(buf)
        assert s.holder.connection == f"{conn}-long" and s.token == 2
        # Never to the expired waiter.
        assert grants_since(client, buf, start) == [(conn, 1), (f"{conn}-long", 2)]
        # A repeat of the expired claim (same request_id and body) gets its stored denial.
        again = short.client.send_raw(short.call.body, short.client.partition_of(buf))
        assert again["status"] == "denied" and again["token"] == 1
        assert long.client.release(buf, long.conn, 2).status == "released"
    finally:
        short.close()
        long.close()


@pytest.mark.live
def test_a_waiting_claim_survives_a_dropped_connection(client, live, buf, conn):
    start = position(client, buf)
    assert client.claim(buf, "holder", conn, 30000).token == 1
    # No timed resends: only the reconnect republishes the claim.
    w = Waiter(live, buf, "ann", f"{conn}-w", resend_after=None)
    try:
        io = w.client._io
        before, strays = io.connects, io.stray_replies
        assert w.call.sends == 1
        w.client._drop_connection()
        wait_until(lambda: io.connects > before and io.connected, 15, "the reconnect")
        # The claim went out again on the new channel (same request_id and body), which moves
        # its answer there; an inspect on that channel is decided after the repeat.
        assert w.call.sends == 2 and w.call.channel_gen == io._channel_gen
        w.client.inspect(buf)
        assert not w.done.is_set()
        assert client.release(buf, conn, 1).status == "released"
        r = w.result()
        assert r.status == "granted" and r.token == 2 and r.holder.connection == f"{conn}-w"
        # Answered exactly once: one reply message for the call, none left over.
        assert w.call.messages == 1
        s = w.client.inspect(buf)  # a round trip on the same channel after the grant
        assert s.holder.connection == f"{conn}-w" and s.token == 2
        assert io.stray_replies == strays
        assert grants_since(client, buf, start) == [(conn, 1), (f"{conn}-w", 2)]
        assert w.client.release(buf, f"{conn}-w", 2).status == "released"
    finally:
        w.close()


@pytest.mark.live
def test_the_keeper_waits_then_keeps_the_lease(client, live, buf, conn):
    assert client.claim(buf, "holder", conn, 30000).token == 1
    with Client(live["url"], partitions=live["partitions"], timeout=10.0) as kc:
        changes = []
        lease = kc.lease(buf, user="ann", connection=f"{conn}-k", lease_ms=2000, wait_ms=WAIT,
                         on_change=changes.append)
        failure = []

        def acquire():
            try:
                lease.acquire()
            except BaseException as exc:
                failure.append(exc)

        t = threading.Thread(target=acquire, daemon=True)
        t.start()
        try:
            claim_call = await_in_line(kc, buf)
            assert lease.state is LeaseState.PENDING
            # Let it wait longer than a whole lease: counted from the claim's send (section 9),
            # the lease would be over the moment it is granted.
            wait_until(lambda: time.monotonic() - claim_call.first_sent > 2.2, 5,
                       "the claim to wait longer than its lease")
            assert client.release(buf, conn, 1).status == "released"
            assert lease.wait_for(LeaseState.HELD, LeaseState.LOST, timeout=15), lease.state
            t.join(5)
            assert not failure, failure
            assert lease.state is LeaseState.HELD, lease.reason
            assert lease.token == 2 and lease.renewals >= 1  # the confirming renewal
            assert "waiting" in lease.reason
            # The lease counts from the confirming renewal, sent after the grant was answered.
            assert lease._confirmed_send > claim_call.first_sent + 2.2
            # Kept past several lease lengths (a renewal about every 667 ms; a 2 s lease leaves a
            # loaded machine room to answer each one).
            start = lease.renewals
            wait_until(lambda: lease.renewals >= start + 9 or lease.state is LeaseState.LOST,
                       15, "nine more renewals")
            assert lease.state in (LeaseState.HELD, LeaseState.RENEWING_LATE), lease.reason
            s = client.inspect(buf)
            assert s.holder.connection == f"{conn}-k" and s.token == 2
        finally:
            lease.release()
            t.join(5)
        assert lease.state is LeaseState.RELEASED
        assert LeaseState.LOST not in [c.state for c in changes]
        assert client.inspect(buf).holder is None


@pytest.mark.live
def test_the_keeper_is_denied_when_its_wait_runs_out(client, live, buf, conn):
    assert client.claim(buf, "holder", conn, 30000).token == 1
    with Client(live["url"], partitions=live["partitions"], timeout=10.0) as kc:
        done = threading.Event()
        failure = []

        def acquire():
            try:
                with kc.lease(buf, user="ann", connection=f"{conn}-k", lease_ms=5000,
                              wait_ms=500):
                    pass
            except BaseException as exc:
                failure.append(exc)
            finally:
                done.set()

        threading.Thread(target=acquire, daemon=True).start()
        nudge_until(done, client, buf)
        assert len(failure) == 1 and isinstance(failure[0], LeaseDeniedError), failure
        assert failure[0].reply.status == "denied" and failure[0].reply.holder.connection == conn
    assert client.release(buf, conn, 1).status == "released"


@pytest.mark.live
def test_the_worker_refuses_a_waiting_claim_in_a_coalesced_message(client, buf, conn):
    """What the client refuses itself (section 19, "Limits"), the worker refuses too."""
    el = Request.claim(buf, "ann", conn, wait_ms=1000).body()
    reply = client.send_raw({"v": 1, "batch": [el]}, client.partition_of(buf))
    assert reply["status"] == "batch"
    (r,) = reply["replies"]
    assert r["status"] == "error" and r["error"]["code"] == "invalid_request"
    assert client.inspect(buf).token == 0  # not decided
    with pytest.raises(ValueError, match="sent alone"):
        client.batch([Request.claim(buf, "ann", conn, wait_ms=1000)])
    bad = dict(Request.claim(buf, "ann", conn).body(), wait_ms=0)
    r = client.send_raw(bad, client.partition_of(buf))
    assert r["status"] == "error" and r["error"]["code"] == "invalid_request"


@pytest.mark.live
def test_a_waiting_claim_of_a_free_buffer_is_granted_at_once(client, buf, conn):
    r = client.claim(buf, "ann", conn, 5000, wait_ms=WAIT)
    assert r.status == "granted" and r.token == 1
    assert client.release(buf, conn, 1).status == "released"
    # The longest wait: its deadline is capped 299 s ahead, which the worker accepts.
    r = client.claim(buf, "ann", conn, 5000, wait_ms=300000)
    assert r.status == "granted" and r.token == 2
    assert client.release(buf, conn, 2).status == "released"


@pytest.mark.live
def test_the_grant_of_an_abandoned_waiting_claim_is_released(client, live, buf, conn):
    """Section 9, "Cancelled calls": a waiting claim given up on (here cancelled, as Ctrl-C
    would) stays in line; the client keeps asking in the background and releases the grant."""
    start = position(client, buf)
    assert client.claim(buf, "holder", conn, 30000).token == 1
    w = Waiter(live, buf, "ann", f"{conn}-w")
    try:
        w.client._io.cancel(w.call)
        assert w.done.wait(10)
        assert w.error is not None and "cancelled" in str(w.error)
        assert client.release(buf, conn, 1).status == "released"
        # The line hands the buffer to the abandoned claim (token 2); the clean-up releases it.
        wait_until(lambda: (lambda s: s.token == 2 and s.holder is None)(client.inspect(buf)),
                   20, "the abandoned grant to be released")
        assert changes_since(client, buf, start)[-2:] == \
            [("granted", 2, f"{conn}-w"), ("released", 2, f"{conn}-w")]
    finally:
        w.close()
