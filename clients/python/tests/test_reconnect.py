"""A dropped connection (section 9): reconnect, consume direct reply-to again, republish."""

import threading
import time

import pytest

from baton_client import Client, LeaseState

pytestmark = pytest.mark.live


def wait_reconnected(c, before, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if c._io.connects > before and c.connected:
            return True
        time.sleep(0.02)
    return False


def test_next_call_works_after_the_connection_dropped(live, buf, conn):
    with Client(live["url"], partitions=live["partitions"], timeout=10.0) as c:
        r = c.claim(buf, "ann", conn)
        before = c._io.connects
        c._drop_connection()
        # The next call is made right away, while the client reconnects.
        s = c.inspect(buf)
        assert s.holder.connection == conn and s.token == r.token
        assert wait_reconnected(c, before)
        assert c.release(buf, conn, r.token).status == "released"


def test_outstanding_request_is_republished(live, buf, conn):
    with Client(live["url"], partitions=live["partitions"], timeout=10.0,
                resend_after=None) as c:  # no timed resends: only the reconnect republishes
        before = c._io.connects
        c._io.ignore_replies = True  # the first attempt's reply is lost with the old channel
        result = {}

        def call():
            result["r"] = c.claim(buf, "ann", conn)

        t = threading.Thread(target=call)
        t.start()
        time.sleep(0.3)
        c._io.ignore_replies = False
        c._drop_connection()
        t.join(15)
        assert wait_reconnected(c, before)
        r = result.get("r")
        assert r is not None and r.granted and r.token == 1  # the stored reply, same request_id
        assert c.inspect(buf).token == 1


def test_lease_survives_a_reconnect(live, buf, conn):
    with Client(live["url"], partitions=live["partitions"], timeout=5.0) as c:
        with c.lease(buf, user="ann", connection=conn, lease_ms=3000) as lease:
            before = c._io.connects
            c._drop_connection()
            assert wait_reconnected(c, before)
            time.sleep(2.5)
            assert lease.state is LeaseState.HELD, lease.reason
            assert lease.renewals >= 1
        assert c.inspect(buf).holder is None


def test_watch_survives_a_reconnect(live, buf, conn):
    with Client(live["url"], partitions=live["partitions"], timeout=5.0) as c:
        with c.watch(buf) as w:
            r = c.claim(buf, "ann", conn)
            assert w.get(5).kind == "granted"
            subs = w.subscriptions
            before = c._io.connects
            c._drop_connection()
            # A change while the queue is gone: found by the read after the new subscription.
            with Client(live["url"], partitions=live["partitions"]) as other:
                other.release(buf, conn, r.token)
            assert wait_reconnected(c, before)
            ev = w.get(10)
            assert ev is not None and (ev.kind, ev.token) == ("released", 1)
            assert w.subscriptions > subs
            assert w.get(0.5) is None


def _services(*args):
    """Runs scripts/services with `args` (a fault on the local broker it started). Returns False when it
    cannot (another broker); with CI set, that fails the test instead."""
    import os
    import subprocess

    from conftest import REPO_ROOT

    done = subprocess.run([str(REPO_ROOT / "scripts" / "services"), *args],
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0 and os.environ.get("CI"):
        raise AssertionError(f"scripts/services {' '.join(args)} failed: {done.stderr}")
    return done.returncode == 0


def _queue_freeze(url, queue, state):
    """scripts/services queue-freeze: suspends (on) or resumes (off) one quorum queue's Raft server."""
    from urllib.parse import unquote, urlsplit

    vhost = unquote(urlsplit(url).path[1:]) or "/"
    return _services("queue-freeze", vhost, queue, state)


def test_a_queue_that_confirms_nothing_gets_a_new_channel(live, buf, conn):
    """Section 9, "Publisher confirms": a request the broker does not confirm for stale_after (here a
    quorum queue whose Raft server is suspended, as a leader whose node froze) makes the client
    publish the waiting calls again on a new channel; the call is answered once the queue resumes."""
    with Client(live["url"], partitions=live["partitions"], timeout=20.0) as c:
        queue = f"baton.requests.{c.partition_of(buf)}"
        c.inspect(buf)
        assert c._io.fresh_channels == 0
        if not _queue_freeze(live["url"], queue, "on"):
            pytest.skip("the broker was not started by scripts/services")
        result = {}
        try:
            t = threading.Thread(target=lambda: result.setdefault("r", c.claim(buf, "ann", conn)))
            t.start()
            end = time.monotonic() + 6.0
            while c._io.fresh_channels == 0 and time.monotonic() < end:
                time.sleep(0.05)
            refreshed = c._io.fresh_channels >= 1
            held = "r" not in result
        finally:
            _queue_freeze(live["url"], queue, "off")
        t.join(20)
        assert refreshed, "a request unconfirmed for a second made the client open a new channel"
        assert held, "the frozen queue held the claim"
        r = result.get("r")
        assert r is not None and r.granted and r.token == 1


def _broker_freeze(state):
    """scripts/services broker-freeze: SIGSTOP (on) or SIGCONT (off) of the local RabbitMQ node, as a
    frozen VM."""
    return _services("broker-freeze", state)


def test_a_channel_that_does_not_open_drops_the_connection(live, buf, conn):
    """Section 9, "Publisher confirms": when even the new channel does not open within stale_after
    (the connection's own node froze), the client drops the connection at once and reconnects, instead
    of waiting for heartbeats that tell only much later; the call is answered once the node resumes."""
    with Client(live["url"], partitions=live["partitions"], timeout=30.0) as c:
        c.inspect(buf)
        assert c._io.last_close_reason is None
        if not _broker_freeze("on"):
            pytest.skip("the broker was not started by scripts/services")
        result = {}
        try:
            started = time.monotonic()
            t = threading.Thread(target=lambda: result.setdefault("r", c.claim(buf, "ann", conn)))
            t.start()
            end = started + 8.0
            while c._io.last_close_reason is None and time.monotonic() < end:
                time.sleep(0.05)
            dropped_after = time.monotonic() - started if c._io.last_close_reason is not None else None
        finally:
            _broker_freeze("off")
        t.join(30)
        # One second without a confirm, one more for the new channel that does not open, and slack.
        assert dropped_after is not None and dropped_after < 4.0, \
            f"the connection was dropped {dropped_after} s after the call (heartbeats would take a minute)"
        r = result.get("r")
        assert r is not None and r.granted and r.token == 1


def test_several_broker_urls_connect_to_the_first_node_that_answers(live, buf, conn):
    """A comma-separated list names the nodes of one broker: a node that refuses connections is
    skipped and the next one is used, as the Swift client does."""
    import re

    dead = re.sub(r"@[^/@]+/", "@127.0.0.1:1/", live["url"], count=1)
    assert dead != live["url"]
    with Client(f"{dead},{live['url']}", partitions=live["partitions"], timeout=10.0,
                connect_timeout=20.0) as c:
        r = c.claim(buf, "ann", conn)
        assert r.granted and r.token == 1
        assert c.url_redacted.count(",") == 1 and "127.0.0.1:1/" in c.url_redacted
        assert c.release(buf, conn, r.token).status == "released"
