import BatonCore
import BatonLab
import BatonPostgres
import Foundation
import Testing

/// The store's partition memory (docs/store.md, "Partition memory"): batches decided without a read, and
/// every way back to a read when the memory cannot be trusted.
@Suite struct PartitionMemoryTests {
    @Test func aBatchOnRememberedBuffersIsDecidedWithoutAReadAndAgreesWithTheDatabase() async throws {
        let url = try await TestDatabase.migrated()
        let store = try await TestDatabase.store(url)
        let epoch = try await store.takePartition(2, owner: "test")
        let b = buffer(in: 2)
        let first = try await store.apply([.claim(b, user: "ann", connection: "c1")], partition: 2, epoch: epoch)
        #expect(!first.fromMemory, "the first batch after taking the partition reads")
        #expect(first.decided.map(\.status) == [.granted])

        let second = try await store.apply([
            .claim(b, user: "bob", connection: "c2"), .release(b, connection: "c1", token: 1), .claim(b, user: "bob", connection: "c2"),
        ], partition: 2, epoch: epoch)
        #expect(second.fromMemory, "every buffer of the batch was remembered")
        #expect(second.decided.map(\.status) == [.denied, .released, .granted])
        #expect(second.decided.map(\.token) == [1, 1, 2])
        #expect(second.decided[0].at! >= first.decided[0].at!, "a decision from memory is never made before an earlier one")

        // What memory decided is what a fresh store reads.
        let reader = try await TestDatabase.store(url)
        let inspect = try await reader.apply([Request(requestID: "i", command: .inspect(buffer: b))], partition: 2, epoch: epoch)
        #expect(!inspect.fromMemory)
        #expect(inspect.decided[0].holder == Holder(user: "bob", connection: "c2") && inspect.decided[0].token == 2)
        #expect(inspect.decided[0].expiresAt == second.decided[2].expiresAt)
        let audit = try await TestDatabase.audit(url)
        #expect(audit.changes.map(\.kind) == [.granted, .released, .granted])
        #expect(audit.finalTokens[ExactString(b)] == 2)
        await store.connection.close()
        await reader.connection.close()
    }

    @Test func aRepeatIsAnsweredFromItsRecordNotDecidedAgainFromMemory() async throws {
        let url = try await TestDatabase.migrated()
        let store = try await TestDatabase.store(url)
        let epoch = try await store.takePartition(4, owner: "test")
        let b = buffer(in: 4)
        let claim = Request.claim(b, user: "ann", connection: "c1", id: "claim-once")
        let granted = try await store.apply([claim], partition: 4, epoch: epoch)
        let release = Request.release(b, connection: "c1", token: 1, id: "release-once")
        let released = try await store.apply([release], partition: 4, epoch: epoch)
        #expect(released.fromMemory && released.decided[0].status == .released)

        // Decided from memory, the repeated claim would be granted again (token 2): its record is already
        // written, so the write aborts and the batch is answered from the records instead.
        let again = try await store.apply([claim, release], partition: 4, epoch: epoch)
        #expect(!again.fromMemory)
        #expect(again.decided == granted.decided + released.decided)
        #expect(again.replayed == 2 && again.changes.isEmpty)
        let audit = try await TestDatabase.audit(url)
        #expect(audit.changes.map(\.kind) == [.granted, .released])
        #expect(audit.finalTokens[ExactString(b)] == 1)
        await store.connection.close()
    }

    @Test func aStaleMemoryLosesItsCompareAndSetAndTheBatchIsDecidedFromARead() async throws {
        let url = try await TestDatabase.migrated()
        let store = try await TestDatabase.store(url)
        // A second writer under the same epoch: what the fence cannot stop (a misconfigured deployment).
        let rival = try await TestDatabase.store(url)
        let epoch = try await store.takePartition(6, owner: "test")
        let b = buffer(in: 6)
        _ = try await store.apply([.claim(b, user: "ann", connection: "c1")], partition: 6, epoch: epoch)
        _ = try await store.apply([.claim(b, user: "ann", connection: "c1")], partition: 6, epoch: epoch)

        // Behind the store's back: ann's lease is released and bob is granted token 2.
        let moved = try await rival.apply([.release(b, connection: "c1", token: 1), .claim(b, user: "bob", connection: "c2")], partition: 6, epoch: epoch)
        #expect(moved.decided.map(\.status) == [.released, .granted])

        // The store still remembers ann holding token 1: ann's renewal would extend it. The write's
        // compare-and-set on the remembered version fails, and the read sees bob.
        let renew = Request(requestID: UUID().uuidString, command: .renew(buffer: b, connection: "c1", token: 1, leaseMilliseconds: 30_000))
        let result = try await store.apply([renew, .claim(b, user: "cid", connection: "c3")], partition: 6, epoch: epoch)
        #expect(!result.fromMemory)
        #expect(result.decided.map(\.status) == [.notOwner, .denied])
        #expect(result.decided[1].holder == Holder(user: "bob", connection: "c2") && result.decided[1].token == 2)
        let audit = try await TestDatabase.audit(url)
        #expect(HistoryChecker.check(audit.changes).doubleGrants == 0)
        #expect(audit.finalTokens[ExactString(b)] == 2)

        // Reloaded, the memory decides again.
        let next = try await store.apply([.release(b, connection: "c2", token: 2)], partition: 6, epoch: epoch)
        #expect(next.decided[0].status == .notOwner || next.decided[0].status == .released)
        await store.connection.close()
        await rival.connection.close()
    }

