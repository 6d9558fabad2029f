import BatonAMQP
import Logging
import Synchronization

/// Where a worker publishes its replies: a connection of its own, with one channel shared by the
/// partitions (each partition hands its batches over in order, and the connection's I/O thread writes
/// them in that order).
///
/// A reply is published to the address the request named, and the broker may be unable to deliver it:
/// RabbitMQ 3.10.8 crashes the publishing channel for an `amq.rabbitmq.reply-to.*` address it cannot
/// resolve (a garbage one, or one whose node is unreachable) and closes the connection with 541
/// INTERNAL_ERROR. On a connection of its own that costs the replies in flight, never the consumers
/// or the event publisher: ``maintain(url:name:logger:while:)`` opens a new one, and a client whose
/// reply was lost gets it from the request's record when it sends the request again.
final class ReplyLink: Sendable {
    private struct Link: Sendable {
        let connection: AMQPConnection
        let channel: AMQPChannel
    }

    private let link: Mutex<Link?>

    private init(_ link: Link) {
        self.link = Mutex(link)
    }

    /// Connects to `url` (a node the worker's other connections reached).
    static func open(url: AMQPURL, name: String, logger: Logger) async throws -> ReplyLink {
        ReplyLink(try await connect(url: url, name: name, logger: logger))
    }

    private static func connect(url: AMQPURL, name: String, logger: Logger) async throws -> Link {
        let connection = try await AMQPConnection.connect(to: url, name: name, logger: logger)
        do {
            return Link(connection: connection, channel: try await connection.openChannel())
        } catch {
            await connection.close()
            throw error
        }
    }

    /// Publishes `publishes` after everything handed over before, without waiting; they are lost when
    /// the connection is down or dies first.
    func enqueue(_ publishes: [ChannelAction]) {
        link.withLock { $0 }?.channel.enqueue(publishes)
    }

    /// Returns once everything handed over before the call is written (or has failed).
    func barrier() async {
        await link.withLock { $0 }?.channel.barrier()
    }

    /// Replaces the connection whenever it has died, with backoff, as long as `alive()` holds.
    func maintain(url: AMQPURL, name: String, logger: Logger, while alive: @escaping @Sendable () -> Bool) async {
        var backoff = Backoff(initial: .milliseconds(20), maximum: .seconds(2))
        while alive() {
            if link.withLock({ $0?.connection.isOpen ?? false }) {
                try? await Task.sleep(for: .milliseconds(20))
                continue
            }
            do {
                let fresh = try await Self.connect(url: url, name: name, logger: logger)
                let old = link.withLock { link in
                    defer { link = fresh }
                    return link
                }
                if let old { await old.connection.close() }
                backoff.reset()
                WorkerMetrics.replyReconnects.increment()
                logger.info("reply connection replaced", metadata: ["baton.amqp": "\(url)"])
            } catch {
                try? await Task.sleep(for: backoff.next())
            }
        }
    }

    func close() async {
        let old = link.withLock { link in
            defer { link = nil }
            return link
        }
        if let old { await old.connection.close() }
    }
}
