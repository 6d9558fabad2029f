import BatonCore
@testable import BatonPostgres
import Testing

/// The store's partition memory and its filter of stored names, without a database.
@Suite struct PartitionMemoryUnitTests {
    /// Names that all hash to partition 5 of 16, as one partition's names do.
    static let names: [ExactString] = {
        let partitioner = try! Partitioner(count: 16)
        return (0..<400_000).map { "project/\($0)/file.swift" }.filter { partitioner.partition(of: $0) == 5 }.map { ExactString($0) }
    }()

    @Test func theFilterNeverForgetsANameAndRarelyClaimsOneItWasNotGiven() {
        let names = Self.names
        let half = names.count / 2
        var filter = BufferFilter(expected: half)
        for name in names[..<half] { filter.insert(name) }
        #expect(names[..<half].allSatisfy(filter.mightContain), "no false negatives")
        let falsePositives = names[half...].filter(filter.mightContain).count
        // One partition's names share their FNV residue modulo 16: unmixed, they would fill a sixteenth of the bits.
        #expect(Double(falsePositives) / Double(names.count - half) < 0.01, "\(falsePositives) false positives of \(names.count - half)")
        #expect(!filter.isFull)
    }

    @Test func theFilterReportsItselfFullPastATenthOfItsBits() {
        var filter = BufferFilter(expected: 1)
        var inserted = 0
        while !filter.isFull {
            filter.insert(ExactString("n\(inserted)"))
            inserted += 1
        }
        #expect(inserted == (1 << 20) / 10 + 1, "2^20 bits at least; full past a tenth")
    }

    @Test func theClockIsNeverAheadOfTheDatabaseNorBeforeADecisionAndGoesStale() {
        var memory = PartitionMemory(epoch: 1, lines: [:], limit: 10)
        let local = ContinuousClock.now
        #expect(memory.now(at: local) == nil, "no reading yet")
        memory.read(clock: Timestamp(milliseconds: 10_000), at: local)
        #expect(memory.now(at: local + .milliseconds(250)) == Timestamp(milliseconds: 10_248), "the reading plus the time elapsed, less 2 ms")
        memory.decided(at: Timestamp(milliseconds: 10_400))
        #expect(memory.now(at: local + .milliseconds(250)) == Timestamp(milliseconds: 10_400), "never before a decision made already")
        #expect(memory.now(at: local + .seconds(1)) == nil, "a reading a second old is not used")
        #expect(memory.now(at: local - .milliseconds(1)) == nil)
    }

    @Test func evictionKeepsEveryBufferWithALineAndForgetsTheOldestOthers() {
        var memory = PartitionMemory(epoch: 1, lines: [:], limit: 4)
        let waiter = Waiter(
            requestID: "w", holder: Holder(user: "u", connection: "c"), principal: nil, leaseMilliseconds: 1000,
            waitUntil: Timestamp(milliseconds: 1), replyTo: nil, correlationID: nil, fingerprint: "f"
        )
        var lined = BufferState(holder: Holder(user: "h", connection: "hc"), token: 1, expiresAt: Timestamp(milliseconds: 5))
        lined.line = [waiter]
        memory.remember([ExactString("lined"): RememberedBuffer(state: lined, version: 1)])
        for index in 0..<5 { memory.remember([ExactString("b\(index)"): RememberedBuffer(state: .fresh, version: 0)]) }
        #expect(memory[ExactString("lined")] != nil, "a buffer with a line is never evicted")
        #expect(memory.lined == [ExactString("lined")])
        #expect(memory.waiting == [ExactString("w"): ExactString("lined")])
        #expect(memory[ExactString("b0")] == nil && memory[ExactString("b4")] != nil, "the oldest went first")
    }
}

/// The lease sweep's schedule (``ExpirySchedule``), without a database.
@Suite struct ExpiryScheduleTests {
    @Test func dueLeasesComeEarliestFirstOnceEachUpToTheLimit() {
        var schedule = ExpirySchedule(epoch: 1, leases: [("c", 300), ("a", 100), ("b", 200)])
        schedule.add("a", 150)  // a later grant while an earlier look at the buffer is pending: no entry
        schedule.add("b", 120)  // an earlier end (a shortened lease) replaces the later entry
        #expect(schedule.count == 3)
        #expect(schedule.takeDue(by: 99, limit: 10).buffers.isEmpty)
        let first = schedule.takeDue(by: 250, limit: 1)
        #expect(first.buffers == ["a"], "at most the limit, earliest first")
        #expect(first.taken.map(\.at) == [100])
        #expect(schedule.takeDue(by: 250, limit: 10).taken.map(\.at) == [120], "the replaced entry at 200 is skipped")
        #expect(schedule.count == 1)
        #expect(schedule.takeDue(by: .max, limit: 10).buffers == ["c"])
        #expect(schedule.count == 0)
    }

    @Test func entriesOfASweepThatFailedAreDueAgain() {
        var schedule = ExpirySchedule(epoch: 1, leases: [("a", 100), ("b", 200)])
        let taken = schedule.takeDue(by: 300, limit: 10)
        #expect(taken.buffers == ["a", "b"])
        schedule.restore(taken.taken)
        #expect(schedule.takeDue(by: 300, limit: 10).buffers == ["a", "b"])
    }

    @Test func whatTheEpochsWritesScheduledBeforeTheLoadIsKept() {
        var schedule = ExpirySchedule(epoch: 2, leases: [], loaded: false)
        schedule.add("written", 300)  // a write sent before the epoch's first sweep, whatever its outcome
        #expect(!schedule.loaded)
        schedule.load([("read", 200)])
        #expect(schedule.loaded)
        #expect(schedule.takeDue(by: 300, limit: 10).buffers == ["read", "written"])
    }

    @Test func grantsOfOneBufferOverAndOverKeepOneEntry() {
        var schedule = ExpirySchedule(epoch: 1, leases: [])
        for grant in 0..<100_000 { schedule.add("churned", 3_600_000 + Int64(grant)) }
        #expect(schedule.count == 1)
        #expect(schedule.takeDue(by: .max, limit: 10).taken.map(\.at) == [3_600_000])
        // Shortened over and over: the replaced entries are dropped once they outnumber the rest.
        for step in 0..<10_000 { schedule.add("shortened", 1_000_000 - Int64(step)) }
        #expect(schedule.count == 1)
        #expect(schedule.takeDue(by: .max, limit: 10).taken.map(\.at) == [990_001])
    }

    @Test func aRenewedLeaseIsLookedAtOnItsOldEndAndScheduledAnew() {
        var schedule = ExpirySchedule(epoch: 1, leases: [("a", 1_000)])
        // Renewed to 5,000: nothing is added; the sweep at 1,000 finds the row running and adds its end.
        let due = schedule.takeDue(by: 1_000, limit: 10)
        #expect(due.buffers == ["a"])
        schedule.add("a", 5_000)
        #expect(schedule.takeDue(by: 4_999, limit: 10).buffers.isEmpty)
        #expect(schedule.takeDue(by: 5_000, limit: 10).buffers == ["a"])
    }
}