    @Test func lostFenceForgetsTheMemoryAndANewEpochStartsFromARead() async throws {
        let url = try await TestDatabase.migrated()
        let old = try await TestDatabase.store(url)
        let new = try await TestDatabase.store(url)
        let oldEpoch = try await old.takePartition(7, owner: "worker-a")
        let b = buffer(in: 7)
        _ = try await old.apply([.claim(b, user: "ann", connection: "c1")], partition: 7, epoch: oldEpoch)
        let newEpoch = try await new.takePartition(7, owner: "worker-b")

        // The old owner's memory would decide this release; the fence in the write refuses it.
        let error = try await #require(throws: StoreError.self) {
            try await old.apply([.release(b, connection: "c1", token: 1)], partition: 7, epoch: oldEpoch)
        }
        #expect(error.code == .partitionOwnershipLost)
        let result = try await new.apply([.claim(b, user: "bob", connection: "c2")], partition: 7, epoch: newEpoch)
        #expect(!result.fromMemory && result.decided[0].status == .denied)
        #expect(result.decided[0].holder == Holder(user: "ann", connection: "c1"))
        await old.connection.close()
        await new.connection.close()
    }

    @Test func linesAreRememberedAndAWaiterIsGrantedFromMemory() async throws {
        let url = try await TestDatabase.migrated()
        let store = try await TestDatabase.store(url)
        let epoch = try await store.takePartition(9, owner: "test")
        let b = buffer(in: 9)
        _ = try await store.apply([.claim(b, user: "ann", connection: "c1")], partition: 9, epoch: epoch)
        var waiting = Request.claim(b, user: "bob", connection: "c2", id: "bob-waits")
        waiting.waiting = Waiting(milliseconds: 60_000, replyTo: "amq.gen-bob", correlationID: "bob-1")
        let joined = try await store.apply([waiting], partition: 9, epoch: epoch)
        #expect(!joined.fromMemory, "a claim that joins a line is not recorded, so it is decided from a read")
        #expect(joined.replies == [nil])

        // The release hands the buffer to bob in the same decision, from memory.
        let released = try await store.apply([.release(b, connection: "c1", token: 1)], partition: 9, epoch: epoch)
        #expect(released.fromMemory)
        #expect(released.answers.map(\.reply.status) == [.granted] && released.answers[0].reply.token == 2)
        // Another request under the waiter's id, on another buffer, before it was answered, would have been
        // refused; now that it was answered, the id is bob's record.
        let reuse = try await store.apply([.claim(buffer(in: 9, prefix: "other"), user: "x", connection: "y", id: "bob-waits")], partition: 9, epoch: epoch)
        #expect(reuse.decided[0].error?.code == .requestIDReused)
        await store.connection.close()
    }
}

