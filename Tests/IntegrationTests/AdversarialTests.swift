@testable import BatonClient
import BatonAMQP
import BatonCore
import BatonPostgres
import BatonLab
@testable import BatonWorker
import Foundation
import Logging
import Synchronization
import Testing

/// Frontends that misbehave, and slow paths (issue 8): each test failed before its fix.
@Suite(.serialized, .timeLimit(.minutes(3))) struct AdversarialTests {
    /// Two names in the same partition.
    static func samePartition(_ partitioner: Partitioner, _ prefix: String) -> (String, String) {
        let first = "\(prefix)-0"
        let p = partitioner.partition(of: first)
        let second = (1...1000).map { "\(prefix)-\($0)" }.first { partitioner.partition(of: $0) == p }!
        return (first, second)
    }

    /// A second frontend user ("mallory") with baton-frontend's permissions in the deployment's virtual host.
    static func otherFrontend(_ deployment: Deployment) async throws -> (url: AMQPURL, cleanup: @Sendable () async -> Void) {
        let admin = deployment.namespace.admin
        let name = "baton-test-mallory-\(UInt32.random(in: 0...UInt32.max))"
        let password = UUID().uuidString
        try await admin.createUser(name, password: password)
        let frontend = try #require(try await admin.permissions(in: deployment.namespace.virtualHost).first { $0.user == deployment.frontendURL.user })
        try await admin.grant(.init(user: name, configure: frontend.configure, write: frontend.write, read: frontend.read), on: deployment.namespace.virtualHost)
        var url = deployment.frontendURL
        url.user = name
        url.password = password
        return (url, { try? await admin.deleteUser(name) })
    }

    @Test func onlyThePrincipalThatClaimedMayRenewOrReleaseWhatOthersCanRead() async throws {
        let deployment = try await Deployment.make(partitions: 4)
        let worker = deployment.startWorker()
        let ann = deployment.client()
        let (malloryURL, cleanup) = try await Self.otherFrontend(deployment)
        let mallory = deployment.client(as: malloryURL)
        guard case .granted(let lease) = try await ann.claim("secure.txt", user: "ann", connection: "c-ann") else {
            Issue.record("not granted")
            return
        }
        // Everything mallory needs to impersonate ann is public: inspect shows connection and token.
        let seen = try #require(try await mallory.inspect("secure.txt").holder)
        #expect(seen.holder.connection == "c-ann" && seen.token == lease.token)
        guard case .notOwner = try await mallory.renew("secure.txt", connection: seen.holder.connection, token: seen.token) else {
            Issue.record("another principal renewed the lease")
            return
        }
        guard case .notOwner = try await mallory.release("secure.txt", connection: seen.holder.connection, token: seen.token) else {
            Issue.record("another principal released the lease")
            return
        }
        #expect(try await mallory.releaseConnection("c-ann").count == 0, "release_connection releases only the caller's own leases")
        guard case .denied = try await mallory.claim("secure.txt", user: "ann", connection: "c-ann") else {
            Issue.record("another principal extended the lease by claiming as the same user and connection")
            return
        }
        #expect(try await ann.inspect("secure.txt").holder?.token == lease.token, "ann still holds it")
        guard case .renewed = try await ann.renew("secure.txt", connection: "c-ann", token: lease.token) else {
            Issue.record("the owner could not renew")
            return
        }
        #expect(try await ann.releaseConnection("c-ann").count == 1)

        // A request without user_id cannot claim.
        let raw = try await deployment.connect("no user id", as: deployment.frontendURL)
        let channel = try await raw.openChannel()
        let (_, replies) = try await channel.consume(queue: ProtocolV1.directReplyTo, noAck: true)
        let request = Request.claim("secure.txt", user: "eve", connection: "c-eve")
        try await channel.publish(OutgoingMessage(
            exchange: ProtocolV1.requestsExchange, routingKey: String(deployment.partitioner.partition(of: "secure.txt")),
            body: ProtocolCodec.encode(request), properties: AMQPProperties(correlationID: "x", replyTo: ProtocolV1.directReplyTo), mandatory: true
        ))
        let answer = try #require(try await replies.next(max: 1, timeout: .seconds(10)).first)
        #expect(try ProtocolCodec.decodeReply(answer.body).error?.code == .unauthenticated)

        // A user_id that is not the connection's login is refused by the broker itself.
        let forged = try await raw.openChannel()
        try await forged.publish(OutgoingMessage(
            exchange: ProtocolV1.requestsExchange, routingKey: "0", body: ProtocolCodec.encode(request),
            properties: AMQPProperties(userID: deployment.amqpURL.user), mandatory: true
        ))
        #expect(await Deployment.eventually(.seconds(5)) { (try? await forged.qos(prefetch: 1)) == nil }, "the broker closed the channel of a forged user_id")

        let audit = try await deployment.audit()
        #expect(audit.changes.filter { $0.kind == .released }.allSatisfy { $0.principal == deployment.frontendURL.user })
        await raw.close()
        await mallory.close()
        await ann.close()
        await cleanup()
        await worker.stop()
    }

    @Test func aFrontendCannotPublishToTheAdminExchange() async throws {
        let deployment = try await Deployment.make(partitions: 4)
        let worker = deployment.startWorker()
        let frontend = deployment.client()
        _ = try await frontend.claim("admin.txt", user: "ann", connection: "c")
        do {
            _ = try await frontend.forceRelease("admin.txt")
            Issue.record("a frontend force-released a lease")
        } catch let error as BatonClientError {
            #expect(error.code == .forbidden, "\(error)")
        }
        #expect(try await frontend.inspect("admin.txt").holder != nil, "the lease is still held")
        let operatorClient = deployment.client(as: deployment.operatorURL)
        #expect(try await operatorClient.forceRelease("admin.txt") == 1)
        await operatorClient.close()
        await frontend.close()
        await worker.stop()
    }

    @Test func repliesGoOnlyToTheSendersReplyQueue() async throws {
        let deployment = try await Deployment.make(partitions: 4)
        let worker = deployment.startWorker()
        let setup = try await deployment.connect("victim")
        let victim = try await setup.openChannel()
        try await victim.declareQueue("baton.test.victim", arguments: ["x-queue-type": .string("quorum")])
        let raw = try await deployment.connect("misdirect", as: deployment.frontendURL)
        let channel = try await raw.openChannel()
        for index in 0..<5 {
            let request = Request.claim("victim-\(index).txt", user: "u", connection: "c")
            try await channel.publish(OutgoingMessage(
                exchange: ProtocolV1.requestsExchange, routingKey: String(deployment.partitioner.partition(of: "victim-\(index).txt")),
                body: ProtocolCodec.encode(request),
                properties: AMQPProperties(correlationID: "\(index)", replyTo: "baton.test.victim", userID: deployment.frontendURL.user), mandatory: true
            ))
        }
        let dead = try await setup.openChannel()
        #expect(await Deployment.eventually { (try? await dead.inspectQueue(ProtocolV1.deadLetterQueue).messages) == 5 }, "refused and dead-lettered")
        #expect(try await victim.inspectQueue("baton.test.victim").messages == 0, "nothing was published to the named queue")
        let client = deployment.client()
        #expect(try await client.inspect("victim-0.txt").holder == nil, "the refused claims were not decided")
        await client.close()
        await raw.close()
        await setup.close()
        await worker.stop()
    }

    /// RabbitMQ 3.10.8 closes the connection (541 INTERNAL_ERROR) that publishes to a direct reply-to
    /// address it cannot resolve. Replies have a connection of their own: such a request costs that one,
    /// not the worker's consumers.
    @Test func aReplyAddressTheBrokerCannotResolveCostsTheWorkerNoConsumer() async throws {
        let deployment = try await Deployment.make(partitions: 2)
        let running = deployment.startWorker()
        let client = deployment.client()
        _ = try await client.inspect("warm-up")
        #expect(running.worker.stats.connections == 1)
        let raw = try await deployment.connect("garbage reply-to", as: deployment.frontendURL)
        let channel = try await raw.openChannel()
        for (index, replyTo) in ["amq.rabbitmq.reply-to.garbage", "amq.rabbitmq.reply-to.Zm9v.YmFy", "amq.rabbitmq.reply-to.g2gC.x"].enumerated() {
            let request = Request.claim("unresolvable-\(index).txt", user: "u", connection: "c")
            try await channel.publish(OutgoingMessage(
                exchange: ProtocolV1.requestsExchange, routingKey: String(deployment.partitioner.partition(of: "unresolvable-\(index).txt")),
                body: ProtocolCodec.encode(request),
                properties: AMQPProperties(correlationID: "\(index)", replyTo: replyTo, userID: deployment.frontendURL.user), mandatory: true
            ))
        }
        // Claims keep being answered, and the worker never had to reconnect its consumers.
        for index in 0..<20 {
            let result = try await client.claim("after-\(index).txt", user: "u", connection: "c", lease: .seconds(30))
            guard case .granted = result else { Issue.record("claim \(index): \(result)"); break }
        }
        #expect(try await Deployment.eventually(.seconds(5)) { try await client.inspect("unresolvable-2.txt").holder != nil }, "the requests were decided")
        #expect(running.worker.stats.connections == 1, "the consumers' connection survived")
        await client.close()
        await raw.close()
        await running.stop()
    }

    @Test func oversizeMessagesAreRefusedOrAnsweredAndTheWorkerServes() async throws {
        let deployment = try await Deployment.make(partitions: 2)
        let worker = deployment.startWorker()
        // Above the broker's max_message_size: the broker refuses it (closing the channel it came on).
        let hugeConnection = try await deployment.connect("oversize 1 MiB", as: deployment.frontendURL)
        let huge = try await hugeConnection.openChannel()
        try await huge.publish(OutgoingMessage(exchange: ProtocolV1.requestsExchange, routingKey: "0", body: [UInt8](repeating: 0x20, count: 1 << 20)))
        #expect(await Deployment.eventually(.seconds(5)) { (try? await huge.qos(prefetch: 1)) == nil }, "the broker refused a 1 MiB message")
        await hugeConnection.close()
        let raw = try await deployment.connect("oversize", as: deployment.frontendURL)
        // Between the protocol's 64 KiB and the broker's limit: answered payload_too_large, never buffered.
        let channel = try await raw.openChannel()
        let (_, replies) = try await channel.consume(queue: ProtocolV1.directReplyTo, noAck: true)
        for index in 0..<200 {
            try await channel.publish(OutgoingMessage(
                exchange: ProtocolV1.requestsExchange, routingKey: String(index % 2), body: [UInt8](repeating: 0x20, count: 100 * 1024),
                properties: AMQPProperties(correlationID: "\(index)", replyTo: ProtocolV1.directReplyTo), mandatory: true
            ))
        }
        var answered = 0
        let deadline = ContinuousClock.now + .seconds(30)
        while answered < 200, ContinuousClock.now < deadline {
            for message in try await replies.next(max: 256, timeout: .seconds(1)) {
                if try ProtocolCodec.decodeReply(message.body).error?.code == .payloadTooLarge { answered += 1 }
            }
        }
        #expect(answered == 200)
        let client = deployment.client()
        guard case .granted = try await client.claim("after-oversize.txt", user: "u", connection: "c") else {
            Issue.record("the worker does not serve after the burst")
            return
        }
        await client.close()
        await raw.close()
        await worker.stop()
    }

    @Test func requestValuesAreEscapedInLogs() async throws {
        let deployment = try await Deployment.make(partitions: 2)
        let captured = CapturedLogs()
        var logger = Logger(label: "baton.test.capture") { _ in captured }
        logger.logLevel = .debug
        let worker = deployment.startWorker(logger: logger)
        let raw = try await deployment.connect("injection", as: deployment.frontendURL)
        let channel = try await raw.openChannel()
        let evil = "x\n2026-11-28T00:00:00Z critical : forged line \u{1B}[2J\u{202E}"
        var body = Array(#"{"v":1,"op":"steal","request_id":"#.utf8)
        body += Array(String(decoding: try JSONEncoder().encode(evil), as: UTF8.self).utf8) + Array(#","buffer":"b"}"#.utf8)
        try await channel.publish(OutgoingMessage(exchange: ProtocolV1.requestsExchange, routingKey: "0", body: body, mandatory: true))
        #expect(await Deployment.eventually { worker.worker.stats.rejected == 1 })
        let lines = captured.lines.value
        #expect(lines.contains { $0.contains("forged line") }, "the request was logged")
        for line in lines {
            #expect(!line.contains("\n") && !line.contains("\u{1B}") && !line.contains("\u{202E}"), "unescaped: \(line.debugDescription)")
        }
        await raw.close()
        await worker.stop()
    }

    @Test func theDeadLetterQueueIsBounded() async throws {
        let deployment = try await Deployment.make(partitions: 2, deadLetterLimit: 10)
        let worker = deployment.startWorker()
        let raw = try await deployment.connect("flood", as: deployment.frontendURL)
        let channel = try await raw.openChannel()
        for index in 0..<40 {
            try await channel.publish(OutgoingMessage(exchange: ProtocolV1.requestsExchange, routingKey: String(index % 2), body: Array("junk \(index)".utf8), mandatory: true))
        }
        #expect(await Deployment.eventually { worker.worker.stats.rejected == 40 })
        let setup = try await deployment.connect("dead letters")
        let dead = try await setup.openChannel()
        try await Task.sleep(for: .milliseconds(500))
        #expect(try await dead.inspectQueue(ProtocolV1.deadLetterQueue).messages == 10, "the oldest dead letters were dropped")
        await setup.close()
        await raw.close()
        await worker.stop()
    }

    @Test func aReplyToAnEarlierAttemptAnswersTheCall() async throws {
        let deployment = try await Deployment.make(partitions: 2)
        let worker = deployment.startWorker { configuration in
            configuration.afterCommit = { _, _ in try? await Task.sleep(for: .seconds(2)) }
        }
        var configuration = BatonClientConfiguration(amqpURL: deployment.frontendURL, partitioner: deployment.partitioner)
        configuration.name = "default client"  // default timeout (5 s) and resend interval (1.5 s)
        let client = BatonClient(configuration: configuration, logger: TestDatabase.logger)
        _ = try? await client.inspect("warm-up")
        let started = ContinuousClock.now
        guard case .granted = try await client.claim("slow.txt", user: "u", connection: "c") else {
            Issue.record("not granted")
            return
        }
        let took = ContinuousClock.now - started
        print("slow worker: granted after \(took)")
        // Every reply comes 2 s after its attempt while attempts are 1.5 s apart: only a client that accepts
        // the reply to any attempt gets one before its 5 s timeout.
        #expect(took < .seconds(4.9), "the reply to an earlier attempt answered the call")
        await client.close()
        await worker.stop()
    }

    @Test func anIdleTransactionCannotBlockATakeover() async throws {
        let url = try await TestDatabase.migrated(partitions: 4)
        // A worker frozen inside a transaction that holds its partition row FOR SHARE.
        let frozen = try await PostgresConnection.connect(to: url, options: .worker(applicationName: "frozen worker"), logger: TestDatabase.logger)
        _ = try await frozen.withSession { session in
            try session.query("BEGIN")
            return try session.query("SELECT epoch FROM baton_partitions WHERE partition = 0 FOR SHARE")
        }
        let connection = try await PostgresConnection.connect(to: url, options: .worker(applicationName: "new owner"), logger: TestDatabase.logger)
        let store = try await OwnershipStore.open(connection: connection, partitioner: try Partitioner(count: 4), logger: TestDatabase.logger)
        let started = ContinuousClock.now
        var epoch: Int64?
        while epoch == nil, ContinuousClock.now - started < .seconds(20) {
            epoch = try? await store.takePartition(0, owner: "new owner")
        }
        let took = ContinuousClock.now - started
        print("takeover past an idle FOR SHARE transaction: \(took)")
        #expect(epoch == 1)
        #expect(took < .seconds(8), "bounded by idle_in_transaction_session_timeout (took \(took))")
        await connection.close()
        await frozen.close()
    }

    @Test func aRequestTheDatabaseRefusesIsAnsweredAndThePartitionGoesOn() async throws {
        let deployment = try await Deployment.make(partitions: 2)
        let admin = try await PostgresConnection.connect(to: deployment.databaseURL, logger: TestDatabase.logger)
        _ = try await admin.withSession { session in
            try session.query("ALTER TABLE baton_buffers ADD CONSTRAINT test_poison CHECK (buffer NOT LIKE 'poison%')")
        }
        await admin.close()
        let worker = deployment.startWorker()
        let client = deployment.client(timeout: .seconds(10))
        let poisonPartition = deployment.partitioner.partition(of: "poison.txt")
        let neighbours = (0..<200).map { "neighbour-\($0)" }.filter { deployment.partitioner.partition(of: $0) == poisonPartition }.prefix(20)
        let outcomes = try await withThrowingTaskGroup(of: (String, String).self) { group in
            for name in ["poison.txt"] + neighbours {
                group.addTask {
                    do {
                        let result = try await client.claim(name, user: "u", connection: "c")
                        if case .granted = result { return (name, "granted") }
                        return (name, "\(result)")
                    } catch let error as BatonClientError {
                        return (name, error.errorCode?.rawValue ?? error.code.description)
                    }
                }
            }
            return try await group.reduce(into: [String: String]()) { $0[$1.0] = $1.1 }
        }
        #expect(outcomes["poison.txt"] == ErrorCode.internalError.rawValue)
        for name in neighbours { #expect(outcomes[name] == "granted", "\(name): \(outcomes[name] ?? "-")") }
        guard case .granted = try await client.claim(neighbours.first! + "-after", user: "u", connection: "c") else {
            Issue.record("the partition stopped")
            return
        }
        #expect(await Deployment.eventually { worker.worker.stats.failed == 1 })
        #expect(worker.worker.readiness.stalled.isEmpty)
        await client.close()
        await worker.stop()
    }

    @Test func releaseConnectionOverThousandsOfLongNamedBuffersIsAnswered() async throws {
        let deployment = try await Deployment.make(partitions: 2)
        let worker = deployment.startWorker()
        let client = deployment.client(timeout: .seconds(30))
        let names = (0..<1500).map { "\($0)-" + String(repeating: "x", count: 1000) }
        try await withThrowingTaskGroup(of: Void.self) { group in
            for lane in 0..<32 {
                group.addTask {
                    for index in stride(from: lane, to: names.count, by: 32) {
                        _ = try await client.claim(names[index], user: "u", connection: "big")
                    }
                }
            }
            try await group.waitForAll()
        }
        let released = try await client.releaseConnection("big")
        #expect(released.count == 1500)
        #expect(!released.isComplete && released.buffers.count > 0 && released.buffers.count < 1500)
        #expect(try await client.inspect(names[0]).holder == nil)
        await client.close()
        await worker.stop()
    }

    @Test func aReusedRequestIDWithAnotherRequestIsRefused() async throws {
        let deployment = try await Deployment.make(partitions: 4)
        let worker = deployment.startWorker()
        let client = deployment.client()
        let (a, b) = Self.samePartition(deployment.partitioner, "reuse")
        guard case .granted = try await client.claim(a, user: "u", connection: "c", requestID: "r-reused") else {
            Issue.record("not granted")
            return
        }
        do {
            let result = try await client.claim(b, user: "u", connection: "c", requestID: "r-reused")
            Issue.record("the reused request id was answered: \(result)")
        } catch let error as BatonClientError {
            #expect(error.errorCode == .requestIDReused, "\(error)")
        }
        #expect(try await client.inspect(b).holder == nil, "b was not granted")
        // An exact retry still gets the original answer.
        guard case .granted = try await client.claim(a, user: "u", connection: "c", requestID: "r-reused") else {
            Issue.record("the retry was not answered from the record")
            return
        }
        await client.close()
        await worker.stop()
    }

    @Test func anExpiredRequestIsNotDecided() async throws {
        let deployment = try await Deployment.make(partitions: 2)
        let worker = deployment.startWorker()
        let client = deployment.client()
        let past = Timestamp(milliseconds: Int64(Date().timeIntervalSince1970 * 1000) - 60_000)
        let request = Request(requestID: UUID().uuidString, command: .claim(buffer: "late.txt", holder: Holder(user: "u", connection: "c"), leaseMilliseconds: 30_000), deadline: past)
        do {
            _ = try await client.call(request)
            Issue.record("an expired request was decided")
        } catch let error as BatonClientError {
            #expect(error.errorCode == .deadlineExceeded, "\(error)")
        }
        #expect(try await client.inspect("late.txt").holder == nil)
        var far = request
        far.requestID = UUID().uuidString
        far.deadline = past.adding(milliseconds: 3_600_000)
        do {
            _ = try await client.call(far)
            Issue.record("a deadline an hour ahead was accepted")
        } catch let error as BatonClientError {
            #expect(error.errorCode == .invalidRequest, "\(error)")
        }
        #expect(OwnershipStore.minimumRetention >= .milliseconds(ProtocolV1.maxRequestLifetimeMilliseconds))
        await client.close()
        await worker.stop()
    }

    @Test func theEchoWorkerRefusesADeploymentsVirtualHost() async throws {
        let deployment = try await Deployment.make(partitions: 1)
        var configuration = deployment.workerConfiguration(id: "echo")
        configuration.echo = true
        configuration.amqpURL.virtualHost = "/"
        let error = await #expect(throws: EchoRefused.self) { try await Worker(configuration: configuration, logger: TestDatabase.logger).run() }
        #expect(error?.description.contains("scratch") == true)
    }

    @Test func aDroppedClientClosesItsConnection() async throws {
        let deployment = try await Deployment.make(partitions: 2)
        let worker = deployment.startWorker()
        var client: BatonClient? = deployment.client()
        _ = try await client!.inspect("dropped.txt")
        let connection = try #require(client!.currentConnection)
        weak var weakClient = client
        client = nil
        #expect(await Deployment.eventually(.seconds(5)) { weakClient == nil }, "the client was freed")
        #expect(await Deployment.eventually(.seconds(5)) { !connection.isOpen }, "its connection was closed")
        await worker.stop()
    }
}

/// A log handler that keeps every line as `StreamLogHandler` would print it (message and metadata).
final class CapturedLogs: LogHandler, Sendable {
    let lines = Shared<[String]>([])
    var metadata: Logger.Metadata {
        get { [:] }
        set {}
    }
    var logLevel: Logger.Level {
        get { .trace }
        set {}
    }
    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { nil }
        set {}
    }
    func log(level: Logger.Level, message: Logger.Message, metadata: Logger.Metadata?, source: String, file: String, function: String, line: UInt) {
        let rendered = (metadata ?? [:]).sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
        lines.update { $0.append("\(level) \(message) \(rendered)") }
    }
}

/// Scratch runs and their child processes (issue 8, item 12).
@Suite(.serialized, .timeLimit(.minutes(3))) struct ScratchIsolationTests {
    /// Pids of processes whose parent is `parent`.
    static func children(of parent: Int32) -> [Int32] {
        ((try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []).compactMap { entry -> Int32? in
            guard let pid = Int32(entry), let stat = try? String(contentsOfFile: "/proc/\(entry)/stat", encoding: .utf8),
                  let close = stat.lastIndex(of: ")")
            else { return nil }
            let fields = stat[stat.index(after: close)...].split(separator: " ")
            return fields.count > 1 && Int32(fields[1]) == parent ? pid : nil
        }
    }

    @Test func aBenchKilledMidwayLeavesNoWorkerBehindAndTheDeploymentUntouched() async throws {
        let deployment = try await Deployment.make(partitions: 2)
        // The "deployment": a consumer on one partition queue and a ready message on the other.
        let owner = try await deployment.connect("deployment consumer")
        let consuming = try await owner.openChannel()
        let (_, deliveries) = try await consuming.consume(queue: ProtocolV1.requestQueue(0))
        let marker = try await owner.openChannel()
        try await marker.publish(OutgoingMessage(exchange: "", routingKey: ProtocolV1.requestQueue(1), body: Array("marker".utf8)))

        let log = FileManager.default.temporaryDirectory.appendingPathComponent("baton-bench-killed-\(UUID().uuidString).log")
        defer { try? FileManager.default.removeItem(at: log) }
        let bench = try deployment.launchBaton(
            ["bench", "--duration", "60", "--workload", "hot", "--system", "baton", "--clients", "4", "--partitions", "2", "--no-half-peak",
             "--output", FileManager.default.temporaryDirectory.appendingPathComponent("baton-bench-killed").path],
            log: log
        )
        var workers: [Int32] = []
        #expect(await Deployment.eventually(.seconds(60)) {
            workers = Self.children(of: bench.pid)
            return !workers.isEmpty
        }, "the bench started its worker")
        try await Task.sleep(for: .seconds(2))
        bench.signal(SIGKILL)
        await bench.wait(timeout: .seconds(10))
        #expect(await Deployment.eventually(.seconds(25)) { workers.allSatisfy { kill($0, 0) != 0 } }, "the bench's workers died with it: \(workers)")

        #expect(try await consuming.inspectQueue(ProtocolV1.requestQueue(0)).consumers == 1, "the deployment's consumer is still there")
        #expect(try await deliveries.next(max: 1, timeout: .milliseconds(200)).isEmpty, "nothing reached the deployment's consumer")
        #expect(try await marker.inspectQueue(ProtocolV1.requestQueue(1)).messages == 1, "the deployment's message is still there")
        await owner.close()
    }

    @Test func aChaosRunThatFailsPrintsTheErrorAndLeavesNoWorker() async throws {
        let deployment = try await Deployment.make(partitions: 2)
        let script = FileManager.default.temporaryDirectory.appendingPathComponent("baton-failing-services-\(UUID().uuidString).sh")
        try "#!/bin/sh\necho refusing >&2\nexit 1\n".write(to: script, atomically: true, encoding: .utf8)
        chmod(script.path, 0o755)
        let log = FileManager.default.temporaryDirectory.appendingPathComponent("baton-chaos-fails-\(UUID().uuidString).log")
        var environment = ProcessInfo.processInfo.environment
        environment["BATON_SERVICES_SCRIPT"] = script.path
        let chaos = try deployment.launchBaton(["chaos", "--fault", "broker", "--settle-seconds", "1", "--clients", "2"], log: log, environment: environment)
        var workers: [Int32] = []
        var status: Int32?
        let deadline = ContinuousClock.now + .seconds(90)
        while status == nil, ContinuousClock.now < deadline {
            workers = Array(Set(workers + Self.children(of: chaos.pid)))
            status = chaos.reap()
            try await Task.sleep(for: .milliseconds(100))
        }
        let output = (try? String(contentsOf: log, encoding: .utf8)) ?? ""
        #expect(status == 1, "a runtime failure exits 1, not 64: \(output.suffix(1000))")
        #expect(output.contains("exited with status 1"))
        #expect(!output.contains("USAGE:"), "no usage text for a runtime failure")
        #expect(!workers.isEmpty, "the run had started workers")
        #expect(await Deployment.eventually(.seconds(20)) { workers.allSatisfy { kill($0, 0) != 0 } }, "its workers are gone: \(workers)")
    }
}

/// Coalesced requests: several requests in one message, each answered in place (issue 9, item 2).
@Suite(.serialized, .timeLimit(.minutes(3))) struct CoalescingTests {
    @Test func aBatchIsAnsweredInOneMessageElementByElement() async throws {
        let deployment = try await Deployment.make(partitions: 2)
        let worker = deployment.startWorker()
        let raw = try await deployment.connect("batch", as: deployment.frontendURL)
        let channel = try await raw.openChannel()
        let (_, replies) = try await channel.consume(queue: ProtocolV1.directReplyTo, noAck: true)
        let here = (0..<100).map { "batch-\($0)" }.filter { deployment.partitioner.partition(of: $0) == 0 }
        let elsewhere = (0..<100).map { "batch-\($0)" }.first { deployment.partitioner.partition(of: $0) == 1 }!
        let good = Request.claim(here[0], user: "u", connection: "c")
        let misrouted = Request.claim(elsewhere, user: "u", connection: "c")
        var body = Array(#"{"v":1,"batch":["#.utf8) + ProtocolCodec.encode(good) + Array(",".utf8)
        body += Array(#"{"v":1,"op":"claim","request_id":"bad","buffer":"x"}"#.utf8) + Array(",".utf8)
        body += ProtocolCodec.encode(misrouted) + Array(",".utf8) + ProtocolCodec.encode(Request(requestID: "i", command: .inspect(buffer: here[0]))) + Array("]}".utf8)
        try await channel.publish(OutgoingMessage(
            exchange: ProtocolV1.requestsExchange, routingKey: "0", body: body,
            properties: AMQPProperties(correlationID: "b1", replyTo: ProtocolV1.directReplyTo, userID: deployment.frontendURL.user), mandatory: true
        ))
        let message = try #require(try await replies.next(max: 1, timeout: .seconds(10)).first)
        #expect(message.properties.correlationID == "b1")
        let answers = try ProtocolCodec.decodeReplies(message.body)
        #expect(answers.map(\.status) == [.granted, .error, .error, .state])
        #expect(answers.map(\.requestID) == [good.requestID, "bad", misrouted.requestID, "i"])
        #expect(answers[1].error?.code == .invalidRequest && answers[2].error?.code == .misrouted)
        #expect(answers[3].holder?.user == "u", "elements are decided in order")

        // A bad envelope is refused whole and dead-lettered; a batch with bad elements is not.
        try await channel.publish(OutgoingMessage(
            exchange: ProtocolV1.requestsExchange, routingKey: "0", body: Array(#"{"v":1,"batch":[]}"#.utf8),
            properties: AMQPProperties(correlationID: "b2", replyTo: ProtocolV1.directReplyTo, userID: deployment.frontendURL.user), mandatory: true
        ))
        let refused = try #require(try await replies.next(max: 1, timeout: .seconds(10)).first)
        #expect(try ProtocolCodec.decodeReply(refused.body).error?.code == .invalidRequest)
        let setup = try await deployment.connect("dead letters")
        let dead = try await setup.openChannel()
        #expect(await Deployment.eventually { (try? await dead.inspectQueue(ProtocolV1.deadLetterQueue).messages) == 1 })
        await setup.close()
        await raw.close()
        await worker.stop()
    }

    @Test func aBusyClientCoalescesCallsToOnePartition() async throws {
        let deployment = try await Deployment.make(partitions: 1)
        let worker = deployment.startWorker()
        let client = deployment.client(timeout: .seconds(20))
        _ = try await client.inspect("warm-up")
        let before = worker.worker.stats
        let granted = try await withThrowingTaskGroup(of: Bool.self) { group in
            for index in 0..<300 {
                group.addTask {
                    if case .granted = try await client.claim("coalesced-\(index)", user: "u", connection: "c") { return true }
                    return false
                }
            }
            return try await group.reduce(0) { $0 + ($1 ? 1 : 0) }
        }
        // The worker counts a batch after its replies are out: wait for the last count.
        #expect(await Deployment.eventually { worker.worker.stats.requests - before.requests >= 300 })
        let after = worker.worker.stats
        let requests = after.requests - before.requests
        let messages = after.messages - before.messages
        print("coalescing: \(requests) requests in \(messages) messages")
        #expect(granted == 300)
        #expect(requests >= 300)
        #expect(messages < requests / 4, "calls to one partition went together (\(requests) requests, \(messages) messages)")
        let audit = try await deployment.audit()
        #expect(HistoryChecker.check(audit.changes, finalTokens: audit.finalTokens).passed)
        await client.close()
        await worker.stop()
    }
}

/// What a worker costs the database (issue 9, item 1: connections do not grow with partitions).
@Suite(.timeLimit(.minutes(3))) struct WorkerShapeTests {
    /// The queue-depth gauge is read on a connection of its own (``QueueDepthProbe``), off the consumer
    /// connection: it reads a queue's ready messages, goes on after a queue that does not exist (the
    /// broker closes the channel on it) and stops at once.
    @Test func theQueueDepthProbeReadsOnAConnectionOfItsOwn() async throws {
        let deployment = try await Deployment.make(partitions: 2)
        let raw = try await deployment.connect("depth publisher")
        let channel = try await raw.openChannel()
        try await channel.enableConfirms()
        for _ in 0..<3 {
            try await channel.publish(OutgoingMessage(exchange: "", routingKey: ProtocolV1.requestQueue(1), body: Array("{}".utf8), properties: AMQPProperties(), mandatory: false))
        }
        await raw.close()
        let probe = QueueDepthProbe(
            url: deployment.amqpURL, name: "test inspect", queueName: { $0 < 2 ? ProtocolV1.requestQueue($0) : "baton.test.missing-\($0)" }, logger: TestDatabase.logger
        )
        let running = Task { await probe.run() }
        let seen = Shared<[Int: Int]>([:])
        for partition in [5, 1, 0] { probe.sample(partition) { depth in seen.update { $0[partition] = depth } } }
        #expect(await Deployment.eventually(.seconds(10)) { seen.value[1] == 3 && seen.value[0] == 0 }, "\(seen.value)")
        #expect(seen.value[5] == nil, "a queue that does not exist gives no sample")
        let stopping = ContinuousClock.now
        probe.stop()
        await running.value
        #expect(ContinuousClock.now - stopping < .seconds(1), "the probe stopped at once")
    }

    @Test func sixtyFourPartitionsShareFourDatabaseConnections() async throws {
        let deployment = try await Deployment.make(partitions: 64)
        let worker = deployment.startWorker()
        #expect(await Deployment.eventually(.seconds(30)) { worker.worker.readiness.isReady })
        let client = deployment.client(timeout: .seconds(20))
        let names = (0..<400).map { "shape-\($0)" }
        #expect(Set(names.map { deployment.partitioner.partition(of: $0) }).count == 64)
        try await withThrowingTaskGroup(of: Void.self) { group in
            for name in names { group.addTask { _ = try await client.claim(name, user: "u", connection: "c") } }
            try await group.waitForAll()
        }
        let admin = try await PostgresConnection.connect(to: deployment.databaseURL, logger: TestDatabase.logger)
        let count = try await admin.withSession { session in
            try session.query("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name LIKE 'baton worker%'").first()
        }
        await admin.close()
        #expect(count == "4", "a worker serving 64 partitions holds \(count ?? "?") PostgreSQL connections")
        let audit = try await deployment.audit()
        #expect(audit.changes.filter { $0.kind == .granted }.count == 400)
        await client.close()
        await worker.stop()
    }
}

/// What a hostile batch could do to a partition (issue 8's "stop a partition with one message").
@Suite(.serialized, .timeLimit(.minutes(3))) struct HostileBatchTests {
    @Test func aTransactionHoldsAtMostBatchSizeRequestsWhateverAMessageCarries() async throws {
        let deployment = try await Deployment.make(partitions: 1)
        let worker = deployment.startWorker { $0.batchSize = 8 }
        let raw = try await deployment.connect("big batch", as: deployment.frontendURL)
        let channel = try await raw.openChannel()
        let (_, replies) = try await channel.consume(queue: ProtocolV1.directReplyTo, noAck: true)
        let claims = (0..<100).map { Request.claim("chunk-\($0)", user: "u", connection: "c", id: "c\($0)") }
        try await channel.publish(OutgoingMessage(
            exchange: ProtocolV1.requestsExchange, routingKey: "0", body: ProtocolCodec.encodeBatch(claims),
            properties: AMQPProperties(correlationID: "big", replyTo: ProtocolV1.directReplyTo, userID: deployment.frontendURL.user), mandatory: true
        ))
        var answered: [Reply] = []
        let deadline = ContinuousClock.now + .seconds(15)
        while answered.count < 100, ContinuousClock.now < deadline {
            for message in try await replies.next(max: 16, timeout: .milliseconds(500)) { answered += try ProtocolCodec.decodeReplies(message.body) }
        }
        #expect(answered.map(\.requestID) == claims.map(\.requestID) && answered.allSatisfy { $0.status == .granted })
        #expect(await Deployment.eventually { worker.worker.stats.transactions >= 13 }, "100 requests in transactions of at most 8")
        await raw.close()
        await worker.stop()
    }

    @Test func aBatchWhoseRepliesAreHugeIsAnsweredInPartsAndThePartitionGoesOn() async throws {
        let deployment = try await Deployment.make(partitions: 1)
        let worker = deployment.startWorker()
        let client = deployment.client()
        // A holder whose names escape to 1.5 KiB each in every reply about the buffer.
        let names = String(repeating: "\u{1}", count: 256)
        guard case .granted = try await client.claim("held", user: names, connection: names) else {
            Issue.record("not granted")
            return
        }
        let raw = try await deployment.connect("hostile batch", as: deployment.frontendURL)
        let channel = try await raw.openChannel()
        let (_, replies) = try await channel.consume(queue: ProtocolV1.directReplyTo, noAck: true)
        let inspects = (0..<256).map { Request(requestID: "i\($0)", command: .inspect(buffer: "held")) }
        let body = ProtocolCodec.encodeBatch(inspects)
        #expect(body.count <= ProtocolV1.maxBodyBytes)
        try await channel.publish(OutgoingMessage(
            exchange: ProtocolV1.requestsExchange, routingKey: "0", body: body,
            properties: AMQPProperties(correlationID: "huge", replyTo: ProtocolV1.directReplyTo, userID: deployment.frontendURL.user), mandatory: true
        ))
        var answered: [Reply] = []
        var messages = 0
        let deadline = ContinuousClock.now + .seconds(15)
        while answered.count < 256, ContinuousClock.now < deadline {
            for message in try await replies.next(max: 16, timeout: .milliseconds(500)) {
                messages += 1
                #expect(message.body.count < 128 * 1024)
                answered += try ProtocolCodec.decodeReplies(message.body)
            }
        }
        print("hostile batch: 256 replies in \(messages) messages")
        #expect(answered.map(\.requestID) == inspects.map(\.requestID), "every element answered, in order")
        #expect(messages > 1)
        guard case .granted = try await client.claim("after", user: "u", connection: "c") else {
            Issue.record("the partition stopped")
            return
        }
        await raw.close()
        await client.close()
        await worker.stop()
    }
}
