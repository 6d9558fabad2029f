import BatonAMQP
import Logging
import Synchronization

/// Reads the depth of the request queues a worker decides for (the `baton_queue_messages_ready` gauge)
/// on a broker connection of its own, off every partition's path.
///
/// The sweeps asked with a passive declare on the partition's consume channel. While the partition's
/// queue stalls (its leader's node froze, its Raft server is suspended), that channel stops answering,
/// and rabbitmq-c waited for the answer on the consumer connection's I/O thread: every partition's
/// deliveries and acks waited with it (one stalled queue cost the other partitions' callers seconds per
/// call; `aStalledPartitionQueueDoesNotDelayTheOtherPartitions`). Declares no longer hold a connection's
/// thread (a timeout closes only their channel), and here a stall delays the gauge only: the next
/// sample waits, and a connection that failed is opened again for the one after.
///
/// Partitions ask with ``sample(_:record:)`` (it never waits); samples asked for while one is read are kept,
/// one per partition, and read in turn.
final class QueueDepthProbe: Sendable {
    private struct State {
        var wanted: [Int: @Sendable (Int) -> Void] = [:]
        var order: [Int] = []
        var wake: CheckedContinuation<Void, Never>?
        var stopped = false
        /// The probe's connection, so that ``stop()`` can end a read that waits on a stalled queue.
        var connection: AMQPConnection?
    }

    private let url: AMQPURL
    private let name: String
    private let queueName: @Sendable (Int) -> String
    private let logger: Logger
    private let state = Mutex(State())

    init(url: AMQPURL, name: String, queueName: @escaping @Sendable (Int) -> String, logger: Logger) {
        self.url = url
        self.name = name
        self.queueName = queueName
        self.logger = logger
    }

    /// Asks for `partition`'s depth (its ready messages) to be handed to `record`; returns at once.
    func sample(_ partition: Int, record: @escaping @Sendable (Int) -> Void) {
        let wake = state.withLock { state -> CheckedContinuation<Void, Never>? in
            guard !state.stopped else { return nil }
            if state.wanted.updateValue(record, forKey: partition) == nil { state.order.append(partition) }
            defer { state.wake = nil }
            return state.wake
        }
        wake?.resume()
    }

    /// Reads what is asked for until ``stop()``.
    func run() async {
        var connection: AMQPConnection?
        var channel: AMQPChannel?
        while let (partition, record) = await next() {
            do {
                if connection?.isOpen != true {
                    connection?.closeSoon()
                    channel = nil
                    let fresh = try await AMQPConnection.connect(to: url, name: name, logger: logger)
                    connection = fresh
                    let stopped = state.withLock { state in
                        state.connection = fresh
                        return state.stopped
                    }
                    if stopped { break }
                }
                if channel == nil { channel = try await connection?.openChannel() }
                if let ready = try await channel?.inspectQueue(queueName(partition)).messages { record(ready) }
            } catch {
                // A queue that is missing closes the channel (404); a stalled one times the call out and
                // the connection with it. Either way the next sample starts on a fresh one.
                logger.debug("could not read a request queue's depth", metadata: [
                    "baton.partition": "\(partition)", "baton.error": "\(error)",
                ])
                channel = nil
            }
        }
        // Only ``stop()`` ends the loop, and it has closed the connection it knew of.
        connection?.closeSoon()
    }

    /// Ends ``run()`` at once: a read in hand fails with the connection, which closes without the
    /// closing handshake (its node may be the one that froze).
    func stop() {
        let (wake, connection) = state.withLock { state -> (CheckedContinuation<Void, Never>?, AMQPConnection?) in
            state.stopped = true
            defer { state.wake = nil }
            return (state.wake, state.connection)
        }
        connection?.closeSoon()
        wake?.resume()
    }

    /// The next partition asked for, oldest first; nil once stopped.
    private func next() async -> (Int, @Sendable (Int) -> Void)? {
        while true {
            enum Next { case stopped, sample(Int, @Sendable (Int) -> Void), none }
            let taken = state.withLock { state -> Next in
                if state.stopped { return .stopped }
                while !state.order.isEmpty {
                    let partition = state.order.removeFirst()
                    if let record = state.wanted.removeValue(forKey: partition) { return .sample(partition, record) }
                }
                return .none
            }
            switch taken {
            case .stopped: return nil
            case .sample(let partition, let record): return (partition, record)
            case .none: break
            }
            await withCheckedContinuation { continuation in
                let resumeNow = state.withLock { state -> Bool in
                    if state.stopped || !state.order.isEmpty { return true }
                    state.wake = continuation
                    return false
                }
                if resumeNow { continuation.resume() }
            }
        }
    }
}
