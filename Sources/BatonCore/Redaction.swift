/// Hides secrets before text reaches a log line or an error message.
public enum Redaction {
    /// `text` with the password of a `scheme://user:password@host` URL replaced by `********`.
    ///
    /// Works on text that is not a valid URL too, so it is safe to apply to anything a user typed.
    public static func url(_ text: String) -> String {
        guard let schemeEnd = text.firstRange(of: "://") else { return text }
        let start = schemeEnd.upperBound
        let end = text[start...].firstIndex(where: { $0 == "/" || $0 == "?" || $0 == "#" }) ?? text.endIndex
        let authority = text[start..<end]
        guard let at = authority.lastIndex(of: "@"), let colon = authority[..<at].firstIndex(of: ":") else { return text }
        return String(text[..<text.index(after: colon)]) + "********" + String(text[at...])
    }
}

extension Duration {
    /// The duration in whole milliseconds (rounded down).
    public var wholeMilliseconds: Int64 {
        let (seconds, attoseconds) = components
        return seconds * 1000 + attoseconds / 1_000_000_000_000_000
    }
}
