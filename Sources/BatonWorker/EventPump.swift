import BatonAMQP
import BatonCore
import BatonPostgres
import Logging
import Synchronization

/// Publishes a partition's committed ownership changes off the decision path.
///
/// The runner hands over each batch's outbox entries and moves on; the pump publishes
/// everything waiting in one confirm window, and marks the confirmed rows delivered in
/// bulk at most every `markInterval`. Rows that never get confirmed stay undelivered and
/// the sweep republishes them (events are at least once).
final class EventPump: Sendable {
    private final class Queue: Sendable {
        let entries = Mutex<[OutboxEntry]>([])
    }

    private let pending = Queue()
    private let wake: AsyncStream<Void>.Continuation
    private let task: Task<Void, Never>

    init(
        partition: Int, store: OwnershipStore, channel: AMQPChannel, perCommit: Bool, logger: Logger, markInterval: Duration = .milliseconds(200),
        delivered: @escaping @Sendable (Int) -> Void
    ) {
        let (signals, wake) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
        self.wake = wake
        let pending = self.pending
        task = Task {
            var confirmed: [Int64] = []
            var lastMark = ContinuousClock.now
            func mark() async {
                guard !confirmed.isEmpty else { return }
                do {
                    try await store.markDelivered(confirmed)
                    delivered(confirmed.count)
                } catch {
                    logger.warning("marking events delivered failed; the sweep will republish them", metadata: ["baton.error": "\(error)"])
                }
                confirmed.removeAll()
                lastMark = ContinuousClock.now
            }
            var markArmed = false
            for await _ in signals {
                while true {
                    let entries = pending.entries.withLock { entries in
                        defer { entries.removeAll() }
                        return entries
                    }
                    if entries.isEmpty { break }
                    confirmed += await Self.publish(entries, partition: partition, channel: channel, perCommit: perCommit, logger: logger)
                    if ContinuousClock.now - lastMark >= markInterval {
                        await mark()
                        markArmed = false
                    }
                }
                // Marks are one statement per markInterval at most, not one per batch: the database
                // connection is shared with the partitions' decisions. What is left is marked when the
                // interval has passed (a wake-up is armed for it), or at the end.
                if ContinuousClock.now - lastMark >= markInterval {
                    await mark()
                    markArmed = false
                } else if !confirmed.isEmpty, !markArmed {
                    markArmed = true
                    let delay = markInterval - (ContinuousClock.now - lastMark)
                    Task {
                        try? await Task.sleep(for: delay)
                        wake.yield()
                    }
                }
            }
            await mark()
        }
    }

    /// Queues committed changes for publishing.
    func send(_ entries: [OutboxEntry]) {
        guard !entries.isEmpty else { return }
        pending.entries.withLock { $0 += entries }
        wake.yield()
    }

    /// Publishes what is queued, marks it, and ends.
    func finish() async {
        wake.finish()
        await task.value
    }

    /// Publishes with confirms, in order: all of `entries` in as few messages as fit (`perCommit`), or one
    /// message per change. Returns the ids the broker confirmed.
    static func publish(_ entries: [OutboxEntry], partition: Int, channel: AMQPChannel, perCommit: Bool, logger: Logger) async -> [Int64] {
        var messages: [OutgoingMessage] = []
        var covered: [ArraySlice<OutboxEntry>] = []
        if perCommit {
            var start = entries.startIndex
            for (body, count) in ProtocolCodec.encodeEvents(partition: partition, entries.map(\.positioned)) where count > 0 {
                let slice = entries[start..<start + count]
                start += count
                messages.append(OutgoingMessage(
                    exchange: ProtocolV1.eventsExchange, routingKey: ProtocolV1.eventsRoutingKey(partition: partition), body: body,
                    properties: AMQPProperties(contentType: ProtocolV1.contentType, messageID: "\(slice.first!.id)-\(slice.last!.id)", deliveryMode: 2)
                ))
                covered.append(slice)
            }
        } else {
            for (index, entry) in entries.enumerated() {
                messages.append(OutgoingMessage(
                    exchange: ProtocolV1.eventsExchange,
                    routingKey: ProtocolV1.eventRoutingKey(partition: partition, kind: entry.change.kind),
                    body: ProtocolCodec.encodeEvent(entry.positioned),
                    properties: AMQPProperties(contentType: ProtocolV1.contentType, messageID: String(entry.id), deliveryMode: 2)
                ))
                covered.append(entries[index...index])
            }
        }
        do {
            let outcomes = try await channel.publishConfirmed(messages)
            return zip(covered, outcomes).filter { $0.1 != .nacked }.flatMap { $0.0.map(\.id) }
        } catch {
            logger.warning("publishing events failed; they stay in the outbox for the sweep", metadata: ["baton.error": "\(error)"])
            return []
        }
    }
}
