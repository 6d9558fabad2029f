import BatonAMQP
import BatonCore

/// Why a call failed, as a code and a message (passwords redacted): what `baton`'s request commands print,
/// and the error reply they print with `--json`.
public struct CallFailure: Sendable {
    /// The worker's protocol error code for a rejected request (`invalid_request`, `request_id_reused`, ...);
    /// otherwise the client's: a ``BatonClientError/Code`` (`timeout`, `unroutable`, `forbidden`, `blocked`,
    /// `closed`, `bad_reply`) or an ``AMQPError/Code`` (`connection_failed`, ...), spaces as underscores.
    public var code: String
    /// A message for a person.
    public var message: String

    /// The failure `error` stands for.
    public init(_ error: any Error) {
        switch error {
        case let error as BatonClientError:
            if error.code == .rejected, let protocolCode = error.errorCode {
                code = protocolCode.rawValue
            } else {
                code = Self.name(error.code.description)
            }
            message = error.message
        case let error as AMQPError:
            code = Self.name(error.code.description)
            message = error.description
        case is CancellationError:
            code = "cancelled"
            message = "the call was cancelled before a reply came"
        default:
            code = "client_error"
            message = "\(error)"
        }
    }

    private static func name(_ description: String) -> String {
        description.replacingOccurrences(of: " ", with: "_")
    }

    /// This failure as a reply to `request`, routed to `partition`: the fields of a protocol reply (docs/protocol.md, `null` where
    /// there is no value), `status` `error`, the request's buffer and the partition it was routed to, and
    /// `error` with the failure's code and message.
    public func reply(to request: Request, partition: Int?) -> String {
        var bytes: [UInt8] = Array(#"{"v":"#.utf8) + Array(String(ProtocolV1.version).utf8)
        func field(_ name: String, _ value: String?) {
            bytes += ",\"\(name)\":".utf8
            if let value { JSONText.appendString(value, to: &bytes) } else { bytes += "null".utf8 }
        }
        field("request_id", request.requestID)
        field("status", ReplyStatus.error.rawValue)
        field("buffer", request.buffer)
        field("holder", nil)
        field("token", nil)
        field("expires_at", nil)
        field("at", nil)
        bytes += #","partition":"#.utf8 + (partition.map { Array(String($0).utf8) } ?? Array("null".utf8))
        bytes += #","error":{"code":"#.utf8
        JSONText.appendString(code, to: &bytes)
        bytes += #","message":"#.utf8
        JSONText.appendString(message, to: &bytes)
        bytes += "}}".utf8
        return String(decoding: bytes, as: UTF8.self)
    }
}
