import BatonCore
import BatonLab
import BatonPostgres
import Foundation
import Testing

/// The incident, replayed on the store: many connections claim and release a few hot
/// buffers at once. Baton's store must give 0 double grants; the naive check-then-act
/// SQL, judged by the same checker, must be caught double-granting.
@Suite(.serialized) struct IncidentReplayTests {
    static let workers = 16
    static let hotBuffers = (0..<50).map { "hot/file-\($0).rs" }
    static let duration: Duration = .seconds(5)

    @Test(.timeLimit(.minutes(2))) func storeNeverDoubleGrants() async throws {
        let url = try await TestDatabase.migrated()
        let partitioner = try Partitioner(count: 16)
        // Every worker acts for every partition with the same epochs: the partition fence
        // lets them all through, so only the per-buffer compare-and-set stands between them.
        let setup = try await TestDatabase.store(url)
        var epochs: [Int: Int64] = [:]
        for partition in 0..<16 { epochs[partition] = try await setup.takePartition(partition, owner: "incident") }
        let sharedEpochs = epochs

        let deadline = ContinuousClock.now + Self.duration
        let counts = try await withThrowingTaskGroup(of: (grants: Int, attempts: Int).self) { group in
            for worker in 0..<Self.workers {
                group.addTask {
                    let store = try await TestDatabase.store(url)
                    var grants = 0
                    var attempts = 0
                    while ContinuousClock.now < deadline {
                        let buffer = Self.hotBuffers.randomElement()!
                        let partition = partitioner.partition(of: buffer)
                        let epoch = sharedEpochs[partition]!
                        attempts += 1
                        let reply = try await store.apply([.claim(buffer, user: "user-\(worker)", connection: "conn-\(worker)")], partition: partition, epoch: epoch).decided[0]
                        guard reply.status == .granted, let token = reply.token else { continue }
                        grants += 1
                        let released = try await store.apply([.release(buffer, connection: "conn-\(worker)", token: token)], partition: partition, epoch: epoch).decided[0]
                        #expect(released.status == .released)
                    }
                    await store.connection.close()
                    return (grants, attempts)
                }
            }
            return try await group.reduce(into: (0, 0)) { $0.0 += $1.grants; $0.1 += $1.attempts }
        }

        let audit = try await TestDatabase.audit(url)
        let report = HistoryChecker.check(audit.changes, finalTokens: audit.finalTokens)
        print("incident replay on the store: workers=\(Self.workers) attempts=\(counts.1) grants=\(counts.0) audited_grants=\(report.grants) double_grants=\(report.doubleGrants)")
        #expect(counts.0 > 100, "the load must actually contend")
        #expect(report.grants == counts.0, "every granted reply has its audit row")
        #expect(report.doubleGrants == 0)
        #expect(report.passed, "\(report.violations.prefix(5))")
    }

    @Test(.timeLimit(.minutes(2))) func naiveCheckThenActIsCaughtByTheSameChecker() async throws {
        let url = try await TestDatabase.create()
        let setup = try await PostgresConnection.connect(to: url, logger: TestDatabase.logger)
        _ = try await setup.withSession { session in
            try session.execute(script: """
                CREATE TABLE naive_buffers (buffer text PRIMARY KEY, owner text, token bigint NOT NULL DEFAULT 0);
                CREATE TABLE naive_audit (id bigserial PRIMARY KEY, kind text, buffer text, owner text, token bigint, at_ms bigint);
                """)
            try session.query("INSERT INTO naive_buffers (buffer) SELECT unnest($1::text[])", [PostgresArray.text(Self.hotBuffers)])
        }
        let check = PreparedStatement(name: "naive_check", sql: "SELECT owner FROM naive_buffers WHERE buffer = $1")
        let act = PreparedStatement(name: "naive_act", sql: """
            WITH g AS (UPDATE naive_buffers SET owner = $2, token = token + 1 WHERE buffer = $1 RETURNING token)
            INSERT INTO naive_audit (kind, buffer, owner, token, at_ms)
            SELECT 'granted', $1, $2, token, floor(extract(epoch FROM clock_timestamp()) * 1000)::int8 FROM g RETURNING token
            """)
        let release = PreparedStatement(name: "naive_release", sql: """
            WITH r AS (UPDATE naive_buffers SET owner = NULL WHERE buffer = $1 AND owner = $2 AND token = $3 RETURNING token)
            INSERT INTO naive_audit (kind, buffer, owner, token, at_ms)
            SELECT 'released', $1, $2, token, floor(extract(epoch FROM clock_timestamp()) * 1000)::int8 FROM r
            """)

        let deadline = ContinuousClock.now + Self.duration
        let grants = try await withThrowingTaskGroup(of: Int.self) { group in
            for worker in 0..<Self.workers {
                group.addTask {
                    let connection = try await PostgresConnection.connect(to: url, logger: TestDatabase.logger)
                    var grants = 0
                    while ContinuousClock.now < deadline {
                        let buffer = Self.hotBuffers.randomElement()!
                        let me = "conn-\(worker)"
                        // The incident's two statements: "is it free?" then "make me the owner".
                        let free = try await connection.withSession { s in try s.query(check, [buffer]).rows.first?[0] == nil }
                        guard free else { continue }
                        guard let token = try await connection.withSession({ s in try s.query(act, [buffer, me]).first() }) else { continue }
                        grants += 1
                        _ = try await connection.withSession { s in try s.query(release, [buffer, me, token]) }
                    }
                    await connection.close()
                    return grants
                }
            }
            return try await group.reduce(0, +)
        }

        let changes = try await setup.withSession { session in
            try session.query("SELECT kind, buffer, owner, token, at_ms FROM naive_audit ORDER BY id").rows.map { row in
                let at = Timestamp(milliseconds: Int64(row[4]!)!)
                return OwnershipChange(kind: ChangeKind(rawValue: row[0]!)!, buffer: row[1]!, holder: Holder(user: row[2]!, connection: row[2]!),
                                       token: Int64(row[3]!)!, at: at, expiresAt: at)
            }
        }
        await setup.close()
        let report = HistoryChecker.check(changes)
        print("incident replay, naive check-then-act: workers=\(Self.workers) grants=\(grants) double_grants=\(report.doubleGrants)")
        #expect(grants > 100)
        #expect(report.doubleGrants > 0, "the checker must catch the naive implementation double-granting")
    }
}
