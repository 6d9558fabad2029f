"""Live tests of the single ops (sections 4, 9, 12, 17)."""

import time
import uuid

import pytest

from baton_client import (
    BatonTimeoutError,
    Client,
    Description,
    ForbiddenError,
    RejectedError,
    ReleasedConnection,
    Request,
    UnroutableError,
)

pytestmark = pytest.mark.live


def test_describe_discovers_n(live):
    with Client(live["url"], timeout=10.0) as c:  # partitions=None: describe (section 17)
        assert c.partitions == live["partitions"]
        assert c.revision is not None and c.revision >= 3
        d = c.description
        assert isinstance(d, Description)
        assert d.protocol == 1 and d.partition == 0
        for op in ("claim", "renew", "release", "inspect", "release_connection",
                   "force_release", "describe", "events"):
            assert op in d.ops


def test_describe_any_partition(client):
    d = client.describe(partition=client.partitions - 1)
    assert d.partition == client.partitions - 1 and d.partitions == client.partitions


def test_claim_renew_release_inspect(client, buf, conn):
    p = client.partition_of(buf)
    r = client.claim(buf, "ann", conn, 5000)
    assert r.status == "granted" and r.granted and r.token == 1 and r.partition == p
    assert r.holder.user == "ann" and r.holder.connection == conn
    assert r.expires_at and r.at and r.buffer == buf

    d = client.claim(buf, "bob", f"{conn}-b")
    assert d.status == "denied" and d.token == 1 and d.holder.connection == conn

    again = client.claim(buf, "ann", conn, 60000)  # extension: same token
    assert again.status == "granted" and again.token == 1

    s = client.inspect(buf)
    assert s.status == "state" and s.token == 1 and s.holder.user == "ann"

    rn = client.renew(buf, conn, 1, 5000)
    assert rn.status == "renewed" and rn.token == 1
    assert client.renew(buf, conn, 2).status == "not_owner"
    assert client.renew(buf, f"{conn}-x", 1).status == "not_owner"

    rel = client.release(buf, conn, 1)
    assert rel.status == "released" and rel.token == 1 and rel.holder is None
    assert client.release(buf, conn, 1).status == "not_owner"

    s = client.inspect(buf)
    assert s.status == "state" and s.holder is None and s.token == 1 and s.expires_at is None

    assert client.claim(buf, "bob", f"{conn}-b").token == 2


def test_inspect_never_claimed(client, buf):
    s = client.inspect(buf)
    assert s.status == "state" and s.token == 0 and s.holder is None


def test_retry_with_same_request_id_gets_stored_reply(client, buf, conn):
    rid = str(uuid.uuid4())
    first = client.claim(buf, "ann", conn, request_id=rid)
    assert first.granted
    client.release(buf, conn, first.token)
    again = client.claim(buf, "ann", conn, request_id=rid)
    assert again.granted and again.token == first.token and again.at == first.at
    with pytest.raises(RejectedError) as ei:
        client.claim(buf, "ann", conn, 5000, request_id=rid)
    assert ei.value.code == "request_id_reused"


def test_release_connection_broadcast_merges(client, conn):
    # Buffers in at least two different partitions (when N > 1).
    bufs, seen = [], set()
    i = 0
    while len(bufs) < 4:
        b = f"pytest/rc/{uuid.uuid4().hex[:8]}/{i}"
        i += 1
        p = client.partition_of(b)
        if p in seen and len(seen) < min(2, client.partitions):
            continue
        seen.add(p)
        bufs.append(b)
    for b in bufs:
        assert client.claim(b, "ann", conn).granted
    other = client.claim(f"pytest/rc/{uuid.uuid4().hex}", "ann", f"{conn}-other")
    assert other.granted
    rid = str(uuid.uuid4())
    rc = client.release_connection(conn, request_id=rid)
    assert isinstance(rc, ReleasedConnection)
    assert rc.buffers == tuple(sorted(bufs)) and rc.released_count == 4 and rc.complete
    assert len(rc.replies) == client.partitions
    assert {r.partition for r in rc.replies} == set(range(client.partitions))
    for b in bufs:
        assert client.inspect(b).holder is None
    # A retry with the same request_id gets the stored replies.
    again = client.release_connection(conn, request_id=rid)
    assert again.buffers == rc.buffers
    # A new one releases nothing.
    assert client.release_connection(conn).buffers == ()
    assert client.inspect(other.buffer).holder is not None


