"""Reading and watching the history (sections 7, 18)."""

import threading
import time
import uuid

import pytest

from baton_client import Event, EventsPage, Missed

pytestmark = pytest.mark.live


def next_events(watch, count, timeout=10.0):
    """The next ``count`` events of the watch (Missed markers are collected too)."""
    out = []
    end = time.monotonic() + timeout
    while len(out) < count:
        item = watch.get(max(0.01, end - time.monotonic()))
        if item is None:
            break
        out.append(item)
    return out


def test_a_buffer_name_that_is_not_nfc_is_routed_and_watched_as_its_nfc_form(client, conn):
    import unicodedata
    nfd = f"pytest/nfd/{uuid.uuid4().hex}/e\u0301.txt"
    nfc = unicodedata.normalize("NFC", nfd)
    assert client.partition_of(nfd) == client.partition_of(nfc)
    with client.watch(nfd) as w:
        r = client.claim(nfd, "ann", conn)
        [granted] = [i for i in next_events(w, 1) if not isinstance(i, Missed)]
        assert granted.buffer == nfc and granted.token == r.token
    page = client.events(buffer=nfd, after=0)
    assert [e.buffer for e in page.events] == [nfc]


def test_events_positions(client, buf, conn):
    p = client.partition_of(buf)
    start = client.events(p)
    assert isinstance(start, EventsPage) and start.events == () and start.buffer is None
    assert start.partition == p and not start.more and not start.missed
    r = client.claim(buf, "ann", conn)
    client.release(buf, conn, r.token)
    page = client.events(buffer=buf, after=start.position)
    assert [(e.kind, e.token) for e in page.events] == [("granted", 1), ("released", 1)]
    assert all(e.partition == p and e.buffer == buf for e in page.events)
    seqs = [e.seq for e in page.events]
    assert seqs == sorted(seqs) and seqs[0] > start.position and page.position >= seqs[-1]
    # Reading on from the position returns nothing new (for this buffer).
    assert client.events(buffer=buf, after=page.position).events == ()
    # limit + more
    client.claim(buf, "ann", conn)
    first = client.events(buffer=buf, after=start.position, limit=2)
    assert len(first.events) == 2 and first.more
    rest = client.events(buffer=buf, after=first.position)
    assert [(e.kind, e.token) for e in rest.events] == [("granted", 2)] and not rest.more
    # Partition-wide read contains our events among others, ascending.
    whole = client.events(p, after=start.position)
    ours = [e for e in whole.events if e.buffer == buf]
    assert [e.kind for e in ours][:3] == ["granted", "released", "granted"] or whole.more


def test_watch_buffer_sees_changes_in_order(client, buf, conn):
    with client.watch(buf) as w:
        r = client.claim(buf, "ann", conn)
        client.release(buf, conn, r.token)
        r2 = client.claim(buf, "bob", f"{conn}-b")
        client.release(buf, f"{conn}-b", r2.token)
        items = next_events(w, 4)
    assert [(e.kind, e.token, e.holder.user) for e in items] == [
        ("granted", 1, "ann"), ("released", 1, "ann"), ("granted", 2, "bob"), ("released", 2, "bob")]
    assert all(isinstance(e, Event) and e.buffer == buf for e in items)


def test_watch_resumes_from_saved_positions(client, buf, conn):
    w = client.watch(buf)  # returns once it watches: changes from now on are seen
    r = client.claim(buf, "ann", conn)
    [granted] = next_events(w, 1)
    assert granted.kind == "granted"
    saved = w.positions
    w.close()
    assert w.get(0.1) is None  # closed
    # Changes while nobody watches.
    client.release(buf, conn, r.token)
    r2 = client.claim(buf, "bob", f"{conn}-b")
    with client.watch(buf, positions=saved) as w2:
        items = next_events(w2, 2)
        assert [(e.kind, e.token) for e in items] == [("released", 1), ("granted", 2)]
        client.release(buf, f"{conn}-b", r2.token)
        [last] = next_events(w2, 1)
        assert (last.kind, last.token) == ("released", 2)
        # No duplicates afterwards.
        assert w2.get(0.5) is None


