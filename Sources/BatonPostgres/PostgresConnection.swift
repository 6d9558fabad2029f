import BatonCore
import CLibPQ
import Foundation
import Logging

/// Options for a PostgreSQL connection.
public struct PostgresConnectionOptions: Sendable {
    /// How long connecting may take, in whole seconds (libpq `connect_timeout`, at least 2 in practice).
    public var connectTimeoutSeconds: Int
    /// The server-side statement timeout (`statement_timeout`).
    public var statementTimeout: Duration
    /// The `application_name` the server shows in `pg_stat_activity`.
    public var applicationName: String
    /// For connections that run only the ownership store's key lookups: plan each prepared
    /// statement once (`plan_cache_mode = force_generic_plan`) and never choose a sequential scan
    /// (`enable_seqscan = off`). On a young, fast-growing table the statistics lag behind and the
    /// planner picked whole-partition scans (measured: 5.8 ms instead of 0.2 ms per batch read); the
    /// store's statements are written so that they cannot (key probes behind `OFFSET 0`, updates by row
    /// id: see `BatchRead.sql`).
    public var planForKeyLookups: Bool = false
    /// How long a lock may be waited for (`lock_timeout`); nil leaves the server's setting.
    public var lockTimeout: Duration?
    /// How long this session may sit idle inside a transaction before the server ends it
    /// (`idle_in_transaction_session_timeout`), releasing its locks; nil leaves the server's setting.
    /// A client frozen mid-transaction (SIGSTOP, a frozen VM) then cannot hold a lock for longer.
    public var idleInTransactionTimeout: Duration?

    /// Creates options; the defaults suit the worker.
    public init(
        connectTimeoutSeconds: Int = 5, statementTimeout: Duration = .seconds(10), applicationName: String = "baton",
        planForKeyLookups: Bool = false, lockTimeout: Duration? = nil, idleInTransactionTimeout: Duration? = nil
    ) {
        self.connectTimeoutSeconds = connectTimeoutSeconds
        self.statementTimeout = statementTimeout
        self.applicationName = applicationName
        self.planForKeyLookups = planForKeyLookups
        self.lockTimeout = lockTimeout
        self.idleInTransactionTimeout = idleInTransactionTimeout
    }

    /// The settings of a worker's connections: key-lookup plans, and every wait bounded — statements
    /// (10 s), lock waits (5 s), idle transactions (5 s), and the server's TCP keepalives so that a dead
    /// client's session (and its locks) go within about 15 s.
    public static func worker(applicationName: String) -> PostgresConnectionOptions {
        PostgresConnectionOptions(
            applicationName: applicationName, planForKeyLookups: true, lockTimeout: .seconds(5), idleInTransactionTimeout: .seconds(5)
        )
    }

    /// The server settings these options ask for, as libpq's `options` string.
    var serverSettings: String {
        var settings = ["statement_timeout=\(statementTimeout.wholeMilliseconds)"]
        if planForKeyLookups { settings += ["plan_cache_mode=force_generic_plan", "enable_seqscan=off"] }
        if let lockTimeout { settings.append("lock_timeout=\(lockTimeout.wholeMilliseconds)") }
        if let idleInTransactionTimeout {
            settings.append("idle_in_transaction_session_timeout=\(idleInTransactionTimeout.wholeMilliseconds)")
            settings += ["tcp_keepalives_idle=5", "tcp_keepalives_interval=2", "tcp_keepalives_count=3"]
        }
        return settings.map { "-c " + $0 }.joined(separator: " ")
    }
}

/// One libpq connection, owned by a dedicated thread.
///
/// Use ``withSession(_:)`` to run a unit of work (a transaction, a few statements)
/// on the connection's thread; the work sees a ``PostgresSession`` that is only
/// valid inside the closure. Jobs run one at a time, in submission order. If the
/// connection broke, the next job reconnects first.
public final class PostgresConnection: Sendable {
    /// The URL this connection was made from (prints without its password).
    public let url: PostgresURL
    private let thread: ConnectionThread
    private let handle: ConnectionHandle

    private init(url: PostgresURL, thread: ConnectionThread, handle: ConnectionHandle) {
        self.url = url
        self.thread = thread
        self.handle = handle
    }

    /// Connects to `url`.
    public static func connect(
        to url: PostgresURL, options: PostgresConnectionOptions = .init(), logger: Logger = Logger(label: "baton.postgres")
    ) async throws -> PostgresConnection {
        let thread = ConnectionThread(name: "baton.postgres \(url.host):\(url.port)")
        let handle = ConnectionHandle(url: url, options: options, logger: logger)
        let connection = PostgresConnection(url: url, thread: thread, handle: handle)
        do {
            try await thread.run { try handle.open() }
        } catch {
            await connection.close()
            throw error
        }
        return connection
    }

