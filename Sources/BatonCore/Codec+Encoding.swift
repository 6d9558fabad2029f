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
        if deadline, let value = request.deadline { json.string("deadline", value.rfc3339) }
        if principal { json.string("principal", request.principal) }
        switch request.command {
        case .claim(let buffer, let holder, let lease):
            json.string("buffer", buffer)
            json.string("user", holder.user)
            json.string("connection", holder.connection)
            json.integer("lease_ms", lease)
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
        json.string("expires_at", reply.expiresAt?.rfc3339)
        json.string("at", reply.at?.rfc3339)
        json.integer("partition", reply.partition)
        if reply.status == .releasedConnection {
            json.strings("buffers", reply.buffers ?? [])
            json.integer("released_count", reply.releasedCount ?? reply.buffers?.count ?? 0)
        }
        if reply.status == .error, let error = reply.error {
            json.object("error") { $0.string("code", error.code.rawValue); $0.string("message", error.message) }
        }
        return json.finish()
    }

    /// Decodes a reply body (what a client receives). Unknown fields are ignored (docs/protocol.md).
    public static func decodeReply(_ body: some Collection<UInt8>) throws(ReplyDecodingError) -> Reply {
        try reply(from: replyObject(body))
    }

    /// Decodes a reply message: one reply, or the replies to a batch in its order.
    public static func decodeReplies(_ body: some Collection<UInt8>) throws(ReplyDecodingError) -> [Reply] {
        let object = try replyObject(body)
        guard case .string("batch")? = object["status"] else { return [try reply(from: object)] }
        guard case .array(let items)? = object["replies"] else { throw ReplyDecodingError("a batch reply without a 'replies' array") }
        return try items.map { item throws(ReplyDecodingError) in
            guard case .object(let fields) = item else { throw ReplyDecodingError("a batch reply element is \(item.kindDescription), not an object") }
            return try reply(from: fields)
        }
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
        guard let status = ReplyStatus(rawValue: statusName) else {
            throw ReplyDecodingError("unknown reply status '\(statusName.replacingControlCharacters())'")
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
            guard let code = ErrorCode(rawValue: name) else { throw ReplyDecodingError("unknown error code '\(name.replacingControlCharacters())'") }
            error = ReplyError(code: code, message: message)
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
        return Reply(
            requestID: try string("request_id"), status: status, buffer: try string("buffer"), holder: holder, token: try integer("token"),
            expiresAt: try timestamp("expires_at"), at: try timestamp("at"), partition: try integer("partition").map { Int($0) },
            buffers: buffers, releasedCount: try integer("released_count").map { Int($0) }, error: error
        )
    }

    /// Encodes the event object of an ownership change: the body of a `per-change` event message (routing
    /// key `<p>.<kind>`), and each element of a `per-commit` one (``encodeEvents(partition:_:)``).
    public static func encodeEvent(_ change: OwnershipChange) -> [UInt8] {
        var json = JSONWriter(capacity: 160)
        json.integer("v", ProtocolV1.version)
        json.string("kind", change.kind.rawValue)
        json.string("buffer", change.buffer)
        json.object("holder") { $0.string("user", change.holder.user); $0.string("connection", change.holder.connection) }
        json.integer("token", change.token)
        json.string("at", change.at.rfc3339)
        if change.forced { json.bool("forced", true) }
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
