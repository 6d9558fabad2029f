import BatonCore
import CRabbitMQ
import Foundation
import Logging

/// A connection to RabbitMQ, owned by one dedicated I/O thread.
///
/// rabbitmq-c is not thread-safe and services heartbeats only inside its calls, so
/// every call on a connection happens on its thread, which also polls the socket
/// whenever it is idle. Channels, publishes, acks and consumers are requests to
/// that thread. When the connection breaks, everything on it fails with
/// ``AMQPError/Code/connectionClosed`` and ``closed()`` returns; reconnecting is the
/// owner's job (see ``Backoff``).
public final class AMQPConnection: Sendable {
    /// The URL (prints without its password).
    public let url: AMQPURL
    let io: IOThread

    private init(url: AMQPURL, io: IOThread) {
        self.url = url
        self.io = io
    }

    /// Connects and logs in, advertising `consumer_cancel_notify` and `connection.blocked`.
    ///
    /// - Parameter name: the connection name the broker shows (`connection_name`).
    /// - Parameter maxBodyBytes: deliveries with a larger body arrive with an empty `body` and their
    ///   announced ``AMQPMessage/bodySize``, so a consumer never keeps an oversize body in memory.
    public static func connect(
        to url: AMQPURL, name: String, maxBodyBytes: Int = .max, logger: Logger = Logger(label: "baton.amqp")
    ) async throws -> AMQPConnection {
        let io = IOThread(url: url, name: name, logger: logger, maxBodyBytes: maxBodyBytes)
        do {
            try await io.run { io throws(AMQPError) in try io.open() }
        } catch {
            io.stop()
            throw error
        }
        return AMQPConnection(url: url, io: io)
    }

    /// Connects to the first of `urls` (the nodes of one cluster) that answers, trying them in order from
    /// `first` and wrapping around; returns the connection and the index of the URL it reached. Start
    /// from the node that worked last, so that a dead node costs one failed attempt, not one per connect.
    ///
    /// - Throws: the error of the only URL, or, for several, ``AMQPError/Code/connectionFailed`` naming
    ///   each node's failure (passwords redacted).
    public static func connect(
        toFirstOf urls: [AMQPURL], from first: Int = 0, name: String, maxBodyBytes: Int = .max, logger: Logger = Logger(label: "baton.amqp")
    ) async throws -> (connection: AMQPConnection, index: Int) {
        var failures: [String] = []
        for offset in 0..<max(1, urls.count) {
            let index = (max(0, first) + offset) % urls.count
            do {
                return (try await connect(to: urls[index], name: name, maxBodyBytes: maxBodyBytes, logger: logger), index)
            } catch {
                if urls.count == 1 { throw error }
                failures.append("\(urls[index]): \(error)")
                logger.notice("broker node did not answer; trying the next", metadata: ["baton.amqp": "\(urls[index])", "baton.error": "\(error)"])
            }
        }
        throw AMQPError(code: .connectionFailed, message: "no broker node answered: \(failures.joined(separator: "; "))")
    }

    /// Runs `body` with a new connection to `url`, closed afterwards whatever happens.
    public static func withConnection<T>(to url: AMQPURL, name: String, logger: Logger, _ body: (AMQPConnection) async throws -> T) async throws -> T {
        try await withClosing(try await connect(to: url, name: name, logger: logger), close: { await $0.close() }, body)
    }

    /// Opens a new channel.
    public func openChannel() async throws -> AMQPChannel {
        let number = try await io.run { io throws(AMQPError) in try io.openChannel() }
        return AMQPChannel(number: number, io: io)
    }

    /// Closes the connection (connection.close), failing what is still pending.
    public func close() async {
        _ = try? await io.run { io throws(AMQPError) in io.closeConnection() }
        io.stop()
    }

    /// Waits until the connection ends; returns why (nil when closed by ``close()``).
    public func closed() async -> AMQPError? {
        await io.waitUntilClosed()
    }

    /// True until the connection ends.
    public var isOpen: Bool { io.isOpen }

    /// While the broker blocks publishing on this connection (a memory or disk alarm; `connection.blocked`),
    /// its reason; nil otherwise. Messages published meanwhile wait in the socket, unread by the broker.
    public var blockedReason: String? { io.blocked }

    /// Closes the connection without waiting (for `deinit`s); everything on it fails.
    public func closeSoon() {
        io.stop()
    }

