import BatonCore

// The store's rows and parameters as types: each row is decoded column by column, and a missing,
// NULL or malformed value throws (naming the column) instead of decoding as a default.

extension PostgresRow {
    /// A text column holding one of `T`'s raw values.
    public func decode<T: RawRepresentable>(_ index: Int, _ name: String, as type: T.Type = T.self) throws -> T where T.RawValue == String {
        let text: String = try decode(index, name)
        guard let value = T(rawValue: text) else {
            throw PostgresError(code: .unexpectedResult, message: "\(source) returned an unknown \(name) '\(text.prefix(60))' (column \(index + 1))")
        }
        return value
    }

    /// A boolean column (PostgreSQL's text form `t` / `f`).
    public func flag(_ index: Int, _ name: String) throws -> Bool {
        switch try decode(index, name, as: String.self) {
        case "t": true
        case "f": false
        case let other: throw PostgresError(code: .unexpectedResult, message: "\(source) returned '\(other.prefix(10))' for the boolean \(name) (column \(index + 1))")
        }
    }

    /// A column of milliseconds since the epoch.
    public func timestamp(_ index: Int, _ name: String) throws -> Timestamp {
        Timestamp(milliseconds: try decode(index, name))
    }
}

/// A buffer row: `buffer, holder_user, holder_connection, token, expires_ms, version, holder_principal,
/// issued` from column `offset` on. The holder is present only with both its user and its connection.
struct BufferRow {
    let buffer: ExactString
    let state: BufferState
    let version: Int64

    init(_ row: PostgresRow, from offset: Int) throws {
        buffer = ExactString(try row.decode(offset, "buffer"))
        let user = try row.optional(offset + 1, "holder_user")
        let connection = try row.optional(offset + 2, "holder_connection")
        let holder = user.flatMap { user in connection.map { Holder(user: user, connection: $0) } }
        let expires = try row.optional(offset + 4, "expires_at").map { _ in try row.timestamp(offset + 4, "expires_at") }
        var state = BufferState(
            holder: holder, token: try row.decode(offset + 3, "token"), expiresAt: expires, principal: try row.optional(offset + 6, "holder_principal"),
            issued: try row.decode(offset + 7, "issued")
        )
        do {
            state.roster = try Roster(storedText: try row.optional(offset + 8, "roster"))
        } catch {
            throw PostgresError(code: .unexpectedResult, message: "the roster of buffer '\(LogValue.escape(buffer.string))' in \(row.source) cannot be read: \(error)")
        }
        self.state = state
        version = try row.decode(offset + 5, "version")
    }
}

/// A row of the batch read (``BatchRead/sql``), told apart by its first column.
enum BatchReadRow {
    /// `f`: the partition's epoch (nil when the partition does not exist) and the database clock.
    case fence(epoch: Int64?, clock: Timestamp)
    /// `r`: the reply already given to a request id, and the fingerprint of the request it answered.
    case stored(requestID: ExactString, reply: Reply, fingerprint: String?)
    /// `b`: a buffer the batch touches.
    case buffer(BufferRow)
    /// `w`: a claim waiting in a touched buffer's line.
    case waiter(WaiterRow)

    private enum Kind: String {
        case fence = "f", stored = "r", buffer = "b", waiter = "w"
    }

    init(_ row: PostgresRow) throws {
        switch try row.decode(0, "row kind", as: Kind.self) {
        case .fence:
            self = .fence(epoch: try row.optional(1, "epoch").map { _ in try row.decode(1, "epoch") }, clock: try row.timestamp(2, "clock"))
        case .stored:
            let id: String = try row.decode(1, "request_id")
            guard let reply = try? ProtocolCodec.decodeReply(Array(try row.decode(2, "reply", as: String.self).utf8)) else {
                // Deciding again could apply a request twice: refuse instead.
                throw PostgresError(code: .unexpectedResult, message: "the stored reply of request '\(LogValue.escape(id))' in \(row.source) cannot be decoded")
            }
            self = .stored(requestID: ExactString(id), reply: reply, fingerprint: try row.optional(3, "fingerprint"))
        case .buffer:
            self = .buffer(try BufferRow(row, from: 1))
        case .waiter:
            self = .waiter(try WaiterRow(row, from: 1))
        }
    }
}

/// A waiter row: `buffer, request_id, holder_user, holder_connection, principal, lease_ms, until_ms,
/// reply_to, correlation_id, fingerprint, position` from column `offset` on.
struct WaiterRow {
    let buffer: ExactString
    let position: Int64
    let waiter: Waiter

    init(_ row: PostgresRow, from offset: Int) throws {
        buffer = ExactString(try row.decode(offset, "buffer"))
        waiter = Waiter(
            requestID: try row.decode(offset + 1, "request_id"),
            holder: Holder(user: try row.decode(offset + 2, "holder_user"), connection: try row.decode(offset + 3, "holder_connection")),
            principal: try row.optional(offset + 4, "principal"), leaseMilliseconds: try row.decode(offset + 5, "lease_ms"),
            waitUntil: try row.timestamp(offset + 6, "wait_until"), replyTo: try row.optional(offset + 7, "reply_to"),
            correlationID: try row.optional(offset + 8, "correlation_id"), fingerprint: try row.decode(offset + 9, "fingerprint")
        )
        position = try row.decode(offset + 10, "position")
    }

    /// The lines of `rows`, per buffer, in the order of position.
    static func lines(_ rows: [WaiterRow]) -> [ExactString: [Waiter]] {
        Dictionary(grouping: rows.sorted { $0.position < $1.position }, by: \.buffer).mapValues { $0.map(\.waiter) }
    }
}

extension OwnershipChange {
    /// Decodes `kind, buffer, holder_user, holder_connection, token, at_ms, expires_ms, forced` and, when
    /// `principal` is true, `principal`, from column `offset` on.
    public init(row: PostgresRow, from offset: Int, principal: Bool) throws {
        self.init(
            kind: try row.decode(offset, "kind"), buffer: try row.decode(offset + 1, "buffer"),
            holder: Holder(user: try row.decode(offset + 2, "holder_user"), connection: try row.decode(offset + 3, "holder_connection")),
            token: try row.decode(offset + 4, "token"), at: try row.timestamp(offset + 5, "at"), expiresAt: try row.timestamp(offset + 6, "expires_at"),
            forced: try row.flag(offset + 7, "forced"), principal: principal ? try row.optional(offset + 9, "principal") : nil,
            replicaID: try row.optional(offset + 8, "replica_id").map { _ in try row.decode(offset + 8, "replica_id", as: Int.self) }
        )
    }
}
