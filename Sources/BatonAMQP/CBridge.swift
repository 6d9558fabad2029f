import CRabbitMQ
import Foundation

/// Malloc'd copies of strings and tables that must outlive one rabbitmq-c call; freed on deinit.
///
/// rabbitmq-c keeps pointers, not copies (`amqp_cstring_bytes` of a Swift string points into a temporary that is gone when the call reads it),
/// so every string handed to it lives here until the call returns.
final class CArena {
    private var allocations: [UnsafeMutableRawPointer] = []

    deinit {
        for pointer in allocations { free(pointer) }
    }

    func bytes(_ string: String) -> amqp_bytes_t {
        let utf8 = Array(string.utf8)
        let pointer = malloc(max(utf8.count, 1))!
        allocations.append(pointer)
        utf8.withUnsafeBytes { pointer.copyMemory(from: $0.baseAddress!, byteCount: utf8.count) }
        return amqp_bytes_t(len: utf8.count, bytes: pointer)
    }

    func bytes(_ data: [UInt8]) -> amqp_bytes_t {
        let pointer = malloc(max(data.count, 1))!
        allocations.append(pointer)
        data.withUnsafeBytes { if let base = $0.baseAddress { pointer.copyMemory(from: base, byteCount: data.count) } }
        return amqp_bytes_t(len: data.count, bytes: pointer)
    }

    func table(_ entries: [String: AMQPValue]) -> amqp_table_t {
        guard !entries.isEmpty else { return amqp_empty_table }
        let pointer = malloc(MemoryLayout<amqp_table_entry_t>.stride * entries.count)!
        allocations.append(pointer)
        let typed = pointer.bindMemory(to: amqp_table_entry_t.self, capacity: entries.count)
        for (index, (key, value)) in entries.sorted(by: { $0.key < $1.key }).enumerated() {
            typed[index] = amqp_table_entry_t(key: bytes(key), value: field(value))
        }
        return amqp_table_t(num_entries: Int32(entries.count), entries: typed)
    }

    private func field(_ value: AMQPValue) -> amqp_field_value_t {
        switch value {
        case .string(let string): CBaton_field_utf8(bytes(string))
        case .bool(let bool): CBaton_field_bool(bool ? 1 : 0)
        case .int(let int): CBaton_field_i64(int)
        case .table(let table): CBaton_field_table(self.table(table))
        }
    }
}

extension amqp_bytes_t {
    /// The bytes as a Swift string (lossy for invalid UTF-8); empty for a null pointer.
    var string: String {
        guard let bytes, len > 0 else { return "" }
        return String(decoding: UnsafeRawBufferPointer(start: bytes, count: len), as: UTF8.self)
    }

    var array: [UInt8] {
        guard let bytes, len > 0 else { return [] }
        return Array(UnsafeRawBufferPointer(start: bytes, count: len))
    }
}

/// Human text for an rabbitmq-c status code.
func statusText(_ status: Int32) -> String {
    String(cString: amqp_error_string2(status))
}

/// Text for a failed synchronous call's reply.
func describe(_ reply: amqp_rpc_reply_t) -> (message: String, replyCode: Int?) {
    switch reply.reply_type {
    case AMQP_RESPONSE_NORMAL:
        return ("ok", nil)
    case AMQP_RESPONSE_LIBRARY_EXCEPTION:
        return (statusText(reply.library_error), nil)
    case AMQP_RESPONSE_SERVER_EXCEPTION:
        switch reply.reply.id {
        case AMQP_CONNECTION_CLOSE_METHOD:
            let close = reply.reply.decoded.assumingMemoryBound(to: amqp_connection_close_t.self).pointee
            return ("the broker closed the connection: \(close.reply_text.string)", Int(close.reply_code))
        case AMQP_CHANNEL_CLOSE_METHOD:
            let close = reply.reply.decoded.assumingMemoryBound(to: amqp_channel_close_t.self).pointee
            return ("the broker closed the channel: \(close.reply_text.string)", Int(close.reply_code))
        default:
            return ("unexpected server method \(reply.reply.id)", nil)
        }
    default:
        return ("no reply", nil)
    }
}
