/// An error from PostgreSQL or libpq.
///
/// Server errors expose their SQLSTATE, message and detail. No description
/// ever contains a password or a bound parameter value.
public struct PostgresError: Error, Sendable, CustomStringConvertible {
    /// What kind of failure this is; extensible.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private let name: String
        private init(_ name: String) { self.name = name }

        /// The database URL cannot be used.
        public static let invalidURL = Code("invalid URL")
        /// Connecting (or reconnecting) failed.
        public static let connectionFailed = Code("connection failed")
        /// The connection broke during a statement; its outcome is unknown.
        public static let connectionLost = Code("connection lost")
        /// The server rejected a statement; see ``PostgresError/sqlState``.
        public static let server = Code("server error")
        /// A statement returned something this code does not expect.
        public static let unexpectedResult = Code("unexpected result")
        /// The connection was closed by its owner.
        public static let closed = Code("connection closed")

        public var description: String { name }
    }

    /// What kind of failure this is.
    public var code: Code
    /// The SQLSTATE for server errors (`40001` serialization failure, `40P01` deadlock, `23505` unique violation, `57014` statement timeout).
    public var sqlState: String?
    /// The primary message.
    public var message: String
    /// The server's detail, if any.
    public var detail: String?
    /// The server's hint, if any.
    public var hint: String?

    /// Creates an error.
    public init(code: Code, sqlState: String? = nil, message: String, detail: String? = nil, hint: String? = nil) {
        self.code = code
        self.sqlState = sqlState
        self.message = message
        self.detail = detail
        self.hint = hint
    }

    /// True for failures that a retry of the whole transaction may fix: serialization failures,
    /// deadlocks, and a connection lost mid-statement.
    public var isTransient: Bool {
        code == .connectionLost || code == .connectionFailed || sqlState == "40001" || sqlState == "40P01"
    }

    /// True for server errors caused by the data a statement writes rather than by the server or the
    /// connection: data exceptions (class 22), integrity constraint violations (23) and program limits
    /// (54, e.g. an index row too large). Retrying the same write cannot succeed; the worker isolates the
    /// request that causes it and answers it with an error instead of retrying its whole batch forever.
    public var isCausedByData: Bool {
        guard code == .server, let sqlState, sqlState.count == 5 else { return false }
        return ["22", "23", "54"].contains(String(sqlState.prefix(2)))
    }

    public var description: String {
        var text = "PostgreSQL \(code)"
        if let sqlState { text += " \(sqlState)" }
        text += ": \(message)"
        if let detail { text += " (\(detail))" }
        if let hint { text += " Hint: \(hint)" }
        return text
    }
}
