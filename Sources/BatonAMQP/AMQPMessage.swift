import BatonCore

/// A value in an AMQP argument table.
public enum AMQPValue: Sendable, Hashable {
    case string(String)
    case bool(Bool)
    case int(Int64)
    case table([String: AMQPValue])
}

/// What became of a message published on a channel in confirm mode.
public enum PublishOutcome: Sendable, Hashable {
    /// The broker took responsibility for it (basic.ack).
    case confirmed
    /// The broker could not route a mandatory message (basic.return, then basic.ack).
    case returned(replyCode: Int, replyText: String)
    /// The broker refused it (basic.nack).
    case nacked
}
