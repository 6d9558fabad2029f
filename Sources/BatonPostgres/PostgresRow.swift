/// One row of a result, read by column with its type checked: a missing, NULL or malformed value throws
/// an error that names the column and the value, instead of decoding as a default.
public struct PostgresRow: Sendable {
    /// The values; nil is SQL NULL.
    public let values: [String?]
    /// What the row comes from, for error messages (a table or a statement).
    public let source: String

    public init(_ values: [String?], source: String) {
        self.values = values
        self.source = source
    }

    /// The value of column `index` (`name` in messages), which must be present and not NULL.
    public func decode<T: LosslessStringConvertible>(_ index: Int, _ name: String, as type: T.Type = T.self) throws -> T {
        guard let text = try optional(index, name) else {
            throw PostgresError(code: .unexpectedResult, message: "\(source) returned NULL for \(name) (column \(index + 1))")
        }
        guard let value = T(text) else {
            throw PostgresError(code: .unexpectedResult, message: "\(source) returned an unreadable \(name) ('\(text.prefix(60))', column \(index + 1)): is this a Baton database at schema version \(Migrator.latestVersion)?")
        }
        return value
    }

    /// The value of column `index`, or nil when it is NULL; throws when the row has no such column.
    public func optional(_ index: Int, _ name: String) throws -> String? {
        guard index < values.count else {
            throw PostgresError(code: .unexpectedResult, message: "\(source) returned \(values.count) columns, without \(name) (column \(index + 1))")
        }
        return values[index]
    }
}

extension PostgresRows {
    /// Every row decoded by `body`; the first row that does not decode throws.
    public func decode<T>(from source: String, _ body: (PostgresRow) throws -> T) throws -> [T] {
        try rows.map { try body(PostgresRow($0, source: source)) }
    }
}
