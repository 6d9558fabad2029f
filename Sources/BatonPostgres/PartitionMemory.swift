import BatonCore
import HeapModule

/// A buffer as the store last read or wrote it: its state (with its line) and its row's version (0: the
/// buffer has no row yet).
struct RememberedBuffer: Sendable, Hashable {
    var state: BufferState
    var version: Int64
}

/// What the store keeps of a partition it writes as the fenced owner of `epoch`, so that a batch can be
/// decided without reading its rows first (docs/store.md, "Partition memory").
///
/// Only the owner of the partition's epoch writes its rows, so what it wrote last is what they hold. The
/// memory is still only a cache in front of the write's safety nets: every buffer a batch changes is
/// written by compare-and-set on the version remembered here, and every request of a batch decided from
/// memory has its record in the write, so a stale entry, a repeat or a redelivery makes the write abort
/// (nothing written); the store then forgets the partition and decides the batch again from a read.
struct PartitionMemory: Sendable {
    /// The epoch the memory belongs to: a batch of another epoch never uses it.
    let epoch: Int64
    /// Buffers as last read or written. Buffers with a line are always here; the others may be evicted.
    private(set) var buffers: [ExactString: RememberedBuffer] = [:]
    /// The buffers whose line is not empty (all of the partition's, since it was loaded).
    private(set) var lined: Set<ExactString> = []
    /// The database clock as last read (a reading, and the local instant at or after which it was taken).
    private var clock: (database: Timestamp, local: ContinuousClock.Instant)?
    /// The latest database time a decision of the partition was made at: none is made earlier.
    private(set) var decided = Timestamp(milliseconds: 0)
    /// The most buffers without a line kept; beyond it, half of them go, first remembered first (see
    /// ``evict()``).
    let limit: Int
    /// Buffers in the order they were first remembered (for eviction: first in, first out).
    private var order: [ExactString] = []
    /// The request ids this memory recorded last (at most ``recentLimit``), oldest first: a resend or a
    /// redelivery of one is decided from a read at once instead of aborting its group's write.
    private var recent: Set<ExactString> = []
    private var recentOrder: [ExactString] = []
    private var recentStart = 0
    /// How many recorded request ids are kept per partition.
    static let recentLimit = 8192

    /// How long a clock reading is trusted. A decision made from memory takes its time from the last
    /// reading plus the local time elapsed since, less ``clockMarginMilliseconds``; the two clocks may
    /// drift apart only so much in this window (NTP slews each by at most 500 ppm: 1 ms per second if the
    /// database's and the worker's are slewed in opposite directions).
    static let clockFreshness: Duration = .seconds(1)
    /// Taken off the estimated database time, so that a decision is never made ahead of the database.
    static let clockMarginMilliseconds: Int64 = 2
    /// How far the two clocks may drift apart within ``clockFreshness`` (rounded up): the database's time
    /// is at most the estimate plus the margin plus this.
    static let clockDriftMilliseconds: Int64 = 1

    /// A memory of `lines` (every line of the partition: loaded right after taking it) at `epoch`.
    init(epoch: Int64, lines: [ExactString: RememberedBuffer], limit: Int) {
        self.epoch = epoch
        self.limit = max(1, limit)
        for (buffer, remembered) in lines { remember(buffer, remembered) }
    }

    /// The remembered buffer, if any.
    subscript(buffer: ExactString) -> RememberedBuffer? { buffers[buffer] }

    /// The request ids of the claims waiting in the partition's lines, with their buffers.
    var waiting: [ExactString: ExactString] {
        var waiting: [ExactString: ExactString] = [:]
        for buffer in lined {
            for waiter in buffers[buffer]?.state.line ?? [] { waiting[ExactString(waiter.requestID)] = buffer }
        }
        return waiting
    }

    /// Records a reading of the database clock, taken at or before the local instant `local`.
    mutating func read(clock database: Timestamp, at local: ContinuousClock.Instant) {
        clock = (database, local)
        decided = max(decided, database)
    }

    /// The database time to decide at, at local instant `local`: never before a decision made already, and
    /// never ahead of the database (nil when the last clock reading is too old to say).
    func now(at local: ContinuousClock.Instant) -> Timestamp? {
        guard let clock, local >= clock.local, local - clock.local < Self.clockFreshness else { return nil }
        let elapsed = (local - clock.local).components
        let milliseconds = elapsed.seconds * 1000 + elapsed.attoseconds / 1_000_000_000_000_000
        return max(decided, clock.database.adding(milliseconds: milliseconds - Self.clockMarginMilliseconds))
    }

