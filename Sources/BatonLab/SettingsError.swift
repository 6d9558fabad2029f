/// A lab setting out of range (bench, chaos), naming the value and what is allowed; the command line shows
/// it as a usage error.
public struct SettingsError: Error, CustomStringConvertible {
    public let description: String

    public init(_ description: String) { self.description = description }

    /// Refuses `value` outside `range`, as `<name> <value> is not allowed: use <low> to <high>`.
    static func check(_ value: Int?, _ name: String, _ range: ClosedRange<Int>, unit: String = "") throws(SettingsError) {
        guard let value, !range.contains(value) else { return }
        throw SettingsError("\(name) \(value) is not allowed: use \(range.lowerBound) to \(range.upperBound)\(unit)")
    }
}
