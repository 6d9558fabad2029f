import BatonCore
import BatonLab
import BatonPostgres
import Foundation
import Testing

/// A buffer name that hashes to `partition`.
func buffer(in partition: Int, count: Int = 16, prefix: String = "buf") -> String {
    let partitioner = try! Partitioner(count: count)
    var index = 0
    while true {
        let name = "\(prefix)-\(index)"
        if partitioner.partition(of: name) == partition { return name }
        index += 1
    }
}

@Suite struct OwnershipStoreTests {
    @Test func claimDenyReleaseAndTokenPlusOneInOneBatch() async throws {
        let url = try await TestDatabase.migrated()
        let store = try await TestDatabase.store(url)
        let epoch = try await store.takePartition(3, owner: "test")
        let b = buffer(in: 3)
        let result = try await store.apply([
            .claim(b, user: "ann", connection: "c1"),
            .claim(b, user: "bob", connection: "c2"),
            .release(b, connection: "c1", token: 1),
            .claim(b, user: "bob", connection: "c2"),
        ], partition: 3, epoch: epoch)
        #expect(result.decided.map(\.status) == [.granted, .denied, .released, .granted])
        #expect(result.decided.map(\.token) == [1, 1, 1, 2])
        #expect(result.decided[1].holder == Holder(user: "ann", connection: "c1"))
        #expect(result.changes.map(\.change.kind) == [.granted, .released, .granted])
        #expect(result.changes.map(\.id) == result.changes.map(\.id).sorted())

        // The next batch sees the committed state.
        let inspect = try await store.apply([Request(requestID: "i", command: .inspect(buffer: b))], partition: 3, epoch: epoch)
        #expect(inspect.decided[0].holder == Holder(user: "bob", connection: "c2"))
        #expect(inspect.decided[0].token == 2)
        #expect(inspect.decided[0].partition == 3)
    }

    @Test func anEventsReadOfOneBufferScansTheHistoryInBoundedWindows() async throws {
        let url = try await TestDatabase.migrated(partitions: 1)
        let store = try await TestDatabase.store(url, partitions: 1)
        let epoch = try await store.takePartition(0, owner: "test")
        let crowd = OwnershipStore.eventsScanWindow + 100
        for start in stride(from: 0, to: crowd, by: 256) {
            _ = try await store.apply((start..<min(start + 256, crowd)).map { .claim("crowd-\($0)", user: "u", connection: "c") }, partition: 0, epoch: epoch)
        }
        _ = try await store.apply([.claim("needle", user: "u", connection: "c")], partition: 0, epoch: epoch)
        let head = try await store.events(partition: 0, after: nil, buffer: nil, limit: 256).page.position

        // From the start, one buffer: the first window holds none of its changes, and says to read on.
        let first = try await store.events(partition: 0, after: 0, buffer: "needle", limit: 256).page
        #expect(first.events.isEmpty && first.more && first.position < head)
        let second = try await store.events(partition: 0, after: first.position, buffer: "needle", limit: 256).page
        #expect(second.events.map(\.change.buffer) == ["needle"] && !second.more && second.position == head)
        // Without a buffer, the limit cuts first.
        let all = try await store.events(partition: 0, after: 0, buffer: nil, limit: 256).page
        #expect(all.events.count == 256 && all.more && all.position == all.events.last!.seq)
        // Exactly the rest: complete, not more.
        let rest = try await store.events(partition: 0, after: second.events[0].seq - 1, buffer: nil, limit: 1).page
        #expect(rest.events.count == 1 && !rest.more && rest.position == head)
        await store.connection.close()
    }

    @Test func staleEpochLosesThePartitionAndWritesNothing() async throws {
        let url = try await TestDatabase.migrated()
        let old = try await TestDatabase.store(url)
        let new = try await TestDatabase.store(url)
        let oldEpoch = try await old.takePartition(5, owner: "worker-a")
        let b = buffer(in: 5)
        _ = try await old.apply([.claim(b, user: "ann", connection: "c1")], partition: 5, epoch: oldEpoch)

        let newEpoch = try await new.takePartition(5, owner: "worker-b")
        #expect(newEpoch == oldEpoch + 1)
        let before = try await TestDatabase.audit(url)

        let error = try await #require(throws: StoreError.self) {
            try await old.apply([.release(b, connection: "c1", token: 1), .claim(buffer(in: 5, prefix: "other"), user: "x", connection: "y")], partition: 5, epoch: oldEpoch)
        }
        #expect(error.code == .partitionOwnershipLost)
        #expect(error.message.contains("epoch \(oldEpoch)") && error.message.contains("epoch \(newEpoch)"))
        let sweepError = try await #require(throws: StoreError.self) { try await old.sweep(partition: 5, epoch: oldEpoch) }
        #expect(sweepError.code == .partitionOwnershipLost)