def test_errors_carry_the_protocol_code(client, buf, conn):
    # The client does not check lengths; the worker does (user: 1-256 code points).
    with pytest.raises(RejectedError) as ei:
        client.claim(buf, "u" * 257, conn)
    assert ei.value.code == "invalid_request"
    assert ei.value.reply.buffer == buf and ei.value.reply.partition == client.partition_of(buf)
    rep = client.send_raw({"v": 1, "op": "claim", "request_id": str(uuid.uuid4()), "buffer": buf,
                           "user": "u", "connection": conn, "lease_ms": 500},
                          client.partition_of(buf))
    assert rep["status"] == "error" and rep["error"]["code"] == "invalid_request"


def test_rejected_error_from_typed_call(client):
    # A buffer routed to another partition on purpose, through a batch with an explicit partition.
    b = "conformance/misrouted/9"
    if client.partitions == 1:
        pytest.skip("N = 1 has no other partition")
    [rep] = client.batch([Request.inspect(b)], partition=0)
    assert rep.is_error and rep.error.code == "misrouted"
    with pytest.raises(RejectedError) as ei:
        rep.raise_for_error()
    assert ei.value.code == "misrouted"


def test_unroutable_is_a_configuration_error(live):
    # A client that believes N is larger than it is publishes to a routing key no queue has.
    n = live["partitions"]
    with Client(live["url"], partitions=n, timeout=5.0) as c:
        with pytest.raises(UnroutableError) as ei:
            c.describe(partition=n + 3)
        assert str(n + 3) in str(ei.value) and "N" in str(ei.value)
        # The client goes on working.
        assert c.describe().partitions == n


def test_force_release_needs_an_operator(client, operator, buf, conn):
    assert client.claim(buf, "ann", conn).granted
    with pytest.raises(ForbiddenError) as ei:
        client.force_release(buf, "test")
    assert ei.value.reply_code == 403
    # The frontend's client still works after its channel was closed by the broker.
    assert client.inspect(buf).token == 1
    r = operator.force_release(buf, reason="pytest")
    assert r.status == "released" and r.token == 1
    assert operator.force_release(buf).status == "not_owner"
    assert client.claim(buf, "bob", f"{conn}-b").token == 2


def test_timeout_error_and_no_password(live):
    url = live["url"]
    pw = url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
    with Client(url, partitions=live["partitions"], timeout=5.0) as c:
        with pytest.raises(BatonTimeoutError) as ei:
            # A deadline in the future but a timeout too short for any reply to arrive.
            c.describe(timeout=0.001)
        assert "describe" in str(ei.value)
        if len(pw) >= 4:
            assert pw not in str(ei.value)


def test_cancelled_claim_leaves_no_grant(live, buf, conn):
    """Section 9, "Cancelled calls": a claim whose reply never came is asked again with the same
    request_id in the background, and what it granted is released."""
    with Client(live["url"], partitions=live["partitions"], timeout=5.0) as c:
        c._io.ignore_replies = True  # the grant happens, its reply is lost
        try:
            with pytest.raises(BatonTimeoutError):
                c.claim(buf, "ann", conn, timeout=1.0)
        finally:
            c._io.ignore_replies = False
        end = time.monotonic() + 15
        while time.monotonic() < end:
            s = c.inspect(buf)
            if s.holder is None:
                break
            time.sleep(0.1)
        assert s.holder is None and s.token == 1, s  # granted (token 1), then released


