import BatonAMQP
import BatonCore
import BatonPostgres
import Logging
import Synchronization

/// Publishes a partition's committed ownership changes in position order, off the decision path, and
/// records how far they were published: the partition's delivered position (docs/store.md, "Events").
///
/// Once the partition is taken (``start()``), the pump first publishes what the partition's history holds
/// after its delivered position (changes a previous owner committed but never got confirmed), then the
/// changes each commit hands over (``send(_:)``), in commit order. The delivered position moves forward (at
/// most every `markInterval`, one row per partition) through the changes the broker confirmed, never past
/// one it did not: when a publish fails or is refused, the pump reads the history again from the delivered
/// position (events are at least once). What commits hand over meanwhile is kept, up to ``liveLimit``
/// changes; past that it is dropped and read back from the history.
final class EventPump: Sendable {
    private struct State {
        /// Changes handed over by commits, in commit order, not yet taken for publishing.
        var live: [OutboxEntry] = []
        /// Whether ``live`` holds every change committed since the last history read began (false after
        /// an overflow: the history is read again before the pump relies on it).
        var complete = true
        var started = false
        var finishing = false
    }

    /// How many handed-over changes are kept while the pump cannot publish.
    static let liveLimit = 65_536
    /// How many changes one history read takes.
    static let readLimit = 1_000

    private final class Shared: Sendable {
        let state = Mutex(State())
    }

    private let shared = Shared()
    private let wake: AsyncStream<Void>.Continuation
    private let task: Task<Void, Never>

    init(
        partition: Int, store: OwnershipStore, channel: AMQPChannel, perCommit: Bool, logger: Logger, markInterval: Duration = .milliseconds(200),
        retryDelay: Duration = .seconds(1), linger: Duration = .zero, delivered: @escaping @Sendable (Int) -> Void
    ) {
        let (signals, wake) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
        self.wake = wake
        let shared = self.shared
        task = Task {
            var cursor = Cursor(partition: partition, store: store, logger: logger, markInterval: markInterval)
            var catchingUp = true
            // When the wake-up armed for the next record is due (a wake-up in the past has fired).
            var armedUntil: ContinuousClock.Instant?
            // When the pump last published what commits handed over (for the linger).
            var lastPublished: ContinuousClock.Instant?
            for await _ in signals {
                while true {
                    let (started, finishing) = shared.state.withLock { ($0.started, $0.finishing) }
                    guard started else { break }
                    do {
                        try await cursor.load()
                        if catchingUp {
                            // Changes handed over from here on are kept; those committed before are in the read.
                            shared.state.withLock { state in
                                if !state.complete {
                                    state.live.removeAll()
                                    state.complete = true
                                }
                            }
                            let rows = try await store.outbox(partition: partition, after: cursor.through, limit: Self.readLimit)
                            let confirmed = await Self.publish(rows, partition: partition, channel: channel, perCommit: perCommit, logger: logger)
                            cursor.advance(through: rows.prefix(confirmed))
                            delivered(confirmed)
                            if confirmed < rows.count { throw PumpRetry() }
                            if rows.count < Self.readLimit { catchingUp = false }
                        } else {
                            // A busy partition publishes what its commits handed over at most once per
                            // `linger`, in one message per commit or fewer; a change after a quiet spell
                            // goes at once.
                            if linger > .zero, !finishing, let last = lastPublished, ContinuousClock.now < last + linger {
                                try? await Task.sleep(until: last + linger)
                            }
                            let taken = shared.state.withLock { state -> [OutboxEntry]? in
                                guard state.complete else { return nil }
                                defer { state.live.removeAll() }
                                return state.live
                            }
                            guard let taken else {
                                catchingUp = true
                                continue
                            }
                            // Already published by a history read when they committed before it.
                            let entries = taken.filter { $0.id > cursor.through }
                            if entries.isEmpty { break }
                            lastPublished = .now
                            let confirmed = await Self.publish(entries, partition: partition, channel: channel, perCommit: perCommit, logger: logger)
                            cursor.advance(through: entries.prefix(confirmed))
                            delivered(confirmed)
                            if confirmed < entries.count {
                                catchingUp = true
                                throw PumpRetry()
                            }
                        }
                        if cursor.markDue { await cursor.mark() }
                    } catch {
                        if !(error is PumpRetry) {
                            logger.warning("reading the partition's history of changes failed; will retry", metadata: ["baton.error": "\(error)"])
                        }
                        if finishing { break }
                        try? await Task.sleep(for: retryDelay)
                    }
                    if finishing, catchingUp { break }
                }
                // Marks are one statement per markInterval at most, not one per batch: the database
                // connection is shared with the partitions' decisions. What is left is marked when the
                // interval has passed (a wake-up is armed for it), or at the end.
                if cursor.markDue {
                    await cursor.mark()
                } else if cursor.unmarked, armedUntil.map({ $0 <= .now }) ?? true {
                    let delay = cursor.untilMark
                    armedUntil = .now + delay
                    Task {
                        try? await Task.sleep(for: delay)
                        wake.yield()
                    }
                }
            }
            await cursor.mark()
        }
    }

