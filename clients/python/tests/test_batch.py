"""Coalesced requests (section 15)."""

import uuid

import pytest

from baton_client import Description, EventsPage, RejectedError, Request

pytestmark = pytest.mark.live


def test_batch_replies_in_order(client, buf, conn):
    reqs = [
        Request.claim(buf, "ann", conn, 5000),
        Request.inspect(buf),
        Request.claim(buf, "bob", f"{conn}-b"),
        Request.renew(buf, conn, 1, 10000),
        Request.renew(buf, conn, 99),
        Request.describe(),
        Request.events(buffer=buf, after=0),
        Request.release(buf, conn, 1),
        Request.inspect(buf),
    ]
    replies = client.batch(reqs)
    assert [r.request_id for r in replies] == [r.request_id for r in reqs]
    assert [r.status for r in replies] == ["granted", "state", "denied", "renewed", "not_owner",
                                           "description", "events", "released", "state"]
    assert replies[0].token == 1 and replies[1].holder.user == "ann"
    assert isinstance(replies[5], Description) and replies[5].partitions == client.partitions
    page = replies[6]
    assert isinstance(page, EventsPage)
    # Every change committed before the read is in it (the grant); changes of later elements of
    # the same message may be in it too (the read can happen after the message's commit).
    assert [e.kind for e in page.events][:1] == ["granted"]
    assert replies[8].holder is None
    p = client.partition_of(buf)
    assert {r.partition for r in replies} == {p}


def test_batch_mixed_valid_and_invalid(client, buf, conn):
    bad = Request(op="claim", fields={"buffer": buf, "user": "ann", "connection": conn,
                                      "lease_ms": 10})
    unknown = Request(op="teleport", fields={"buffer": buf})
    replies = client.batch([bad, Request.claim(buf, "ann", conn), unknown, Request.inspect(buf)])
    assert [r.status for r in replies] == ["error", "granted", "error", "state"]
    assert replies[0].error.code == "invalid_request" and replies[0].request_id == bad.request_id
    assert replies[2].error.code == "unknown_op"
    with pytest.raises(RejectedError):
        replies[0].raise_for_error()


def test_batch_elements_are_idempotent(client, buf, conn):
    claim = Request.claim(buf, "ann", conn)
    first = client.batch([claim])[0]
    client.release(buf, conn, first.token)
    again = client.batch([claim, Request.inspect(buf)])
    assert again[0].status == "granted" and again[0].token == first.token
    assert again[0].at == first.at
    assert again[1].holder is None  # the retried claim was not decided again


def test_batch_needs_one_partition(client):
    if client.partitions == 1:
        pytest.skip("N = 1")
    bufs = {}
    while len(bufs) < 2:
        b = f"pytest/{uuid.uuid4().hex}"
        bufs.setdefault(client.partition_of(b), b)
    with pytest.raises(ValueError):
        client.batch([Request.inspect(b) for b in bufs.values()])


def test_large_batch_reply_split(client, conn):
    """256 inspects of buffers held under a long user name: the replies exceed 64 KiB and may
    come in several messages (``first``); they are put together in order."""
    base = f"pytest/large/{uuid.uuid4().hex[:8]}"
    p = client.partition_of(base + "/0")
    bufs = []
    i = 0
    while len(bufs) < 256:
        b = f"{base}/{i}"
        i += 1
        if client.partition_of(b) == p:
            bufs.append(b)
    user = "\u00e9" * 250
    for k in range(0, 256, 64):
        replies = client.batch([Request.claim(b, user, conn) for b in bufs[k:k + 64]])
        assert all(r.granted for r in replies)
    inspects = [Request.inspect(b) for b in bufs]
    replies = client.batch(inspects)
    assert [r.request_id for r in replies] == [r.request_id for r in inspects]
    assert all(r.status == "state" and r.holder.user == user for r in replies)
    assert client.last_batch_call.messages >= 2  # it was split (section 15)
    rc = client.release_connection(conn)
    assert rc.released_count == 256
