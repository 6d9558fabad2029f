import BatonAMQP
import BatonCore

/// Baton's broker topology (DESIGN.md, "Topology"), declared idempotently.
public enum Topology {
    /// The arguments of every request queue.
    public static let requestQueueArguments: [String: AMQPValue] = [
        "x-queue-type": .string("quorum"),
        "x-single-active-consumer": .bool(true),
        "x-delivery-limit": .int(5),
        "x-dead-letter-exchange": .string(ProtocolV1.deadLetterExchange),
    ]

    /// Declares the exchanges, the N request queues and their bindings, and the dead-letter queue.
    ///
    /// Safe to run any number of times. A queue that exists with other arguments makes
    /// the broker refuse (406 PRECONDITION_FAILED); the error says which queue.
    public static func declare(on connection: AMQPConnection, partitionCount: Int) async throws {
        let channel = try await connection.openChannel()
        try await channel.declareExchange(ProtocolV1.requestsExchange, type: "direct")
        try await channel.declareExchange(ProtocolV1.deadLetterExchange, type: "fanout")
        try await channel.declareExchange(ProtocolV1.eventsExchange, type: "topic")
        try await channel.declareExchange(ProtocolV1.adminExchange, type: "direct")
        try await channel.declareQueue(ProtocolV1.deadLetterQueue, arguments: ["x-queue-type": .string("quorum")])
        try await channel.bindQueue(ProtocolV1.deadLetterQueue, exchange: ProtocolV1.deadLetterExchange, routingKey: "")
        for partition in 0..<partitionCount {
            let queue = ProtocolV1.requestQueue(partition)
            try await channel.declareQueue(queue, arguments: requestQueueArguments)
            try await channel.bindQueue(queue, exchange: ProtocolV1.requestsExchange, routingKey: String(partition))
            try await channel.bindQueue(queue, exchange: ProtocolV1.adminExchange, routingKey: String(partition))
        }
        await channel.close()
    }
}
