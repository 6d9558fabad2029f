/// A point in time with millisecond precision, in milliseconds since the Unix epoch (UTC).
///
/// Baton measures leases on the database clock; timestamps travel as RFC 3339
/// UTC strings with exactly three fractional digits and `Z`, e.g.
/// `2026-11-28T00:15:44.123Z`.
public struct Timestamp: Sendable, Hashable, Comparable, CustomStringConvertible {
    /// Milliseconds since 1970-01-01T00:00:00Z.
    public var milliseconds: Int64

    /// Creates a timestamp from milliseconds since the Unix epoch.
    public init(milliseconds: Int64) {
        self.milliseconds = milliseconds
    }

    /// This timestamp moved by `milliseconds`.
    public func adding(milliseconds delta: Int64) -> Timestamp {
        Timestamp(milliseconds: milliseconds + delta)
    }

    public static func < (lhs: Timestamp, rhs: Timestamp) -> Bool {
        lhs.milliseconds < rhs.milliseconds
    }

    /// The RFC 3339 form, `YYYY-MM-DDTHH:MM:SS.mmmZ`.
    public var description: String { rfc3339 }

    /// The RFC 3339 form, `YYYY-MM-DDTHH:MM:SS.mmmZ`.
    public var rfc3339: String {
        guard (0...Self.lastFourDigitYear).contains(milliseconds) else { return slowRFC3339 }
        return String(unsafeUninitializedCapacity: 24) { buffer in
            writeRFC3339(into: buffer)
            return 24
        }
    }

    /// Appends ``rfc3339``'s bytes to `bytes`, without making a String (replies and events carry one or two
    /// timestamps each, written on the worker's hot path).
    func appendRFC3339(to bytes: inout [UInt8]) {
        guard (0...Self.lastFourDigitYear).contains(milliseconds) else { return bytes += slowRFC3339.utf8 }
        let start = bytes.count
        bytes += repeatElement(0, count: 24)
        bytes.withUnsafeMutableBufferPointer { buffer in
            writeRFC3339(into: UnsafeMutableBufferPointer(rebasing: buffer[start..<start + 24]))
        }
    }

    /// The last millisecond of 9999-12-31: the fast path writes four-digit years after 1970 only.
    private static let lastFourDigitYear: Int64 = 253_402_300_799_999

    /// Writes the 24 bytes of ``rfc3339`` (a year from 1970 to 9999) into `buffer`.
    private func writeRFC3339(into buffer: UnsafeMutableBufferPointer<UInt8>) {
        let (daysSinceEpoch, msOfDay) = milliseconds.floorDivided(by: 86_400_000)
        let (year, month, day) = Self.civil(fromDays: daysSinceEpoch)
        func put(_ value: Int64, at offset: Int, width: Int) {
            var value = value
            for index in stride(from: offset + width - 1, through: offset, by: -1) {
                buffer[index] = UInt8(ascii: "0") + UInt8(value % 10)
                value /= 10
            }
        }
        put(year, at: 0, width: 4)
        buffer[4] = UInt8(ascii: "-")
        put(month, at: 5, width: 2)
        buffer[7] = UInt8(ascii: "-")
        put(day, at: 8, width: 2)
        buffer[10] = UInt8(ascii: "T")
        put(msOfDay / 3_600_000, at: 11, width: 2)
        buffer[13] = UInt8(ascii: ":")
        put(msOfDay / 60_000 % 60, at: 14, width: 2)
        buffer[16] = UInt8(ascii: ":")
        put(msOfDay / 1000 % 60, at: 17, width: 2)
        buffer[19] = UInt8(ascii: ".")
        put(msOfDay % 1000, at: 20, width: 3)
        buffer[23] = UInt8(ascii: "Z")
    }

    /// ``rfc3339`` for any year (before 1970 or after 9999), by string interpolation.
    private var slowRFC3339: String {
        let (daysSinceEpoch, msOfDay) = milliseconds.floorDivided(by: 86_400_000)
        let (year, month, day) = Self.civil(fromDays: daysSinceEpoch)
        let hour = msOfDay / 3_600_000
        let minute = msOfDay / 60_000 % 60
        let second = msOfDay / 1000 % 60
        let millis = msOfDay % 1000
        return "\(pad(year, 4))-\(pad(month, 2))-\(pad(day, 2))T\(pad(hour, 2)):\(pad(minute, 2)):\(pad(second, 2)).\(pad(millis, 3))Z"
    }