    deinit {
        io.stop()
    }
}

/// A channel on an ``AMQPConnection``.
public final class AMQPChannel: Sendable {
    /// The channel number.
    public let number: UInt16
    let io: IOThread
    let unconfirmed = UnconfirmedPublishes()

    init(number: UInt16, io: IOThread) {
        self.number = number
        self.io = io
    }

    /// Declares an exchange (idempotent when the arguments match).
    public func declareExchange(_ name: String, type: String, durable: Bool = true) async throws {
        let channel = number
        try await io.run { io throws(AMQPError) in
            let arena = CArena()
            amqp_exchange_declare(io.conn, channel, arena.bytes(name), arena.bytes(type), 0, durable ? 1 : 0, 0, 0, amqp_empty_table)
            try io.check(amqp_get_rpc_reply(io.conn), channel: channel, doing: "declare exchange '\(name)'")
        }
    }

    /// Declares a queue (idempotent when the arguments match; a mismatch closes the channel with 406).
    @discardableResult
    public func declareQueue(_ name: String, durable: Bool = true, arguments: [String: AMQPValue] = [:]) async throws -> (messages: Int, consumers: Int) {
        try await queueDeclare(name, passive: false, durable: durable, arguments: arguments)
    }

    /// Declares a queue the broker names (`amq.gen-…`): exclusive to this connection, deleted with it.
    /// Returns its name.
    public func declareServerNamedQueue() async throws -> String {
        let channel = number
        return try await io.run { io throws(AMQPError) in
            let arena = CArena()
            let ok = amqp_queue_declare(io.conn, channel, arena.bytes(""), 0, 0, 1, 1, amqp_empty_table)
            try io.check(amqp_get_rpc_reply(io.conn), channel: channel, doing: "declare a server-named queue")
            guard let name = ok?.pointee.queue.string else {
                throw AMQPError(code: .channelClosed, message: "channel \(channel) closed while declaring a server-named queue")
            }
            return name
        }
    }

    /// Checks that a queue exists and returns its ready messages and consumers (passive declare).
    public func inspectQueue(_ name: String) async throws -> (messages: Int, consumers: Int) {
        try await queueDeclare(name, passive: true, durable: true, arguments: [:])
    }

    /// Declares (or with `passive`, checks) a queue without holding the connection while the broker
    /// answers (see ``request(doing:within:_:)``).
    private func queueDeclare(_ name: String, passive: Bool, durable: Bool, arguments: [String: AMQPValue]) async throws -> (messages: Int, consumers: Int) {
        let channel = number
        let counts = try await request(doing: "declare queue '\(name)'") { (io, wait: ReplyWait<QueueCounts>) throws(AMQPError) in
            try io.startDeclare(queue: name, passive: passive, durable: durable, arguments: arguments, channel: channel, wait: wait)
        }
        return (counts.messages, counts.consumers)
    }

    /// Sends a request with `send` on the I/O thread and waits for its answer off it: a quorum queue
    /// answers consumes and declares from its leader, which may be stalled. When no answer comes within
    /// the connection's timeout (or `within`, if shorter), this channel is closed and the call fails with
    /// ``AMQPError/Code/timeout``; the connection and its other channels go on.
    private func request<T: Sendable>(
        doing what: String, within: Duration? = nil, _ send: @escaping @Sendable (IOThread, ReplyWait<T>) throws(AMQPError) -> Void
    ) async throws -> T {
        let channel = number
        let wait = ReplyWait<T>()
        try await io.run { io throws(AMQPError) in try send(io, wait) }
        let milliseconds = min(io.url.connectionTimeoutMilliseconds, within.map { Int(clamping: max(1, $0.wholeMilliseconds)) } ?? .max)
        do {
            return try await wait.value(
                timeout: .milliseconds(milliseconds),
                timedOut: AMQPError(code: .timeout, message: "\(what): the broker did not answer within \(milliseconds) ms (channel \(channel) closed; the connection goes on)")
            )
        } catch {
            if error.code == .timeout {
                let id = ObjectIdentifier(wait)
                io.submit({ io in io.abandon(id, channel: channel, error: error) }, refused: {})
            }
            throw error
        }
    }