    /// A decision was made at `time`.
    mutating func decided(at time: Timestamp) {
        decided = max(decided, time)
    }

    /// Whether `requestID` was recorded lately by this memory's writes.
    func recorded(_ requestID: ExactString) -> Bool { recent.contains(requestID) }

    /// Notes the request ids a committed write recorded.
    mutating func recorded(_ ids: [String]) {
        for id in ids {
            let key = ExactString(id)
            guard recent.insert(key).inserted else { continue }
            recentOrder.append(key)
        }
        while recentOrder.count - recentStart > Self.recentLimit {
            recent.remove(recentOrder[recentStart])
            recentStart += 1
        }
        if recentStart > Self.recentLimit {
            recentOrder.removeFirst(recentStart)
            recentStart = 0
        }
    }

    /// Remembers buffers as a committed write left them (or as a read found them).
    mutating func remember(_ written: [ExactString: RememberedBuffer]) {
        for (buffer, remembered) in written { remember(buffer, remembered) }
        if buffers.count > limit + lined.count { evict() }
    }

    private mutating func remember(_ buffer: ExactString, _ remembered: RememberedBuffer) {
        if buffers.updateValue(remembered, forKey: buffer) == nil { order.append(buffer) }
        if remembered.state.line.isEmpty { lined.remove(buffer) } else { lined.insert(buffer) }
    }

    /// Forgets half of the buffers without a line, those remembered first (a buffer still in use is read
    /// again when next asked about, and remembered anew).
    private mutating func evict() {
        var kept: [ExactString] = []
        var dropping = (buffers.count - lined.count) - limit / 2
        kept.reserveCapacity(buffers.count - max(0, dropping))
        for buffer in order {
            guard buffers[buffer] != nil else { continue }
            if dropping > 0, !lined.contains(buffer) {
                buffers[buffer] = nil
                dropping -= 1
            } else {
                kept.append(buffer)
            }
        }
        order = kept
    }
}

/// The names of every buffer of a partition that has a row, as a Bloom filter: a name it does not
/// contain was never stored, so a batch about it can be decided from memory (as a buffer never claimed,
/// inserted only if still absent) without a read. A name it may contain is read. It never forgets (a
/// buffer's row is never deleted); when it fills past a tenth of its bits it reports itself full, and
/// the store loads a larger one.
///
/// Names are hashed with FNV-1a 64 (the partitioner's hash) through a 64-bit finalizer: the names of one
/// partition share their FNV residue modulo N, so the raw hash would fill only a fraction of the bits.
struct BufferFilter: Sendable {
    private var bits: [UInt64]
    private let mask: UInt64
    private static let hashes = 6
    /// Names inserted (as loaded, then as written).
    private(set) var count = 0

    /// A filter for about `expected` names (at least 2^20 bits; 16 bits per name expected).
    init(expected: Int) {
        var size: UInt64 = 1 << 20
        while size < UInt64(max(1, expected)) * 16 { size <<= 1 }
        bits = Array(repeating: 0, count: Int(size / 64))
        mask = size - 1
    }

    /// Whether more names went in than the filter keeps a low false-positive rate for (a tenth of its bits).
    var isFull: Bool { UInt64(count) * 10 > mask + 1 }

    /// Adds `name`.
    mutating func insert(_ name: ExactString) {
        var (h1, h2) = Self.hash(name)
        for _ in 0..<Self.hashes {
            let bit = h1 & mask
            bits[Int(bit >> 6)] |= 1 << (bit & 63)
            h1 &+= h2
        }
        count += 1
    }

    /// False when `name` was certainly never inserted.
    func mightContain(_ name: ExactString) -> Bool {
        var (h1, h2) = Self.hash(name)
        for _ in 0..<Self.hashes {
            let bit = h1 & mask
            if bits[Int(bit >> 6)] & (1 << (bit & 63)) == 0 { return false }
            h1 &+= h2
        }
        return true
    }

