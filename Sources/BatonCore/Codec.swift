#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// The JSON codec of protocol v1: validates requests exactly as docs/protocol.md (section 3) says and encodes replies and events.
///
/// Every rejection is a ``ProtocolError`` whose message names the field, the value
/// and what is allowed.
public enum ProtocolCodec {
    private static let commonFields: Set<String> = ["v", "op", "request_id", "deadline"]
    private static let opFields: [Operation: Set<String>] = [
        .claim: ["buffer", "user", "connection", "lease_ms", "wait_ms"],
        .renew: ["buffer", "connection", "lease_ms", "token"],
        .release: ["buffer", "connection", "token"],
        .inspect: ["buffer"],
        .releaseConnection: ["connection"],
        .forceRelease: ["buffer", "reason"],
        .describe: [],
        .events: ["buffer", "after", "limit"],
        .join: ["buffer", "user", "connection", "lease_ms"],
        .leave: ["buffer", "connection", "token"],
    ]
    /// Each op's fields with the common ones, made once.
    private static let allowedFields: [Operation: Set<String>] = opFields.mapValues { $0.union(commonFields) }

    /// Decodes and validates one request body.
    public static func decodeRequest(_ body: some Collection<UInt8>) throws(ProtocolError) -> Request {
        try decodeRequest(fields: try decodeObject(body))
    }

    /// Checks a body's size and encoding and parses it as one JSON object.
    static func decodeObject(_ body: some Collection<UInt8>) throws(ProtocolError) -> [String: JSONValue] {
        guard body.count <= ProtocolV1.maxBodyBytes else {
            throw ProtocolError(
                code: .payloadTooLarge,
                message: "request body is \(body.count) bytes; the limit is \(ProtocolV1.maxBodyBytes) bytes"
            )
        }
        let bytes = Array(body)
        // ASCII (most bodies) is valid UTF-8 without building a String to find out.
        guard !bytes.contains(where: { $0 >= 0x80 }) || String(validating: bytes, as: UTF8.self) != nil else {
            throw ProtocolError(code: .invalidRequest, message: "request body is not valid UTF-8: it must be one UTF-8 JSON object")
        }
        let value: JSONValue
        do throws(JSONParser.Failure) {
            value = try JSONParser.parse(bytes)
        } catch {
            throw ProtocolError(code: .invalidRequest, message: "request body is not JSON (\(bytes.count) bytes; \(error.reason) at byte \(error.offset)): it must be one JSON object")
        }
        guard case .object(let fields) = value else {
            throw ProtocolError(code: .invalidRequest, message: "request body is \(value.kindDescription), not a JSON object")
        }
        return fields
    }

