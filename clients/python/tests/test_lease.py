"""The lease keeper (section 9, "Keeping a lease")."""

import queue
import time

import pytest

from baton_client import LeaseDeniedError, LeaseState

pytestmark = pytest.mark.live


def test_renewals_keep_a_lease_past_several_lease_lengths(client, buf, conn):
    changes = []
    with client.lease(buf, user="ann", connection=conn, lease_ms=1000,
                      on_change=changes.append) as lease:
        assert lease.state is LeaseState.HELD and lease.token == 1
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3.5:
            assert lease.state in (LeaseState.HELD, LeaseState.RENEWING_LATE), lease.reason
            time.sleep(0.05)
        assert lease.state in (LeaseState.HELD, LeaseState.RENEWING_LATE), lease.reason
        assert lease.renewals >= 6  # every ~333 ms
        s = client.inspect(buf)
        assert s.holder.connection == conn and s.token == 1
        assert 0 < lease.remaining() <= 1.0
    assert lease.state is LeaseState.RELEASED
    assert client.inspect(buf).holder is None
    assert [c.state for c in changes][-1] is LeaseState.RELEASED
    assert LeaseState.LOST not in [c.state for c in changes]


def test_force_release_is_reported_lost_before_the_local_expiry(client, operator, buf, conn):
    lease = client.keep(buf, "ann", conn, lease_ms=1000)
    try:
        assert lease.state is LeaseState.HELD
        time.sleep(0.5)
        assert operator.force_release(buf, reason="pytest").status == "released"
        # No renewal can succeed any more, so this is the end of the lease on the local clock.
        local_expiry = lease._expiry
        assert lease.wait_for(LeaseState.LOST, timeout=2.0), lease.state
        assert "not_owner" in lease.reason
        lost = [c for c in iter_changes(lease) if c.state is LeaseState.LOST]
        assert len(lost) == 1
        assert lost[0].at < local_expiry - lease.margin  # before the lease ran out locally
    finally:
        lease.release()
    assert lease.state is LeaseState.RELEASED
    # The keeper did not release what is not its own anymore; the buffer is free.
    assert client.inspect(buf).holder is None


def iter_changes(lease):
    while True:
        try:
            yield lease.changes.get_nowait()
        except queue.Empty:
            return


def test_exit_releases_also_on_exceptions(client, buf, conn):
    with pytest.raises(RuntimeError):
        with client.lease(buf, user="ann", connection=conn, lease_ms=30000) as lease:
            assert client.inspect(buf).holder.connection == conn
            raise RuntimeError("boom")
    assert lease.state is LeaseState.RELEASED
    s = client.inspect(buf)
    assert s.holder is None and s.token == 1


def test_denied_when_held_by_another(client, buf, conn):
    r = client.claim(buf, "bob", f"{conn}-bob")
    with pytest.raises(LeaseDeniedError) as ei:
        with client.lease(buf, user="ann", connection=conn, lease_ms=5000):
            pass
    assert ei.value.reply.holder.user == "bob"
    client.release(buf, f"{conn}-bob", r.token)


def test_lost_when_renewals_go_unanswered(client, live, buf, conn):
    from baton_client import Client

    with Client(live["url"], partitions=live["partitions"], timeout=5.0) as c:
        lease = c.keep(buf, "ann", conn, lease_ms=1200)
        states = []
        lease.add_callback(lambda ch: states.append(ch.state))
        c._io.ignore_replies = True  # renewals are sent, their answers never come
        try:
            assert lease.wait_for(LeaseState.LOST, timeout=3.0)
            assert LeaseState.RENEWING_LATE in states  # late before lost
            assert "ran out" in lease.reason
            assert lease.remaining() == 0.0
        finally:
            c._io.ignore_replies = False
            lease.release()


def test_closing_the_client_releases_its_leases_and_ends_watches(client, live, buf, conn):
    from baton_client import Client

    c = Client(live["url"], partitions=live["partitions"], timeout=5.0)
    lease = c.keep(buf, "ann", conn, lease_ms=30000)
    w = c.watch(buf)
    got = []
    import threading

    t = threading.Thread(target=lambda: got.extend(w))
    t.start()
    c.close()
    t.join(5)
    assert not t.is_alive()
    assert lease.state is LeaseState.RELEASED
    assert client.inspect(buf).holder is None
