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

/// A row of the batch read (``SQL/readBatch``), told apart by its first column.
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

/// Everything one batch (or sweep) writes, in the one fenced statement ``SQL/write``: buffers by
/// compare-and-set on the token and version read, idempotency records, outbox rows.
struct BatchWrite {
    let partition: Int
    let epoch: Int64
    let now: Timestamp
    /// Changed buffers, sorted (a fixed order keeps concurrent writers from deadlocking), with the state
    /// to write and the token and version they had when read (version 0: absent, to be inserted).
    var buffers: [(buffer: ExactString, state: BufferState, expectedToken: Int64, expectedVersion: Int64)] = []
    var records: [RequestRecord] = []
    /// Changes in decision order, with the request that made each (nil for expiries).
    var changes: [AttributedChange] = []
    /// Leases this write makes that the lease sweep's schedule may not cover yet: every grant (a new
    /// token), and every lease whose end moves earlier than it was (a renewal or a re-claim with a shorter
    /// lease), with their ends (``ExpirySchedule``).
    var leases: [(buffer: ExactString, end: Int64)] = []
    /// Waiters that left their lines (by request id), joined them (in order), or moved their reply address.
    var waitersRemoved: [String] = []
    var waitersAdded: [(buffer: String, waiter: Waiter)] = []
    var waitersMoved: [Waiter] = []

    var isEmpty: Bool { buffers.isEmpty && records.isEmpty && changes.isEmpty }

    /// The line differences between `initial` and `after` of the written buffers.
    mutating func lines(from initial: [ExactString: BufferState]) {
        for (buffer, state) in buffers.map({ ($0.buffer, $0.state) }) {
            let before = initial[buffer]?.line ?? []
            let beforeIDs = Dictionary(before.map { (ExactString($0.requestID), $0) }, uniquingKeysWith: { first, _ in first })
            let afterIDs = Set(state.line.map { ExactString($0.requestID) })
            waitersRemoved += before.filter { !afterIDs.contains(ExactString($0.requestID)) }.map(\.requestID)
            for waiter in state.line {
                if let old = beforeIDs[ExactString(waiter.requestID)] {
                    if old != waiter { waitersMoved.append(waiter) }
                } else {
                    waitersAdded.append((buffer.string, waiter))
                }
            }
        }
    }

    /// Whether a line changes: then the write is ``SQL/writeWithLines`` ($1 to $43), else ``SQL/write`` ($1 to $29).
    var changesLines: Bool { !(waitersRemoved.isEmpty && waitersAdded.isEmpty && waitersMoved.isEmpty) }

    /// The statement that writes this.
    var statement: PreparedStatement { changesLines ? SQL.writeWithLines : SQL.write }

    /// The parameters of ``statement``, in its numbering ($1 to $29; with lines, $1 to $43).
    var parameters: [String?] {
        changesLines ? baseParameters + lineParameters : baseParameters
    }

    private var baseParameters: [String?] {
        let list = changes.map(\.change)
        let states = buffers.map(\.state)
        return [
            /* $1 */ String(partition), /* $2 */ String(now.milliseconds),
            /* $3-$9: buffers */
            PostgresArray.text(buffers.map(\.buffer.string)),
            PostgresArray.text(states.map { $0.holder?.user }),
            PostgresArray.text(states.map { $0.holder?.connection }),
            PostgresArray.integers(states.map { Optional($0.token) }),
            PostgresArray.integers(states.map { $0.expiresAt?.milliseconds }),
            PostgresArray.integers(buffers.map { Optional($0.expectedToken) }),
            PostgresArray.integers(buffers.map { Optional($0.expectedVersion) }),
            /* $10-$11: records */
            PostgresArray.text(records.map(\.id)),
            PostgresArray.text(records.map { String(decoding: ProtocolCodec.encode($0.reply), as: UTF8.self) }),
            /* $12-$19: outbox */
            PostgresArray.text(list.map(\.kind.rawValue)),
            PostgresArray.text(list.map(\.buffer)),
            PostgresArray.text(list.map(\.holder.user)),
            PostgresArray.text(list.map(\.holder.connection)),
            PostgresArray.integers(list.map { Optional($0.token) }),
            PostgresArray.integers(list.map { Optional($0.at.milliseconds) }),
            PostgresArray.integers(list.map { Optional($0.expiresAt.milliseconds) }),
            PostgresArray.text(changes.map(\.requestID)),
            /* $20 */ String(epoch), /* $21 */ String(buffers.count), /* $22 */ String(records.count),
            /* $23 */ "{" + list.map { $0.forced ? "t" : "f" }.joined(separator: ",") + "}",
            /* $24 */ PostgresArray.text(states.map(\.principal)),
            /* $25 */ PostgresArray.text(records.map(\.fingerprint)),
            /* $26 */ PostgresArray.text(list.map(\.principal)),
            /* $27 */ PostgresArray.integers(states.map { Optional($0.issued) }),
            /* $28 */ PostgresArray.text(states.map(\.roster.storedText)),
            /* $29 */ PostgresArray.integers(list.map { $0.replicaID.map(Int64.init) }),
        ]
    }

    private var lineParameters: [String?] {
        [
            /* $30 */ PostgresArray.text(waitersRemoved),
            /* $31-$40: waiters that joined */
            PostgresArray.text(waitersAdded.map(\.buffer)),
            PostgresArray.text(waitersAdded.map(\.waiter.requestID)),
            PostgresArray.text(waitersAdded.map(\.waiter.holder.user)),
            PostgresArray.text(waitersAdded.map(\.waiter.holder.connection)),
            PostgresArray.text(waitersAdded.map(\.waiter.principal)),
            PostgresArray.integers(waitersAdded.map { Optional($0.waiter.leaseMilliseconds) }),
            PostgresArray.integers(waitersAdded.map { Optional($0.waiter.waitUntil.milliseconds) }),
            PostgresArray.text(waitersAdded.map(\.waiter.replyTo)),
            PostgresArray.text(waitersAdded.map(\.waiter.correlationID)),
            PostgresArray.text(waitersAdded.map(\.waiter.fingerprint)),
            /* $41-$43: waiters that moved their reply address */
            PostgresArray.text(waitersMoved.map(\.requestID)),
            PostgresArray.text(waitersMoved.map(\.replyTo)),
            PostgresArray.text(waitersMoved.map(\.correlationID)),
        ]
    }

    /// Checks the statement's result row (`written, recorded, outbox ids, epoch, abort, clock`) and returns
    /// the outbox ids, in the order of `changes`, and the database clock read at the statement's end.
    ///
    /// - Throws: ``StoreError`` when the fence was lost, ``CompareAndSetMiss`` when another writer changed
    ///   a buffer or recorded a request id first.
    func check(_ row: PostgresRow) throws -> (ids: [Int64], clock: Timestamp) {
        try OwnershipStore.checkEpoch(try row.optional(3, "epoch").map { _ in try row.decode(3, "epoch") }, partition: partition, epoch: epoch)
        let written: Int = try row.decode(0, "rows written")
        let recorded: Int = try row.decode(1, "records written")
        guard written == buffers.count, recorded == records.count else {
            throw CompareAndSetMiss(missed: buffers.count - written + records.count - recorded)
        }
        return (PostgresArray.parseIntegers(try row.optional(2, "outbox ids")), try row.timestamp(5, "clock"))
    }
}