    static func decodeRequest(fields: [String: JSONValue]) throws(ProtocolError) -> Request {
        // Read what can identify the request first, so that every later error can carry it.
        var reader = FieldReader(fields: fields)
        if case .string(let id)? = fields["request_id"], validateName(id, scalars: ProtocolV1.requestIDLength, form: false) == nil {
            reader.requestID = id
        }
        if case .string(let buffer)? = fields["buffer"], validateBuffer(buffer, form: false) == nil {
            reader.buffer = buffer
        }

        switch fields["v"] {
        case nil:
            throw reader.error(.invalidRequest, "field 'v' is missing: it must be 1")
        case .integer(let version)?:
            guard version == Int64(ProtocolV1.version) else {
                throw reader.error(.unsupportedVersion, "protocol version \(version) is not supported: this service speaks v=\(ProtocolV1.version)")
            }
        case let other?:
            throw reader.error(.invalidRequest, "field 'v' must be the integer 1, got \(other.excerpt)")
        }

        let opName = try reader.string("op")
        guard let op = Operation(rawValue: opName) else {
            let known = Operation.allCases.map(\.rawValue).joined(separator: ", ")
            throw reader.error(.unknownOp, "op '\(opName.replacingControlCharacters())' is unknown: use one of \(known)")
        }

        let allowed = allowedFields[op]!
        if fields.keys.contains(where: { !allowed.contains($0) }), let extra = fields.keys.sorted().first(where: { !allowed.contains($0) }) {
            throw reader.error(
                .invalidRequest,
                "field '\(extra.replacingControlCharacters())' is not allowed for op '\(op)': allowed fields are \(allowed.sorted().joined(separator: ", "))"
            )
        }

        let requestID = try reader.name("request_id", scalars: ProtocolV1.requestIDLength)
        let command: Command
        var waiting: Waiting?
        switch op {
        case .claim:
            let buffer = try reader.buffer("buffer")
            let user = try reader.name("user", scalars: ProtocolV1.nameLength)
            let connection = try reader.name("connection", scalars: ProtocolV1.nameLength)
            let lease = try reader.lease()
            command = .claim(buffer: buffer, holder: Holder(user: user, connection: connection), leaseMilliseconds: lease)
            let range = ProtocolV1.waitRange
            if let wait = try reader.integer("wait_ms", in: range, allowed: "an integer from \(range.lowerBound) to \(range.upperBound), how long the claim may wait in line (omit it to be denied at once)") {
                waiting = Waiting(milliseconds: wait)
            }
        case .renew:
            let buffer = try reader.buffer("buffer")
            let connection = try reader.name("connection", scalars: ProtocolV1.nameLength)
            let token = try reader.token()
            let lease = try reader.lease()
            command = .renew(buffer: buffer, connection: connection, token: token, leaseMilliseconds: lease)
        case .release:
            let buffer = try reader.buffer("buffer")
            let connection = try reader.name("connection", scalars: ProtocolV1.nameLength)
            let token = try reader.token()
            command = .release(buffer: buffer, connection: connection, token: token)
        case .inspect:
            command = .inspect(buffer: try reader.buffer("buffer"))
        case .releaseConnection:
            command = .releaseConnection(connection: try reader.name("connection", scalars: ProtocolV1.nameLength))
        case .forceRelease:
            let buffer = try reader.buffer("buffer")
            let reason = fields["reason"] == nil ? nil : try reader.name("reason", scalars: ProtocolV1.nameLength, form: false)
            command = .forceRelease(buffer: buffer, reason: reason)
        case .describe:
            command = .describe
        case .events:
            let buffer = fields["buffer"] == nil ? nil : try reader.buffer("buffer")
            let after = try reader.integer("after", in: 0...Int64.max, allowed: "an integer from 0 to \(Int64.max), a position from an event's 'seq' or a reply's 'position' (omit it to read the current position)")
            let limit = try reader.integer(
                "limit", in: 1...Int64(ProtocolV1.maxEventsPerRead),
                allowed: "an integer from 1 to \(ProtocolV1.maxEventsPerRead) (omit it for \(ProtocolV1.maxEventsPerRead))"
            )
            command = .events(buffer: buffer, after: after, limit: Int(limit ?? Int64(ProtocolV1.maxEventsPerRead)))
        case .join:
            let buffer = try reader.buffer("buffer")
            let user = try reader.name("user", scalars: ProtocolV1.nameLength)
            let connection = try reader.name("connection", scalars: ProtocolV1.nameLength)
            command = .join(buffer: buffer, user: user, connection: connection, leaseMilliseconds: try reader.lease())
        case .leave:
            let buffer = try reader.buffer("buffer")
            let connection = try reader.name("connection", scalars: ProtocolV1.nameLength)
            command = .leave(buffer: buffer, connection: connection, token: try reader.token())
        }
        var request = Request(requestID: requestID, command: command, deadline: try reader.deadline())
        request.waiting = waiting
        return request
    }

