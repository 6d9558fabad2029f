/// Writes the fixed-shape JSON objects of the protocol (replies, events) straight into bytes.
///
/// Replies are encoded once per request on the worker's hot path; the profile of a
/// batch showed `JSONEncoder` taking about 60 % of the store's CPU, so the shapes
/// Baton emits are written here directly. Requests are read by `JSONParser`, replies by `JSONDecoder`; the
/// tests check that everything written here decodes back to the same values.
struct JSONWriter {
    private(set) var bytes: [UInt8] = []
    private var needsComma = false

    init(capacity: Int = 256) {
        bytes.reserveCapacity(capacity)
        bytes.append(UInt8(ascii: "{"))
    }

    mutating func finish() -> [UInt8] {
        bytes.append(UInt8(ascii: "}"))
        return bytes
    }

    private mutating func key(_ name: StaticString) {
        if needsComma { bytes.append(UInt8(ascii: ",")) }
        needsComma = true
        bytes.append(UInt8(ascii: "\""))
        name.withUTF8Buffer { bytes += $0 }
        bytes += "\":".utf8
    }

    mutating func null(_ name: StaticString) {
        key(name)
        bytes += "null".utf8
    }

    mutating func string(_ name: StaticString, _ value: String?) {
        key(name)
        guard let value else { return bytes += "null".utf8 }
        appendString(value)
    }

    /// Writes `value` in its RFC 3339 form (``Timestamp/rfc3339``), or null.
    mutating func timestamp(_ name: StaticString, _ value: Timestamp?) {
        key(name)
        guard let value else { return bytes += "null".utf8 }
        bytes.append(UInt8(ascii: "\""))
        value.appendRFC3339(to: &bytes)
        bytes.append(UInt8(ascii: "\""))
    }

    mutating func integer(_ name: StaticString, _ value: (some BinaryInteger)?) {
        key(name)
        guard let value else { return bytes += "null".utf8 }
        bytes += String(value).utf8
    }

    mutating func bool(_ name: StaticString, _ value: Bool) {
        key(name)
        bytes += (value ? "true" : "false").utf8
    }

    mutating func strings(_ name: StaticString, _ values: [String]) {
        key(name)
        bytes.append(UInt8(ascii: "["))
        for (index, value) in values.enumerated() {
            if index > 0 { bytes.append(UInt8(ascii: ",")) }
            appendString(value)
        }
        bytes.append(UInt8(ascii: "]"))
    }

    /// Writes `json`, already-encoded JSON, as the value of `name`.
    mutating func raw(_ name: StaticString, _ json: [UInt8]) {
        key(name)
        bytes += json
    }

    /// Writes a nested object under `name` (in place: `body` writes its fields into the same bytes).
    mutating func object(_ name: StaticString, _ body: (inout JSONWriter) -> Void) {
        key(name)
        bytes.append(UInt8(ascii: "{"))
        needsComma = false
        body(&self)
        bytes.append(UInt8(ascii: "}"))
        needsComma = true
    }

    private mutating func appendString(_ value: String) {
        bytes.append(UInt8(ascii: "\""))
        // Most names need no escape: copied whole.
        if let copied = value.utf8.withContiguousStorageIfAvailable({ utf8 -> Bool in
            guard !utf8.contains(where: { $0 < 0x20 || $0 == UInt8(ascii: "\"") || $0 == UInt8(ascii: "\\") }) else { return false }
            bytes.append(contentsOf: utf8)
            return true
        }), copied {
            bytes.append(UInt8(ascii: "\""))
            return
        }
        for byte in value.utf8 {
            switch byte {
            case UInt8(ascii: "\""): bytes += "\\\"".utf8
            case UInt8(ascii: "\\"): bytes += "\\\\".utf8
            case 0x0A: bytes += "\\n".utf8
            case 0x0D: bytes += "\\r".utf8
            case 0x09: bytes += "\\t".utf8
            case 0x00..<0x20:
                let hex: [UInt8] = Array("0123456789abcdef".utf8)
                bytes += "\\u00".utf8
                bytes.append(hex[Int(byte >> 4)])
                bytes.append(hex[Int(byte & 0x0F)])
            default:
                bytes.append(byte)
            }
        }
        bytes.append(UInt8(ascii: "\""))
    }
}
