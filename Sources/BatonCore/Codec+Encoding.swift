#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

extension ProtocolCodec {
    /// Encodes a request the way a frontend publishes it (only the fields of its op; `deadline` when set).
    /// The principal is not part of the body: it travels as the AMQP `user_id` property.
    public static func encode(_ request: Request) -> [UInt8] {
        encode(request, deadline: true, principal: false)
    }

    /// What a request asked, for idempotency: every field of the body but `deadline` (a retry may carry a
    /// later one), plus the principal that sent it. A `request_id` seen before is answered from its stored
    /// reply only when this matches byte for byte.
    public static func fingerprint(_ request: Request) -> String {
        String(decoding: encode(request, deadline: false, principal: true), as: UTF8.self)
    }

    private static func encode(_ request: Request, deadline: Bool, principal: Bool) -> [UInt8] {
        var json = JSONWriter(capacity: 192)
        json.integer("v", ProtocolV1.version)
        json.string("op", request.operation.rawValue)
        json.string("request_id", request.requestID)
        if deadline, let value = request.deadline { json.timestamp("deadline", value) }
        if principal { json.string("principal", request.principal) }
        switch request.command {
        case .claim(let buffer, let holder, let lease):
            json.string("buffer", buffer)
            json.string("user", holder.user)
            json.string("connection", holder.connection)
            json.integer("lease_ms", lease)
            if let wait = request.waiting?.milliseconds { json.integer("wait_ms", wait) }
        case .renew(let buffer, let connection, let token, let lease):
            json.string("buffer", buffer)
            json.string("connection", connection)
            json.integer("token", token)
            json.integer("lease_ms", lease)
        case .release(let buffer, let connection, let token):
            json.string("buffer", buffer)
            json.string("connection", connection)
            json.integer("token", token)
        case .inspect(let buffer):
            json.string("buffer", buffer)
        case .releaseConnection(let connection):
            json.string("connection", connection)
        case .forceRelease(let buffer, let reason):
            json.string("buffer", buffer)
            if let reason { json.string("reason", reason) }
        case .describe:
            break
        case .events(let buffer, let after, let limit):
            if let buffer { json.string("buffer", buffer) }
            if let after { json.integer("after", after) }
            if limit != ProtocolV1.maxEventsPerRead { json.integer("limit", limit) }
        case .join(let buffer, let user, let connection, let lease):
            json.string("buffer", buffer)
            json.string("user", user)
            json.string("connection", connection)
            json.integer("lease_ms", lease)
        case .leave(let buffer, let connection, let token):
            json.string("buffer", buffer)
            json.string("connection", connection)
            json.integer("token", token)
        }
        return json.finish()
    }

    /// Encodes a reply body: every field present, absent values as `null`.
    public static func encode(_ reply: Reply) -> [UInt8] {
        var json = JSONWriter()
        json.integer("v", ProtocolV1.version)
        json.string("request_id", reply.requestID)
        json.string("status", reply.status.rawValue)
        json.string("buffer", reply.buffer)
        if let holder = reply.holder {
            json.object("holder") { $0.string("user", holder.user); $0.string("connection", holder.connection) }
        } else {
            json.null("holder")
        }
        json.integer("token", reply.token)
        json.timestamp("expires_at", reply.expiresAt)
        json.timestamp("at", reply.at)
        json.integer("partition", reply.partition)
        if reply.status == .releasedConnection {
            json.strings("buffers", reply.buffers ?? [])
            json.integer("released_count", reply.releasedCount ?? reply.buffers?.count ?? 0)
            if let ended = reply.endedMemberships { json.integer("ended_memberships", ended) }
        }
        if reply.status == .state, let roster = reply.roster {
            json.integer("members", roster.count)
            json.raw("roster", eventArray(roster.listed.map { member in
                var item = JSONWriter(capacity: 96)
                item.integer("replica_id", member.replicaID)
                item.string("user", member.user)
                item.string("connection", member.connection)
                item.timestamp("expires_at", member.expiresAt)
                return item.finish()
            }))
        }
        if let membership = reply.membership {
            json.integer("replica_id", membership.replicaID)
            json.integer("members", membership.members)
            json.bool("reclaimed", membership.reclaimed)
        }
        if reply.status == .error, let error = reply.error {
            json.object("error") { $0.string("code", error.code.rawValue); $0.string("message", error.message) }
        }
        if reply.status == .description, let deployment = reply.deployment {
            json.integer("protocol", deployment.protocolVersion)
            json.integer("revision", deployment.revision)
            json.integer("partitions", deployment.partitions)
            json.strings("ops", deployment.ops)
            if let grace = deployment.memberGraceMilliseconds { json.integer("member_grace_ms", grace) }
        }
        if reply.status == .events {
            let page = reply.events ?? EventPage(events: [], position: 0, more: false, missed: false)
            json.raw("events", eventArray(page.events.map(encodeEvent)))
            json.integer("position", page.position)
            json.bool("more", page.more)
            json.bool("missed", page.missed)
        }
        return json.finish()
    }

