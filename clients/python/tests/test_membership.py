"""Replica memberships (protocol section 20, revision 6) against a live worker: ids unique among live
members, one token sequence with leases, leave frees at once, release_connection reserves for the grace."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from baton_client import Membership, RejectedError, Request, State


def test_joins_get_distinct_ids_and_a_leave_frees_one(client, buf):
    conns = [f"conn-{i}-{uuid.uuid4()}" for i in range(16)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        joined = list(pool.map(lambda i: client.join(buf, f"user-{i}", conns[i]), range(16)))
    assert sorted(m.replica_id for m in joined) == list(range(1, 17))
    assert len({m.token for m in joined}) == 16
    assert all(isinstance(m, Membership) and m.status == "joined" and not m.reclaimed for m in joined)
    i, first = next((i, m) for i, m in enumerate(joined) if m.replica_id == 1)
    again = client.join(buf, f"user-{i}", conns[i])
    assert (again.replica_id, again.token) == (1, first.token), "a repeat extends the same membership"
    left = client.leave(buf, conns[i], first.token)
    assert left.status == "left" and left.replica_id == 1 and left.members == 15
    late = client.join(buf, "late", f"conn-late-{uuid.uuid4()}")
    assert late.replica_id == 1 and late.token > max(m.token for m in joined)


def test_a_released_connection_keeps_its_id_for_the_user(client, buf, conn):
    ann = client.join(buf, "ann", conn)
    bob = client.join(buf, "bob", f"{conn}-bob")
    assert (ann.replica_id, bob.replica_id) == (1, 2)
    released = client.release_connection(conn)
    assert released.released_count == 0 and released.ended_memberships == 1
    assert client.join(buf, "cat", f"{conn}-cat").replica_id == 3
    back = client.join(buf, "ann", f"{conn}-2")
    assert back.replica_id == 1 and back.reclaimed
    state = client.inspect(buf)
    assert isinstance(state, State) and state.members == 3
    assert [m.replica_id for m in state.roster] == [1, 2, 3] and state.roster[0].user == "ann"
    assert client.describe().member_grace_ms is not None


def test_a_membership_renews_with_its_token_and_leaves_once(client, buf, conn):
    m = client.join(buf, "ann", conn, lease_ms=5000)
    renewed = client.renew(buf, conn, m.token, lease_ms=60000)
    assert isinstance(renewed, Membership) and renewed.status == "renewed" and renewed.replica_id == 1
    assert renewed.holder is None and renewed.expires_at > m.expires_at
    assert client.leave(buf, conn, m.token).status == "left"
    assert client.leave(buf, conn, m.token).status == "not_member"
    with pytest.raises(RejectedError) as refused:
        client.join(buf, "bob", conn)  # free again: bob may join on it now
        client.join(buf, "cat", conn)  # a live member's connection under another user
    assert refused.value.code == "invalid_request"


def test_join_and_leave_requests_are_built_in_nfc_and_checked_offline():
    req = Request.join("cafe\u0301.md", "ann", "c1", 5000)
    assert req.body()["buffer"] == "caf\u00e9.md" and req.body()["op"] == "join"
    with pytest.raises(ValueError):
        Request.leave("b", "c1", 0)


def test_membership_changes_are_events_of_the_history(client, buf, conn):
    from baton_client import partition as partition_of

    p = partition_of(buf, client.partitions)
    start = client.events(p).position
    m = client.join(buf, "ann", conn)
    client.leave(buf, conn, m.token)
    page = client.events(p, buffer=buf, after=start)
    assert [(e.kind, e.replica_id, e.token) for e in page.events] == [
        ("member_joined", 1, m.token), ("member_left", 1, m.token)]
    assert page.events[0].holder.user == "ann" and page.events[0].holder.connection == conn


def test_a_kept_membership_renews_is_lost_with_its_connection_and_leaves(client, buf, conn):
    from baton_client import LeaseState

    with client.membership(buf, "ann", conn, lease_ms=1000) as ann:
        bob = client.membership(buf, "bob", f"{conn}-bob", lease_ms=1000).acquire()
        assert (ann.replica_id, bob.replica_id) == (1, 2)
        time.sleep(2.5)  # two and a half lease lengths: only renewals keep them
        assert ann.held and bob.held and ann.renewals >= 2
        state = client.inspect(buf)
        assert isinstance(state, State) and [m.replica_id for m in state.roster] == [1, 2]
        client.release_connection(f"{conn}-bob")
        assert bob.wait_for(LeaseState.LOST, timeout=5), bob.reason
    assert ann.state is LeaseState.RELEASED
    after = client.inspect(buf)
    assert isinstance(after, State) and after.members == 0
