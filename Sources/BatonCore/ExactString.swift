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
        if string.utf8.withContiguousStorageIfAvailable({ hasher.combine(bytes: UnsafeRawBufferPointer($0)) }) == nil {
            var copy = string
            copy.withUTF8 { hasher.combine(bytes: UnsafeRawBufferPointer($0)) }
        }
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
        // Lengths first (O(1) for native strings), then the bytes in place: comparing `utf8` views
        // element by element walks String indices, and this runs for every dictionary probe of a name.
        guard utf8.count == other.utf8.count else { return false }
        let inPlace = utf8.withContiguousStorageIfAvailable { mine in
            other.utf8.withContiguousStorageIfAvailable { theirs in mine.elementsEqual(theirs) }
        }
        if let inPlace, let equal = inPlace { return equal }
        return utf8.elementsEqual(other.utf8)
    }
}

extension ExactString: ExpressibleByStringLiteral {
    /// Wraps a string literal.
    public init(stringLiteral value: String) {
        self.init(value)
    }
}