    /// Parses the form produced by ``rfc3339`` (`YYYY-MM-DDTHH:MM:SS.mmmZ`); returns nil for anything else.
    public init?(rfc3339 text: String) {
        let bytes = Array(text.utf8)
        guard bytes.count == 24,
              bytes[4] == UInt8(ascii: "-"), bytes[7] == UInt8(ascii: "-"), bytes[10] == UInt8(ascii: "T"),
              bytes[13] == UInt8(ascii: ":"), bytes[16] == UInt8(ascii: ":"), bytes[19] == UInt8(ascii: "."),
              bytes[23] == UInt8(ascii: "Z")
        else { return nil }
        func number(_ range: Range<Int>) -> Int64? {
            var value: Int64 = 0
            for index in range {
                let byte = bytes[index]
                guard byte >= UInt8(ascii: "0"), byte <= UInt8(ascii: "9") else { return nil }
                value = value * 10 + Int64(byte - UInt8(ascii: "0"))
            }
            return value
        }
        guard let year = number(0..<4), let month = number(5..<7), let day = number(8..<10),
              let hour = number(11..<13), let minute = number(14..<16), let second = number(17..<19),
              let millis = number(20..<23),
              (1...12).contains(month), day >= 1, day <= Self.daysInMonth(year: year, month: month),
              hour < 24, minute < 60, second < 60
        else { return nil }
        let days = Self.days(fromCivil: year, month, day)
        milliseconds = days * 86_400_000 + ((hour * 60 + minute) * 60 + second) * 1000 + millis
    }

    // Howard Hinnant's days_from_civil / civil_from_days (proleptic Gregorian calendar).
    static func days(fromCivil year: Int64, _ month: Int64, _ day: Int64) -> Int64 {
        let y = month <= 2 ? year - 1 : year
        let era = (y >= 0 ? y : y - 399) / 400
        let yearOfEra = y - era * 400
        let dayOfYear = (153 * (month > 2 ? month - 3 : month + 9) + 2) / 5 + day - 1
        let dayOfEra = yearOfEra * 365 + yearOfEra / 4 - yearOfEra / 100 + dayOfYear
        return era * 146_097 + dayOfEra - 719_468
    }

    static func civil(fromDays days: Int64) -> (year: Int64, month: Int64, day: Int64) {
        let z = days + 719_468
        let era = (z >= 0 ? z : z - 146_096) / 146_097
        let dayOfEra = z - era * 146_097
        let yearOfEra = (dayOfEra - dayOfEra / 1460 + dayOfEra / 36524 - dayOfEra / 146_096) / 365
        let dayOfYear = dayOfEra - (365 * yearOfEra + yearOfEra / 4 - yearOfEra / 100)
        let mp = (5 * dayOfYear + 2) / 153
        let day = dayOfYear - (153 * mp + 2) / 5 + 1
        let month = mp < 10 ? mp + 3 : mp - 9
        return (yearOfEra + era * 400 + (month <= 2 ? 1 : 0), month, day)
    }

    static func daysInMonth(year: Int64, month: Int64) -> Int64 {
        switch month {
        case 2: return (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 ? 29 : 28
        case 4, 6, 9, 11: return 30
        default: return 31
        }
    }
}

private func pad(_ value: Int64, _ width: Int) -> String {
    let digits = String(value)
    return digits.count >= width ? digits : String(repeating: "0", count: width - digits.count) + digits
}

extension Int64 {
    /// Floor division and the matching non-negative remainder.
    func floorDivided(by divisor: Int64) -> (quotient: Int64, remainder: Int64) {
        let quotient = self / divisor
        let remainder = self % divisor
        return remainder < 0 ? (quotient - 1, remainder + divisor) : (quotient, remainder)
    }
}
