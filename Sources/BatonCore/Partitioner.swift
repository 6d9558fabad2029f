/// Maps a buffer name to its partition: `FNV-1a-64(UTF-8 bytes) mod N`.
///
/// Every frontend, in every language, must compute the same partition for the
/// same buffer, so this is part of the wire protocol (docs/protocol.md, section 2).
public struct Partitioner: Sendable, Hashable {
    /// The smallest and largest partition counts a deployment may use.
    public static let allowedCounts: ClosedRange<Int> = 1...1024
    /// The default partition count.
    public static let defaultCount = 16

    /// The number of partitions, N.
    public let count: Int

    /// Creates a partitioner for `count` partitions.
    ///
    /// - Throws: ``PartitionCountError`` when `count` is outside ``allowedCounts``.
    public init(count: Int) throws(PartitionCountError) {
        guard Self.allowedCounts.contains(count) else { throw PartitionCountError(count: count) }
        self.count = count
    }

    /// The partition that owns `buffer`.
    public func partition(of buffer: String) -> Int {
        Int(Self.fnv1a64(buffer) % UInt64(count))
    }

    /// FNV-1a, 64 bits, over the UTF-8 bytes of `string`.
    public static func fnv1a64(_ string: String) -> UInt64 {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in string.utf8 {
            hash ^= UInt64(byte)
            hash &*= 0x0000_0100_0000_01b3
        }
        return hash
    }
}

/// A partition count outside 1...1024.
public struct PartitionCountError: Error, Hashable, CustomStringConvertible {
    /// The rejected count.
    public let count: Int

    /// Creates the error for `count`.
    public init(count: Int) {
        self.count = count
    }
    public var description: String {
        "partition count \(count) is not allowed: it must be between \(Partitioner.allowedCounts.lowerBound) and \(Partitioner.allowedCounts.upperBound)"
    }
}

/// A set of partitions a worker serves, parsed from `all`, `0-15` or `0,3,5-7`.
public struct PartitionSet: Sendable, Hashable, CustomStringConvertible {
    /// The partitions, ascending.
    public let partitions: [Int]

    /// Parses `text` for a deployment of `count` partitions.
    public init(parsing text: String, count: Int) throws(PartitionSetError) {
        let trimmed = text.trimmingWhitespace()
        if trimmed == "all" {
            partitions = Array(0..<count)
            return
        }
        var seen = Set<Int>()
        for rawPart in trimmed.split(separator: ",", omittingEmptySubsequences: false) {
            let part = String(rawPart).trimmingWhitespace()
            let bounds = part.split(separator: "-", omittingEmptySubsequences: false)
            guard (1...2).contains(bounds.count),
                  let low = Int(bounds[0]), let high = Int(bounds[bounds.count - 1]), low <= high
            else {
                throw PartitionSetError(text: text, reason: "'\(part)' is not a partition number or a range like 0-7")
            }
            guard low >= 0, high < count else {
                throw PartitionSetError(text: text, reason: "'\(part)' is outside 0-\(count - 1) (the deployment has \(count) partitions)")
            }
            seen.formUnion(low...high)
        }
        partitions = seen.sorted()
    }

    public var description: String {
        var ranges: [String] = []
        var index = 0
        while index < partitions.count {
            var end = index
            while end + 1 < partitions.count, partitions[end + 1] == partitions[end] + 1 { end += 1 }
            ranges.append(end == index ? "\(partitions[index])" : "\(partitions[index])-\(partitions[end])")
            index = end + 1
        }
        return ranges.joined(separator: ",")
    }
}

/// A partition set that could not be parsed.
public struct PartitionSetError: Error, Hashable, CustomStringConvertible {
    /// The text given.
    public let text: String
    /// What is wrong with it.
    public let reason: String
    public var description: String {
        "invalid partition set '\(text)': \(reason); use 'all', a range like '0-15' or a list like '0,3,5-7'"
    }
}

extension String {
    func trimmingWhitespace() -> String {
        String(drop(while: \.isWhitespace).reversed().drop(while: \.isWhitespace).reversed())
    }
}
