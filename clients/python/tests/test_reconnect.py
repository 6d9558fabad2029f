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