    /// The partition was taken: publish its history after the delivered position, then what commits hand over.
    func start() {
        shared.state.withLock { $0.started = true }
        wake.yield()
    }

    /// Queues committed changes (in commit order) for publishing.
    func send(_ entries: [OutboxEntry]) {
        guard !entries.isEmpty else { return }
        shared.state.withLock { state in
            guard state.complete else { return }
            if state.live.count + entries.count > Self.liveLimit {
                state.live.removeAll()
                state.complete = false
            } else {
                state.live += entries
            }
        }
        wake.yield()
    }

    /// Publishes what is queued, records the delivered position, and ends.
    func finish() async {
        shared.state.withLock { $0.finishing = true }
        wake.yield()
        wake.finish()
        await task.value
    }

    private struct PumpRetry: Error {}

    /// The pump's delivered position: how far it published (`through`) and how far it recorded (`marked`).
    private struct Cursor {
        let partition: Int
        let store: OwnershipStore
        let logger: Logger
        let markInterval: Duration
        private(set) var through: Int64 = 0
        private var marked: Int64 = 0
        private var loaded = false
        private var lastMark = ContinuousClock.now

        init(partition: Int, store: OwnershipStore, logger: Logger, markInterval: Duration) {
            self.partition = partition
            self.store = store
            self.logger = logger
            self.markInterval = markInterval
        }

        /// Reads the delivered position once.
        mutating func load() async throws {
            guard !loaded else { return }
            through = try await store.deliveredThrough(partition: partition)
            marked = through
            loaded = true
        }

        mutating func advance(through published: ArraySlice<OutboxEntry>) {
            if let last = published.last { through = max(through, last.id) }
        }

        var unmarked: Bool { loaded && through > marked }
        var markDue: Bool { unmarked && ContinuousClock.now - lastMark >= markInterval }
        var untilMark: Duration { max(.zero, markInterval - (ContinuousClock.now - lastMark)) }

        mutating func mark() async {
            guard unmarked else { return }
            do {
                try await store.markDelivered(partition: partition, through: through)
                marked = through
            } catch {
                logger.warning("recording the delivered position failed; events after it are published again", metadata: ["baton.error": "\(error)"])
            }
            lastMark = ContinuousClock.now
        }
    }

    /// Publishes `entries` with confirms, in order: in as few messages as fit (`perCommit`), or one message
    /// per change. Returns how many of them, from the first, the broker confirmed.
    static func publish(_ entries: [OutboxEntry], partition: Int, channel: AMQPChannel, perCommit: Bool, logger: Logger) async -> Int {
        guard !entries.isEmpty else { return 0 }
        var messages: [OutgoingMessage] = []
        var covered: [Int] = []
        if perCommit {
            var start = entries.startIndex
            for (body, count) in ProtocolCodec.encodeEvents(partition: partition, entries.map(\.positioned)) where count > 0 {
                let slice = entries[start..<start + count]
                start += count
                messages.append(OutgoingMessage(
                    exchange: ProtocolV1.eventsExchange, routingKey: ProtocolV1.eventsRoutingKey(partition: partition), body: body,
                    properties: AMQPProperties(contentType: ProtocolV1.contentType, messageID: "\(slice.first!.id)-\(slice.last!.id)", deliveryMode: 2)
                ))
                covered.append(count)
            }
        } else {
            for entry in entries {
                messages.append(OutgoingMessage(
                    exchange: ProtocolV1.eventsExchange,
                    routingKey: ProtocolV1.eventRoutingKey(partition: partition, kind: entry.change.kind),
                    body: ProtocolCodec.encodeEvent(entry.positioned),
                    properties: AMQPProperties(contentType: ProtocolV1.contentType, messageID: String(entry.id), deliveryMode: 2)
                ))
                covered.append(1)
            }
        }
        do {
            let outcomes = try await channel.publishConfirmed(messages)
            var confirmed = 0
            for (count, outcome) in zip(covered, outcomes) {
                guard outcome != .nacked else { break }
                confirmed += count
            }
            return confirmed
        } catch {
            logger.warning("publishing events failed; they are published again from the partition's history", metadata: ["baton.error": "\(error)"])
            return 0
        }
    }
}
