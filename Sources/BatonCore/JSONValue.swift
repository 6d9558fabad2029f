#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Any JSON value, as ``JSONParser`` reads a request body, so that the codec can validate each field
/// itself and name the offending value in its errors.
enum JSONValue: Sendable, Hashable {
    case null
    case bool(Bool)
    case integer(Int64)
    case number(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    /// What kind of value this is, for error messages ("a string", "an array").
    var kindDescription: String {
        switch self {
        case .null: "null"
        case .bool: "a boolean"
        case .integer, .number: "a number"
        case .string: "a string"
        case .array: "an array"
        case .object: "an object"
        }
    }

    /// A short rendering of the value for error messages (long strings are cut).
    var excerpt: String {
        switch self {
        case .null: return "null"
        case .bool(let value): return String(value)
        case .integer(let value): return String(value)
        case .number(let value): return String(value)
        case .string(let value):
            let scalars = value.unicodeScalars
            let shown = scalars.count > 40 ? String(String.UnicodeScalarView(scalars.prefix(40))) + "…" : value
            return "\"\(shown.replacingControlCharacters())\" (\(scalars.count) characters, \(value.utf8.count) bytes)"
        case .array(let values): return "an array of \(values.count)"
        case .object(let values): return "an object with \(values.count) fields"
        }
    }
}

extension String {
    /// The string with control characters shown as `\u{..}`, safe to put in a message or a log line.
    func replacingControlCharacters() -> String {
        LogValue.escape(self)
    }
}

/// Makes values that come from requests safe to write into log lines and messages.
public enum LogValue {
    /// `text` with every control, format (bidirectional overrides, zero-width) and line/paragraph
    /// separator character shown as `\u{..}`, and backslashes doubled, so a value cannot start a
    /// new log line, move a terminal's cursor, or pass for an escape it does not contain.
    public static func escape(_ text: String) -> String {
        var clean = true
        for scalar in text.unicodeScalars where needsEscape(scalar) {
            clean = false
            break
        }
        if clean { return text }
        var result = ""
        result.unicodeScalars.reserveCapacity(text.unicodeScalars.count + 8)
        for scalar in text.unicodeScalars {
            if scalar == "\\" {
                result += "\\\\"
            } else if needsEscape(scalar) {
                result += "\\u{\(String(scalar.value, radix: 16))}"
            } else {
                result.unicodeScalars.append(scalar)
            }
        }
        return result
    }

    private static func needsEscape(_ scalar: Unicode.Scalar) -> Bool {
        if scalar == "\\" { return true }
        if scalar.value >= 0x20 && scalar.value < 0x7F { return false }
        switch scalar.properties.generalCategory {
        case .control, .format, .lineSeparator, .paragraphSeparator, .surrogate, .privateUse, .unassigned: return true
        default: return false
        }
    }
}