    /// The longest `events` reply a worker sends: the page is cut (`more`) before it grows past this.
    public static let maxEventsReplyBytes = 60 * 1024

    /// `page` cut to what fits in one reply of at most ``maxEventsReplyBytes`` (with room for the reply's
    /// other fields, `buffer` of up to 6 KiB escaped included): later events are left for the next read,
    /// `position` moves back to the last event kept and `more` is set. At least one event is kept (an
    /// event is at most about 4 KiB even with every name escaped).
    public static func fitting(_ page: EventPage) -> EventPage {
        var budget = maxEventsReplyBytes - 8 * 1024
        var kept = 0
        for event in page.events {
            let size = encodeEvent(event).count + 1
            if kept > 0, size > budget { break }
            budget -= size
            kept += 1
        }
        guard kept < page.events.count else { return page }
        return EventPage(events: Array(page.events.prefix(kept)), position: page.events[kept - 1].seq, more: true, missed: page.missed)
    }

    static func eventArray(_ bodies: [[UInt8]]) -> [UInt8] {
        var bytes: [UInt8] = [UInt8(ascii: "[")]
        bytes.reserveCapacity(bodies.reduce(2) { $0 + $1.count + 1 })
        for (index, body) in bodies.enumerated() {
            if index > 0 { bytes.append(UInt8(ascii: ",")) }
            bytes += body
        }
        bytes.append(UInt8(ascii: "]"))
        return bytes
    }

    /// Decodes a reply body (what a client receives). Unknown fields are ignored (docs/protocol.md).
    public static func decodeReply(_ body: some Collection<UInt8>) throws(ReplyDecodingError) -> Reply {
        let object = try replyObject(body)
        if case .string("batch")? = object["status"] { throw ReplyDecodingError("a batch reply carries several replies: decode it with decodeReplies") }
        return try reply(from: object)
    }

    /// Decodes a reply message: one reply, or the replies to a batch in its order.
    public static func decodeReplies(_ body: some Collection<UInt8>) throws(ReplyDecodingError) -> [Reply] {
        try decodeReplyMessage(body).replies
    }

    /// The replies a reply message carries and, for a part of a batch reply, the batch element its first
    /// reply answers (`first`; nil for a reply to a single request or to a message refused whole).
    public static func decodeReplyMessage(_ body: some Collection<UInt8>) throws(ReplyDecodingError) -> (first: Int?, replies: [Reply]) {
        let object = try replyObject(body)
        guard case .string("batch")? = object["status"] else { return (nil, [try reply(from: object)]) }
        guard case .array(let items)? = object["replies"] else { throw ReplyDecodingError("a batch reply without a 'replies' array") }
        var first = 0
        if case .integer(let value)? = object["first"], value >= 0, value < Int64(ProtocolV1.maxBatchCount) { first = Int(value) }
        let replies = try items.map { item throws(ReplyDecodingError) in
            guard case .object(let fields) = item else { throw ReplyDecodingError("a batch reply element is \(item.kindDescription), not an object") }
            return try reply(from: fields)
        }
        return (first, replies)
    }

    private static func replyObject(_ body: some Collection<UInt8>) throws(ReplyDecodingError) -> [String: JSONValue] {
        let value: JSONValue
        do {
            value = try JSONParser.parse(Array(body))
        } catch {
            throw ReplyDecodingError("not JSON at byte \(error.offset): \(error.reason)")
        }
        guard case .object(let fields) = value else { throw ReplyDecodingError("the reply is \(value.kindDescription), not an object") }
        return fields
    }

