import BatonAMQP
import BatonCore
import Logging
import Synchronization

/// What a watch follows.
public enum WatchScope: Sendable, Hashable {
    /// One buffer's changes (its partition's event stream, filtered).
    case buffer(String)
    /// Every change of one partition.
    case partition(Int)
    /// Every change of the deployment (each partition in its own order; partitions have no common order).
    case all
}

extension WatchScope {
    /// Resume positions from `P:SEQ` texts (a partition and the position after which to resume, e.g.
    /// `3:1843`); nil names the first text that is not one.
    public static func positions(parsing texts: [String]) -> Result<[Int: Int64], WatchPositionError> {
        var resume: [Int: Int64] = [:]
        for text in texts {
            let parts = text.split(separator: ":", maxSplits: 1)
            guard parts.count == 2, let partition = Int(parts[0]), let seq = Int64(parts[1]), partition >= 0, seq >= 0 else {
                return .failure(WatchPositionError(text: text))
            }
            resume[partition] = seq
        }
        return .success(resume)
    }
}

/// A resume position that is not `P:SEQ`.
public struct WatchPositionError: Error, CustomStringConvertible {
    public let text: String
    public var description: String { "'\(text)' is not P:SEQ (a partition and a position, e.g. 3:1843)" }
}

/// What a watch yields.
public enum WatchEvent: Sendable, Hashable {
    /// An ownership change, with its position: save `seq` per `partition` to resume from it.
    case change(PositionedChange)
    /// The history from the position the watch resumed at was already pruned (docs/protocol.md, section
    /// 18): changes of `partition` were missed. The changes that follow start at the oldest kept; re-read
    /// the state you care about with ``BatonClient/inspect(_:requestID:)``.
    case missed(partition: Int)
}

extension BatonClient {
    /// What the deployment is: N, the protocol revision and its ops (docs/protocol.md, section 17).
    public func describe(requestID: String = BatonClient.newRequestID()) async throws -> DeploymentDescription {
        let reply = try await call(Request(requestID: requestID, command: .describe), partition: 0)
        guard reply.status == .description, let deployment = reply.deployment else { throw unexpected(reply) }
        return deployment
    }

    /// Reads `partition`'s history after position `after` (of `buffer` only, when given), at most
    /// `limit` changes; without `after`, only the partition's current position (docs/protocol.md, section 18).
    public func events(
        partition: Int, after: Int64?, buffer: String? = nil, limit: Int = ProtocolV1.maxEventsPerRead, requestID: String = BatonClient.newRequestID()
    ) async throws -> EventPage {
        let reply = try await call(Request(requestID: requestID, command: .events(buffer: buffer, after: after, limit: limit)), partition: partition)
        guard reply.status == .events, let page = reply.events else { throw unexpected(reply) }
        return page
    }

    /// Follows ownership changes in commit order per partition, without gaps, across reconnects
    /// (docs/protocol.md, section 18): live event messages are signals, the changes themselves are read
    /// from the partitions' history by position, so a change is yielded once and never out of order.
    ///
    /// - Parameters:
    ///   - scope: a buffer, a partition, or everything.
    ///   - positions: where to resume, per partition (the `seq` of the last change handled); a watched
    ///     partition without one starts from now.
    /// - Returns: the changes; the sequence ends when the task iterating it is cancelled or the client
    ///   closes. Connection failures are retried with backoff, never thrown.
    public func watch(_ scope: WatchScope, from positions: [Int: Int64] = [:]) -> AsyncThrowingStream<WatchEvent, any Error> {
        let (stream, continuation) = AsyncThrowingStream.makeStream(of: WatchEvent.self)
        let task = Task { [self] in
            await Watcher(client: self, scope: scope, positions: positions, output: continuation).run()
            continuation.finish()
        }
        continuation.onTermination = { _ in task.cancel() }
        return stream
    }

    func unexpected(_ reply: Reply) -> BatonClientError {
        BatonClientError(code: .badReply, message: "unexpected reply status '\(reply.status)' for request \(reply.requestID ?? "-")", requestID: reply.requestID)
    }
}

/// One watch: its own connection with a server-named queue bound to `baton.events`, and the reads of the
/// partitions' history through the client.
private final class Watcher: Sendable {
    let client: BatonClient
    let scope: WatchScope
    /// The position of the last change yielded, per partition: read by the live stream's handler too, to
    /// signal only news.
    let positions: Mutex<[Int: Int64]>
    let output: AsyncThrowingStream<WatchEvent, any Error>.Continuation

    init(client: BatonClient, scope: WatchScope, positions: [Int: Int64], output: AsyncThrowingStream<WatchEvent, any Error>.Continuation) {
        self.client = client
        self.scope = scope
        self.positions = Mutex(positions)
        self.output = output
    }

