import BatonClient
import BatonCore
import BatonPostgres
import Foundation
import Logging
import Synchronization

/// One system under test: the operations a workload needs.
protocol BenchSystem: Sendable {
    /// Claims `buffer` for client `client`; returns the token when granted, nil when denied.
    func claim(client: Int, buffer: String) async throws -> Int64?
    /// Claims `buffer`, waiting in its line up to `wait`; nil when the wait ran out.
    func claim(client: Int, buffer: String, wait: Duration) async throws -> Int64?
    /// Releases a lease.
    func release(client: Int, buffer: String, token: Int64) async throws
    /// Renews a lease; false when no longer the owner.
    func renew(client: Int, buffer: String, token: Int64) async throws -> Bool
    /// Double grants in this system's audit trail, judged by `HistoryChecker` (nil when the system keeps none).
    func doubleGrants() async throws -> Int?
    /// Joins `buffer`'s collaborators as client `client` (`join-storm`); the systems without replica ids throw.
    func join(client: Int, buffer: String) async throws -> BenchMembership
    /// Ends the membership `join` gave.
    func leave(client: Int, buffer: String, token: Int64) async throws
    /// Transactions tried again after a serialization failure or a deadlock so far (nil: never retries).
    var serializationRetries: Int? { get }
    /// Membership violations the history checker finds in the audit trail (nil when the system keeps none).
    func membershipViolations() async throws -> Int?
    func close() async
}

let benchLease: Duration = .seconds(30)

/// Baton end to end (or the broker echo): BatonClient connections shared by the load's clients.
struct BatonSystem: BenchSystem {
    let clients: [BatonClient]
    let databaseURL: PostgresURL?
    let logger: Logger

    func client(_ index: Int) -> BatonClient { clients[index % clients.count] }

    func claim(client index: Int, buffer: String) async throws -> Int64? {
        switch try await client(index).claim(buffer, user: "bench", connection: "bench-\(index)", lease: benchLease) {
        case .granted(let lease): lease.token
        case .denied: nil
        }
    }

    func claim(client index: Int, buffer: String, wait: Duration) async throws -> Int64? {
        switch try await client(index).claim(buffer, user: "bench", connection: "bench-\(index)", lease: benchLease, wait: wait) {
        case .granted(let lease): lease.token
        case .denied: nil
        }
    }

    func release(client index: Int, buffer: String, token: Int64) async throws {
        _ = try await client(index).release(buffer, connection: "bench-\(index)", token: token)
    }

    func renew(client index: Int, buffer: String, token: Int64) async throws -> Bool {
        if case .renewed = try await client(index).renew(buffer, connection: "bench-\(index)", token: token, lease: benchLease) { return true }
        return false
    }

    func join(client index: Int, buffer: String) async throws -> BenchMembership {
        let membership = try await client(index).join(buffer, user: "user-\(index)", connection: "bench-\(index)", lease: benchLease)
        return BenchMembership(replicaID: membership.replicaID, token: membership.token)
    }

    func leave(client index: Int, buffer: String, token: Int64) async throws {
        _ = try await client(index).leave(buffer, connection: "bench-\(index)", token: token)
    }

    func doubleGrants() async throws -> Int? {
        try await auditTrail().map { HistoryChecker.check($0).doubleGrants }
    }

    /// What the history checker finds wrong with the memberships of the audit trail (two live members
    /// with one id, an id given away in its grace, ...), judged with the worker's default grace.
    func membershipViolations() async throws -> Int? {
        try await auditTrail().map { HistoryChecker.checkMemberships($0, graceMilliseconds: Roster.defaultGraceMilliseconds).count }
    }

    private func auditTrail() async throws -> [OwnershipChange]? {
        guard let databaseURL else { return nil }
        let partitioner = clients[0].configuration.partitioner
        return try await PostgresConnection.withConnection(to: databaseURL, logger: logger) { connection in
            let store = try await OwnershipStore.open(connection: connection, partitioner: partitioner, logger: logger)
            return try await store.auditTrail().changes
        }
    }

    func close() async {
        for client in clients { await client.close() }
    }
}

/// PostgreSQL without Baton: the usual fix (conditional upsert), the same with what Baton also writes
/// per request (an idempotency record with the reply, beside the audit row, in the same transaction), or
/// the incident's check-then-act.
struct SQLSystem: BenchSystem {
    enum Style { case conditional, recorded, naive }

    let style: Style
    let pool: [PostgresConnection]
    let table: String
    /// Request ids for the idempotency records (``Style/recorded``): a prefix per run and a counter.
    private let requestIDs = RequestIDs()

    private final class RequestIDs: Sendable {
        let prefix = String(UInt64.random(in: 0...UInt64.max), radix: 36)
        let next = Atomic<Int>(0)
        func make() -> String { "\(prefix)-\(next.add(1, ordering: .relaxed).newValue)" }
    }