    private static func reply(from fields: [String: JSONValue]) throws(ReplyDecodingError) -> Reply {
        func string(_ key: String) throws(ReplyDecodingError) -> String? {
            switch fields[key] {
            case nil, .null?: return nil
            case .string(let value)?: return value
            case let other?: throw ReplyDecodingError("'\(key)' is \(other.kindDescription), not a string")
            }
        }
        func integer(_ key: String) throws(ReplyDecodingError) -> Int64? {
            switch fields[key] {
            case nil, .null?: return nil
            case .integer(let value)?: return value
            case let other?: throw ReplyDecodingError("'\(key)' is \(other.excerpt), not an integer")
            }
        }
        func timestamp(_ key: String) throws(ReplyDecodingError) -> Timestamp? {
            guard let text = try string(key) else { return nil }
            guard let value = Timestamp(rfc3339: text) else {
                throw ReplyDecodingError("'\(key)' is '\(text.replacingControlCharacters())', not a timestamp like 2026-11-28T00:15:44.123Z")
            }
            return value
        }
        func object(_ key: String) throws(ReplyDecodingError) -> [String: JSONValue]? {
            switch fields[key] {
            case nil, .null?: return nil
            case .object(let value)?: return value
            case let other?: throw ReplyDecodingError("'\(key)' is \(other.kindDescription), not an object")
            }
        }
        guard try integer("v") != nil else { throw ReplyDecodingError("the reply has no version 'v'") }
        guard let statusName = try string("status") else { throw ReplyDecodingError("the reply has no 'status'") }
        // A status or error code of a later revision reads as an error (docs/protocol.md, "Compatibility rules").
        guard let status = ReplyStatus(rawValue: statusName) else {
            return Reply(
                requestID: try string("request_id"), status: .error, buffer: try string("buffer"), partition: try integer("partition").map { Int($0) },
                error: ReplyError(code: .internalError, message: "the reply's status '\(statusName.replacingControlCharacters())' is not one this client knows")
            )
        }
        var holder: Holder?
        if let fields = try object("holder") {
            guard case .string(let user)? = fields["user"], case .string(let connection)? = fields["connection"] else {
                throw ReplyDecodingError("'holder' needs the strings 'user' and 'connection'")
            }
            holder = Holder(user: user, connection: connection)
        }
        var error: ReplyError?
        if let fields = try object("error") {
            guard case .string(let name)? = fields["code"], case .string(let message)? = fields["message"] else {
                throw ReplyDecodingError("'error' needs the strings 'code' and 'message'")
            }
            if let code = ErrorCode(rawValue: name) {
                error = ReplyError(code: code, message: message)
            } else {
                error = ReplyError(code: .internalError, message: "\(name.replacingControlCharacters()): \(message)")
            }
        }
        var buffers: [String]?
        switch fields["buffers"] {
        case nil, .null?: break
        case .array(let items)?:
            buffers = try items.map { item throws(ReplyDecodingError) in
                guard case .string(let name) = item else { throw ReplyDecodingError("'buffers' holds \(item.kindDescription), not a string") }
                return name
            }
        case let other?: throw ReplyDecodingError("'buffers' is \(other.kindDescription), not an array")
        }
        var deployment: DeploymentDescription?
        if status == .description {
            guard let version = try integer("protocol"), let revision = try integer("revision"), let partitions = try integer("partitions"),
                  case .array(let ops)? = fields["ops"] else {
                throw ReplyDecodingError("a description needs the integers 'protocol', 'revision', 'partitions' and the array 'ops'")
            }
            deployment = DeploymentDescription(
                protocolVersion: Int(version), revision: Int(revision), partitions: Int(partitions),
                ops: ops.compactMap { if case .string(let op) = $0 { op } else { nil } }, memberGraceMilliseconds: try integer("member_grace_ms")
            )
        }
        var page: EventPage?
        if status == .events {
            guard case .array(let items)? = fields["events"], let position = try integer("position"),
                  case .bool(let more)? = fields["more"], case .bool(let missed)? = fields["missed"] else {
                throw ReplyDecodingError("an events reply needs 'events', 'position', 'more' and 'missed'")
            }
            page = EventPage(events: try items.map(event), position: position, more: more, missed: missed)
        }
        var roster: RosterView?
        if status == .state, let count = try integer("members") {
            guard case .array(let items)? = fields["roster"] else { throw ReplyDecodingError("a state reply with 'members' needs the array 'roster'") }
            roster = RosterView(count: Int(count), listed: try items.map { item throws(ReplyDecodingError) in
                guard case .object(let member) = item, case .integer(let id)? = member["replica_id"], case .string(let user)? = member["user"],
                      case .string(let connection)? = member["connection"], case .string(let expires)? = member["expires_at"],
                      let expiresAt = Timestamp(rfc3339: expires) else {
                    throw ReplyDecodingError("a 'roster' entry needs 'replica_id', 'user', 'connection' and 'expires_at': \(item.excerpt)")
                }
                return Roster.Member(replicaID: Int(id), user: user, connection: connection, token: 0, expiresAt: expiresAt)
            })
        }
        var membership: MembershipReply?
        if let replicaID = try integer("replica_id") {
            let reclaimed: Bool = if case .bool(true)? = fields["reclaimed"] { true } else { false }
            membership = MembershipReply(replicaID: Int(replicaID), members: Int(try integer("members") ?? 0), reclaimed: reclaimed)
        }
        return Reply(
            requestID: try string("request_id"), status: status, buffer: try string("buffer"), holder: holder, token: try integer("token"),
            expiresAt: try timestamp("expires_at"), at: try timestamp("at"), partition: try integer("partition").map { Int($0) },
            buffers: buffers, releasedCount: try integer("released_count").map { Int($0) }, error: error, deployment: deployment, events: page,
            membership: membership, roster: roster, endedMemberships: try integer("ended_memberships").map { Int($0) }
        )
    }

