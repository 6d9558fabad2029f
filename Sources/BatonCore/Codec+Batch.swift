#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// What one request message carries: one request, as before, or a coalesced batch (`{"v":1,"batch":[...]}`),
/// whose elements are validated, decided and answered one by one.
public enum RequestMessage: Sendable {
    /// A single request object.
    case single(Request)
    /// The elements of a batch in order, each a request or the reason it is refused.
    case batch([Result<Request, ProtocolError>])
}

extension ProtocolV1 {
    /// The most requests one batch message may carry.
    public static let maxBatchCount = 256
    /// The longest reply message to a batch, in bytes (the replies of a larger one are split; section 15).
    public static let maxBatchReplyBytes = 64 * 1024
}

extension ProtocolCodec {
    /// Decodes a request message: a single request object, or `{"v": 1, "batch": [request, ...]}`.
    ///
    /// An envelope that cannot be read (oversize, not JSON, `batch` not an array of 1 to 256 objects, a
    /// field other than `v` and `batch`) throws, and the whole message is refused as a single request
    /// would be. A bad element refuses only itself.
    public static func decodeMessage(_ body: some Collection<UInt8>) throws(ProtocolError) -> RequestMessage {
        let fields = try decodeObject(body)
        guard fields["batch"] != nil else { return .single(try decodeRequest(fields: fields)) }
        if let extra = fields.keys.sorted().first(where: { $0 != "v" && $0 != "batch" }) {
            throw ProtocolError(code: .invalidRequest, message: "field '\(LogValue.escape(extra))' is not allowed in a batch envelope: it has only 'v' and 'batch'")
        }
        switch fields["v"] {
        case .integer(let version)? where version == Int64(ProtocolV1.version):
            break
        case .integer(let version)?:
            throw ProtocolError(code: .unsupportedVersion, message: "protocol version \(version) is not supported: this service speaks v=\(ProtocolV1.version)")
        case nil:
            throw ProtocolError(code: .invalidRequest, message: "field 'v' is missing from the batch envelope: it must be 1")
        case let other?:
            throw ProtocolError(code: .invalidRequest, message: "field 'v' must be the integer 1, got \(other.excerpt)")
        }
        guard case .array(let elements)? = fields["batch"] else {
            throw ProtocolError(code: .invalidRequest, message: "field 'batch' must be an array of request objects, got \(fields["batch"]!.excerpt)")
        }
        guard (1...ProtocolV1.maxBatchCount).contains(elements.count) else {
            throw ProtocolError(code: .invalidRequest, message: "field 'batch' has \(elements.count) requests: a batch carries 1 to \(ProtocolV1.maxBatchCount)")
        }
        return .batch(elements.enumerated().map { index, element in
            guard case .object(let fields) = element else {
                return .failure(ProtocolError(code: .invalidRequest, message: "batch element \(index) is \(element.kindDescription), not a request object"))
            }
            do throws(ProtocolError) {
                return .success(try decodeRequest(fields: fields))
            } catch {
                return .failure(error)
            }
        })
    }

    /// Encodes requests as one batch message body.
    public static func encodeBatch(_ requests: [Request]) -> [UInt8] {
        encodeBatch(bodies: requests.map(encode))
    }

    /// Wraps request bodies already encoded (each one JSON object) in a batch message body.
    public static func encodeBatch(bodies: [[UInt8]]) -> [UInt8] {
        envelope(#"{"v":1,"batch":["#, bodies)
    }

    /// Encodes the replies to a batch, in the batch's order, as one or more reply messages
    /// `{"v":1,"status":"batch","first":i,"replies":[...]}`, each covering consecutive replies from
    /// index `i` and at most ``ProtocolV1/maxBatchReplyBytes`` long (or one reply, if that alone is
    /// longer): replies can be far larger than the requests (a holder's names, escaped), and no message
    /// may outgrow the broker's limit.
    public static func encodeBatchReply(_ replies: [Reply]) -> [[UInt8]] {
        let bodies = replies.map(encode)
        return runs(of: bodies, limit: ProtocolV1.maxBatchReplyBytes).map { run in
            envelope(Array(#"{"v":1,"status":"batch","first":\#(run.lowerBound),"replies":["#.utf8), Array(bodies[run]))
        }
    }

    /// Encodes a partition's ownership changes, in commit order, as one or more event messages
    /// `{"v":1,"partition":p,"events":[E...]}` (docs/protocol.md, section 7), each at most
    /// ``ProtocolV1/maxBatchReplyBytes`` long (or one event, if that alone is longer). Returns each
    /// body with how many of the changes, from the front, it carries.
    public static func encodeEvents(partition: Int, _ changes: [PositionedChange]) -> [(body: [UInt8], count: Int)] {
        let bodies = changes.map(encodeEvent)
        return runs(of: bodies, limit: ProtocolV1.maxBatchReplyBytes).map { run in
            (envelope(Array(#"{"v":1,"partition":\#(partition),"events":["#.utf8), Array(bodies[run])), run.count)
        }
    }

    /// Consecutive runs of `bodies` whose JSON array (commas and some 64 bytes of envelope included)
    /// stays within `limit` bytes; a body longer than that alone is a run of its own. At least one run.
    private static func runs(of bodies: [[UInt8]], limit: Int) -> [Range<Int>] {
        var runs: [Range<Int>] = []
        var start = 0
        var bytes = 64
        for (index, body) in bodies.enumerated() {
            if index > start, bytes + body.count + 1 > limit {
                runs.append(start..<index)
                start = index
                bytes = 64
            }
            bytes += body.count + 1
        }
        runs.append(start..<bodies.count)
        return runs
    }

    private static func envelope(_ opening: StaticString, _ elements: [[UInt8]]) -> [UInt8] {
        envelope([UInt8](UnsafeBufferPointer(start: opening.utf8Start, count: opening.utf8CodeUnitCount)), elements)
    }

    private static func envelope(_ opening: [UInt8], _ elements: [[UInt8]]) -> [UInt8] {
        var body = opening
        body.reserveCapacity(body.count + elements.reduce(2) { $0 + $1.count + 1 })
        for (index, element) in elements.enumerated() {
            if index > 0 { body.append(UInt8(ascii: ",")) }
            body += element
        }
        body += [UInt8(ascii: "]"), UInt8(ascii: "}")]
        return body
    }
}
