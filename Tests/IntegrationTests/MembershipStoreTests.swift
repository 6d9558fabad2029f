import BatonCore
import BatonLab
import BatonPostgres
import Foundation
import Testing

/// Replica memberships in the store (migration 10, docs/store.md "Rosters"): written with the buffer's row
/// under its compare-and-set, read back by a store that never saw them, found by connection for
/// `release_connection`, and swept into their grace from the schedule.
@Suite struct MembershipStoreTests {
    static func join(_ buffer: String, _ user: String, _ connection: String, lease: Int64 = 30_000) -> Request {
        Request(requestID: UUID().uuidString, command: .join(buffer: buffer, user: user, connection: connection, leaseMilliseconds: lease), principal: "p")
    }

    static func roster(_ url: PostgresURL, _ buffer: String) async throws -> Roster {
        let admin = try await PostgresConnection.connect(to: url, logger: TestDatabase.logger)
        defer { Task { await admin.close() } }
        let text = try await admin.withSession { session in
            try session.query("SELECT roster::text FROM baton_buffers WHERE buffer = $1", [buffer]).first()
        }
        return try Roster(storedText: text)
    }

    @Test func membershipsAreStoredReadBackByAnotherStoreAndContinueTheSequence() async throws {
        let url = try await TestDatabase.migrated()
        let store = try await TestDatabase.store(url)
        let epoch = try await store.takePartition(3, owner: "test")
        let b = buffer(in: 3)
        let first = try await store.apply([
            Request(requestID: "c", command: .claim(buffer: b, holder: Holder(user: "ann", connection: "c1"), leaseMilliseconds: 30_000), principal: "p"),
            Self.join(b, "ann", "c1"), Self.join(b, "bob", "c2"),
        ], partition: 3, epoch: epoch)
        #expect(first.decided.map(\.status) == [.granted, .joined, .joined])
        #expect(first.decided.map(\.token) == [1, 2, 3] && first.decided.compactMap(\.membership?.replicaID) == [1, 2])
        let stored = try await Self.roster(url, b)
        #expect(stored.members.map(\.replicaID) == [1, 2] && stored.members.map(\.user) == ["ann", "bob"] && stored.members.map(\.principal) == ["p", "p"])

        // Another store (the next owner) reads the roster and the sequence from the row.
        let next = try await TestDatabase.store(url)
        let nextEpoch = try await next.takePartition(3, owner: "next")
        let third = try await next.apply([Self.join(b, "cat", "c3")], partition: 3, epoch: nextEpoch)
        #expect(third.decided.first?.membership == MembershipReply(replicaID: 3, members: 3) && third.decided.first?.token == 4 && !third.fromMemory)
        let left = try await next.apply([
            Request(requestID: UUID().uuidString, command: .leave(buffer: b, connection: "c2", token: 3), principal: "p"),
            Self.join(b, "dan", "c4"),
        ], partition: 3, epoch: nextEpoch)
        #expect(left.decided.map(\.status) == [.left, .joined] && left.decided.last?.membership?.replicaID == 2 && left.decided.last?.token == 5)
        #expect(left.fromMemory, "decided from the partition's memory, rosters included")
        // The lease was never touched, and its renewal still names token 1.
        let renewed = try await next.apply([
            Request(requestID: UUID().uuidString, command: .renew(buffer: b, connection: "c1", token: 1, leaseMilliseconds: 30_000), principal: "p"),
        ], partition: 3, epoch: nextEpoch)
        #expect(renewed.decided.first?.status == .renewed && renewed.decided.first?.token == 1)
        let audit = try await TestDatabase.audit(url)
        #expect(audit.changes.filter(\.kind.isOwnership).map(\.kind) == [.granted] && audit.finalTokens[ExactString(b)] == 1)
        // The memberships' changes are in the same history, in decision order, with their ids.
        #expect(audit.changes.filter { !$0.kind.isOwnership }.map { "\($0.kind) \($0.replicaID ?? 0) \($0.token)" } == [
            "member_joined 1 2", "member_joined 2 3", "member_joined 3 4", "member_left 2 3", "member_joined 2 5",
        ])
        await store.connection.close()
        await next.connection.close()
    }

    @Test func releaseConnectionEndsItsMembershipsIntoTheGraceOnEveryBuffer() async throws {
        let url = try await TestDatabase.migrated()
        let store = try await TestDatabase.store(url)
        let epoch = try await store.takePartition(5, owner: "test")
        let (a, b) = (buffer(in: 5, prefix: "a"), buffer(in: 5, prefix: "b"))
        _ = try await store.apply([Self.join(a, "ann", "c1"), Self.join(b, "bob", "c2"), Self.join(b, "ann", "c1")], partition: 5, epoch: epoch)
        // A store that has not seen them (its memory is empty) finds them by connection.
        let other = try await TestDatabase.store(url)
        let otherEpoch = try await other.takePartition(5, owner: "other")
        let released = try await other.apply([
            Request(requestID: UUID().uuidString, command: .releaseConnection(connection: "c1"), principal: "p"),
        ], partition: 5, epoch: otherEpoch)
        #expect(released.decided.first?.status == .releasedConnection && released.decided.first?.releasedCount == 0)
        let rosterA = try await Self.roster(url, a)
        let rosterB = try await Self.roster(url, b)
        #expect(rosterA.members.isEmpty && rosterA.reservations.map(\.user) == ["ann"])
        #expect(rosterB.members.map(\.user) == ["bob"] && rosterB.reservations.map(\.replicaID) == [2])
        // Within the grace, ann gets id 2 of b back from another connection; cat does not get it.
        let back = try await other.apply([Self.join(b, "cat", "c3"), Self.join(b, "ann", "c9")], partition: 5, epoch: otherEpoch)
        #expect(back.decided.compactMap(\.membership) == [MembershipReply(replicaID: 3, members: 2), MembershipReply(replicaID: 2, members: 3, reclaimed: true)])
        await store.connection.close()
        await other.connection.close()
    }

    @Test func anExpiredMembershipIsSweptIntoItsGraceByTheNextOwner() async throws {
        let url = try await TestDatabase.migrated()
        let old = try await TestDatabase.store(url)
        let b = buffer(in: 7)
        let oldEpoch = try await old.takePartition(7, owner: "old")
        _ = try await old.apply([Self.join(b, "ann", "c1", lease: 300), Self.join(b, "bob", "c2", lease: 60_000)], partition: 7, epoch: oldEpoch)
        let new = try await TestDatabase.store(url)
        let epoch = try await new.takePartition(7, owner: "new")
        try await Task.sleep(for: .milliseconds(400))
        // The new store never wrote the memberships: only the rows can have told its schedule.
        _ = try await new.sweep(partition: 7, epoch: epoch)
        let swept = try await Self.roster(url, b)
        #expect(swept.members.map(\.user) == ["bob"] && swept.reservations.map(\.user) == ["ann"], "\(swept)")
        #expect(swept.reservations.first.map { $0.until.milliseconds - swept.members[0].expiresAt.milliseconds } ?? 0 < 0)
        await old.connection.close()
        await new.connection.close()
    }

    /// The `release_connection` read's membership arm, planned on an empty table, still goes through
    /// `baton_buffers_roster` once the partition has grown (5,000 rosters of other connections; kept small,
    /// as the suite's timing tests share the machine).
    @Test func releaseConnectionPlannedOnAnEmptyTableFindsMembershipsByTheIndex() async throws {
        let url = try await TestDatabase.migrated()
        let connection = try await PostgresConnection.connect(to: url, options: .worker(applicationName: "baton test"), logger: TestDatabase.logger)
        let store = try await OwnershipStore.open(connection: connection, partitioner: try Partitioner(count: 16), logger: TestDatabase.logger)
        let epoch = try await store.takePartition(11, owner: "test")
        let b = buffer(in: 11)
        _ = try await store.apply([Self.join(b, "ann", "c1")], partition: 11, epoch: epoch)
        let partitioner = try Partitioner(count: 16)
        let grown: [String] = Array((0..<600_000).lazy.map { "grown/\($0)" }.filter { partitioner.partition(of: $0) == 11 }.prefix(5_000))
        let admin = try await PostgresConnection.connect(to: url, logger: TestDatabase.logger)
        _ = try await admin.withSession { session in
            try session.query("""
                INSERT INTO baton_buffers (partition, buffer, token, version, updated_at, roster)
                SELECT 11, g, 0, 1, now(), jsonb_build_object('m', jsonb_build_array(jsonb_build_object(
                    'i', 1, 'u', 'someone', 'c', 'other-' || g, 't', 1, 'e', 9999999999999, 'p', 'p')), 'r', jsonb_build_array())
                FROM unnest($1::text[]) g
                """, [PostgresArray.text(grown.map { Optional($0) })])
        }
        let fetchedBefore = try await PartitionMemoryTests.rowsFetched(admin)
        let released = try await store.apply([
            Request(requestID: UUID().uuidString, command: .releaseConnection(connection: "c1"), principal: "p"),
        ], partition: 11, epoch: epoch)
        #expect(released.decided.first?.status == .releasedConnection)
        await connection.close()  // its statistics reach the shared ones when the backend ends
        var fetched = 0
        for _ in 0..<40 {
            fetched = try await PartitionMemoryTests.rowsFetched(admin) - fetchedBefore
            if fetched >= 1 { break }
            try await Task.sleep(for: .milliseconds(100))
        }
        #expect(fetched >= 1 && fetched < 100, "the read fetches the connection's rosters, not the partition's 5,001 (fetched \(fetched))")
        #expect(try await Self.roster(url, b).members.isEmpty)
        await admin.close()
    }
}