    /// Decodes an event message from `baton.events`, in either form (docs/protocol.md, section 7.1): the
    /// events it carries, in order. Events of workers before revision 3 have no position (`seq` 0) and take
    /// the envelope's partition, or -1 without one. Unknown fields are ignored.
    public static func decodeEventMessage(_ body: some Collection<UInt8>) throws(ReplyDecodingError) -> [PositionedChange] {
        let object = try replyObject(body)
        guard case .array(let items)? = object["events"] else { return [try event(.object(object))] }
        let envelopePartition: Int? = if case .integer(let value)? = object["partition"] { Int(value) } else { nil }
        return try items.map { item throws(ReplyDecodingError) in
            var decoded = try event(item)
            if decoded.partition < 0, let envelopePartition { decoded.partition = envelopePartition }
            return decoded
        }
    }

    private static func event(_ value: JSONValue) throws(ReplyDecodingError) -> PositionedChange {
        guard case .object(let fields) = value else { throw ReplyDecodingError("an event is \(value.kindDescription), not an object") }
        guard case .string(let kindName)? = fields["kind"], let kind = ChangeKind(rawValue: kindName),
              case .string(let buffer)? = fields["buffer"], case .object(let holder)? = fields["holder"],
              case .string(let user)? = holder["user"], case .string(let connection)? = holder["connection"],
              case .integer(let token)? = fields["token"], case .string(let atText)? = fields["at"], let at = Timestamp(rfc3339: atText) else {
            throw ReplyDecodingError("an event needs 'kind' (\(ChangeKind.allCases.map(\.rawValue).joined(separator: ", "))), 'buffer', 'holder', 'token' and 'at'")
        }
        let seq: Int64 = if case .integer(let value)? = fields["seq"] { value } else { 0 }
        let partition: Int = if case .integer(let value)? = fields["partition"] { Int(value) } else { -1 }
        let forced = if case .bool(true)? = fields["forced"] { true } else { false }
        let replicaID: Int? = if case .integer(let value)? = fields["replica_id"] { Int(value) } else { nil }
        // Events do not carry the lease's end; `at` stands in for it.
        let change = OwnershipChange(
            kind: kind, buffer: buffer, holder: Holder(user: user, connection: connection), token: token, at: at, expiresAt: at, forced: forced, replicaID: replicaID
        )
        return PositionedChange(seq: seq, partition: partition, change: change)
    }

    /// Encodes the event object of an ownership change: the body of a `per-change` event message (routing
    /// key `<p>.<kind>`), each element of a `per-commit` one (``encodeEvents(partition:_:)``) and of an
    /// `events` reply.
    public static func encodeEvent(_ event: PositionedChange) -> [UInt8] {
        let change = event.change
        var json = JSONWriter(capacity: 192)
        json.integer("v", ProtocolV1.version)
        json.string("kind", change.kind.rawValue)
        json.string("buffer", change.buffer)
        json.object("holder") { $0.string("user", change.holder.user); $0.string("connection", change.holder.connection) }
        json.integer("token", change.token)
        json.timestamp("at", change.at)
        if change.forced { json.bool("forced", true) }
        if let replicaID = change.replicaID { json.integer("replica_id", replicaID) }
        json.integer("partition", event.partition)
        json.integer("seq", event.seq)
        return json.finish()
    }

}

/// Why a reply could not be decoded.
public struct ReplyDecodingError: Error, Sendable, Hashable, CustomStringConvertible {
    /// What is wrong, for a person.
    public let description: String

    init(_ description: String) {
        self.description = description
    }
}