    /// The partitions watched.
    var partitions: [Int] {
        switch scope {
        case .buffer(let buffer): [client.configuration.partitioner.partition(of: UnicodeForm.nfc(buffer))]
        case .partition(let partition): [partition]
        case .all: Array(0..<client.configuration.partitioner.count)
        }
    }

    var buffer: String? {
        if case .buffer(let buffer) = scope { UnicodeForm.nfc(buffer) } else { nil }
    }

    /// Signals from the live stream: a partition with news, or nil when the connection ended.
    typealias Signal = Int?

    func run() async {
        let configuration = client.configuration
        let urls = [configuration.amqpURL] + configuration.amqpAlternates
        var node = 0
        var backoff = Backoff(initial: .milliseconds(100), maximum: .seconds(3))
        while !Task.isCancelled {
            let (signals, signal) = AsyncStream.makeStream(of: Signal.self)
            var connection: AMQPConnection?
            do {
                let (opened, reached) = try await AMQPConnection.connect(toFirstOf: urls, from: node, name: "\(configuration.name) watch", logger: client.logger)
                connection = opened
                node = reached
                if case .all = scope {
                    try await client.checkPartitionCount(via: 0, timeout: configuration.timeout)
                }
                try await subscribe(on: opened, signal: signal)
                // Catch up from the saved positions (or learn where "now" is), then follow the signals.
                for partition in partitions { try await read(partition) }
                backoff.reset()
                var dirty = Set<Int>()
                var ended = false
                for await next in signals {
                    guard let partition = next else { ended = true; break }
                    dirty.insert(partition)
                    // Read each partition with news once, however many signals came while the last read ran.
                    while let partition = dirty.popFirst() {
                        try await read(partition)
                    }
                }
                if !ended { break }  // cancelled
                client.logger.debug("watch connection ended; resubscribing")
                node = (node + 1) % urls.count
            } catch is CancellationError {
                break
            } catch let error as BatonClientError where error.code == .closed {
                break
            } catch let error as BatonClientError where error.code == .misconfigured {
                output.finish(throwing: error)
                return
            } catch {
                client.logger.debug("watch failed; resubscribing", metadata: ["baton.error": "\(error)"])
                node = (node + 1) % urls.count
            }
            signal.finish()
            if let connection { await connection.close() }
            try? await Task.sleep(for: backoff.next())
        }
    }

    /// Declares the watch's queue, binds the watched partitions and consumes: each live message holding a
    /// change past the saved position (of the watched buffer, for a buffer watch) signals its partition.
    private func subscribe(on connection: AMQPConnection, signal: AsyncStream<Signal>.Continuation) async throws {
        let channel = try await connection.openChannel()
        let queue = try await channel.declareServerNamedQueue()
        switch scope {
        case .all:
            try await channel.bindQueue(queue, exchange: ProtocolV1.eventsExchange, routingKey: "#")
        case .buffer, .partition:
            for partition in partitions {
                try await channel.bindQueue(queue, exchange: ProtocolV1.eventsExchange, routingKey: "\(partition).*")
            }
        }
        let buffer = self.buffer
        let logger = client.logger
        _ = try await channel.consume(
            queue: queue, noAck: true,
            onDeliveries: { messages in
                self.client.recordEventMessages(messages.count)
                for message in messages {
                    guard let events = try? ProtocolCodec.decodeEventMessage(message.body) else {
                        logger.debug("ignored an event message that could not be read", metadata: ["baton.routing_key": "\(message.routingKey)"])
                        continue
                    }
                    let news = events.filter { event in
                        (buffer.map { event.change.buffer.exactlyEquals($0) } ?? true)
                            && event.seq > self.positions.withLock { $0[event.partition] ?? -1 }
                    }
                    for partition in Set(news.map(\.partition)) { signal.yield(partition) }
                }
            },
            onEnd: { _ in signal.yield(nil) }
        )
    }

    /// Reads `partition`'s history from the saved position until it is complete, yielding each change.
    /// Without a saved position it only learns the current one (the watch starts from now).
    private func read(_ partition: Int) async throws {
        while true {
            try Task.checkCancellation()
            let after = positions.withLock { $0[partition] }
            let page = try await client.events(partition: partition, after: after, buffer: buffer)
            if let after, page.position < after, !page.more {
                // The saved position is beyond this partition's history (another deployment, a restored
                // database): what happened since cannot be known; go on from the current position.
                output.yield(.missed(partition: partition))
                positions.withLock { $0[partition] = page.position }
                return
            }
            if page.missed { output.yield(.missed(partition: partition)) }
            for event in page.events where event.seq > (after ?? -1) {
                output.yield(.change(event))
            }
            positions.withLock { $0[partition] = max($0[partition] ?? 0, page.position) }
            if !page.more { return }
        }
    }
}