    /// Runs `body` with a new connection to `url`, closed afterwards whatever happens.
    public static func withConnection<T>(
        to url: PostgresURL, options: PostgresConnectionOptions = .init(), logger: Logger = Logger(label: "baton.postgres"),
        _ body: (PostgresConnection) async throws -> T
    ) async throws -> T {
        try await withClosing(try await connect(to: url, options: options, logger: logger), close: { await $0.close() }, body)
    }

    /// Runs `body` on the connection's thread with exclusive use of the connection.
    ///
    /// Reconnects first if the connection broke. A ``PostgresError`` with code
    /// ``PostgresError/Code/connectionLost`` means the outcome of the last statement is unknown.
    public func withSession<T: Sendable>(_ body: @escaping @Sendable (PostgresSession) throws -> T) async throws -> T {
        let handle = self.handle
        return try await thread.run {
            try handle.ensureOpen()
            return try body(PostgresSession(handle: handle))
        }
    }

    /// Runs `body` on the connection's thread without suspending the caller: with the session (after
    /// reconnecting if the connection broke), or with why there is none (closed, cannot reconnect).
    public func submit(_ body: @escaping @Sendable (Result<PostgresSession, any Error>) -> Void) {
        let handle = self.handle
        thread.submit(
            { body(Result { try handle.ensureOpen(); return PostgresSession(handle: handle) }) },
            refused: { body(.failure(PostgresError(code: .closed, message: "the connection was closed"))) }
        )
    }

    /// Closes the connection after the jobs already submitted; later jobs fail with ``PostgresError/Code/closed``.
    public func close() async {
        let handle = self.handle
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let stopping = thread.stop {
                handle.finish()
                continuation.resume()
            }
            if !stopping { continuation.resume() }  // already closed or closing
        }
    }

    deinit {
        let handle = self.handle
        thread.stop { handle.finish() }
    }
}

/// The raw `PGconn` and the names of the statements prepared on it.
///
/// `@unchecked Sendable`: it is created on any thread but every use of `conn` and
/// `prepared` happens on the owning ``ConnectionThread``, one job at a time.
final class ConnectionHandle: @unchecked Sendable {
    let url: PostgresURL
    let options: PostgresConnectionOptions
    let logger: Logger
    private(set) var conn: OpaquePointer?
    var prepared: Set<String> = []

    init(url: PostgresURL, options: PostgresConnectionOptions, logger: Logger) {
        self.url = url
        self.options = options
        self.logger = logger
    }

    func open() throws {
        finish()
        var pairs: [(String, String)] = [
            ("host", url.endpoints.map(\.host).joined(separator: ",")), ("port", url.endpoints.map { String($0.port) }.joined(separator: ",")),
            ("user", url.user), ("dbname", url.database),
            ("connect_timeout", String(options.connectTimeoutSeconds)),
            ("application_name", options.applicationName),
            ("options", options.serverSettings),
            ("keepalives", "1"), ("keepalives_idle", "5"), ("keepalives_interval", "2"), ("keepalives_count", "3"),
            ("tcp_user_timeout", "10000"),
        ]
        if let password = url.password { pairs.append(("password", password)) }
        for (key, value) in url.parameters.sorted(by: { $0.key < $1.key }) {
            pairs.removeAll { $0.0 == key }
            pairs.append((key, value))
        }
        let keys = pairs.map { strdup($0.0) }
        let values = pairs.map { strdup($0.1) }
        defer {
            keys.forEach { free($0) }
            values.forEach { free($0) }
        }
        var keyPointers = keys.map { UnsafePointer<CChar>($0) } + [nil]
        var valuePointers = values.map { UnsafePointer<CChar>($0) } + [nil]
        let conn = PQconnectdbParams(&keyPointers, &valuePointers, 0)
        guard let conn, PQstatus(conn) == CONNECTION_OK else {
            let message = conn.map { scrub(String(cString: PQerrorMessage($0))) } ?? "out of memory"
            if let conn { PQfinish(conn) }
            throw PostgresError(code: .connectionFailed, message: "cannot connect to \(url): \(message)")
        }
        self.conn = conn
        prepared.removeAll()
        logger.debug("connected to PostgreSQL", metadata: ["baton.database": "\(url)"])
    }

    func ensureOpen() throws {
        guard let conn, PQstatus(conn) == CONNECTION_OK else {
            logger.info("reconnecting to PostgreSQL", metadata: ["baton.database": "\(url)"])
            try open()
            return
        }
    }

    func finish() {
        if let conn { PQfinish(conn) }
        conn = nil
        prepared.removeAll()
    }

    /// The message with the password removed, should a server or libpq ever echo it.
    func scrub(_ message: String) -> String {
        var text = message.trimmingCharacters(in: .whitespacesAndNewlines)
        if let password = url.password, password.count >= 3 {
            text = text.replacingOccurrences(of: password, with: "********")
        }
        return text
    }
}
