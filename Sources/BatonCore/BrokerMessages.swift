/// The broker's messages as plain values: what a consumer is delivered, what a publisher sends, and
/// what a channel does with them. They carry no connection and do no I/O (BatonAMQP moves them over
/// rabbitmq-c), so the worker's partition machine, which decides on deliveries and answers with
/// publishes and settles, stays pure and is tested without a broker.

/// Properties of a published or delivered message (the ones Baton uses).
public struct AMQPProperties: Sendable, Hashable {
    /// `content_type`, e.g. `application/json`.
    public var contentType: String?
    /// `correlation_id` as the broker carries it (a short string: any bytes, up to 255), copied from
    /// request to reply unchanged, binary ones included.
    public var correlationIDBytes: [UInt8]?
    /// ``correlationIDBytes`` as text (invalid UTF-8 decoded with replacement characters, so a binary
    /// id reads differently from what it is: copy the bytes).
    public var correlationID: String? {
        get { correlationIDBytes.map { String(decoding: $0, as: UTF8.self) } }
        set { correlationIDBytes = newValue.map { Array($0.utf8) } }
    }
    /// `reply_to`: a queue name or `amq.rabbitmq.reply-to`.
    public var replyTo: String?
    /// `message_id`; Baton matches `basic.return`s to publishes by it.
    public var messageID: String?
    /// `expiration`: per-message TTL in milliseconds, as text.
    public var expiration: String?
    /// `delivery_mode`: 2 is persistent.
    public var deliveryMode: UInt8?
    /// `user_id`: RabbitMQ refuses a publish whose `user_id` is not the connection's login user, so a
    /// consumer can trust it as the publisher's identity (unless the publisher is tagged `impersonator`).
    public var userID: String?
    /// String headers to send.
    public var headers: [String: String]

    /// Creates properties.
    public init(
        contentType: String? = nil, correlationID: String? = nil, replyTo: String? = nil, messageID: String? = nil,
        expiration: String? = nil, deliveryMode: UInt8? = nil, userID: String? = nil, headers: [String: String] = [:]
    ) {
        self.userID = userID
        self.contentType = contentType
        self.correlationIDBytes = correlationID.map { Array($0.utf8) }
        self.replyTo = replyTo
        self.messageID = messageID
        self.expiration = expiration
        self.deliveryMode = deliveryMode
        self.headers = headers
    }
}

/// A message delivered to a consumer, copied out of rabbitmq-c's buffers.
public struct AMQPMessage: Sendable {
    /// The body.
    public var body: [UInt8]
    /// The properties.
    public var properties: AMQPProperties
    /// The delivery tag, for ack and reject on the channel it arrived on.
    public var deliveryTag: UInt64
    /// True when the broker delivered it before (to this or another consumer).
    public var redelivered: Bool
    /// The exchange it was published to.
    public var exchange: String
    /// Its routing key.
    public var routingKey: String
    /// The body size the broker announced. Larger than `body.count` when the body exceeded the
    /// connection's `maxBodyBytes` (BatonAMQP) and was dropped instead of kept in memory.
    public var bodySize: Int

    /// Creates a message (tests build them by hand).
    public init(
        body: [UInt8], properties: AMQPProperties = AMQPProperties(), deliveryTag: UInt64 = 0, redelivered: Bool = false,
        exchange: String = "", routingKey: String = "", bodySize: Int? = nil
    ) {
        self.bodySize = bodySize ?? body.count
        self.body = body
        self.properties = properties
        self.deliveryTag = deliveryTag
        self.redelivered = redelivered
        self.exchange = exchange
        self.routingKey = routingKey
    }
}

/// A message to publish.
public struct OutgoingMessage: Sendable {
    /// The exchange (`""` is the default exchange).
    public var exchange: String
    /// The routing key (for the default exchange: the queue name).
    public var routingKey: String
    /// The body.
    public var body: [UInt8]
    /// The properties.
    public var properties: AMQPProperties
    /// Ask the broker to return the message (basic.return) when no queue takes it.
    public var mandatory: Bool

    /// Creates a message.
    public init(exchange: String, routingKey: String, body: [UInt8], properties: AMQPProperties = AMQPProperties(), mandatory: Bool = false) {
        self.exchange = exchange
        self.routingKey = routingKey
        self.body = body
        self.properties = properties
        self.mandatory = mandatory
    }
}

/// One step of a channel's work (BatonAMQP's `AMQPChannel.perform`): several publishes, acks and rejects in one hop.
public enum ChannelAction: Sendable {
    case publish(OutgoingMessage)
    case ack(deliveryTag: UInt64, multiple: Bool)
    case reject(deliveryTag: UInt64, requeue: Bool)
}
