import BatonCore
import BatonAMQP
import BatonLab
import Foundation
import Testing

/// The broker that `scripts/services up` starts (or the `BATON_*_AMQP_URL` / `BATON_BROKER_ADMIN_URL`
/// it exports). Tests work in a virtual host of their own (one per test process, or per ``Deployment``),
/// never in the deployment's.
enum TestBroker {
    static let environment = ProcessInfo.processInfo.environment
    /// The worker's user (configure, read and write on `baton.*`).
    static let urlText = environment["BATON_AMQP_URL"] ?? "amqp://baton-worker:baton-worker@127.0.0.1:55672/%2F"
    /// A frontend's user (publish requests, read replies and events).
    static let frontendURLText = environment["BATON_FRONTEND_AMQP_URL"] ?? "amqp://baton-frontend:baton-frontend@127.0.0.1:55672/%2F"
    /// An operator's user (also publish to `baton.admin`).
    static let operatorURLText = environment["BATON_OPERATOR_AMQP_URL"] ?? "amqp://baton-operator:baton-operator@127.0.0.1:55672/%2F"
    /// The management API.
    static let adminURLText = environment["BATON_BROKER_ADMIN_URL"] ?? BrokerAdmin.defaultURL

    static func admin() throws -> BrokerAdmin { try BrokerAdmin(url: adminURLText) }

    /// A scratch virtual host for one test (or one deployment).
    static func namespace(_ purpose: String = "test") async throws -> ScratchBroker {
        do {
            return try await ScratchBroker.create(purpose: purpose, admin: try admin())
        } catch {
            Issue.record("the RabbitMQ management API is not reachable (\(error)): run scripts/services up")
            throw error
        }
    }

    /// The shared scratch virtual host of this test process (for tests that need no deployment).
    static let shared = Task { try await namespace("shared") }

    /// `text` as a URL in the shared scratch virtual host.
    static func url(_ text: String = urlText) async throws -> AMQPURL {
        try await shared.value.url(try AMQPURL(text))
    }

    static func connect(_ name: String = "test", url text: String = urlText) async throws -> AMQPConnection {
        let url = try await url(text)
        do {
            return try await AMQPConnection.connect(to: url, name: name, logger: TestDatabase.logger)
        } catch {
            Issue.record("RabbitMQ is not reachable at \(url): run scripts/services up (\(error))")
            throw error
        }
    }
}

@Suite struct AMQPTests {
    @Test func publishConfirmConsumeAck() async throws {
        let connection = try await TestBroker.connect()
        let channel = try await connection.openChannel()
        let queue = "baton.test.\(UUID().uuidString)"
        try await channel.declareQueue(queue, durable: false, arguments: ["x-expires": .int(60_000)])
        try await channel.enableConfirms()
        let outcomes = try await channel.publishConfirmed((0..<300).map { index in
            OutgoingMessage(exchange: "", routingKey: queue, body: Array("m\(index)".utf8),
                            properties: AMQPProperties(contentType: "text/plain", correlationID: "c\(index)", messageID: "id\(index)"))
        })
        #expect(outcomes.count == 300 && outcomes.allSatisfy { $0 == .confirmed })
        #expect(try await channel.inspectQueue(queue).messages == 300)

        let consumer = try await connection.openChannel()
        try await consumer.qos(prefetch: 100)
        let (_, deliveries) = try await consumer.consume(queue: queue)
        var received: [AMQPMessage] = []
        while received.count < 300 {
            let batch = try await deliveries.next(max: 64, timeout: .seconds(5))
            #expect(!batch.isEmpty, "deliveries stalled at \(received.count)")
            if batch.isEmpty { break }
            received += batch
            try await consumer.perform([.ack(deliveryTag: batch.last!.deliveryTag, multiple: true)])
        }
        #expect(received.map { String(decoding: $0.body, as: UTF8.self) } == (0..<300).map { "m\($0)" }, "in order")
        #expect(received.first?.properties.correlationID == "c0")
        #expect(received.first?.properties.contentType == "text/plain")
        try await channel.deleteQueue(queue)
        await connection.close()
        #expect(await connection.closed() == nil)
    }

    @Test func heartbeatsKeepAnIdleConnectionAlive() async throws {
        // With a 1 s heartbeat the broker drops a peer that stays silent for 2 s; the I/O thread must
        // service heartbeats while the application does nothing.
        var url = try await TestBroker.url()
        url.heartbeatSeconds = 1
        let connection = try await AMQPConnection.connect(to: url, name: "idle", logger: TestDatabase.logger)
        try await Task.sleep(for: .seconds(4))
        #expect(connection.isOpen)
        let channel = try await connection.openChannel()
        try await channel.declareExchange("baton.test.heartbeat", type: "fanout", durable: false)
        await connection.close()
    }

