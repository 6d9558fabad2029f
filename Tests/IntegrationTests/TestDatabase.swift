import BatonCore
import BatonPostgres
import Foundation
import Logging
import Synchronization
import Testing

/// Fresh databases on the PostgreSQL that `scripts/services up` starts (or `BATON_DATABASE_URL`).
///
/// A missing server fails the test with a message saying how to start it; it never skips.
enum TestDatabase {
    static let serverURL: String = ProcessInfo.processInfo.environment["BATON_DATABASE_URL"]
        ?? "postgres://baton:baton@127.0.0.1:55432/baton?sslmode=disable"

    static let logger: Logger = {
        var logger = Logger(label: "baton.tests")
        logger.logLevel = .warning
        return logger
    }()

    /// Creates an empty database for one test and returns its URL.
    static func create() async throws -> PostgresURL {
        let server = try PostgresURL(serverURL)
        let admin: PostgresConnection
        do {
            admin = try await PostgresConnection.connect(to: server, logger: logger)
        } catch {
            Issue.record("PostgreSQL is not reachable at \(server): run scripts/services up (\(error))")
            throw error
        }
        try await removeStale(admin)
        // The test process's pid is in the name, so that a later run can tell which are left over.
        let name = "baton_test_\(getpid())_\(UInt64.random(in: 0...UInt64.max) % 1_000_000_000_000)"
        _ = try await admin.withSession { session in try session.query("CREATE DATABASE \(name)") }
        await admin.close()
        var url = server
        url.database = name
        return url
    }

    private static let cleaned = Mutex(false)

    /// Once per test process: drops the databases (and their `_bench` / `_chaos` scratch databases) that
    /// test processes no longer running left behind, and those named before the pid was in the name.
    /// Without it every run left some 150 databases on a developer's server.
    private static func removeStale(_ admin: PostgresConnection) async throws {
        guard cleaned.withLock({ done in defer { done = true }; return !done }) else { return }
        let names = try await admin.withSession { session in
            try session.query("SELECT datname FROM pg_database WHERE datname LIKE 'baton\\_test\\_%'").rows.compactMap { $0.first ?? nil }
        }
        for name in names {
            let parts = name.split(separator: "_")  // baton, test, pid, random[, bench|chaos]
            if parts.count >= 4, let pid = Int32(parts[2]), parts[3].allSatisfy(\.isNumber), kill(pid, 0) == 0 || errno != ESRCH { continue }
            _ = try? await admin.withSession { session in try session.query("DROP DATABASE IF EXISTS \(name) WITH (FORCE)") }
        }
    }

    /// A fresh, migrated database with `partitions` partitions.
    static func migrated(partitions: Int = 16) async throws -> PostgresURL {
        let url = try await create()
        let connection = try await PostgresConnection.connect(to: url, logger: logger)
        try await Migrator.migrate(connection, partitionCount: partitions, logger: logger)
        await connection.close()
        return url
    }

    /// Opens a store on its own connection.
    static func store(_ url: PostgresURL, partitions: Int = 16) async throws -> OwnershipStore {
        let connection = try await PostgresConnection.connect(to: url, logger: logger)
        return try await OwnershipStore.open(connection: connection, partitioner: try Partitioner(count: partitions), logger: logger)
    }

    /// Every ownership change in the audit table, and the final token of every buffer.
    static func audit(_ url: PostgresURL) async throws -> (changes: [OwnershipChange], finalTokens: [ExactString: Int64]) {
        let partitions = try await partitionCount(url)
        return try await PostgresConnection.withConnection(to: url, logger: logger) { connection in
            try await OwnershipStore.open(connection: connection, partitioner: try Partitioner(count: partitions), logger: logger).auditTrail()
        }
    }

    private static func partitionCount(_ url: PostgresURL) async throws -> Int {
        try await PostgresConnection.withConnection(to: url, logger: logger) { connection in
            try await connection.withSession { session in Int(try session.query("SELECT partition_count FROM baton_meta").first() ?? "") ?? 16 }
        }
    }
}

extension Request {
    static func claim(_ buffer: String, user: String, connection: String, lease: Int64 = 30_000, id: String = UUID().uuidString) -> Request {
        Request(requestID: id, command: .claim(buffer: buffer, holder: Holder(user: user, connection: connection), leaseMilliseconds: lease))
    }

    static func release(_ buffer: String, connection: String, token: Int64, id: String = UUID().uuidString) -> Request {
        Request(requestID: id, command: .release(buffer: buffer, connection: connection, token: token))
    }
}

extension BatchResult {
    /// The replies, each claim that waits in line shown as an error reply saying so (the store tests
    /// compare replies; a waiting claim has none).
    var decided: [Reply] {
        replies.map { $0 ?? Reply(requestID: nil, status: .error, error: ReplyError(code: .internalError, message: "waits in line")) }
    }
}
