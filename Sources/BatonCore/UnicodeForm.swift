/// Unicode Normalization Form C, the one form of a name the protocol accepts (docs/protocol.md 3.2).
///
/// `"café"` can be sent as `U+00E9` (composed, NFC) or as `e U+0301` (decomposed, as macOS file names
/// come). The partitioner and PostgreSQL compare bytes, so two forms of one name would be two buffers
/// with two owners; Swift's `String ==` compares by canonical equivalence, so they would also be one
/// name to some of the worker's lookups. Only NFC reaches a decision: the worker refuses other forms and
/// the clients normalize before hashing and sending.
///
/// Both the check and the normalization are the Swift standard library's (the normalizer its own `String`
/// comparison uses), not Foundation's: on Linux, Foundation's `precomposedStringWithCanonicalMapping`
/// composes a supplementary-plane character as if it were the BMP character of its low 16 bits
/// (`U+10041 U+0301` became `U+00C1`), 104 wrong answers in 1.5 million strings checked against Python's
/// `unicodedata`; the standard library agreed on all but 7, characters assigned after Python's Unicode 14.
public enum UnicodeForm {
    /// True when `value` is in NFC.
    ///
    /// Fast path: UTF-8 bytes all below `0xCC` encode code points below U+0300, and such a string is
    /// always NFC (none of them decomposes, has a combining class, or composes with what precedes it);
    /// that covers ASCII and the Latin letters with diacritics.
    public static func isNFC(_ value: String) -> Bool {
        if value.utf8.allSatisfy({ $0 < 0xCC }) { return true }
        var span = value.utf8Span
        return span.checkForNFC(quickCheck: false)
    }

    /// `value` in NFC (itself when it already is).
    public static func nfc(_ value: String) -> String {
        isNFC(value) ? value : String(decoding: value._nfcCodeUnits, as: UTF8.self)
    }

    /// Why `value` is not NFC (for an `invalid_request` message), or nil when it is.
    static func problem(_ value: String) -> String? {
        guard !isNFC(value) else { return nil }
        let given = Array(value.unicodeScalars)
        let normal = Array(nfc(value).unicodeScalars)
        let at = zip(given, normal).prefix { $0 == $1 }.count
        func scalar(_ scalars: [Unicode.Scalar]) -> String {
            at < scalars.count ? "U+" + String(String(scalars[at].value, radix: 16, uppercase: true).leftPadded(to: 4)) : "the end"
        }
        return "is not in Unicode NFC (normalization form C): code point \(at + 1) is \(scalar(given)) where NFC has \(scalar(normal)); "
            + "normalize names to NFC before sending"
    }
}

extension String {
    fileprivate func leftPadded(to width: Int) -> String {
        count >= width ? self : String(repeating: "0", count: width - count) + self
    }
}

extension Request {
    /// This request with its request id and every name (buffer, user, connection) in NFC: what a client
    /// sends, and hashes to route (protocol 3.2).
    public func inNFC() -> Request {
        let n = UnicodeForm.nfc
        var request = self
        request.requestID = n(requestID)
        switch command {
        case .claim(let buffer, let holder, let lease):
            request.command = .claim(buffer: n(buffer), holder: Holder(user: n(holder.user), connection: n(holder.connection)), leaseMilliseconds: lease)
        case .renew(let buffer, let connection, let token, let lease):
            request.command = .renew(buffer: n(buffer), connection: n(connection), token: token, leaseMilliseconds: lease)
        case .release(let buffer, let connection, let token):
            request.command = .release(buffer: n(buffer), connection: n(connection), token: token)
        case .inspect(let buffer):
            request.command = .inspect(buffer: n(buffer))
        case .releaseConnection(let connection):
            request.command = .releaseConnection(connection: n(connection))
        case .forceRelease(let buffer, let reason):
            request.command = .forceRelease(buffer: n(buffer), reason: reason)
        case .describe:
            break
        case .events(let buffer, let after, let limit):
            request.command = .events(buffer: buffer.map(n), after: after, limit: limit)
        case .join(let buffer, let user, let connection, let lease):
            request.command = .join(buffer: n(buffer), user: n(user), connection: n(connection), leaseMilliseconds: lease)
        case .leave(let buffer, let connection, let token):
            request.command = .leave(buffer: n(buffer), connection: n(connection), token: token)
        }
        return request
    }
}