    /// Runs `body` with a system of `poolSize` connections, closed afterwards whatever happens.
    static func with<T>(style: Style, url: PostgresURL, poolSize: Int, logger: Logger, _ body: (SQLSystem) async throws -> T) async throws -> T {
        try await withClosing(try await make(style: style, url: url, poolSize: poolSize, logger: logger), close: { await $0.close() }, body)
    }

    private static func make(style: Style, url: PostgresURL, poolSize: Int, logger: Logger) async throws -> SQLSystem {
        let table = switch style {
        case .conditional: "bench_direct"
        case .recorded: "bench_recorded"
        case .naive: "bench_naive"
        }
        var pool: [PostgresConnection] = []
        do {
        for index in 0..<poolSize {
            pool.append(try await PostgresConnection.connect(
                to: url, options: PostgresConnectionOptions(applicationName: "baton bench \(table) \(index)"), logger: logger
            ))
        }
        try await pool[0].withSession { session in
            try session.execute(script: """
                SET client_min_messages = warning;
                DROP TABLE IF EXISTS \(table), \(table)_audit, \(table)_requests;
                CREATE TABLE \(table) (buffer text PRIMARY KEY, owner text, token bigint NOT NULL DEFAULT 0, expires_at timestamptz);
                CREATE TABLE \(table)_audit (id bigserial PRIMARY KEY, kind text NOT NULL, buffer text NOT NULL, owner text NOT NULL,
                    token bigint NOT NULL, at_ms bigint NOT NULL, expires_ms bigint NOT NULL);
                CREATE TABLE \(table)_requests (request_id text PRIMARY KEY, reply text NOT NULL, created_at timestamptz NOT NULL DEFAULT clock_timestamp());
                """)
        }
        } catch {
            for connection in pool { await connection.close() }
            throw error
        }
        return SQLSystem(style: style, pool: pool, table: table)
    }

    private var now: String { "floor(extract(epoch FROM clock_timestamp()) * 1000)::int8" }
    private var leaseMS: String { String(benchLease.wholeMilliseconds) }

    // The usual fix: one conditional upsert decides and records the grant atomically.
    private var conditionalClaim: PreparedStatement {
        grant(name: "bench_conditional_claim", condition: "WHERE b.owner IS NULL OR b.expires_at <= clock_timestamp()")
    }

    // The usual fix with Baton's per-request record: the same upsert and audit rows, and the request's
    // idempotency record holding its reply ($3 the request id), in the same statement (one transaction).
    private var recordedClaim: PreparedStatement {
        grant(name: "bench_recorded_claim", condition: "WHERE b.owner IS NULL OR b.expires_at <= clock_timestamp()", record: """
            INSERT INTO \(table)_requests (request_id, reply)
            SELECT $3, coalesce((SELECT '{"status":"granted","token":' || token || ',"expires_ms":' || expires_ms || '}' FROM g),
                                (SELECT '{"status":"denied","holder":' || to_json(owner) || ',"token":' || token || '}' FROM old), '{"status":"denied"}')
            """)
    }

    // The incident: "is it free?" ...
    private var naiveCheck: PreparedStatement {
        PreparedStatement(name: "bench_naive_check", sql: """
            SELECT owner IS NULL OR expires_at <= clock_timestamp() FROM \(table) WHERE buffer = $1
            """)
    }

    // ... then "make me the owner", unconditionally.
    private var naiveAct: PreparedStatement {
        grant(name: "bench_naive_act", condition: "")
    }

    /// An upsert that grants `$1` to `$2`, and audits the grant (closing a lease it replaced as expired);
    /// `record`, when given, is one more statement in the same one (it may read `old` and `g`).
    private func grant(name: String, condition: String, record: String? = nil) -> PreparedStatement {
        PreparedStatement(name: name, sql: """
            WITH old AS (
                SELECT owner, token, (extract(epoch FROM expires_at) * 1000)::int8 AS expires_ms FROM \(table) WHERE buffer = $1
            ),
            g AS (
                INSERT INTO \(table) AS b (buffer, owner, token, expires_at)
                VALUES ($1, $2, 1, clock_timestamp() + \(leaseMS) * interval '1 millisecond')
                ON CONFLICT (buffer) DO UPDATE SET owner = EXCLUDED.owner, token = b.token + 1, expires_at = EXCLUDED.expires_at
                    \(condition)
                RETURNING token, (extract(epoch FROM expires_at) * 1000)::int8 AS expires_ms
            ),
            closed AS (
                INSERT INTO \(table)_audit (kind, buffer, owner, token, at_ms, expires_ms)
                SELECT 'expired', $1, old.owner, old.token, \(now), old.expires_ms FROM old, g
                WHERE old.owner IS NOT NULL AND g.token = old.token + 1 AND old.expires_ms <= \(now)
            )\(record.map { ",\nrecorded AS (\n\($0)\n)" } ?? "")
            INSERT INTO \(table)_audit (kind, buffer, owner, token, at_ms, expires_ms)
            SELECT 'granted', $1, $2, token, \(now), expires_ms FROM g RETURNING token
            """)
    }

