/// An error from RabbitMQ or rabbitmq-c. Descriptions never contain a password.
public struct AMQPError: Error, Sendable, CustomStringConvertible {
    /// What kind of failure; extensible.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private let name: String
        private init(_ name: String) { self.name = name }

        /// The URL cannot be used.
        public static let invalidURL = Code("invalid URL")
        /// Connecting, TLS or logging in failed.
        public static let connectionFailed = Code("connection failed")
        /// The connection broke or the broker closed it; everything on it failed.
        public static let connectionClosed = Code("connection closed")
        /// The broker closed a channel (see ``AMQPError/replyCode``).
        public static let channelClosed = Code("channel closed")
        /// A synchronous call or a wait ran out of time.
        public static let timeout = Code("timeout")
        /// The broker cancelled a consumer (its queue was deleted, or it failed over).
        public static let consumerCancelled = Code("consumer cancelled")
        /// The caller closed the connection.
        public static let closed = Code("closed by the application")

        public var description: String { name }
    }

    /// What kind of failure.
    public var code: Code
    /// A message for a person.
    public var message: String
    /// The AMQP reply code when the broker closed something (e.g. 404 not found, 406 precondition failed).
    public var replyCode: Int?

    /// Creates an error.
    public init(code: Code, message: String, replyCode: Int? = nil) {
        self.code = code
        self.message = message
        self.replyCode = replyCode
    }

    public var description: String {
        "AMQP \(code)\(replyCode.map { " \($0)" } ?? ""): \(message)"
    }
}