        let after = try await TestDatabase.audit(url)
        #expect(after.changes == before.changes, "the stale worker wrote no audit row")
        #expect(after.finalTokens == before.finalTokens, "the stale worker changed no buffer")

        // The new owner carries on from the committed state.
        let result = try await new.apply([.release(b, connection: "c1", token: 1)], partition: 5, epoch: newEpoch)
        #expect(result.decided[0].status == .released)
    }

    @Test func partitionsSharingAConnectionCommitTogetherAndFailAlone() async throws {
        let url = try await TestDatabase.migrated()
        let store = try await TestDatabase.store(url)
        let rival = try await TestDatabase.store(url)
        var taken: [Int: Int64] = [:]
        for partition in 0..<6 { taken[partition] = try await store.takePartition(partition, owner: "test") }
        let epochs = taken
        // Partition 5 is taken by another worker: its batch must fail alone, and write nothing.
        _ = try await rival.takePartition(5, owner: "rival")
        let before = try await TestDatabase.audit(url)

        // Hold the connection so that the six batches wait for it together.
        let holding = Task { try await store.connection.withSession { session in try session.query("SELECT pg_sleep(0.3)") } }
        try await Task.sleep(for: .milliseconds(50))
        let results = await withTaskGroup(of: (Int, Result<BatchResult, any Error>).self) { group in
            for partition in 0..<6 {
                group.addTask {
                    let b = buffer(in: partition, prefix: "group")
                    do {
                        return (partition, .success(try await store.apply(
                            [.claim(b, user: "ann", connection: "c1"), .claim(b, user: "bob", connection: "c2")], partition: partition, epoch: epochs[partition]!
                        )))
                    } catch {
                        return (partition, .failure(error))
                    }
                }
            }
            var results: [Int: Result<BatchResult, any Error>] = [:]
            for await (partition, result) in group { results[partition] = result }
            return results
        }
        try await holding.value
        for partition in 0..<5 {
            let result = try #require(try? results[partition]?.get(), "partition \(partition) was applied")
            #expect(result.decided.map(\.status) == [.granted, .denied])
            #expect(result.changes.map(\.change.kind) == [.granted])
        }
        let lost = try #require(results[5])
        #expect(throws: StoreError.self) { try lost.get() }
        let after = try await TestDatabase.audit(url)
        #expect(after.changes.count == before.changes.count + 5, "one grant for each partition still owned, none for partition 5")

        // With the fenced-out batch gone, the five others commit in one group.
        let again = Task { try await store.connection.withSession { session in try session.query("SELECT pg_sleep(0.3)") } }
        try await Task.sleep(for: .milliseconds(50))
        let sizes = try await withThrowingTaskGroup(of: Int.self) { group in
            for partition in 0..<5 {
                group.addTask {
                    try await store.apply(
                        [Request(requestID: "inspect-\(partition)", command: .inspect(buffer: buffer(in: partition, prefix: "group")))],
                        partition: partition, epoch: epochs[partition]!
                    ).groupSize
                }
            }
            return try await group.reduce(into: [Int]()) { $0.append($1) }
        }
        try await again.value
        #expect(sizes == [5, 5, 5, 5, 5], "the five batches that waited together were committed together")
    }

    @Test func sameRequestIDTwiceGivesOneChangeAndTheSameReply() async throws {
        let url = try await TestDatabase.migrated()
        let store = try await TestDatabase.store(url)
        let epoch = try await store.takePartition(1, owner: "test")
        let b = buffer(in: 1)
        let claim = Request.claim(b, user: "ann", connection: "c1", id: "same-id")
        let first = try await store.apply([claim], partition: 1, epoch: epoch)
        // Redelivered in a later batch, and duplicated inside one batch.
        let second = try await store.apply([claim, .claim(b, user: "bob", connection: "c2", id: "other"), claim], partition: 1, epoch: epoch)
        #expect(second.decided[0] == first.decided[0])
        #expect(second.decided[2] == first.decided[0])
        #expect(second.replayed == 2)
        #expect(second.decided[1].status == .denied)

        // A retry of a release after the buffer moved on still answers what it answered.
        let release = Request.release(b, connection: "c1", token: 1, id: "release-once")
        let released = try await store.apply([release], partition: 1, epoch: epoch)
        _ = try await store.apply([.claim(b, user: "bob", connection: "c2")], partition: 1, epoch: epoch)
        let again = try await store.apply([release], partition: 1, epoch: epoch)
        #expect(again.decided == released.decided)
        #expect(again.changes.isEmpty)

        let audit = try await TestDatabase.audit(url)
        #expect(audit.changes.map(\.kind) == [.granted, .released, .granted])
        #expect(audit.changes.map(\.token) == [1, 1, 2])
    }

    @Test func expiryUsesDatabaseTimeAndTheSweepEmitsEachExpiryOnce() async throws {
        let url = try await TestDatabase.migrated()
        let store = try await TestDatabase.store(url)
        let epoch = try await store.takePartition(7, owner: "test")
        let (b1, b2) = (buffer(in: 7, prefix: "a"), buffer(in: 7, prefix: "b"))
        let dbBefore = try await store.connection.withSession { s in Int64(try s.query("SELECT (extract(epoch FROM clock_timestamp())*1000)::int8").first()!)! }
        let claimed = try await store.apply([
            .claim(b1, user: "ann", connection: "c1", lease: 2000),
            .claim(b2, user: "ann", connection: "c1", lease: 60_000),
        ], partition: 7, epoch: epoch)
        let dbAfter = try await store.connection.withSession { s in Int64(try s.query("SELECT (extract(epoch FROM clock_timestamp())*1000)::int8").first()!)! }
        let at = try #require(claimed.decided[0].at).milliseconds
        #expect(at >= dbBefore - 1 && at <= dbAfter + 1, "decisions are stamped with the database clock")
        #expect(claimed.decided[0].expiresAt?.milliseconds == at + 2000)

        #expect(try await store.sweep(partition: 7, epoch: epoch).isEmpty, "nothing has expired yet")
        try await Task.sleep(for: .milliseconds(2200))
        let swept = try await store.sweep(partition: 7, epoch: epoch)
        #expect(swept.map(\.change.kind) == [.expired])
        #expect(swept.first?.change.buffer == b1)
        #expect(swept.first?.change.token == 1)
        #expect(try await store.sweep(partition: 7, epoch: epoch).isEmpty, "an expiry is emitted once")

        let next = try await store.apply([.claim(b1, user: "bob", connection: "c2")], partition: 7, epoch: epoch)
        #expect(next.decided[0].token == 2)
        #expect(next.changes.map(\.change.kind) == [.granted], "no second expired change after the sweep")

        let audit = try await TestDatabase.audit(url)
        #expect(HistoryChecker.check(audit.changes, finalTokens: audit.finalTokens).passed)
    }

    @Test func releaseConnectionSeesCommittedAndInBatchGrants() async throws {
        let url = try await TestDatabase.migrated()
        let store = try await TestDatabase.store(url)
        let epoch = try await store.takePartition(2, owner: "test")
        let names = (0..<3).map { buffer(in: 2, prefix: "rc\($0)") }
        _ = try await store.apply([.claim(names[0], user: "ann", connection: "c1")], partition: 2, epoch: epoch)
        let result = try await store.apply([
            .claim(names[1], user: "ann", connection: "c1"),
            .claim(names[2], user: "bob", connection: "c2"),
            Request(requestID: "rc", command: .releaseConnection(connection: "c1")),
        ], partition: 2, epoch: epoch)
        #expect(result.decided[2].status == .releasedConnection)
        #expect(result.decided[2].buffers == [names[0], names[1]].sorted())
        let state = try await store.apply([Request(requestID: "i", command: .inspect(buffer: names[2]))], partition: 2, epoch: epoch)
        #expect(state.decided[0].holder?.connection == "c2")
    }

    @Test func canonicallyEquivalentBufferNamesAreStoredApart() async throws {
        let url = try await TestDatabase.migrated(partitions: 1)
        let store = try await TestDatabase.store(url, partitions: 1)
        let epoch = try await store.takePartition(0, owner: "test")
        let result = try await store.apply([
            .claim("caf\u{E9}.rs", user: "ann", connection: "c1"),
            .claim("cafe\u{301}.rs", user: "bob", connection: "c2"),
        ], partition: 0, epoch: epoch)
        #expect(result.decided.map(\.status) == [.granted, .granted])
        #expect(try await TestDatabase.audit(url).finalTokens.count == 2)
    }

    @Test func misroutedRequestsAreAnsweredAndChangeNothing() async throws {
        let url = try await TestDatabase.migrated()
        let store = try await TestDatabase.store(url)
        let epoch = try await store.takePartition(0, owner: "test")
        let result = try await store.apply([.claim(buffer(in: 9), user: "ann", connection: "c1")], partition: 0, epoch: epoch)
        #expect(result.decided[0].status == .error)
        #expect(result.decided[0].error?.code == .misrouted)
        #expect(result.changes.isEmpty)
        #expect(try await TestDatabase.audit(url).finalTokens.isEmpty)
    }

    @Test func unknownPartitionIsAClearError() async throws {
        let url = try await TestDatabase.migrated(partitions: 4)
        let store = try await TestDatabase.store(url, partitions: 4)
        let error = try await #require(throws: StoreError.self) { try await store.takePartition(4, owner: "x") }
        #expect(error.code == .unknownPartition)
        #expect(error.message.contains("0-3"))
    }

    @Test func pruneKeepsRecentRecordsAndRemovesOldOnes() async throws {
        let url = try await TestDatabase.migrated()
        let store = try await TestDatabase.store(url)
        await #expect(throws: StoreError.self) { try await store.prune(retention: .seconds(60)) }
        let epoch = try await store.takePartition(4, owner: "test")
        let result = try await store.apply(
            (0..<5).map { .claim(buffer(in: 4, prefix: "p\($0)"), user: "u", connection: "c", id: "req-\($0)") },
            partition: 4, epoch: epoch
        )
        #expect(try await store.undelivered(partition: 4).map(\.id) == result.changes.map(\.id))
        try await store.markDelivered(partition: 4, through: result.changes[2].id)
        #expect(try await store.undelivered(partition: 4).count == 2)
        try await store.markDelivered(partition: 4, through: result.changes[0].id)
        #expect(try await store.undelivered(partition: 4).count == 2, "the delivered position never moves back")

        // Age two idempotency records and every outbox row past the retention.
        _ = try await store.connection.withSession { s in
            try s.query("UPDATE baton_requests SET created_at = created_at - interval '2 hours' WHERE request_id IN ('req-0', 'req-1')")
            try s.query("UPDATE baton_outbox SET at = at - interval '2 hours'")
        }
        let pruned = try await store.prune(retention: .seconds(3600), chunk: 1)
        #expect(pruned.requests == 2)
        #expect(pruned.outbox == 3, "only the published rows")
        #expect(try await store.undelivered(partition: 4).count == 2, "undelivered rows are never pruned")
    }

    /// Workers prune on a schedule with `pruneAlone`: while another session holds the prune lock it
    /// skips (nil), and it releases the lock after its own run.
    @Test func pruneAloneSkipsWhileAnotherSessionPrunes() async throws {
        let url = try await TestDatabase.migrated()
        let store = try await TestDatabase.store(url)
        let other = try await TestDatabase.store(url)
        let key = String(OwnershipStore.pruneLockKey)
        _ = try await other.connection.withSession { s in try s.query("SELECT pg_advisory_lock(\(key))") }
        #expect(try await store.pruneAlone(retention: .seconds(3600)) == nil, "another session prunes: skipped")
        _ = try await other.connection.withSession { s in try s.query("SELECT pg_advisory_unlock(\(key))") }
        let pruned = try #require(try await store.pruneAlone(retention: .seconds(3600)), "alone: it prunes")
        #expect(pruned.requests == 0 && pruned.outbox == 0)
        let free = try await other.connection.withSession { s in
            try s.query("SELECT pg_try_advisory_lock(\(key))::int").decode(from: "lock") { try $0.decode(0, "locked", as: Int.self) }.first
        }
        #expect(free == 1, "the prune released its lock")
    }

    @Test func pruneWalksTheHistoryInPositionOrderAndStopsAtTheFirstRowToKeep() async throws {
        let url = try await TestDatabase.migrated()
        let store = try await TestDatabase.store(url)
        let epoch = try await store.takePartition(4, owner: "test")
        let result = try await store.apply(
            (0..<5).map { .claim(buffer(in: 4, prefix: "w\($0)"), user: "u", connection: "c", id: "walk-\($0)") },
            partition: 4, epoch: epoch
        )
        let ids = result.changes.map(\.id)
        try await store.markDelivered(partition: 4, through: ids[4])
        // Rows 0, 1, 3 and 4 are old; row 2 was decided within the retention.
        _ = try await store.connection.withSession { s in
            try s.query("UPDATE baton_outbox SET at = at - interval '2 hours' WHERE id <> \(ids[2])")
        }
        #expect(try await store.prune(retention: .seconds(3600), chunk: 10).outbox == 2)
        let left = try await store.connection.withSession { s in
            try s.query("SELECT id FROM baton_outbox WHERE partition = 4 ORDER BY id").decode(from: "baton_outbox") { try $0.decode(0, "id", as: Int64.self) }
        }
        #expect(left == Array(ids[2...]), "the walk stops at the first row to keep, and the next prune starts there")
        let (page, _) = try await store.events(partition: 4, after: 0, buffer: nil, limit: 10)
        #expect(page.missed && page.events.map(\.seq) == Array(ids[2...]))
    }
}