    @Test func unroutableMandatoryMessagesAreReturned() async throws {
        let connection = try await TestBroker.connect()
        let channel = try await connection.openChannel()
        try await channel.enableConfirms()
        let outcome = try await channel.publishConfirmed([
            OutgoingMessage(exchange: "", routingKey: "baton.test.no-such-queue", body: [1], properties: AMQPProperties(messageID: "lost"), mandatory: true),
        ])
        guard case .returned(let code, _) = outcome.first else {
            Issue.record("expected a return, got \(outcome)")
            return
        }
        #expect(code == 312)
        await connection.close()
    }

    @Test func brokerErrorsCloseTheChannelNotTheConnection() async throws {
        let connection = try await TestBroker.connect()
        let channel = try await connection.openChannel()
        let error = try await #require(throws: AMQPError.self) { try await channel.inspectQueue("baton.test.missing.\(UUID().uuidString)") }
        #expect(error.code == .channelClosed)
        #expect(error.replyCode == 404)
        // The connection is still usable.
        let other = try await connection.openChannel()
        try await other.declareExchange("baton.test.exchange", type: "fanout", durable: false)
        await connection.close()
    }

    /// Declares and consumes are answered off the I/O thread (the connection is not held while a queue's
    /// leader answers): their answers and the broker's refusals still reach the caller.
    @Test func declaresAndConsumesAreAnsweredAndRefusedOnTheirChannel() async throws {
        let connection = try await TestBroker.connect()
        let name = "baton.test.declare.\(UUID().uuidString)"
        var channel = try await connection.openChannel()
        try await channel.declareQueue(name, arguments: ["x-queue-type": .string("quorum")])
        #expect(try await channel.inspectQueue(name) == (messages: 0, consumers: 0))
        // The same queue with other arguments: 406 closes that channel, not the connection.
        let error = try await #require(throws: AMQPError.self) { try await channel.declareQueue(name, arguments: ["x-queue-type": .string("classic")]) }
        #expect(error.code == .channelClosed && error.replyCode == 406, "\(error)")
        channel = try await connection.openChannel()
        let (tag, _) = try await channel.consume(queue: name)
        #expect(!tag.isEmpty)
        #expect(try await channel.inspectQueue(name).consumers == 1)
        let missing = try await connection.openChannel()
        let refused = try await #require(throws: AMQPError.self) { try await missing.consume(queue: "\(name).missing") }
        #expect(refused.code == .channelClosed && refused.replyCode == 404, "\(refused)")
        try await channel.deleteQueue(name)
        await connection.close()
    }

    @Test func wrongPasswordFailsClearlyWithoutEchoingIt() async throws {
        var url = try await TestBroker.url()
        url.password = "definitely-wrong-pw"
        let error = try await #require(throws: AMQPError.self) { try await AMQPConnection.connect(to: url, name: "bad") }
        #expect(error.code == .connectionFailed)
        #expect(!error.description.contains("definitely-wrong-pw"))
        #expect(error.description.contains("********"))
    }

    @Test func handshakeTimeoutIsBounded() async throws {
        // A listener that accepts TCP connections (in the kernel's backlog) but never speaks AMQP.
        let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(listener) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = 0
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, length) } }
        #expect(bound == 0)
        #expect(listen(listener, 8) == 0)
        _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(listener, $0, &length) } }
        let port = Int(UInt16(bigEndian: address.sin_port))

        let url = try AMQPURL("amqp://u:p@127.0.0.1:\(port)/?connection_timeout=500")
        let start = ContinuousClock.now
        let error = try await #require(throws: AMQPError.self) { try await AMQPConnection.connect(to: url, name: "timeout") }
        #expect(error.code == .connectionFailed)
        // 0.5 s alone; 3.4 s once among the whole suite's parallel tests on 2 cores. Without the URL's timeout,
        // rabbitmq-c's own handshake timeout is 30 s.
        #expect(ContinuousClock.now - start < .seconds(10))
    }

    @Test func consumersEndWhenTheBrokerDropsTheConnection() async throws {
        let connection = try await TestBroker.connect("to-be-killed")
        let channel = try await connection.openChannel()
        let queue = "baton.test.\(UUID().uuidString)"
        try await channel.declareQueue(queue, durable: false, arguments: ["x-expires": .int(60_000)])
        let (_, deliveries) = try await channel.consume(queue: queue)
        // Ask the broker to close our connection, as an operator or a failover would.
        let admin = try await TestBroker.connect("admin")
        _ = admin
        try await channel.deleteQueue(queue)  // the broker cancels our consumer: basic.cancel
        await #expect(throws: AMQPError.self) { _ = try await deliveries.next(max: 1, timeout: .seconds(5)) }
        await admin.close()
        await connection.close()
    }
}
