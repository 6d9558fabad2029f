import CLibPQ
import Foundation

/// A statement prepared once per connection, on first use, under a fixed name.
public struct PreparedStatement: Sendable, Hashable {
    /// The name of the prepared statement on the server.
    public let name: String
    /// The SQL, with `$1`-style parameters.
    public let sql: String

    /// Creates a prepared statement.
    public init(name: String, sql: String) {
        self.name = name
        self.sql = sql
    }
}

/// The rows a statement returned, copied out of libpq (text format).
public struct PostgresRows: Sendable {
    /// The rows; nil is SQL NULL.
    public let rows: [[String?]]
    /// Rows inserted, updated or deleted (`PQcmdTuples`), 0 for other statements.
    public let affectedRows: Int

    /// The single value of the first row's `column`, or nil when there is no row or it is NULL.
    public func first(_ column: Int = 0) -> String? {
        rows.first.flatMap { $0[column] }
    }
}

/// Exclusive use of one connection, valid only inside ``PostgresConnection/withSession(_:)``.
///
/// Every method blocks the connection's own thread, never the cooperative pool.
public final class PostgresSession {
    private let handle: ConnectionHandle

    init(handle: ConnectionHandle) {
        self.handle = handle
    }

    /// Runs `sql` with text parameters (`$1`...), unprepared.
    @discardableResult
    public func query(_ sql: String, _ parameters: [String?] = []) throws -> PostgresRows {
        try withCStrings(parameters) { values in
            try collect(PQexecParams(try conn(), sql, Int32(values.count), nil, values, nil, nil, 0))
        }
    }

    /// Runs one or more `;`-separated statements without parameters (for migrations).
    public func execute(script sql: String) throws {
        _ = try collect(PQexec(try conn(), sql))
    }

    /// Runs a prepared statement, preparing it on this connection the first time.
    @discardableResult
    public func query(_ statement: PreparedStatement, _ parameters: [String?] = []) throws -> PostgresRows {
        let conn = try conn()
        if !handle.prepared.contains(statement.name) {
            _ = try collect(PQprepare(conn, statement.name, statement.sql, 0, nil))
            handle.prepared.insert(statement.name)
        }
        return try withCStrings(parameters) { values in
            try collect(PQexecPrepared(conn, statement.name, Int32(values.count), values, nil, nil, 0))
        }
    }

    /// Sends prepared statements in one pipeline (libpq pipeline mode, one round trip) and returns each
    /// one's outcome, in order. They run in one implicit transaction that commits at the end: when one
    /// fails, the transaction rolls back and the statements after it are not run (each of those gets an
    /// ``PostgresError/Code/unexpectedResult`` "not run"). A lost connection throws.
    public func pipeline(_ statements: [(PreparedStatement, [String?])]) throws -> [Result<PostgresRows, PostgresError>] {
        let conn = try conn()
        for (statement, _) in statements where !handle.prepared.contains(statement.name) {
            _ = try collect(PQprepare(conn, statement.name, statement.sql, 0, nil))
            handle.prepared.insert(statement.name)
        }
        guard PQenterPipelineMode(conn) == 1 else { throw lostOrFailed(fallback: "cannot enter pipeline mode") }
        do {
            let outcomes = try runPipeline(conn, statements)
            PQexitPipelineMode(conn)
            return outcomes
        } catch {
            // Results may be left unread, and the writes may or may not have committed: the connection
            // cannot be used for anything else now. Drop it (the next session reconnects), and report the
            // outcome as unknown, as for any connection lost mid-statement.
            handle.finish()
            if let error = error as? PostgresError, error.code == .connectionLost { throw error }
            throw PostgresError(code: .connectionLost, message: "a pipeline broke off (\(error)); its outcome is unknown")
        }
    }

    private func runPipeline(_ conn: OpaquePointer, _ statements: [(PreparedStatement, [String?])]) throws -> [Result<PostgresRows, PostgresError>] {
        for (statement, parameters) in statements {
            let sent = try withCStrings(parameters) { values in
                PQsendQueryPrepared(conn, statement.name, Int32(values.count), values, nil, nil, 0)
            }
            guard sent == 1 else { throw lostOrFailed(fallback: "cannot send \(statement.name)") }
        }
        guard PQpipelineSync(conn) == 1 else { throw lostOrFailed(fallback: "cannot send the pipeline's sync") }
        var outcomes: [Result<PostgresRows, PostgresError>] = []
        outcomes.reserveCapacity(statements.count)
        for _ in statements {
            guard let result = PQgetResult(conn) else { throw lostOrFailed(fallback: "a pipelined statement returned no result") }
            if PQresultStatus(result) == PGRES_PIPELINE_ABORTED {
                PQclear(result)
                outcomes.append(.failure(PostgresError(code: .unexpectedResult, message: "not run: an earlier statement of its pipeline failed")))
            } else {
                do {
                    outcomes.append(.success(try collect(result)))
                } catch let error as PostgresError {
                    outcomes.append(.failure(error))
                }
            }
            // Each statement's results end with a null result.
            while let extra = PQgetResult(conn) { PQclear(extra) }
        }
        // The sync's own result ends the pipeline.
        guard let sync = PQgetResult(conn) else { throw lostOrFailed(fallback: "the pipeline's sync returned no result") }
        let synced = PQresultStatus(sync) == PGRES_PIPELINE_SYNC
        PQclear(sync)
        guard synced else { throw lostOrFailed(fallback: "the pipeline did not end with its sync") }
        return outcomes
    }

