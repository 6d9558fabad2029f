import BatonCore
import BatonPostgres
import Foundation
import Logging
import Synchronization

/// A membership a system handed out (`join-storm`): the replica id and the token that ends it.
struct BenchMembership: Sendable {
    var replicaID: Int
    var token: Int64
}

extension BenchSystem {
    func join(client: Int, buffer: String) async throws -> BenchMembership {
        throw ScratchError("\(Self.self) has no replica memberships")
    }

    func leave(client: Int, buffer: String, token: Int64) async throws {
        throw ScratchError("\(Self.self) has no replica memberships")
    }

    var serializationRetries: Int? { nil }

    func membershipViolations() async throws -> Int? { nil }
}

/// Replica ids in PostgreSQL without Baton, as a collab server allocates them today (Zed's collab
/// server: read the project's collaborators, take the smallest id none of them holds, insert, all in one
/// transaction), at SERIALIZABLE with its retry policy (up to 10 retries on a serialization failure or
/// a deadlock, 10 ms doubling, jittered), or at READ COMMITTED without retries: the negative control,
/// where two joins that read the same collaborators take the same id.
struct SQLMembershipSystem: BenchSystem {
    enum Isolation: Sendable {
        case serializable, readCommitted

        var sql: String { self == .serializable ? "SERIALIZABLE" : "READ COMMITTED" }
    }

    let isolation: Isolation
    let pool: [PostgresConnection]
    /// Attempts that failed with a serialization failure or a deadlock and were tried again.
    private let retries = Counter()

    private final class Counter: Sendable {
        let value = Atomic<Int>(0)
    }
    static let table = "bench_members"
    /// Retries after the first attempt, and the first backoff (doubled each retry, jittered ±50 %).
    static let maximumRetries = 10
    static let firstBackoff: Duration = .milliseconds(10)

    init(isolation: Isolation, pool: [PostgresConnection]) {
        self.isolation = isolation
        self.pool = pool
    }

    /// Runs `body` with a system of `poolSize` connections, closed afterwards whatever happens.
    static func with<T>(isolation: Isolation, url: PostgresURL, poolSize: Int, logger: Logger, _ body: (SQLMembershipSystem) async throws -> T) async throws -> T {
        var pool: [PostgresConnection] = []
        do {
            for index in 0..<poolSize {
                let connection = try await PostgresConnection.connect(
                    to: url, options: PostgresConnectionOptions(applicationName: "baton bench \(table) \(index)"), logger: logger
                )
                pool.append(connection)
                let level = isolation.sql
                try await connection.withSession { session in
                    try session.execute(script: "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL \(level)")
                }
            }
            try await pool[0].withSession { session in
                try session.execute(script: """
                    SET client_min_messages = warning;
                    DROP TABLE IF EXISTS \(table);
                    CREATE TABLE \(table) (
                        project text NOT NULL, connection text NOT NULL, user_id text NOT NULL, replica_id int NOT NULL,
                        PRIMARY KEY (project, connection)
                    );
                    """)
            }
        } catch {
            for connection in pool { await connection.close() }
            throw error
        }
        return try await withClosing(SQLMembershipSystem(isolation: isolation, pool: pool), close: { await $0.close() }, body)
    }

    private static let collaborators = PreparedStatement(
        name: "bench_members_of_project", sql: "SELECT connection, replica_id FROM \(table) WHERE project = $1"
    )
    private static let insert = PreparedStatement(
        name: "bench_members_insert", sql: "INSERT INTO \(table) (project, connection, user_id, replica_id) VALUES ($1, $2, $3, $4)"
    )
    private static let delete = PreparedStatement(
        name: "bench_members_delete", sql: "DELETE FROM \(table) WHERE project = $1 AND connection = $2 RETURNING replica_id"
    )

    func connection(_ client: Int) -> PostgresConnection { pool[client % pool.count] }

    /// Runs `body` as one transaction, again (after a backoff) while it fails with a serialization failure
    /// or a deadlock, at most ``maximumRetries`` times (at SERIALIZABLE; READ COMMITTED never retries).
    private func transaction<T: Sendable>(client: Int, _ body: @escaping @Sendable (PostgresSession) throws -> T) async throws -> T {
        var attempt = 0
        while true {
            do {
                return try await connection(client).withSession { session in try session.transaction { try body(session) } }
            } catch let error as PostgresError where isolation == .serializable && (error.sqlState == "40001" || error.sqlState == "40P01") {
                guard attempt < Self.maximumRetries else { throw error }
                retries.value.add(1, ordering: .relaxed)
                try await Task.sleep(for: Self.firstBackoff * (1 << attempt) * Double.random(in: 0.5...1.5))
                attempt += 1
            }
        }
    }

    func join(client: Int, buffer: String) async throws -> BenchMembership {
        let connectionID = "bench-\(client)"
        let id = try await transaction(client: client) { session -> Int in
            var taken = Set<Int>()
            for row in try session.query(Self.collaborators, [buffer]).rows {
                guard let id = row[1].flatMap(Int.init) else { continue }
                if row[0] == connectionID { return id }  // a repeat by a member: its own id
                taken.insert(id)
            }
            var id = 1
            while taken.contains(id) { id += 1 }
            _ = try session.query(Self.insert, [buffer, connectionID, "user-\(client)", String(id)])
            return id
        }
        return BenchMembership(replicaID: id, token: Int64(id))
    }

    func leave(client: Int, buffer: String, token: Int64) async throws {
        let connectionID = "bench-\(client)"
        _ = try await transaction(client: client) { session in try session.query(Self.delete, [buffer, connectionID]).rows.count }
    }

    var serializationRetries: Int? { isolation == .serializable ? retries.value.load(ordering: .relaxed) : nil }

    func claim(client: Int, buffer: String) async throws -> Int64? { throw ScratchError("\(Self.table) has no ownership leases") }
    func claim(client: Int, buffer: String, wait: Duration) async throws -> Int64? { throw ScratchError("\(Self.table) has no ownership leases") }
    func release(client: Int, buffer: String, token: Int64) async throws { throw ScratchError("\(Self.table) has no ownership leases") }
    func renew(client: Int, buffer: String, token: Int64) async throws -> Bool { throw ScratchError("\(Self.table) has no ownership leases") }
    func doubleGrants() async throws -> Int? { nil }

    func close() async {
        for connection in pool { await connection.close() }
    }
}