extension PartitionMemoryTests {
    @Test func aNeverStoredBufferIsDecidedFromMemoryAndOneStoredBehindTheFiltersBackIsRead() async throws {
        let url = try await TestDatabase.migrated()
        let store = try await TestDatabase.store(url)
        let rival = try await TestDatabase.store(url)
        let epoch = try await store.takePartition(11, owner: "test")
        // Loads the partition's lines and names (none yet).
        _ = try await store.apply([.claim(buffer(in: 11, prefix: "warm"), user: "ann", connection: "c1")], partition: 11, epoch: epoch)

        let fresh = buffer(in: 11, prefix: "fresh")
        let first = try await store.apply([.claim(fresh, user: "ann", connection: "c1")], partition: 11, epoch: epoch)
        #expect(first.fromMemory, "a name the filter never saw was never stored: no read")
        #expect(first.decided[0].status == .granted && first.decided[0].token == 1)

        // Behind the store's back (a second writer under the same epoch), a buffer the filter does not know
        // is stored and granted. The store decides it as never claimed; the insert finds the row, the write
        // aborts, and the read answers.
        let hidden = buffer(in: 11, prefix: "hidden")
        _ = try await rival.apply([.claim(hidden, user: "bob", connection: "c2")], partition: 11, epoch: epoch)
        let result = try await store.apply([.claim(hidden, user: "cid", connection: "c3")], partition: 11, epoch: epoch)
        #expect(!result.fromMemory)
        #expect(result.decided[0].status == .denied && result.decided[0].holder == Holder(user: "bob", connection: "c2"))
        let audit = try await TestDatabase.audit(url)
        #expect(HistoryChecker.check(audit.changes).doubleGrants == 0)
        #expect(audit.finalTokens[ExactString(hidden)] == 1)

        // A decision that writes no row (a renewal, an inspect) never rests on the filter: with a name
        // stored where the filter cannot see it, it would answer not_owner to the real holder and record it.
        let unseen = buffer(in: 11, prefix: "unseen")
        _ = try await rival.apply([.claim(unseen, user: "dan", connection: "c4")], partition: 11, epoch: epoch)
        // The abort above made the store forget the partition; a batch on a known buffer loads it again.
        let reloaded = try await store.apply([.claim(fresh, user: "ann", connection: "c1")], partition: 11, epoch: epoch)
        #expect(reloaded.decided[0].status == .granted)
        let renew = Request(requestID: UUID().uuidString, command: .renew(buffer: unseen, connection: "c4", token: 1, leaseMilliseconds: 30_000))
        let renewed = try await store.apply([renew, Request(requestID: UUID().uuidString, command: .inspect(buffer: unseen))], partition: 11, epoch: epoch)
        #expect(!renewed.fromMemory, "read, not decided from the filter")
        #expect(renewed.decided.map(\.status) == [.renewed, .state])
        #expect(renewed.decided[1].holder == Holder(user: "dan", connection: "c4") && renewed.decided[1].token == 1)
        await store.connection.close()
        await rival.connection.close()
    }
}

