"""The asyncio API (baton_client.aio) against the live worker."""

import asyncio
import threading
import uuid

import pytest

from baton_client import AsyncClient, LeaseState

pytestmark = pytest.mark.live


def test_calls_are_awaited_without_a_thread_each(live, buf, conn):
    async def main() -> None:
        async with await AsyncClient.connect(live["url"], partitions=live["partitions"], timeout=20.0) as client:
            r = await client.claim(buf, "ann", conn)
            assert r.granted and r.token == 1
            assert (await client.inspect(buf)).holder.connection == conn
            assert (await client.renew(buf, conn, 1)).status == "renewed"
            assert (await client.claim(buf, "bob", "other")).status == "denied"
            assert (await client.release(buf, conn, 1)).status == "released"
            # Many calls at once share the client's messages; none takes a thread of its own.
            before = threading.active_count()
            names = [f"{buf}-many-{i}" for i in range(300)]
            replies = await asyncio.gather(*(client.claim(n, "ann", conn) for n in names))
            assert all(r.granted for r in replies)
            assert threading.active_count() - before < 10
            gone = await client.release_connection(conn)
            assert gone.released_count == 300

    asyncio.run(main())


def test_an_async_lease_holds_and_releases(live, buf, conn):
    async def main() -> None:
        async with await AsyncClient.connect(live["url"], partitions=live["partitions"]) as client:
            async with client.lease(buf, user="ann", connection=conn, lease_ms=3000) as lease:
                assert lease.state is LeaseState.HELD and lease.token == 1
                assert (await client.inspect(buf)).holder.connection == conn
            assert (await client.inspect(buf)).holder is None

    asyncio.run(main())


def test_an_async_watch_yields_the_changes_made_after_it(live, buf, conn):
    async def main() -> None:
        async with await AsyncClient.connect(live["url"], partitions=live["partitions"]) as client:
            async with client.watch(buf) as watch:
                await asyncio.sleep(0.3)  # subscribed
                r = await client.claim(buf, "ann", conn)
                seen = []

                async def first_two() -> None:
                    async for item in watch:
                        seen.append(item)
                        if len(seen) == 1:
                            await client.release(buf, conn, r.token)
                        if len(seen) == 2:
                            return

                await asyncio.wait_for(first_two(), 15)
            assert [e.kind for e in seen] == ["granted", "released"]
            assert all(e.buffer == buf for e in seen)

    asyncio.run(main())
