/// A string compared and hashed by its exact UTF-8 bytes.
///
/// Swift's `String ==` treats canonically equivalent strings as equal (`"é" == "e\u{301}"`),
/// but the protocol, the partitioner and PostgreSQL treat them as different buffers,
/// connections and request ids. Every lookup that decides ownership uses this type.
public struct ExactString: Hashable, Comparable, Sendable, CustomStringConvertible {
    /// The string.
    public let string: String

    /// Wraps `string`.
    public init(_ string: String) {
        self.string = string
    }

    public static func == (lhs: ExactString, rhs: ExactString) -> Bool {
        lhs.string.exactlyEquals(rhs.string)
    }

    public func hash(into hasher: inout Hasher) {
        var copy = string
        copy.withUTF8 { hasher.combine(bytes: UnsafeRawBufferPointer($0)) }
    }

    /// Byte order (what PostgreSQL's "C" collation does).
    public static func < (lhs: ExactString, rhs: ExactString) -> Bool {
        lhs.string.utf8.lexicographicallyPrecedes(rhs.string.utf8)
    }

    public var description: String { string }
}

extension String {
    /// True when both strings have the same UTF-8 bytes (not merely canonically equivalent).
    public func exactlyEquals(_ other: String) -> Bool {
        utf8.elementsEqual(other.utf8)
    }
}

extension ExactString: ExpressibleByStringLiteral {
    /// Wraps a string literal.
    public init(stringLiteral value: String) {
        self.init(value)
    }
}