def test_claim_that_was_never_decided_stays_undecided(live, buf, conn, monkeypatch):
    # A claim that reaches the worker after its deadline is never decided. With a 1 ms timeout alone the
    # request could still arrive in time on a fast machine (and be granted, rightly), so its deadline is
    # set in the past, as for a request delayed in transit past its caller's timeout.
    import baton_client.client as client_module
    from datetime import datetime, timedelta, timezone
    from baton_client.errors import BatonError
    from baton_client.requests import format_timestamp
    monkeypatch.setattr(client_module, "deadline_after",
                        lambda seconds: format_timestamp(datetime.now(timezone.utc) - timedelta(seconds=1)))
    with Client(live["url"], partitions=live["partitions"], timeout=5.0) as c:
        with pytest.raises(BatonError):
            c.claim(buf, "ann", conn, timeout=0.5)
    monkeypatch.undo()
    with Client(live["url"], partitions=live["partitions"], timeout=5.0) as c:
        s = c.inspect(buf)
        assert s.holder is None and s.token == 0


def test_many_threads_share_one_client(client):
    errors = []
    results = []

    def worker(k):
        try:
            c = f"conn-thread-{k}-{uuid.uuid4().hex[:6]}"
            for j in range(10):
                b = f"pytest/threads/{uuid.uuid4().hex[:8]}/{k}/{j}"
                r = client.claim(b, f"user{k}", c, 5000)
                assert r.granted and r.buffer == b
                assert client.release(b, c, r.token).status == "released"
                results.append(b)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    import threading

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(results) == 160


def test_resend_same_body_until_answered(live, buf, conn):
    """Replies of the first attempts are lost; a resend (same request_id and body) is answered
    with the stored reply."""
    import threading

    with Client(live["url"], partitions=live["partitions"], timeout=10.0, resend_after=0.3) as c:
        c._io.ignore_replies = True
        timer = threading.Timer(1.0, lambda: setattr(c._io, "ignore_replies", False))
        timer.start()
        r = c.claim(buf, "ann", conn)
        timer.join()
        assert r.granted and r.token == 1
        assert c.inspect(buf).token == 1  # decided once


def test_without_publisher_confirms(live, buf, conn):
    with Client(live["url"], partitions=live["partitions"], timeout=10.0, confirms=False) as c:
        r = c.claim(buf, "ann", conn)
        assert r.granted
        with pytest.raises(ForbiddenError):
            c.force_release(buf)
        assert c.release(buf, conn, r.token).status == "released"
        with pytest.raises(UnroutableError):
            c.describe(partition=live["partitions"] + 1)


def test_blocked_connection_fails_at_timeout_then_recovers(live, buf, conn):
    """connection.blocked (resource alarm, section 9), simulated inside the client: nothing is
    published while blocked, the call fails at its timeout saying why, and calls go on after
    connection.unblocked."""
    with Client(live["url"], partitions=live["partitions"], timeout=5.0) as c:
        c._io._threadsafe(lambda: c._io._on_blocked(None, None))
        with pytest.raises(BatonTimeoutError) as ei:
            c.claim(buf, "ann", conn, timeout=1.0)
        assert "blocked" in str(ei.value)
        c._io._threadsafe(lambda: c._io._on_unblocked(None, None))
        s = c.inspect(buf)
        assert s.status == "state" and s.token == 0  # the blocked claim was never published


def test_wrong_password_fails_fast_without_showing_it(live):
    from urllib.parse import urlsplit

    from baton_client import BatonConnectionError

    u = urlsplit(live["url"])
    bad = live["url"].replace(f":{u.password}@", ":Wr0ng-Secret-42@", 1)
    t0 = time.monotonic()
    with pytest.raises(BatonConnectionError) as ei:
        Client(bad, partitions=live["partitions"], timeout=10.0)
    assert time.monotonic() - t0 < 5.0
    assert "Wr0ng-Secret-42" not in str(ei.value) and "********" in str(ei.value)


@pytest.mark.live
def test_a_given_n_that_differs_from_the_deployments_is_refused(live):
    from baton_client import Client

    with pytest.raises(ValueError, match="describe"):
        Client(live["url"], partitions=live["partitions"] + 1, timeout=10.0)
    with Client(live["url"], partitions=live["partitions"], timeout=10.0) as c:
        assert c.revision is not None and c.revision >= 3, "the revision is learned even when N is given"