def test_watch_partition_and_all(client, conn):
    b = f"pytest/watch-all/{uuid.uuid4().hex}"
    p = client.partition_of(b)
    with client.watch(partition=p) as wp, client.watch() as wall:
        r = client.claim(b, "ann", conn)
        client.release(b, conn, r.token)

        def ours(w):
            got = []
            end = time.monotonic() + 10
            while len(got) < 2 and time.monotonic() < end:
                item = w.get(0.5)
                if isinstance(item, Event) and item.buffer == b:
                    got.append(item)
            return got

        for w in (wp, wall):
            got = ours(w)
            assert [(e.kind, e.token) for e in got] == [("granted", 1), ("released", 1)]
        assert set(wall.positions) == set(range(client.partitions))
        assert set(wp.positions) == {p}


def test_watch_from_position_zero_replays_history(client, buf, conn):
    r = client.claim(buf, "ann", conn)
    client.release(buf, conn, r.token)
    with client.watch(buf, positions={client.partition_of(buf): 0}) as w:
        items = next_events(w, 2)
    items = [i for i in items if not isinstance(i, Missed)]
    assert [(e.kind, e.token) for e in items] == [("granted", 1), ("released", 1)]


def test_watch_from_a_position_of_another_history_reports_missed(client, buf, conn):
    p = client.partition_of(buf)
    head = client.events(p).position
    with client.watch(buf, positions={p: head + 1_000_000}) as w:
        [first] = next_events(w, 1)
        assert isinstance(first, Missed) and first.partition == p
        assert w.positions[p] <= head + 1_000_000 - 1
        r = client.claim(buf, "ann", conn)
        [granted] = [i for i in next_events(w, 1) if not isinstance(i, Missed)]
        assert (granted.kind, granted.token) == ("granted", r.token)


def test_watch_iterator_ends_on_close(client, buf):
    w = client.watch(buf)
    t = threading.Timer(0.5, w.close)
    t.start()
    assert list(w) == []
    t.join()


def test_live_event_messages_match_the_schemas(client, buf, conn, schema_validator):
    import queue as _queue

    from baton_client._io import Subscription

    p = client.partition_of(buf)
    got = _queue.Queue()
    ready = threading.Event()
    sub = Subscription([f"{p}.*"], lambda obj, rk: got.put((rk, obj)), ready.set,
                       lambda exc: got.put(("error", exc)))
    client._io.subscribe(sub)
    try:
        assert ready.wait(10)
        r = client.claim(buf, "ann", conn)
        client.release(buf, conn, r.token)
        kinds = []
        end = time.monotonic() + 10
        while len(kinds) < 2 and time.monotonic() < end:
            rk, obj = got.get(timeout=max(0.01, end - time.monotonic()))
            assert rk.startswith(f"{p}.")
            if "events" in obj:  # per-commit (section 7.1)
                assert rk == f"{p}.changes"
                schema_validator("events-message.schema.json").validate(obj)
                evs = obj["events"]
            else:  # per-change
                schema_validator("event.schema.json").validate(obj)
                evs = [obj]
            kinds += [e["kind"] for e in evs if e["buffer"] == buf]
        assert kinds == ["granted", "released"]
    finally:
        client._io.unsubscribe(sub)


def test_a_watch_dropped_without_close_ends_its_subscription(client, buf):
    import gc

    subscriptions = client._io._subs
    # Let the I/O thread run what earlier tests queued (an unsubscribe still on its way would
    # otherwise land between the two counts): a callback queued now runs after them.
    barrier = threading.Event()
    client._io._threadsafe(barrier.set)
    assert barrier.wait(5)
    before = len(subscriptions)
    w = client.watch(buf)
    assert len(subscriptions) == before + 1
    del w
    gc.collect()
    end = time.monotonic() + 5
    while len(subscriptions) > before and time.monotonic() < end:
        time.sleep(0.05)
    assert len(subscriptions) == before, "the dropped watch's subscription (queue, channel) was ended"
