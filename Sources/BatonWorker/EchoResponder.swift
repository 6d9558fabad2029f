import BatonCore
import Foundation
import Synchronization

/// The benchmark's broker echo (`baton worker --echo`, scratch virtual hosts only): it stands in for the
/// store, so that the partition machine runs its whole path (admission, batches, replies, acks) and only
/// the database is missing. It decides each batch from memory with the worker's own decision
/// (``PartitionState/decideBatch(_:at:recorded:waiting:latest:)``) at the wall clock's time, so that a
/// load makes the same calls against it as against Baton (a claim of a held buffer is denied, and its
/// caller has nothing to release): a ceiling for the broker and the worker with a free store. It keeps
/// no records (a resend is decided again) and publishes no events.
final class EchoResponder: Sendable {
    private let partitioner: Partitioner
    private let graceMilliseconds: Int64
    private let states = Mutex<[Int: PartitionState]>([:])
    /// Buffers a partition's memory may hold (a few hundred bytes each); past it, the echo forgets the
    /// partition and starts it empty (a bench run's distinct buffers, 100,000 by default over all
    /// partitions, stay below it; the echo's answers are a ceiling's, not a record of ownership).
    static let bufferLimit = 100_000

    init(partitioner: Partitioner, graceMilliseconds: Int64 = Roster.defaultGraceMilliseconds) {
        self.partitioner = partitioner
        self.graceMilliseconds = graceMilliseconds
    }

    /// The replies to a batch, decided from the partition's memory.
    func apply(_ requests: [Request], partition: Int) -> BatchResult {
        let now = Timestamp(milliseconds: Int64(Date().timeIntervalSince1970 * 1000))
        let decision = states.withLock { states -> BatchDecision in
            var state = states.removeValue(forKey: partition)
                ?? PartitionState(partition: partition, partitioner: partitioner, graceMilliseconds: graceMilliseconds)
            let decision = state.decideBatch(requests, at: now)
            if state.buffers.count <= Self.bufferLimit { states[partition] = state }
            return decision
        }
        var result = BatchResult(replies: decision.replies, changes: [], replayed: decision.replayed, attempts: 1)
        result.answers = decision.answers
        return result
    }

    /// The `events` reads of a batch: an empty page each.
    static func read(_ requests: [Request], partition: Int) -> [Reply] {
        let now = Timestamp(milliseconds: Int64(Date().timeIntervalSince1970 * 1000))
        return requests.map { request in
            Reply(
                requestID: request.requestID, status: .events, buffer: request.buffer, at: now, partition: partition,
                events: EventPage(events: [], position: 0, more: false, missed: false)
            )
        }
    }
}