    /// The release (and, with `recorded`, its idempotency record, $4 the request id).
    private func releaseStatement(recorded: Bool) -> PreparedStatement {
        let record = !recorded ? "" : """
            ,
            recorded AS (
                INSERT INTO \(table)_requests (request_id, reply)
                SELECT $4, CASE WHEN EXISTS (SELECT 1 FROM r) THEN '{"status":"released"}' ELSE '{"status":"not_owner"}' END
            )
            """
        return PreparedStatement(name: "bench_release_\(table)", sql: """
            WITH r AS (
                UPDATE \(table) SET owner = NULL, expires_at = NULL WHERE buffer = $1 AND owner = $2 AND token = $3 RETURNING token
            )\(record)
            INSERT INTO \(table)_audit (kind, buffer, owner, token, at_ms, expires_ms) SELECT 'released', $1, $2, token, \(now), \(now) FROM r
            """)
    }

    private var renewStatement: PreparedStatement {
        PreparedStatement(name: "bench_renew_\(table)", sql: """
            UPDATE \(table) SET expires_at = clock_timestamp() + \(leaseMS) * interval '1 millisecond'
            WHERE buffer = $1 AND owner = $2 AND token = $3 AND expires_at > clock_timestamp()
            """)
    }

    /// The renewal with its idempotency record ($4 the request id); returns the rows renewed.
    private var recordedRenew: PreparedStatement {
        PreparedStatement(name: "bench_recorded_renew", sql: """
            WITH r AS (
                UPDATE \(table) SET expires_at = clock_timestamp() + \(leaseMS) * interval '1 millisecond'
                WHERE buffer = $1 AND owner = $2 AND token = $3 AND expires_at > clock_timestamp() RETURNING 1
            ),
            recorded AS (
                INSERT INTO \(table)_requests (request_id, reply)
                SELECT $4, CASE WHEN EXISTS (SELECT 1 FROM r) THEN '{"status":"renewed"}' ELSE '{"status":"not_owner"}' END
            )
            SELECT count(*) FROM r
            """)
    }

    func connection(_ client: Int) -> PostgresConnection { pool[client % pool.count] }

    func claim(client: Int, buffer: String) async throws -> Int64? {
        let owner = "bench-\(client)"
        switch style {
        case .conditional:
            let statement = conditionalClaim
            return try await connection(client).withSession { session in
                try session.query(statement, [buffer, owner]).first().flatMap(Int64.init)
            }
        case .recorded:
            let statement = recordedClaim
            let id = requestIDs.make()
            return try await connection(client).withSession { session in
                try session.query(statement, [buffer, owner, id]).first().flatMap(Int64.init)
            }
        case .naive:
            let (check, act) = (naiveCheck, naiveAct)
            let free = try await connection(client).withSession { session in
                try session.query(check, [buffer]).first().map { $0 == "t" } ?? true
            }
            guard free else { return nil }
            return try await connection(client).withSession { session in
                try session.query(act, [buffer, owner]).first().flatMap(Int64.init)
            }
        }
    }

    func claim(client: Int, buffer: String, wait: Duration) async throws -> Int64? {
        throw ScratchError("PostgreSQL without Baton has no line to wait in (\(table))")
    }

    func release(client: Int, buffer: String, token: Int64) async throws {
        let recorded = style == .recorded
        let statement = releaseStatement(recorded: recorded)
        let parameters = [buffer, "bench-\(client)", String(token)] + (recorded ? [requestIDs.make()] : [])
        _ = try await connection(client).withSession { session in try session.query(statement, parameters) }
    }

    func renew(client: Int, buffer: String, token: Int64) async throws -> Bool {
        let owner = "bench-\(client)"
        if style == .recorded {
            let (statement, id) = (recordedRenew, requestIDs.make())
            return try await connection(client).withSession { session in try session.query(statement, [buffer, owner, String(token), id]).first() == "1" }
        }
        let statement = renewStatement
        return try await connection(client).withSession { session in try session.query(statement, [buffer, owner, String(token)]).affectedRows == 1 }
    }

    func doubleGrants() async throws -> Int? {
        let table = self.table
        let changes = try await pool[0].withSession { session in
            try session.query("SELECT kind, buffer, owner, owner, token, at_ms, expires_ms, false, NULL::int FROM \(table)_audit ORDER BY id")
                .decode(from: "\(table)_audit") { try OwnershipChange(row: $0, from: 0, principal: false) }
        }
        return HistoryChecker.check(changes).doubleGrants
    }

    func close() async {
        for connection in pool { await connection.close() }
    }
}