    /// Why `value` is not a valid `user`, `connection` or `request_id`, or nil when it is.
    /// With `form`, a name not in NFC is refused too (a reply still echoes such a request id or buffer).
    static func validateName(_ value: String, scalars range: ClosedRange<Int>, form: Bool = true) -> String? {
        let count = value.unicodeScalars.count
        if !range.contains(count) {
            return "must be a string of \(range.lowerBound) to \(range.upperBound) characters"
        }
        if value.unicodeScalars.contains("\u{0}") {
            return "must not contain U+0000"
        }
        return form ? UnicodeForm.problem(value) : nil
    }

    /// Why `value` is not a valid `buffer`, or nil when it is.
    static func validateBuffer(_ value: String, form: Bool = true) -> String? {
        if !ProtocolV1.bufferBytes.contains(value.utf8.count) {
            return "must be a string of \(ProtocolV1.bufferBytes.lowerBound) to \(ProtocolV1.bufferBytes.upperBound) UTF-8 bytes"
        }
        if value.unicodeScalars.contains("\u{0}") {
            return "must not contain U+0000"
        }
        return form ? UnicodeForm.problem(value) : nil
    }

    /// Reads and validates the fields of one request object.
    private struct FieldReader {
        let fields: [String: JSONValue]
        var requestID: String?
        var buffer: String?

        init(fields: [String: JSONValue]) {
            self.fields = fields
        }

        func error(_ code: ErrorCode, _ message: String) -> ProtocolError {
            ProtocolError(code: code, message: message, requestID: requestID, buffer: buffer)
        }

        func string(_ name: String) throws(ProtocolError) -> String {
            switch fields[name] {
            case nil: throw error(.invalidRequest, "field '\(name)' is missing: it must be a string")
            case .string(let value)?: return value
            case let other?: throw error(.invalidRequest, "field '\(name)' must be a string, got \(other.excerpt)")
            }
        }

        func name(_ name: String, scalars range: ClosedRange<Int>, form: Bool = true) throws(ProtocolError) -> String {
            let value = try string(name)
            if let problem = ProtocolCodec.validateName(value, scalars: range, form: form) {
                throw error(.invalidRequest, "field '\(name)' \(problem), got \(JSONValue.string(value).excerpt)")
            }
            return value
        }

        func buffer(_ name: String) throws(ProtocolError) -> String {
            let value = try string(name)
            if let problem = ProtocolCodec.validateBuffer(value) {
                throw error(.invalidRequest, "field '\(name)' \(problem), got \(JSONValue.string(value).excerpt)")
            }
            return value
        }

        func integer(_ name: String, in range: ClosedRange<Int64>, allowed: String) throws(ProtocolError) -> Int64? {
            switch fields[name] {
            case nil: return nil
            case .integer(let value)? where range.contains(value): return value
            case let other?: throw error(.invalidRequest, "field '\(name)' must be \(allowed), got \(other.excerpt)")
            }
        }

        func lease() throws(ProtocolError) -> Int64 {
            let range = ProtocolV1.leaseRange
            return try integer(
                "lease_ms", in: range,
                allowed: "an integer from \(range.lowerBound) to \(range.upperBound) (omit it for \(ProtocolV1.defaultLeaseMilliseconds))"
            ) ?? ProtocolV1.defaultLeaseMilliseconds
        }

        func deadline() throws(ProtocolError) -> Timestamp? {
            guard let value = fields["deadline"] else { return nil }
            if case .string(let text) = value, let deadline = Timestamp(rfc3339: text) { return deadline }
            throw error(.invalidRequest, "field 'deadline' must be a UTC time like 2026-11-28T00:15:44.123Z, got \(value.excerpt)")
        }

        func token() throws(ProtocolError) -> Int64 {
            let allowed = "an integer from 1 to \(Int64.max), the token of the grant"
            guard let token = try integer("token", in: 1...Int64.max, allowed: allowed) else {
                throw error(.invalidRequest, "field 'token' is missing: it must be \(allowed)")
            }
            return token
        }
    }
}
