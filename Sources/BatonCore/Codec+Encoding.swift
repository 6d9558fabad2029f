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

    /// Decodes a reply body (what a client receives).
    public static func decodeReply(_ body: some Collection<UInt8>) throws -> Reply {
        try JSONDecoder().decode(WireReply.self, from: Data(body)).reply()
    }

    /// Decodes a reply message: one reply, or the replies to a batch in its order.
    public static func decodeReplies(_ body: some Collection<UInt8>) throws -> [Reply] {
        let wire = try JSONDecoder().decode(WireReply.self, from: Data(body))
        if wire.status == "batch" {
            guard let replies = wire.replies else {
                throw DecodingError.dataCorrupted(.init(codingPath: [], debugDescription: "a batch reply without 'replies'"))
            }
            return try replies.map { try $0.reply() }
        }
        return [try wire.reply()]
    }

    /// Encodes the event body of an ownership change, published to `baton.events` with routing key `<p>.<kind>`.
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

private struct WireHolder: Decodable {
    var user: String
    var connection: String
}

/// The reply as it travels, for decoding.
private struct WireReply: Decodable {
    var v: Int
    var requestID: String?
    var status: String
    var buffer: String?
    var holder: WireHolder?
    var token: Int64?
    var expiresAt: String?
    var at: String?
    var partition: Int?
    var buffers: [String]?
    var releasedCount: Int?
    var error: ReplyError?
    var replies: [WireReply]?

    enum CodingKeys: String, CodingKey {
        case v, requestID = "request_id", status, buffer, holder, token, expiresAt = "expires_at", at, partition, buffers
        case releasedCount = "released_count", error, replies
    }

    func reply() throws -> Reply {
        func timestamp(_ text: String?, _ key: CodingKeys) throws -> Timestamp? {
            guard let text else { return nil }
            guard let value = Timestamp(rfc3339: text) else {
                throw DecodingError.dataCorrupted(.init(codingPath: [key], debugDescription: "'\(text)' is not a timestamp like 2026-11-28T00:15:44.123Z"))
            }
            return value
        }
        guard let status = ReplyStatus(rawValue: status) else {
            throw DecodingError.dataCorrupted(.init(codingPath: [CodingKeys.status], debugDescription: "unknown reply status '\(status)'"))
        }
        return Reply(
            requestID: requestID, status: status, buffer: buffer,
            holder: holder.map { Holder(user: $0.user, connection: $0.connection) },
            token: token, expiresAt: try timestamp(expiresAt, .expiresAt), at: try timestamp(at, .at),
            partition: partition, buffers: buffers, releasedCount: releasedCount, error: error
        )
    }
}