    private static func hash(_ name: ExactString) -> (UInt64, UInt64) {
        let base = Partitioner.fnv1a64(name.string)
        return (mix(base), mix(base ^ 0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// MurmurHash3's 64-bit finalizer.
    private static func mix(_ value: UInt64) -> UInt64 {
        var x = value
        x ^= x >> 33
        x &*= 0xFF51_AFD7_ED55_8CCD
        x ^= x >> 33
        x &*= 0xC4CE_B9FE_1A85_EC53
        x ^= x >> 33
        return x
    }
}

/// When to look at each lease of a partition: the lease sweep's index, kept in the worker instead of in
/// PostgreSQL, so that a renewal (which changes only `expires_at`) touches no indexed column and is a HOT
/// update (docs/store.md, "The lease sweep's schedule").
///
/// It is a schedule of candidates, never an authority: the sweep reads each due buffer's row and expires
/// it only when the row says its lease ran out on the database clock. What it must never do is miss a
/// lease: for every lease the partition's rows hold there is an entry due at or before its end. It is
/// loaded from the rows when the sweep first runs in an epoch (only the epoch's owner writes them
/// afterwards), and a write adds an entry for every lease it grants before it is sent (``add(_:_:)``:
/// whether it commits, fails or ends with its outcome unknown, no lease it makes goes unscheduled). A
/// renewal needs nothing: the lease's entry is due no later than its old end, and the sweep that finds
/// it running there adds it again at the row's end. An entry of a lease released since costs one look at
/// its row. So the schedule is a heap of (end, name) alone, about 24 bytes and the name per lease.
struct ExpirySchedule: Sendable {
    /// The epoch whose writes it follows.
    let epoch: Int64
    /// Whether the partition's rows were read into it (its epoch's first sweep); until then it only
    /// collects what the epoch's writes schedule.
    private(set) var loaded: Bool
    /// Each scheduled buffer's one entry: the earliest time to look at it. A later lease of the same
    /// buffer needs no entry of its own (the look at the earlier time finds it running and schedules its
    /// end), so a frontend that claims and releases one buffer over and over keeps one entry, not one per
    /// grant.
    private var due: [ExactString: Int64] = [:]
    /// The entries by time, earliest first; one that no longer matches `due` (an earlier one replaced
    /// it) is skipped when it comes up, and they are dropped together once they outnumber the rest.
    private var heap = Heap<Entry>()

    struct Entry: Comparable, Sendable {
        let at: Int64
        let buffer: ExactString
        static func < (a: Entry, b: Entry) -> Bool { a.at < b.at }
    }

    /// A schedule of `leases` (buffer, end) as the partition's rows hold them, for `epoch`.
    init(epoch: Int64, leases: [(buffer: ExactString, end: Int64)], loaded: Bool = true) {
        self.epoch = epoch
        self.loaded = loaded
        for lease in leases { add(lease.buffer, lease.end) }
    }

    /// Adds the leases the partition's rows hold (read at its epoch's first sweep) to what it collected.
    mutating func load(_ leases: [(buffer: ExactString, end: Int64)]) {
        for lease in leases { add(lease.buffer, lease.end) }
        loaded = true
    }

    /// Buffers scheduled.
    var count: Int { due.count }

    /// `buffer` has (or may get, from a write about to be sent) a lease ending at `end`: it is looked at
    /// no later than that.
    mutating func add(_ buffer: ExactString, _ end: Int64) {
        if let current = due[buffer], current <= end { return }
        due[buffer] = end
        heap.insert(Entry(at: end, buffer: buffer))
        if heap.count > 2 * due.count + 1024 {
            heap = Heap(due.map { Entry(at: $0.value, buffer: $0.key) })
        }
    }

    /// Takes the buffers due at or before `time`, earliest first, at most `limit`: the buffers, and the
    /// entries taken (to ``restore(_:)`` if what follows fails).
    mutating func takeDue(by time: Int64, limit: Int) -> (buffers: [ExactString], taken: [Entry]) {
        var taken: [Entry] = []
        while taken.count < limit, let first = heap.min, first.at <= time {
            let entry = heap.removeMin()
            guard due[entry.buffer] == entry.at else { continue }  // replaced by an earlier one
            due[entry.buffer] = nil
            taken.append(entry)
        }
        return (taken.map(\.buffer), taken)
    }

    /// Puts taken entries back (the sweep that took them did not finish).
    mutating func restore(_ taken: [Entry]) {
        for entry in taken { add(entry.buffer, entry.at) }
    }
}