    /// Deletes a queue.
    public func deleteQueue(_ name: String) async throws {
        let channel = number
        try await io.run { io throws(AMQPError) in
            let arena = CArena()
            amqp_queue_delete(io.conn, channel, arena.bytes(name), 0, 0)
            try io.check(amqp_get_rpc_reply(io.conn), channel: channel, doing: "delete queue '\(name)'")
        }
    }

    /// Binds a queue to an exchange.
    public func bindQueue(_ queue: String, exchange: String, routingKey: String) async throws {
        let channel = number
        try await io.run { io throws(AMQPError) in
            let arena = CArena()
            amqp_queue_bind(io.conn, channel, arena.bytes(queue), arena.bytes(exchange), arena.bytes(routingKey), amqp_empty_table)
            try io.check(amqp_get_rpc_reply(io.conn), channel: channel, doing: "bind queue '\(queue)' to '\(exchange)'")
        }
    }

    /// Limits unacknowledged deliveries on this channel.
    public func qos(prefetch: UInt16) async throws {
        let channel = number
        try await io.run { io throws(AMQPError) in
            amqp_basic_qos(io.conn, channel, 0, prefetch, 0)
            try io.check(amqp_get_rpc_reply(io.conn), channel: channel, doing: "set prefetch \(prefetch)")
        }
    }

    /// Puts the channel in publisher-confirm mode (``publishConfirmed(_:)``). With `tracking`, the
    /// publishes nobody awaits (``publish(_:completion:)``, ``enqueue(_:queued:completion:)``) are tracked
    /// until the broker confirms them: ``oldestUnconfirmedPublish``.
    public func enableConfirms(tracking: Bool = false) async throws {
        let channel = number
        let unconfirmed = tracking ? self.unconfirmed : nil
        try await io.run { io throws(AMQPError) in
            amqp_confirm_select(io.conn, channel)
            try io.check(amqp_get_rpc_reply(io.conn), channel: channel, doing: "enable publisher confirms")
            io.channels[channel]?.confirmMode = true
            io.channels[channel]?.unconfirmed = unconfirmed
        }
    }

    /// When the oldest publish of this channel still waiting for its broker confirm was sent (nil when
    /// none waits, or the channel does not track them: ``enableConfirms(tracking:)``). The broker confirms
    /// once the message is in its queues, whatever their consumers do: a publish unconfirmed for long
    /// means the broker cannot reach the queue (on a RabbitMQ 3.10 cluster, a channel that keeps sending
    /// to a quorum queue leader whose node froze).
    public var oldestUnconfirmedPublish: ContinuousClock.Instant? { unconfirmed.oldest }

    /// How many tracked publishes the broker nacked since the last call (``enableConfirms(tracking:)``),
    /// and starts counting again. A nack means the broker did not store the message: on a RabbitMQ 3.10
    /// cluster, a channel that cannot register with a quorum queue's new leader nacks everything it
    /// publishes to that queue until the old leader's node returns, while a new channel reaches the new
    /// leader.
    public func takeNacks() -> Int { unconfirmed.takeNacks() }

    /// Starts a consumer; its deliveries arrive in the returned queue.
    public func consume(queue: String, noAck: Bool = false, exclusive: Bool = false, arguments: [String: AMQPValue] = [:]) async throws -> (consumerTag: String, deliveries: DeliveryQueue) {
        let deliveries = DeliveryQueue()
        let tag = try await consume(queue: queue, noAck: noAck, exclusive: exclusive, arguments: arguments, into: deliveries)
        return (tag, deliveries)
    }

    /// Starts a consumer whose deliveries are handed to `onDeliveries` on the connection's I/O thread, in
    /// order, everything read in one pass at a time: no thread hop between the socket and the handler.
    ///
    /// The handler must not block (it holds up the connection); it may call ``enqueue(_:completion:)``
    /// on channels of this connection, which then runs at once. `onEnd` runs once when the consumer ends:
    /// nil when the application closed the channel, else why (connection lost, channel closed, cancelled
    /// by the broker).
    ///
    /// `answerWithin` bounds the wait for the broker's consume-ok below the connection's timeout (see
    /// ``request(doing:within:_:)``).
    public func consume(
        queue: String, noAck: Bool = false, exclusive: Bool = false, arguments: [String: AMQPValue] = [:], answerWithin: Duration? = nil,
        onDeliveries: @escaping @Sendable ([AMQPMessage]) -> Void, onEnd: @escaping @Sendable (AMQPError?) -> Void
    ) async throws -> String {
        try await consume(
            queue: queue, noAck: noAck, exclusive: exclusive, arguments: arguments, within: answerWithin,
            into: DeliveryHandler(onDeliveries: onDeliveries, onEnd: onEnd)
        )
    }