extension PartitionMemoryTests {
    @Test func aRepeatInOneBatchOfAGroupDoesNotSendTheOthersAlone() async throws {
        let url = try await TestDatabase.migrated()
        let store = try await TestDatabase.store(url)
        let rival = try await TestDatabase.store(url)
        var epochs: [Int: Int64] = [:]
        for partition in 0..<3 { epochs[partition] = try await store.takePartition(partition, owner: "test") }
        let claims = (0..<3).map { Request.claim(buffer(in: $0, prefix: "g"), user: "ann", connection: "c1", id: "first-\($0)") }
        // The store remembers partition 0's buffer as never claimed; its claim is recorded behind its back
        // (a request id the store never recorded itself, as after a takeover), the others through it.
        _ = try await store.apply([Request(requestID: "look", command: .inspect(buffer: claims[0].buffer!))], partition: 0, epoch: epochs[0]!)
        _ = try await rival.apply([claims[0]], partition: 0, epoch: epochs[0]!)
        for partition in 1..<3 { _ = try await store.apply([claims[partition]], partition: partition, epoch: epochs[partition]!) }
        let knownEpochs = epochs

        // Hold the connection so that the three batches wait for it together; partition 0's is a repeat,
        // which memory decides as a new claim and whose record is taken: the group's write aborts. The
        // store's connection waits for an advisory lock the rival holds until the batches are queued (a
        // 0.3 s pg_sleep started 50 ms before them was not always running yet under CI's load).
        let lock = "SELECT pg_advisory_lock(884211)"
        _ = try await rival.connection.withSession { session in try session.query(lock) }
        let holding = Task {
            try await store.connection.withSession { session in
                _ = try session.query(lock)
                _ = try session.query("SELECT pg_advisory_unlock(884211)")
            }
        }
        #expect(try await Deployment.eventually {
            try await rival.connection.withSession { session in
                try session.query("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 884211 AND NOT granted").first()
            } == "1"
        }, "the store's connection waits for the lock")
        let applying = Task {
            try await withThrowingTaskGroup(of: (Int, BatchResult).self) { group in
                for partition in 0..<3 {
                    group.addTask {
                        let request = partition == 0 ? claims[0] : Request.release(buffer(in: partition, prefix: "g"), connection: "c1", token: 1)
                        return (partition, try await store.apply([request], partition: partition, epoch: knownEpochs[partition]!))
                    }
                }
                return try await group.reduce(into: [Int: BatchResult]()) { $0[$1.0] = $1.1 }
            }
        }
        try await Task.sleep(for: .milliseconds(500))  // the three batches queue behind the held connection
        _ = try await rival.connection.withSession { session in try session.query("SELECT pg_advisory_unlock(884211)") }
        let results = try await applying.value
        try await holding.value
        #expect(results[0]?.replayed == 1 && results[0]?.decided[0].token == 1, "the repeat is answered from its record")
        #expect(results[1]?.decided[0].status == .released && results[2]?.decided[0].status == .released)
        #expect(results.values.map(\.groupSize) == [3, 3, 3], "decided again as one group from reads, not alone")
        let audit = try await TestDatabase.audit(url)
        #expect(audit.changes.map(\.kind).filter { $0 == .granted }.count == 3 && audit.changes.map(\.kind).filter { $0 == .released }.count == 2)
        await store.connection.close()
        await rival.connection.close()
    }

    @Test func aResendOfARequestRecordedLatelyIsReadWithoutAbortingTheWrite() async throws {
        let url = try await TestDatabase.migrated()
        let store = try await TestDatabase.store(url)
        let epoch = try await store.takePartition(8, owner: "test")
        let b = buffer(in: 8)
        let claim = Request.claim(b, user: "ann", connection: "c1", id: "resent")
        _ = try await store.apply([claim], partition: 8, epoch: epoch)
        _ = try await store.apply([.claim(b, user: "bob", connection: "c2")], partition: 8, epoch: epoch)
        let again = try await store.apply([claim], partition: 8, epoch: epoch)
        #expect(!again.fromMemory && again.replayed == 1)
        // Had it been decided from memory, its write would have aborted on the taken record and the
        // partition's memory been forgotten: the next batch would read.
        let next = try await store.apply([.claim(b, user: "bob", connection: "c2")], partition: 8, epoch: epoch)
        #expect(next.fromMemory, "no write aborted: the memory was kept")
        await store.connection.close()
    }

    // MARK: - The lease sweep's schedule (migration 8: no index on expires_at)

    @Test func aLeaseOfTheEpochBeforeIsSweptByTheNextOwner() async throws {
        let url = try await TestDatabase.migrated()
        let old = try await TestDatabase.store(url)
        let new = try await TestDatabase.store(url)
        let b = buffer(in: 4)
        let oldEpoch = try await old.takePartition(4, owner: "old")
        _ = try await old.apply([.claim(b, user: "ann", connection: "c1", lease: 300)], partition: 4, epoch: oldEpoch)
        let epoch = try await new.takePartition(4, owner: "new")
        try await Task.sleep(for: .milliseconds(400))
        // The new store never wrote the lease: only the rows can have told its schedule.
        let swept = try await new.sweep(partition: 4, epoch: epoch)
        #expect(swept.map(\.change.kind) == [.expired] && swept.map(\.change.buffer) == [b], "the new owner's schedule was loaded from the rows")
        await old.connection.close()
        await new.connection.close()
    }

    @Test func aRenewalIsAHeapOnlyUpdateAndOutlivesTheLeasesOldEnd() async throws {
        let url = try await TestDatabase.migrated()
        let store = try await TestDatabase.store(url)
        let epoch = try await store.takePartition(6, owner: "test")
        let b = buffer(in: 6)
        // Long enough that the renewals come before its end even on a loaded machine (the suite runs its
        // tests side by side on two cores).
        let claimed = try await store.apply([.claim(b, user: "ann", connection: "c1", lease: 3_000)], partition: 6, epoch: epoch)
        let token = try #require(claimed.decided.first?.token)
        #expect(try await store.sweep(partition: 6, epoch: epoch).isEmpty, "scheduled at the claim's end")
        for index in 0..<20 {
            // Each renewal to another end (two in one millisecond to the same end would change nothing).
            let renewed = try await store.apply([
                Request(requestID: UUID().uuidString, command: .renew(buffer: b, connection: "c1", token: token, leaseMilliseconds: 60_000 + Int64(index) * 10)),
            ], partition: 6, epoch: epoch)
            #expect(renewed.decided.first?.status == .renewed)
        }
        try await Task.sleep(for: .milliseconds(3_100))
        #expect(try await store.sweep(partition: 6, epoch: epoch).isEmpty, "renewed: still held past the claim's end")
        // A backend's statistics reach the shared ones when it ends.
        await store.connection.close()
        let reader = try await PostgresConnection.connect(to: url, logger: TestDatabase.logger)
        var counts: (updates: Int, heapOnly: Int) = (0, 0)
        for _ in 0..<40 where counts.updates < 20 {
            counts = try await reader.withSession { session in
                let row = try session.query("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'baton_buffers'").rows.first ?? []
                return (Int(row.first.flatMap { $0 } ?? "") ?? 0, Int(row.dropFirst().first.flatMap { $0 } ?? "") ?? 0)
            }
            if counts.updates < 20 { try await Task.sleep(for: .milliseconds(100)) }
        }
        #expect(counts.updates == 20, "one update per renewal")
        #expect(counts.heapOnly == 20, "every renewal a heap-only update: no index holds a column a renewal changes")
        await reader.close()
    }

    /// A worker's statements are planned once, on whatever the table held then. A plan made on an empty
    /// table once joined the batch write's updates to a scan of the whole partition (until autovacuum
    /// analyzed the table), so every renewal read every row of its partition: in `open-storm` over
    /// 1,000,000 buffers, writes took 300-600 ms and calls timed out. Counted, not timed: the rows the
    /// renewals fetched from `baton_buffers`, from the table's statistics once the backend ended.
    @Test func aWritePlannedOnAnEmptyTableStillLooksUpItsKeysWhenThePartitionHasGrown() async throws {
        let url = try await TestDatabase.migrated()
        let connection = try await PostgresConnection.connect(to: url, options: .worker(applicationName: "baton test"), logger: TestDatabase.logger)
        let store = try await OwnershipStore.open(connection: connection, partitioner: try Partitioner(count: 16), logger: TestDatabase.logger)
        let epoch = try await store.takePartition(9, owner: "test")
        let b = buffer(in: 9)
        let claimed = try await store.apply([.claim(b, user: "ann", connection: "c1")], partition: 9, epoch: epoch)
        let token = try #require(claimed.decided.first?.token)
        // The partition grows by 30,000 rows, with no ANALYZE (autovacuum looks once a minute at most).
        let partitioner = try Partitioner(count: 16)
        let grown: [String] = Array((0..<600_000).lazy.map { "grown/\($0)" }.filter { partitioner.partition(of: $0) == 9 }.prefix(30_000))
        let admin = try await PostgresConnection.connect(to: url, logger: TestDatabase.logger)
        _ = try await admin.withSession { session in
            try session.query("""
                INSERT INTO baton_buffers (partition, buffer, token, version, updated_at)
                SELECT 9, g, 1, 1, now() FROM unnest($1::text[]) g
                """, [PostgresArray.text(grown.map { Optional($0) })])
        }
        let fetchedBefore = try await Self.rowsFetched(admin)
        for index in 0..<5 {
            let renewed = try await store.apply([
                Request(requestID: UUID().uuidString, command: .renew(buffer: b, connection: "c1", token: token, leaseMilliseconds: 60_000 + Int64(index) * 10)),
            ], partition: 9, epoch: epoch)
            #expect(renewed.decided.first?.status == .renewed)
        }
        // A claim of a grown buffer: the memory's filter of stored names never saw it, so it is decided as
        // new, its insert conflicts, and the batch is read (the read planned on the empty table too).
        let read = try await store.apply([.claim(grown[7], user: "bob", connection: "c2")], partition: 9, epoch: epoch)
        #expect(read.decided.first?.status == .granted && read.decided.first?.token == 2 && !read.fromMemory)
        await connection.close()  // its statistics reach the shared ones when the backend ends
        var fetched = 0
        for _ in 0..<40 {
            fetched = try await Self.rowsFetched(admin) - fetchedBefore
            if fetched >= 6 { break }
            try await Task.sleep(for: .milliseconds(100))
        }
        #expect(fetched >= 6 && fetched < 100, "each write and read fetches its own rows, not the partition's 30,001 (fetched \(fetched))")
        await admin.close()
    }

    static func rowsFetched(_ connection: PostgresConnection) async throws -> Int {
        try await connection.withSession { session in
            Int(try session.query("SELECT coalesce(idx_tup_fetch, 0) + coalesce(seq_tup_read, 0) FROM pg_stat_user_tables WHERE relname = 'baton_buffers'").first() ?? "") ?? 0
        }
    }

    /// A renewal (or re-claim) may shorten a lease: its end moves earlier than the entry the schedule
    /// holds for it, so the write schedules the new end (found in review: an hour's lease renewed for a
    /// second would have been swept only at the hour).
    @Test func aLeaseRenewedShorterIsSweptAtItsNewEnd() async throws {
        let url = try await TestDatabase.migrated()
        let store = try await TestDatabase.store(url)
        let epoch = try await store.takePartition(5, owner: "test")
        let b = buffer(in: 5)
        let claimed = try await store.apply([.claim(b, user: "ann", connection: "c1", lease: 3_600_000)], partition: 5, epoch: epoch)
        let token = try #require(claimed.decided.first?.token)
        #expect(try await store.sweep(partition: 5, epoch: epoch).isEmpty, "scheduled at the hour")
        let renewed = try await store.apply([
            Request(requestID: UUID().uuidString, command: .renew(buffer: b, connection: "c1", token: token, leaseMilliseconds: 1_000)),
        ], partition: 5, epoch: epoch)
        #expect(renewed.decided.first?.status == .renewed)
        try await Task.sleep(for: .milliseconds(1_200))
        let swept = try await store.sweep(partition: 5, epoch: epoch)
        #expect(swept.map(\.change.kind) == [.expired] && swept.map(\.change.buffer) == [b], "swept at the renewal's end, not at the hour")
        await store.connection.close()
    }

    // MARK: - The token sequence (migration 9)

    /// The store keeps a buffer's token sequence apart from its holder's token: a sequence that ran ahead
    /// (as replica memberships will make it) is read back, written, and remembered, and a row written
    /// before migration 9 (no sequence of its own) reads as its holder's token.
    @Test func aSequenceAheadOfTheHoldersTokenIsStoredReadAndContinued() async throws {
        let url = try await TestDatabase.migrated()
        let b = buffer(in: 3)
        let first = try await TestDatabase.store(url)
        let epoch = try await first.takePartition(3, owner: "first")
        let claimed = try await first.apply([.claim(b, user: "ann", connection: "c1")], partition: 3, epoch: epoch)
        #expect(claimed.decided.first?.token == 1)
        let admin = try await PostgresConnection.connect(to: url, logger: TestDatabase.logger)
        let issued = { () async throws -> String? in
            try await admin.withSession { session in try session.query("SELECT issued FROM baton_buffers WHERE partition = 3 AND buffer = $1", [b]).first() }
        }
        #expect(try await issued() == "1", "written with the grant")
        // Four tokens issued to others since Ann's grant.
        _ = try await admin.withSession { session in try session.query("UPDATE baton_buffers SET issued = 5, version = version + 1 WHERE partition = 3 AND buffer = $1", [b]) }
        await first.connection.close()

        let store = try await TestDatabase.store(url)
        let next = try await store.takePartition(3, owner: "second")
        let renewed = try await store.apply([
            Request(requestID: UUID().uuidString, command: .renew(buffer: b, connection: "c1", token: 1, leaseMilliseconds: 60_000)),
        ], partition: 3, epoch: next)
        #expect(renewed.decided.first?.status == .renewed && renewed.decided.first?.token == 1, "renewed with the holder's own token")
        let released = try await store.apply([.release(b, connection: "c1", token: 1)], partition: 3, epoch: next)
        #expect(released.decided.first?.status == .released)
        let regranted = try await store.apply([.claim(b, user: "bob", connection: "c2")], partition: 3, epoch: next)
        #expect(regranted.fromMemory, "decided from what the store remembered of the read")
        #expect(regranted.decided.first?.token == 6, "after the sequence, not after Ann's token")
        #expect(try await issued() == "6")

        // A row from before migration 9: no sequence of its own, read as its token.
        _ = try await admin.withSession { session in try session.query("UPDATE baton_buffers SET issued = NULL, version = version + 1 WHERE partition = 3 AND buffer = $1", [b]) }
        let third = try await TestDatabase.store(url)
        let last = try await third.takePartition(3, owner: "third")
        let released2 = try await third.apply([.release(b, connection: "c2", token: 6)], partition: 3, epoch: last)
        #expect(released2.decided.first?.status == .released)
        let claimedAgain = try await third.apply([.claim(b, user: "cy", connection: "c3")], partition: 3, epoch: last)
        #expect(claimedAgain.decided.first?.token == 7)
        let audit = try await TestDatabase.audit(url)
        #expect(HistoryChecker.check(audit.changes, finalTokens: audit.finalTokens).passed)
        await store.connection.close()
        await third.connection.close()
        await admin.close()
    }
}
