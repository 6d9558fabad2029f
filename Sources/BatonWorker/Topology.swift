import BatonAMQP
import BatonCore
import Logging

/// Baton's broker topology (docs/protocol.md, section 1), declared idempotently.
public enum Topology {
    /// The arguments of every request queue. `x-message-ttl` bounds how long a request may wait
    /// (``ProtocolV1/maxRequestLifetimeMilliseconds``): the broker dead-letters older ones, so no request
    /// outlives the idempotency record that answers its repeats.
    public static let requestQueueArguments: [String: AMQPValue] = [
        "x-queue-type": .string("quorum"),
        "x-single-active-consumer": .bool(true),
        "x-delivery-limit": .int(5),
        "x-dead-letter-exchange": .string(ProtocolV1.deadLetterExchange),
        "x-message-ttl": .int(ProtocolV1.maxRequestLifetimeMilliseconds),
    ]

    /// How many messages the dead-letter queue keeps (the oldest are dropped first) by default.
    public static let defaultDeadLetterLimit = 100_000
    /// How long a dead letter is kept, in milliseconds (7 days).
    public static let deadLetterTTLMilliseconds: Int64 = 7 * 24 * 3600 * 1000

    /// The arguments of the dead-letter queue: bounded in length (dropping the oldest) and age, so a
    /// flood of bad input cannot fill the broker's disk.
    public static func deadLetterQueueArguments(limit: Int = defaultDeadLetterLimit) -> [String: AMQPValue] {
        [
            "x-queue-type": .string("quorum"),
            "x-max-length": .int(Int64(limit)),
            "x-overflow": .string("drop-head"),
            "x-message-ttl": .int(deadLetterTTLMilliseconds),
        ]
    }

    /// Declares the exchanges, the N request queues and their bindings, and the dead-letter queue.
    ///
    /// Safe to run any number of times. A queue that an older Baton declared with other arguments
    /// (the broker refuses a redeclaration with 406 PRECONDITION_FAILED) is kept as it is, with a
    /// warning naming it: recreate it (docs/operations.md, "Changing queue arguments") or apply the
    /// same limits as a policy.
    public static func declare(
        on connection: AMQPConnection, partitionCount: Int, deadLetterLimit: Int = defaultDeadLetterLimit,
        logger: Logger = Logger(label: "baton.topology")
    ) async throws {
        var channel = try await connection.openChannel()
        try await channel.declareExchange(ProtocolV1.requestsExchange, type: "direct")
        try await channel.declareExchange(ProtocolV1.deadLetterExchange, type: "fanout")
        try await channel.declareExchange(ProtocolV1.eventsExchange, type: "topic")
        try await channel.declareExchange(ProtocolV1.adminExchange, type: "direct")
        channel = try await declareQueue(ProtocolV1.deadLetterQueue, arguments: deadLetterQueueArguments(limit: deadLetterLimit), on: channel, connection: connection, logger: logger)
        try await channel.bindQueue(ProtocolV1.deadLetterQueue, exchange: ProtocolV1.deadLetterExchange, routingKey: "")
        for partition in 0..<partitionCount {
            let queue = ProtocolV1.requestQueue(partition)
            channel = try await declareQueue(queue, arguments: requestQueueArguments, on: channel, connection: connection, logger: logger)
            try await channel.bindQueue(queue, exchange: ProtocolV1.requestsExchange, routingKey: String(partition))
            try await channel.bindQueue(queue, exchange: ProtocolV1.adminExchange, routingKey: String(partition))
        }
        await channel.close()
    }

    /// Declares `queue`; when it exists with other arguments, checks that it exists and warns. Returns
    /// the channel to go on with (a refused declaration closes the one it was made on).
    private static func declareQueue(
        _ queue: String, arguments: [String: AMQPValue], on channel: AMQPChannel, connection: AMQPConnection, logger: Logger
    ) async throws -> AMQPChannel {
        do {
            try await channel.declareQueue(queue, arguments: arguments)
            return channel
        } catch let error as AMQPError where error.replyCode == 406 {
            logger.warning("queue exists with other arguments (declared by an older Baton); keeping it as it is", metadata: [
                "baton.queue": "\(queue)", "baton.wanted": "\(arguments.keys.sorted().joined(separator: ","))", "baton.error": "\(error)",
            ])
            let fresh = try await connection.openChannel()
            _ = try await fresh.inspectQueue(queue)
            return fresh
        }
    }
}