    /// Runs `body` in a transaction: commits when it returns, rolls back when it throws.
    public func transaction<T>(_ body: () throws -> T) throws -> T {
        try query("BEGIN")
        let result: T
        do {
            result = try body()
        } catch {
            rollbackQuietly()
            throw error
        }
        try query("COMMIT")
        return result
    }

    private func rollbackQuietly() {
        guard let conn = handle.conn, PQstatus(conn) == CONNECTION_OK else { return }
        PQclear(PQexec(conn, "ROLLBACK"))
    }

    private func conn() throws -> OpaquePointer {
        guard let conn = handle.conn else {
            throw PostgresError(code: .connectionLost, message: "not connected to \(handle.url)")
        }
        return conn
    }

    /// Copies a result out of libpq and frees it, turning failures into ``PostgresError``.
    private func collect(_ result: OpaquePointer?) throws -> PostgresRows {
        guard let result else {
            throw lostOrFailed(fallback: "no result")
        }
        defer { PQclear(result) }
        switch PQresultStatus(result) {
        case PGRES_COMMAND_OK, PGRES_TUPLES_OK, PGRES_EMPTY_QUERY:
            let columnCount = Int(PQnfields(result))
            let rowCount = Int(PQntuples(result))
            var rows: [[String?]] = []
            rows.reserveCapacity(rowCount)
            for row in 0..<Int32(rowCount) {
                rows.append((0..<Int32(columnCount)).map { column in
                    PQgetisnull(result, row, column) == 1 ? nil : String(cString: PQgetvalue(result, row, column))
                })
            }
            let affected = Int(String(cString: PQcmdTuples(result))) ?? 0
            return PostgresRows(rows: rows, affectedRows: affected)
        default:
            func field(_ code: UInt8) -> String? {
                PQresultErrorField(result, Int32(code)).map { handle.scrub(String(cString: $0)) }
            }
            guard let sqlState = field(UInt8(ascii: "C")) else {
                throw lostOrFailed(fallback: String(cString: PQresultErrorMessage(result)))
            }
            throw PostgresError(
                code: .server, sqlState: sqlState,
                message: field(UInt8(ascii: "M")) ?? "unknown error",
                detail: field(UInt8(ascii: "D")), hint: field(UInt8(ascii: "H"))
            )
        }
    }

    private func lostOrFailed(fallback: String) -> PostgresError {
        if let conn = handle.conn, PQstatus(conn) != CONNECTION_OK {
            return PostgresError(code: .connectionLost, message: "lost the connection to \(handle.url): \(handle.scrub(String(cString: PQerrorMessage(conn))))")
        }
        let message = handle.conn.map { String(cString: PQerrorMessage($0)) } ?? fallback
        return PostgresError(code: .unexpectedResult, message: handle.scrub(message.isEmpty ? fallback : message))
    }
}

/// Calls `body` with the parameters as NUL-terminated C strings that live for the call.
private func withCStrings<T>(_ values: [String?], _ body: ([UnsafePointer<CChar>?]) throws -> T) throws -> T {
    let copies = values.map { $0.map { strdup($0) } ?? nil }
    defer { copies.forEach { free($0) } }
    return try body(copies.map { $0.map { UnsafePointer($0) } })
}

/// PostgreSQL array literals in text form (`{"a","b\"c",NULL}`) for `unnest($1::text[])`.
public enum PostgresArray {
    /// A `text[]` literal.
    public static func text(_ values: some Sequence<String?>) -> String {
        var literal: [UInt8] = [UInt8(ascii: "{")]
        literal.reserveCapacity(values.underestimatedCount * 16 + 2)
        var first = true
        for value in values {
            if !first { literal.append(UInt8(ascii: ",")) }
            first = false
            guard let value else {
                literal += "NULL".utf8
                continue
            }
            literal.append(UInt8(ascii: "\""))
            for byte in value.utf8 {
                if byte == UInt8(ascii: "\"") || byte == UInt8(ascii: "\\") { literal.append(UInt8(ascii: "\\")) }
                literal.append(byte)
            }
            literal.append(UInt8(ascii: "\""))
        }
        literal.append(UInt8(ascii: "}"))
        return String(decoding: literal, as: UTF8.self)
    }

    /// A `bigint[]` or `int[]` literal.
    public static func integers<I: BinaryInteger>(_ values: some Sequence<I?>) -> String {
        "{" + values.map { $0.map { String($0) } ?? "NULL" }.joined(separator: ",") + "}"
    }

    /// Parses a one-dimensional `bigint[]` result such as `{1,2,3}`.
    public static func parseIntegers(_ literal: String?) -> [Int64] {
        guard let literal, literal.count > 2 else { return [] }
        return literal.dropFirst().dropLast().split(separator: ",").compactMap { Int64($0) }
    }
}
