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
