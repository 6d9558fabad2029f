import BatonCore
import Foundation
import Testing

@Suite struct TimestampTests {
    @Test(arguments: [
        (Int64(0), "1970-01-01T00:00:00.000Z"),
        (1_795_822_544_123, "2026-11-27T23:35:44.123Z"),
        (951_782_400_000, "2000-02-29T00:00:00.000Z"),
        (-1, "1969-12-31T23:59:59.999Z"),
        (253_402_300_799_999, "9999-12-31T23:59:59.999Z"),
    ])
    func knownValues(milliseconds: Int64, text: String) {
        #expect(Timestamp(milliseconds: milliseconds).rfc3339 == text)
        #expect(Timestamp(rfc3339: text)?.milliseconds == milliseconds)
    }

    @Test func yearsPastFourDigitsAreWrittenInFull() {
        #expect(Timestamp(milliseconds: 253_402_300_800_000).rfc3339 == "10000-01-01T00:00:00.000Z")
    }

    @Test func agreesWithFoundationOverManyInstants() {
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<2000 {
            let milliseconds = Int64.random(in: 0...4_102_444_800_000, using: &generator)
            let seconds = milliseconds / 1000
            let expected = Date(timeIntervalSince1970: TimeInterval(seconds)).formatted(.iso8601)
            let text = Timestamp(milliseconds: milliseconds).rfc3339
            #expect(text.prefix(19) + "Z" == expected, "for \(milliseconds)")
            #expect(Timestamp(rfc3339: text)?.milliseconds == milliseconds)
        }
    }

    @Test(arguments: [
        "", "2026-11-28T00:15:44Z", "2026-11-28T00:15:44.123", "2026-13-01T00:00:00.000Z",
        "2026-02-30T00:00:00.000Z", "2026-11-28 00:15:44.123Z", "2026-11-28T24:00:00.000Z", "２026-11-28T00:15:44.123Z",
    ])
    func rejectsOtherForms(text: String) {
        #expect(Timestamp(rfc3339: text) == nil)
    }
}

@Suite struct TimestampEncodingTests {
    /// Replies and events write timestamps straight into their bytes; they must read as `rfc3339` does,
    /// on both sides of the fast path's range (1970 to 9999).
    @Test(arguments: [Int64(0), 1_795_822_544_123, -1, 253_402_300_799_999, 253_402_300_800_000, -62_135_596_800_000])
    func repliesCarryTheRFC3339Form(milliseconds: Int64) throws {
        let at = Timestamp(milliseconds: milliseconds)
        let reply = Reply(requestID: "r\"1\\", status: .granted, buffer: "a\u{1}b/ü", holder: Holder(user: "u", connection: "c"), token: 3, expiresAt: at, at: at, partition: 2)
        let text = String(decoding: ProtocolCodec.encode(reply), as: UTF8.self)
        #expect(text.contains(#""expires_at":"\#(at.rfc3339)","at":"\#(at.rfc3339)""#), "\(text)")
        #expect(text.contains(#""holder":{"user":"u","connection":"c"},"token":3"#), "\(text)")
        // A reader takes four-digit years only (as it always has).
        guard milliseconds <= 253_402_300_799_999 else { return }
        let decoded = try ProtocolCodec.decodeReply(ProtocolCodec.encode(reply))
        #expect(decoded.requestID == "r\"1\\" && decoded.buffer == "a\u{1}b/ü" && decoded.holder == reply.holder)
        #expect(decoded.at == at && decoded.expiresAt == at)
    }
}