    /// Starts a consumer without holding the connection while the broker answers (see ``request(doing:within:_:)``).
    private func consume(
        queue: String, noAck: Bool, exclusive: Bool, arguments: [String: AMQPValue], within: Duration? = nil, into sink: any DeliverySink
    ) async throws -> String {
        let channel = number
        return try await request(doing: "consume from '\(queue)'", within: within) { (io, wait: ReplyWait<String>) throws(AMQPError) in
            try io.startConsume(queue: queue, noAck: noAck, exclusive: exclusive, arguments: arguments, channel: channel, sink: sink, wait: wait)
        }
    }

    /// Publishes, acks and rejects in order, in one hop to the I/O thread (no confirms awaited).
    public func perform(_ actions: [ChannelAction]) async throws {
        guard !actions.isEmpty else { return }
        let channel = number
        try await io.run { io throws(AMQPError) in try io.perform(actions, channel: channel) }
    }

    /// Publishes one message without waiting for a confirm.
    public func publish(_ message: OutgoingMessage) async throws {
        try await perform([.publish(message)])
    }

    /// Publishes, acks and rejects in order without suspending and without waiting for confirms:
    /// `completion` runs on the I/O thread once they are written (nil) or one failed (the rest are not
    /// done). Called on the I/O thread (from a consumer handler or a completion), they run at once,
    /// unless `queued`; from elsewhere they are queued, in call order. A caller that enqueues from
    /// several threads, this one among them, passes `queued` to keep its call order (running at once
    /// would overtake what other threads queued before). For callers that bound their waits themselves
    /// (a broker that stops reading can block a write).
    public func enqueue(_ actions: [ChannelAction], queued: Bool = false, completion: (@Sendable (AMQPError?) -> Void)? = nil) {
        let channel = number
        io.submit(
            inline: !queued,
            { io in
                do throws(AMQPError) {
                    if let failure = io.failure { throw failure }
                    try io.perform(actions, channel: channel)
                    completion?(nil)
                } catch {
                    completion?(error)
                }
            },
            refused: { completion?(AMQPError(code: .closed, message: "the connection is closed")) }
        )
    }

    /// Publishes one message as ``enqueue(_:completion:)`` does.
    public func publish(_ message: OutgoingMessage, completion: @escaping @Sendable (AMQPError?) -> Void) {
        enqueue([.publish(message)], completion: completion)
    }

    /// Returns once everything queued on this channel's connection before the call has run.
    public func barrier() async {
        _ = try? await io.run { _ throws(AMQPError) in }
    }

    /// Publishes messages on a confirm-mode channel and waits for all their confirms (a window, not one by one).
    public func publishConfirmed(_ messages: [OutgoingMessage], timeout: Duration = .seconds(10)) async throws -> [PublishOutcome] {
        guard !messages.isEmpty else { return [] }
        let channel = number
        let io = self.io
        let waits = try await io.run { io throws(AMQPError) -> [ConfirmWait] in
            guard io.channels[channel]?.confirmMode == true else {
                throw AMQPError(code: .channelClosed, message: "channel \(channel) is not in confirm mode")
            }
            return try messages.map { message throws(AMQPError) in
                let tag = try io.publish(message, channel: channel)
                let wait = ConfirmWait()
                io.channels[channel]?.confirmWaits[tag] = wait
                if let id = message.properties.messageID { io.channels[channel]?.tagsByMessageID[id] = tag }
                return wait
            }
        }
        var outcomes: [PublishOutcome] = []
        for wait in waits {
            outcomes.append(try await wait.value(timeout: timeout))
        }
        return outcomes
    }

    /// Calls `handler(messageID, replyCode, replyText)` for mandatory messages the broker returns on this channel.
    public func onReturn(_ handler: @escaping @Sendable (String?, Int, String) -> Void) async throws {
        let channel = number
        try await io.run { io throws(AMQPError) in
            io.channels[channel]?.returnHandler = handler
        }
    }

    /// Closes the channel; its unacknowledged deliveries go back to their queues.
    public func close() async {
        let channel = number
        _ = try? await io.run { io throws(AMQPError) in io.closeChannel(channel) }
    }
}
