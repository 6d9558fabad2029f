import BatonAMQP
import BatonCore
import BatonPostgres
import Foundation
import Logging
import ServiceLifecycle
import Synchronization

/// How a worker runs.
public struct WorkerConfiguration: Sendable {
    /// The broker.
    public var amqpURL: AMQPURL
    /// The database.
    public var databaseURL: PostgresURL
    /// The deployment's partitioner (N).
    public var partitioner: Partitioner
    /// The partitions this worker serves (active or standby, as the broker decides).
    public var partitions: [Int]
    /// Unacknowledged deliveries per partition.
    public var prefetch: UInt16 = 256
    /// Requests per batch (one transaction).
    public var batchSize: Int = 256
    /// PostgreSQL connections the worker opens, whatever the number of partitions it serves (they share
    /// them); at most one per partition.
    public var databaseConnections: Int = 4
    /// How long to wait for more requests after the first of a batch.
    public var linger: Duration = .zero
    /// Events as one message per commit (`<p>.changes`, the default) or one message per change
    /// (`<p>.<kind>`, for consumers that bind by kind); docs/protocol.md, section 7.
    public var eventsPerCommit = true
    /// How often each partition expires leases and republishes undelivered events.
    public var sweepInterval: Duration = .seconds(1)
    /// How long to wait before consuming a partition again after losing it.
    public var rejoinDelay: Duration = .seconds(2)
    /// This worker's name in `baton_partitions.owner` and in the broker's connection list.
    public var workerID: String
    /// The queue consumed for a partition (`baton.requests.<p>`); tests point it elsewhere to run duplicate consumers.
    public var queueName: @Sendable (Int) -> String = { ProtocolV1.requestQueue($0) }
    /// Benchmark ceiling: answer every valid request at once, as granted, without PostgreSQL
    /// (`baton bench`'s "broker echo"). It runs only in a scratch virtual host (`baton-scratch-...`, as
    /// `baton bench` makes), so it can never answer a deployment's claims.
    public var echo = false
    /// Fault injection for tests: called after a batch commits and before its replies and acks are sent,
    /// with the connection replies are published on.
    public var afterCommit: (@Sendable (_ partition: Int, _ connection: AMQPConnection) async -> Void)?

    /// Creates a configuration.
    public init(amqpURL: AMQPURL, databaseURL: PostgresURL, partitioner: Partitioner, partitions: [Int], workerID: String = Worker.defaultID()) {
        self.amqpURL = amqpURL
        self.databaseURL = databaseURL
        self.partitioner = partitioner
        self.partitions = partitions
        self.workerID = workerID
    }
}

/// The partition worker: for each partition it serves, it consumes requests in
/// batches, decides them through the fenced store in one transaction, replies,
/// acks, and publishes the committed ownership changes as events.
///
/// Run it in a `ServiceGroup`: on graceful shutdown it finishes the batch in hand,
/// closes its channels (unacked messages return to their queues, in order) and returns.
public final class Worker: Service, Sendable {
    /// The configuration.
    public let configuration: WorkerConfiguration
    private let logger: Logger
    private let stopping = Atomic<Bool>(false)
    private let statistics = Mutex(WorkerStatistics())
    private let health = Mutex(WorkerReadiness())

    /// Creates a worker.
    public init(configuration: WorkerConfiguration, logger: Logger) {
        self.configuration = configuration
        var logger = logger
        logger[metadataKey: "baton.worker"] = "\(configuration.workerID)"
        self.logger = logger
    }

    /// A name unique to this process: host, pid and a random suffix.
    public static func defaultID() -> String {
        "\(ProcessInfo.processInfo.hostName)-\(ProcessInfo.processInfo.processIdentifier)-\(UInt16.random(in: 0...UInt16.max))"
    }

    /// Counters since start (for tests and logs).
    public var stats: WorkerStatistics { statistics.withLock { $0 } }

    /// Whether the worker is connected to both services and consuming every partition it serves.
    public var readiness: WorkerReadiness {
        var readiness = health.withLock { $0 }
        readiness.partitions = configuration.partitions
        return readiness
    }

    public func run() async throws {
        try await withGracefulShutdownHandler {
            try await serve()
        } onGracefulShutdown: {
            self.stopping.store(true, ordering: .relaxed)
        }
    }

    /// Asks the worker to stop as on SIGTERM (for embedding without a ServiceGroup).
    public func requestStop() {
        stopping.store(true, ordering: .relaxed)
    }

    private var isStopping: Bool { stopping.load(ordering: .relaxed) }

    private func serve() async throws {
        if configuration.echo, !configuration.amqpURL.virtualHost.hasPrefix("baton-scratch-") {
            throw EchoRefused(virtualHost: configuration.amqpURL.virtualHost)
        }
        let stores = configuration.echo ? [:] : try await openStores()
        health.withLock { $0.databaseConnected = true }
        var backoff = Backoff()
        while !isStopping {
            let connections: BrokerConnections
            do {
                connections = try await BrokerConnections.open(configuration: configuration, logger: logger)
            } catch {
                let delay = backoff.next()
                logger.warning("cannot reach RabbitMQ; retrying", metadata: ["baton.error": "\(error)", "baton.retry_in": "\(delay)"])
                await sleep(delay)
                continue
            }
            backoff.reset()
            let reconnect = statistics.withLock { state -> Bool in
                state.connections += 1
                return state.connections > 1
            }
            if reconnect { WorkerMetrics.reconnects.increment() }
            health.withLock { $0.brokerConnected = true }
            logger.info("worker connected", metadata: [
                "baton.amqp": "\(configuration.amqpURL)", "baton.partitions": "\(PartitionSetDescription(configuration.partitions))",
            ])
            await withTaskGroup(of: Void.self) { group in
                for partition in configuration.partitions {
                    group.addTask { await self.runPartition(partition, store: stores[partition], connections: connections) }
                }
                // Stop every runner promptly on shutdown: they finish their batch in hand and close their channel.
                group.addTask {
                    while !self.isStopping, connections.isOpen {
                        let blocked = connections.publisher.blockedReason
                        self.health.withLock { $0.publishingBlocked = blocked }
                        await self.sleep(.milliseconds(50))
                    }
                    // One of the two connections died: end the other too, so that every runner stops
                    // (their unacked deliveries go back to the queues) and the worker reconnects both.
                    if !self.isStopping { await connections.close() }
                }
                await group.waitForAll()
            }
            health.withLock {
                $0.brokerConnected = false
                $0.publishingBlocked = nil
                $0.consuming.removeAll()
            }
            await connections.close()
        }
        var shared: [ObjectIdentifier: OwnershipStore] = [:]
        for store in stores.values { shared[ObjectIdentifier(store)] = store }
        for store in shared.values { await store.connection.close() }
        let stats = self.stats
        logger.info("worker stopped", metadata: [
            "baton.requests": "\(stats.requests)", "baton.batches": "\(stats.batches)", "baton.replayed": "\(stats.replayed)",
            "baton.rejected": "\(stats.rejected)", "baton.events": "\(stats.events)", "baton.fence_losses": "\(stats.fenceLosses)",
            "baton.mean_batch": "\(stats.batches > 0 ? Double(stats.requests) / Double(stats.batches) : 0)",
            "baton.mean_commit_ms": "\(stats.batches > 0 ? Double(stats.commitTime.components.attoseconds / 1_000_000_000_000 + stats.commitTime.components.seconds * 1_000_000) / 1000 / Double(stats.batches) : 0)",
        ])
    }

    /// At most ``WorkerConfiguration/databaseConnections`` stores (one PostgreSQL connection each),
    /// shared by the partitions in turn: partition i of the served list uses store i mod K. A store runs
    /// one statement at a time, so partitions sharing one commit one after the other; the number of
    /// connections (and their threads) no longer grows with the partitions served.
    private func openStores() async throws -> [Int: OwnershipStore] {
        let count = max(1, min(configuration.databaseConnections, configuration.partitions.count))
        var shared: [OwnershipStore] = []
        var backoff = Backoff()
        while shared.count < count {
            do {
                let connection = try await PostgresConnection.connect(
                    to: configuration.databaseURL, options: .worker(applicationName: "baton worker \(shared.count + 1)/\(count)"), logger: logger
                )
                shared.append(try await OwnershipStore.open(connection: connection, partitioner: configuration.partitioner, logger: logger))
            } catch let error as SchemaError {
                throw error
            } catch {
                if isStopping { throw error }
                let delay = backoff.next()
                logger.warning("cannot reach PostgreSQL; retrying", metadata: ["baton.error": "\(error)", "baton.retry_in": "\(delay)"])
                await sleep(delay)
            }
        }
        var stores: [Int: OwnershipStore] = [:]
        for (index, partition) in configuration.partitions.enumerated() { stores[partition] = shared[index % count] }
        return stores
    }

    // MARK: - One partition

    private enum RunnerExit: Error {
        case ownershipLost
        case connectionLost
    }

    private func runPartition(_ partition: Int, store: OwnershipStore?, connections: BrokerConnections) async {
        var logger = self.logger
        logger[metadataKey: "baton.partition"] = "\(partition)"
        let metrics = PartitionMetrics(partition: partition)
        while !isStopping, connections.isOpen {
            let runner = PartitionRunner(partition: partition, store: store, configuration: configuration, logger: logger, worker: self, connections: connections, metrics: metrics)
            defer {
                metrics.active.record(0)
                metrics.epoch.record(0)
                _ = health.withLock { $0.consuming.remove(partition) }
            }
            do {
                try await runner.run()
            } catch RunnerExit.ownershipLost {
                statistics.withLock { $0.fenceLosses += 1 }
                metrics.fenceLosses.increment()
                logger.warning("partition ownership lost: stopped consuming; will rejoin as a standby", metadata: ["baton.rejoin_in": "\(configuration.rejoinDelay)"])
                await sleep(configuration.rejoinDelay)
            } catch {
                if connections.isOpen, !isStopping {
                    logger.warning("partition runner failed; restarting it", metadata: ["baton.error": "\(error)"])
                    await sleep(.milliseconds(500))
                }
            }
        }
    }

    /// Sleeps, returning early when the worker stops.
    func sleep(_ duration: Duration) async {
        let deadline = ContinuousClock.now + duration
        while !isStopping, ContinuousClock.now < deadline {
            try? await Task.sleep(for: min(.milliseconds(50), deadline - ContinuousClock.now))
        }
    }

    /// Consumes one partition until the worker stops, the channel dies, or the partition is taken by another worker.
    private struct PartitionRunner {
        let partition: Int
        let store: OwnershipStore?
        let configuration: WorkerConfiguration
        var logger: Logger
        let worker: Worker
        let connections: BrokerConnections
        let metrics: PartitionMetrics

        /// The partition's three channels: one consuming (and acking) on the consumer connection; on the
        /// publisher connection, one for events and ticks in confirm mode and one for replies.
        struct Channels {
            let consume: AMQPChannel
            let publish: AMQPChannel
            /// Replies, on the publisher connection without confirms (the broker would confirm each one).
            let reply: AMQPChannel

            /// Publishes a batch's replies, then settles its deliveries, without waiting for either: the
            /// runner goes on with the next batch meanwhile. Each connection's I/O thread runs what it is
            /// given in order, so replies always leave before their acks, and batches settle in order.
            /// A failure ends the connection, and with it the runner (unsettled deliveries go back to the
            /// queue, answered from their records when they come again).
            func send(_ publishes: [ChannelAction], thenSettle settles: [ChannelAction]) {
                let consume = self.consume
                reply.enqueue(publishes) { error in
                    if error == nil, !settles.isEmpty { consume.enqueue(settles) }
                }
            }

            /// Waits until every batch handed to ``send(_:thenSettle:)`` is published and settled (or failed).
            func drain() async {
                await reply.barrier()
                await consume.barrier()
            }
        }

        func run() async throws {
            let consume = try await connections.consumer.openChannel()
            let publish: AMQPChannel
            let reply: AMQPChannel
            do {
                publish = try await connections.publisher.openChannel()
            } catch {
                await consume.close()
                throw error
            }
            do {
                reply = try await connections.publisher.openChannel()
            } catch {
                await consume.close()
                await publish.close()
                throw error
            }
            let channels = Channels(consume: consume, publish: publish, reply: reply)
            do {
                try await publish.enableConfirms()
                try await consume.qos(prefetch: configuration.prefetch)
                let (_, deliveries) = try await consume.consume(queue: configuration.queueName(partition))
                _ = worker.health.withLock { $0.consuming.insert(partition) }
                let metrics = self.metrics
                let pump = store.map { store in
                    EventPump(partition: partition, store: store, channel: publish, perCommit: configuration.eventsPerCommit, logger: logger) { count in
                        worker.statistics.withLock { $0.events += count }
                        metrics.events.increment(by: count)
                    }
                }
                do {
                    try await loop(channels: channels, deliveries: deliveries, pump: pump)
                } catch {
                    await channels.drain()
                    await pump?.finish()
                    throw error
                }
                await channels.drain()
                await pump?.finish()
            } catch {
                await consume.close()
                await publish.close()
                await reply.close()
                throw error
            }
            await consume.close()
            await publish.close()
            await reply.close()
        }

        private func loop(channels: Channels, deliveries: DeliveryQueue, pump: EventPump?) async throws {
            var epoch: Int64?
            var logger = self.logger
            var nextSweep = ContinuousClock.now + configuration.sweepInterval
            var acks = DeferredAck(limit: max(1, Int(configuration.prefetch) / 4))
            // A deferred ack goes out before the channels close (else its deliveries come back and are
            // answered again from their records).
            defer { if let settle = acks.flush() { channels.send([], thenSettle: [settle]) } }
            var lastTick = ContinuousClock.now - .seconds(3600)
            while !worker.isStopping {
                if epoch == nil, store != nil, ContinuousClock.now - lastTick >= max(.seconds(1), configuration.sweepInterval * 3) {
                    // Not (yet) the active consumer, or the queue is idle: a tick through the queue reaches
                    // whichever worker is active, which then takes the partition and sweeps its leases.
                    lastTick = ContinuousClock.now
                    try await channels.publish.publish(OutgoingMessage(
                        exchange: "", routingKey: configuration.queueName(partition), body: [],
                        properties: AMQPProperties(messageID: Self.tickPrefix + configuration.workerID)
                    ))
                }
                let wait = max(.milliseconds(1), min(nextSweep - ContinuousClock.now, .milliseconds(100)))
                var batch = try await deliveries.next(max: configuration.batchSize, timeout: wait)
                if !batch.isEmpty {
                    if batch.count < configuration.batchSize, configuration.linger > Duration.zero {
                        try? await Task.sleep(for: configuration.linger)
                        batch += deliveries.takeAvailable(max: configuration.batchSize - batch.count)
                    }
                    // Replies cannot leave while the broker blocks our publisher (memory or disk alarm):
                    // hold the batch unacked until it unblocks. The consumer connection never publishes,
                    // so it is never blocked and keeps its heartbeats.
                    try await waitWhilePublishingBlocked()
                    guard let store else {
                        try await echo(batch, channels: channels, acks: &acks, moreWaiting: deliveries.hasBuffered)
                        continue
                    }
                    if epoch == nil {
                        // We are the active consumer: take the partition, fencing out any previous owner.
                        let taken = try await retryingDatabase { try await store.takePartition(partition, owner: configuration.workerID) }
                        guard let taken else { return }
                        epoch = taken
                        logger[metadataKey: "baton.epoch"] = "\(taken)"
                        metrics.epoch.record(taken)
                        metrics.active.record(1)
                        logger.info("took partition")
                    }
                    guard try await process(
                        batch, epoch: epoch!, store: store, channels: channels, pump: pump, acks: &acks, moreWaiting: { deliveries.hasBuffered }, logger: logger
                    ) else { return }
                }
                if ContinuousClock.now >= nextSweep {
                    // Advance even while standing by: the wait above is bounded by it.
                    nextSweep = ContinuousClock.now + configuration.sweepInterval
                    if let epoch, let store {
                        try await sweep(epoch: epoch, store: store, channels: channels, logger: logger)
                    }
                }
            }
        }

        /// Runs a database call, retrying with backoff while PostgreSQL is unavailable.
        /// Returns nil when the worker stops first; rethrows a lost fence.
        private func retryingDatabase<T: Sendable>(_ call: () async throws -> T) async throws -> T? {
            var backoff = Backoff(initial: .milliseconds(100), maximum: .seconds(3))
            var failing = false
            defer { if failing { _ = worker.health.withLock { $0.stalled.removeValue(forKey: partition) } } }
            while true {
                do {
                    return try await call()
                } catch let error as StoreError where error.code == .partitionOwnershipLost {
                    throw RunnerExit.ownershipLost
                } catch let error as SchemaError {
                    throw error
                } catch let error as PostgresError where error.isCausedByData || error.code == .unexpectedResult {
                    // Retrying the same write cannot help: let the caller find the request that causes it.
                    throw DataFailure(error: error)
                } catch {
                    if worker.isStopping { return nil }
                    let delay = backoff.next()
                    logger.warning("database call failed; holding the batch unacked and retrying", metadata: [
                        "baton.error": "\(error)", "baton.retry_in": "\(delay)",
                    ])
                    failing = true
                    worker.health.withLock { $0.stalled[partition] = "\(error)" }
                    worker.statistics.withLock { $0.databaseRetries += 1 }
                    WorkerMetrics.databaseRetries.increment()
                    await worker.sleep(delay)
                }
            }
        }

        /// The message id of a tick: an empty message a worker sends through its partition's queue so that
        /// the active consumer takes the partition and sweeps it even when no request arrives.
        static let tickPrefix = "baton-tick:"

        static func isTick(_ message: AMQPMessage) -> Bool {
            message.body.isEmpty && message.properties.messageID?.hasPrefix(tickPrefix) == true
        }

        /// Waits while the broker blocks the publisher connection (memory or disk alarm).
        private func waitWhilePublishingBlocked() async throws {
            var warned = false
            while let reason = connections.publisher.blockedReason, !worker.isStopping, connections.isOpen {
                if !warned {
                    logger.warning("the broker blocks publishing (resource alarm): holding the batch until it unblocks", metadata: ["baton.reason": "\(reason)"])
                    warned = true
                }
                try? await Task.sleep(for: .milliseconds(50))
            }
        }

        /// What a delivery carries, as far as the worker accepts it.
        private enum Admission {
            /// One request, or why the whole message is refused (answered and dead-lettered).
            case single(Result<Request, ProtocolError>)
            /// A coalesced batch: each element a request or why that element alone is refused.
            case batch([Result<Request, ProtocolError>])
            /// `reply_to` names a destination the worker will not publish to: not answered at all.
            case unanswerable(String)
        }

        /// Checks one delivery: its reply destination, size, body (one request or a batch), and for each
        /// request its exchange and principal.
        private func admit(_ message: AMQPMessage) -> Admission {
            if let replyTo = message.properties.replyTo, !replyTo.isEmpty, !ProtocolV1.isAcceptedReplyTo(replyTo) {
                return .unanswerable(replyTo)
            }
            do throws(ProtocolError) {
                guard message.bodySize <= ProtocolV1.maxBodyBytes else {
                    throw ProtocolError(
                        code: .payloadTooLarge,
                        message: "request body is \(message.bodySize) bytes; the limit is \(ProtocolV1.maxBodyBytes) bytes"
                    )
                }
                switch try ProtocolCodec.decodeMessage(message.body) {
                case .single(let request):
                    return .single(authorize(request, from: message))
                case .batch(let elements):
                    return .batch(elements.map { element in element.flatMap { authorize($0, from: message) } })
                }
            } catch {
                return .single(.failure(error))
            }
        }

        /// Checks what the broker says about the sender: the exchange (`force_release` only through
        /// `baton.admin`) and the principal (`user_id`), which it records on the request.
        private func authorize(_ request: Request, from message: AMQPMessage) -> Result<Request, ProtocolError> {
            var request = request
            if request.operation == .forceRelease, message.exchange != ProtocolV1.adminExchange {
                return .failure(ProtocolError(
                    code: .invalidRequest,
                    message: "op 'force_release' is accepted only through the \(ProtocolV1.adminExchange) exchange (got '\(LogValue.escape(message.exchange))'); operators publish it there",
                    requestID: request.requestID, buffer: request.buffer
                ))
            }
            request.principal = message.properties.userID
            if request.principal == nil, request.operation != .inspect, request.operation != .forceRelease {
                return .failure(ProtocolError(
                    code: .unauthenticated,
                    message: "op '\(request.operation)' needs the AMQP property user_id set to the broker user you log in as (RabbitMQ checks it): a lease belongs to the user that claimed it, and only that user may renew or release it",
                    requestID: request.requestID, buffer: request.buffer
                ))
            }
            return .success(request)
        }

        /// The outcome of deciding requests, aligned with them.
        private struct Decided {
            var replies: [Reply] = []
            var changes: [OutboxEntry] = []
            var replayed = 0
            var failed = 0

            static func + (lhs: Decided, rhs: Decided) -> Decided {
                Decided(replies: lhs.replies + rhs.replies, changes: lhs.changes + rhs.changes, replayed: lhs.replayed + rhs.replayed, failed: lhs.failed + rhs.failed)
            }
        }

        /// Decides `requests` through the store in queue order. When the database refuses a write because
        /// of what it contains (a constraint, a data error), the batch is split in halves, decided in order,
        /// until the request that causes it stands alone; that one is answered `internal_error` and the rest
        /// go on. Returns nil when the worker stopped first.
        private func decide(_ requests: ArraySlice<Request>, epoch: Int64, store: OwnershipStore) async throws -> Decided? {
            do {
                guard let result = try await retryingDatabase({ try await store.apply(Array(requests), partition: partition, epoch: epoch) }) else { return nil }
                worker.statistics.withLock { $0.transactions += 1 }
                return Decided(replies: result.replies, changes: result.changes, replayed: result.replayed)
            } catch let failure as DataFailure {
                guard requests.count > 1 else {
                    let request = requests[requests.startIndex]
                    logger.error("the database refused a request; answering it with an error and dead-lettering it", metadata: [
                        "baton.request_id": "\(LogValue.escape(request.requestID))", "baton.buffer": "\(LogValue.escape(request.buffer ?? "-"))",
                        "baton.error": "\(failure.error)",
                    ])
                    let error = ProtocolError(
                        code: .internalError,
                        message: "the database refused to record this request (\(failure.error.sqlState.map { "SQLSTATE \($0): " } ?? "")\(failure.error.message)); nothing changed and the request was dead-lettered for an operator",
                        requestID: request.requestID, buffer: request.buffer
                    )
                    return Decided(replies: [Reply.rejection(error, partition: partition, at: nil)], failed: 1)
                }
                let middle = requests.startIndex + requests.count / 2
                guard let first = try await decide(requests[..<middle], epoch: epoch, store: store),
                      let second = try await decide(requests[middle...], epoch: epoch, store: store)
                else { return nil }
                return first + second
            }
        }

        /// Decides one batch of deliveries and answers them. Returns false when the worker stopped before
        /// the batch committed.
        ///
        /// A delivery carries one request or a coalesced batch of them. A single request that is refused is
        /// answered and dead-lettered, as always; in a batch, each element is answered in its place (in one
        /// reply message, in order) and the message is acked, since its other elements were decided.
        private func process(
            _ batch: [AMQPMessage], epoch: Int64, store: OwnershipStore, channels: Channels, pump: EventPump?, acks: inout DeferredAck,
            moreWaiting: () -> Bool, logger: Logger
        ) async throws -> Bool {
            let batchStarted = ContinuousClock.now
            var requests: [Request] = []
            /// For each request: its delivery and, for a batch, its place in it.
            var origins: [(message: AMQPMessage, element: Int?)] = []
            /// The replies of each batch delivery, by delivery tag, filled in place.
            var batchReplies: [UInt64: (message: AMQPMessage, replies: [Reply?])] = [:]
            var publishes: [ChannelAction] = []
            var settles: [ChannelAction] = []
            var rejected = 0
            var counts: [String: Int] = [:]
            var lastAck: UInt64? = batch.filter(Self.isTick).map(\.deliveryTag).max()
            func refuse(_ error: ProtocolError, _ message: AMQPMessage) {
                logger.notice("rejected a malformed request", metadata: [
                    "baton.error_code": "\(error.code)", "baton.request_id": "\(LogValue.escape(error.requestID ?? "-"))",
                    "baton.reason": "\(LogValue.escape(error.message))",
                ])
            }
            func accept(_ request: Request, _ message: AMQPMessage, element: Int?) {
                if case .forceRelease(let buffer, let reason) = request.command {
                    logger.notice("force release", metadata: [
                        "baton.buffer": "\(LogValue.escape(buffer))", "baton.reason": "\(LogValue.escape(reason ?? "-"))",
                        "baton.request_id": "\(LogValue.escape(request.requestID))", "baton.principal": "\(LogValue.escape(request.principal ?? "-"))",
                    ])
                }
                requests.append(request)
                origins.append((message, element))
            }
            for message in batch where !Self.isTick(message) {
                switch admit(message) {
                case .single(.success(let request)):
                    accept(request, message, element: nil)
                case .single(.failure(let error)):
                    // Malformed or not allowed: answer if we can, then dead-letter it. It never reaches the database.
                    refuse(error, message)
                    if let reply = replyMessage(ProtocolCodec.encode(Reply.rejection(error, partition: partition, at: nil)), to: message) {
                        publishes.append(.publish(reply))
                    }
                    settles.append(.reject(deliveryTag: message.deliveryTag, requeue: false))
                    metrics.deadLetter(error.code.rawValue)
                    rejected += 1
                case .batch(let elements):
                    var replies = [Reply?](repeating: nil, count: elements.count)
                    for (index, element) in elements.enumerated() {
                        switch element {
                        case .success(let request):
                            accept(request, message, element: index)
                        case .failure(let error):
                            refuse(error, message)
                            replies[index] = Reply.rejection(error, partition: partition, at: nil)
                            counts["-|\(error.code.rawValue)", default: 0] += 1
                        }
                    }
                    batchReplies[message.deliveryTag] = (message, replies)
                case .unanswerable(let replyTo):
                    logger.warning("refused a request whose reply_to is not a reply queue of its sender; dead-lettered without an answer", metadata: [
                        "baton.reply_to": "\(LogValue.escape(replyTo))", "baton.correlation_id": "\(LogValue.escape(message.properties.correlationID ?? "-"))",
                        "baton.principal": "\(LogValue.escape(message.properties.userID ?? "-"))",
                    ])
                    settles.append(.reject(deliveryTag: message.deliveryTag, requeue: false))
                    metrics.deadLetter("reply_to_refused")
                    rejected += 1
                }
            }
            metrics.batchSize.record(requests.count)
            var decided = Decided()
            if !requests.isEmpty {
                let started = ContinuousClock.now
                // At most batchSize requests per transaction, however many a delivery batch carries
                // (coalesced messages hold up to 256 each): one transaction stays short.
                for start in stride(from: 0, to: requests.count, by: configuration.batchSize) {
                    let chunk = requests[start..<min(start + configuration.batchSize, requests.count)]
                    guard let result = try await decide(chunk, epoch: epoch, store: store) else { return false }
                    decided = decided + result
                }
                let took = ContinuousClock.now - started
                worker.statistics.withLock { $0.commitTime += took }
                metrics.commitDuration.recordNanoseconds(took.nanoseconds)
                if let afterCommit = configuration.afterCommit { await afterCommit(partition, connections.publisher) }
            }
            for (request, (origin, reply)) in zip(requests, zip(origins, decided.replies)) {
                counts["\(request.operation.rawValue)|\(reply.error?.code.rawValue ?? reply.status.rawValue)", default: 0] += 1
                if reply.status == .error, reply.error?.code != .deadlineExceeded {
                    logger.notice("rejected a request", metadata: [
                        "baton.request_id": "\(LogValue.escape(reply.requestID ?? "-"))", "baton.reason": "\(LogValue.escape(reply.error?.message ?? ""))",
                    ])
                }
                if let element = origin.element {
                    batchReplies[origin.message.deliveryTag]?.replies[element] = reply
                    continue
                }
                if let answer = replyMessage(ProtocolCodec.encode(reply), to: origin.message) { publishes.append(.publish(answer)) }
                if reply.status == .error, reply.error?.code != .deadlineExceeded {
                    metrics.deadLetter(reply.error?.code.rawValue ?? "error")
                    settles.append(.reject(deliveryTag: origin.message.deliveryTag, requeue: false))
                    rejected += 1
                } else {
                    // Expired requests are acked, not dead-lettered: nothing is wrong with them, their caller gave up.
                    lastAck = max(lastAck ?? 0, origin.message.deliveryTag)
                }
            }
            for (tag, answered) in batchReplies {
                let replies = answered.replies.map { $0 ?? Reply(requestID: nil, status: .error, partition: partition, error: ReplyError(code: .internalError, message: "no decision")) }
                for part in ProtocolCodec.encodeBatchReply(replies) {
                    if let answer = replyMessage(part, to: answered.message) { publishes.append(.publish(answer)) }
                }
                lastAck = max(lastAck ?? 0, tag)
            }
            // Replies leave before the acks; rejections go first so that the closing multiple-ack covers
            // exactly the accepted ones.
            if let settle = acks.settle(lastAck, count: batch.count, moreWaiting: moreWaiting()) { settles.append(settle) }
            channels.send(publishes, thenSettle: settles)
            metrics.requests(counts)
            metrics.replies.increment(by: publishes.count)
            metrics.batchDuration.recordNanoseconds((ContinuousClock.now - batchStarted).nanoseconds)
            worker.statistics.withLock {
                $0.requests += requests.count
                $0.messages += batch.count
                $0.replayed += decided.replayed
                $0.rejected += rejected
                $0.failed += decided.failed
                $0.batches += 1
            }
            if !decided.changes.isEmpty { pump?.send(decided.changes) }
            return true
        }

        /// The benchmark's broker ceiling: the same consume, reply and ack path, with no database.
        private func echo(_ batch: [AMQPMessage], channels: Channels, acks: inout DeferredAck, moreWaiting: Bool) async throws {
            let now = Timestamp(milliseconds: Int64(Date().timeIntervalSince1970 * 1000))
            func answer(_ element: Result<Request, ProtocolError>) -> Reply {
                switch element {
                case .success(let request):
                    let status: ReplyStatus = switch request.operation {
                    case .claim: .granted
                    case .renew: .renewed
                    case .release: .released
                    case .inspect: .state
                    case .releaseConnection: .releasedConnection
                    case .forceRelease: .released
                    }
                    return Reply(
                        requestID: request.requestID, status: status, buffer: request.buffer, holder: nil, token: 1,
                        expiresAt: now.adding(milliseconds: 30_000), at: now, partition: partition, buffers: status == .releasedConnection ? [] : nil
                    )
                case .failure(let error):
                    return Reply.rejection(error, partition: partition, at: nil)
                }
            }
            var publishes: [ChannelAction] = []
            var requests = 0
            for message in batch where !Self.isTick(message) {
                let body: [UInt8]
                switch admit(message) {
                case .single(let element):
                    requests += 1
                    body = ProtocolCodec.encode(answer(element))
                case .batch(let elements):
                    requests += elements.count
                    for part in ProtocolCodec.encodeBatchReply(elements.map(answer)) {
                        if let reply = replyMessage(part, to: message) { publishes.append(.publish(reply)) }
                    }
                    continue
                case .unanswerable:
                    continue
                }
                if let reply = replyMessage(body, to: message) { publishes.append(.publish(reply)) }
            }
            channels.send(publishes, thenSettle: acks.settle(batch.last?.deliveryTag, count: batch.count, moreWaiting: moreWaiting).map { [$0] } ?? [])
            worker.statistics.withLock {
                $0.requests += requests
                $0.messages += batch.count
                $0.batches += 1
            }
        }

        /// The reply message carrying `body` to `message`'s sender, or nil when it asked for none (or for one
        /// the worker refuses to send).
        private func replyMessage(_ body: [UInt8], to message: AMQPMessage) -> OutgoingMessage? {
            guard let replyTo = message.properties.replyTo, ProtocolV1.isAcceptedReplyTo(replyTo) else { return nil }
            return OutgoingMessage(
                exchange: "", routingKey: replyTo, body: body,
                properties: AMQPProperties(contentType: ProtocolV1.contentType, correlationID: message.properties.correlationID),
                mandatory: false
            )
        }

        private func sweep(epoch: Int64, store: OwnershipStore, channels: Channels, logger: Logger) async throws {
            do {
                let expired = try await store.sweep(partition: partition, epoch: epoch)
                // Expiries, and any event the pump could not get confirmed (rows older than a few seconds).
                var events = expired
                events += try await store.undelivered(partition: partition, olderThan: .seconds(5), limit: 1000)
                if !events.isEmpty {
                    let confirmed = await EventPump.publish(events, partition: partition, channel: channels.publish, perCommit: configuration.eventsPerCommit, logger: logger)
                    try await store.markDelivered(confirmed)
                    worker.statistics.withLock { $0.events += confirmed.count }
                }
                if let ready = try? await channels.consume.inspectQueue(configuration.queueName(partition)).messages {
                    metrics.queueReady.record(ready)
                }
                if !expired.isEmpty {
                    metrics.expired.increment(by: expired.count)
                    worker.statistics.withLock { $0.expired += expired.count }
                    logger.debug("expired leases", metadata: ["baton.count": "\(expired.count)"])
                }
            } catch let error as StoreError where error.code == .partitionOwnershipLost {
                throw RunnerExit.ownershipLost
            } catch {
                logger.warning("lease sweep failed; will retry", metadata: ["baton.error": "\(error)"])
            }
        }
    }
}

/// The closing ack of a partition's batches, deferred while more deliveries wait: acks are cumulative
/// (`multiple`), so the next batch's ack covers this one's, and the quorum queue records one settle
/// command for several batches. At most `limit` deliveries stay unacked this way (a quarter of the
/// prefetch, so deliveries never stall on it), and the partition acks as soon as it has nothing waiting.
struct DeferredAck {
    let limit: Int
    private var tag: UInt64?
    private var count = 0

    init(limit: Int) {
        self.limit = limit
    }

    /// Records a batch whose accepted deliveries end at `last`; returns the ack to send now, if any.
    mutating func settle(_ last: UInt64?, count batch: Int, moreWaiting: Bool) -> ChannelAction? {
        if let last { tag = max(tag ?? 0, last) }
        count += batch
        guard !moreWaiting || count >= limit else { return nil }
        return flush()
    }

    /// The ack of everything deferred, if anything is.
    mutating func flush() -> ChannelAction? {
        defer {
            tag = nil
            count = 0
        }
        return tag.map { .ack(deliveryTag: $0, multiple: true) }
    }
}

/// Counters a worker keeps.
public struct WorkerStatistics: Sendable {
    /// Requests decided (valid ones; each element of a coalesced batch counts).
    public var requests = 0
    /// Request messages consumed (a coalesced batch is one message; ticks count too).
    public var messages = 0
    /// Requests answered from their idempotency record (redeliveries and client retries).
    public var replayed = 0
    /// Requests rejected (malformed, misrouted, refused) and dead-lettered.
    public var rejected = 0
    /// Requests the database refused to record (answered `internal_error` and dead-lettered).
    public var failed = 0
    /// Batches of deliveries handled.
    public var batches = 0
    /// Store writes committed (a delivery batch takes one per `batchSize` requests, more when a request
    /// the database refuses is isolated).
    public var transactions = 0
    /// Events published and marked delivered.
    public var events = 0
    /// Leases expired by sweeps.
    public var expired = 0
    /// Times a partition's fence was lost.
    public var fenceLosses = 0
    /// Database calls retried.
    public var databaseRetries = 0
    /// AMQP connections made.
    public var connections = 0
    /// Time spent in the store's batch transactions.
    public var commitTime: Duration = .zero
}

struct PartitionSetDescription: CustomStringConvertible {
    let partitions: [Int]
    init(_ partitions: [Int]) { self.partitions = partitions }
    var description: String {
        (try? PartitionSet(parsing: partitions.map(String.init).joined(separator: ","), count: (partitions.max() ?? 0) + 1).description) ?? "\(partitions)"
    }
}

/// What `/health/ready` reports.
public struct WorkerReadiness: Sendable, Hashable {
    /// Connected to RabbitMQ.
    public var brokerConnected = false
    /// Connected to PostgreSQL (one connection per served partition).
    public var databaseConnected = false
    /// Partitions with a live consumer (active or standby).
    public var consuming: Set<Int> = []
    /// Partitions served.
    public var partitions: [Int] = []
    /// Partitions that cannot make progress: their database calls keep failing (the last error).
    public var stalled: [Int: String] = [:]
    /// The broker's reason while it blocks this worker's publishing (a resource alarm), else nil.
    public var publishingBlocked: String?

    /// Ready: both services connected, every served partition consumed and making progress, and the
    /// broker not blocking replies.
    public var isReady: Bool {
        brokerConnected && databaseConnected && Set(partitions).isSubset(of: consuming) && stalled.isEmpty && publishingBlocked == nil
    }
}

extension Duration {
    var nanoseconds: Int64 {
        let (seconds, attoseconds) = components
        return seconds * 1_000_000_000 + attoseconds / 1_000_000_000
    }
}

/// A database failure caused by what a write contains; retrying the same write cannot succeed.
struct DataFailure: Error {
    let error: PostgresError
}

/// A worker's two broker connections, as RabbitMQ advises: one consumes and acks (and never
/// publishes, so a resource alarm never blocks it and its heartbeats go on), the other publishes
/// replies, events and ticks.
struct BrokerConnections: Sendable {
    let consumer: AMQPConnection
    let publisher: AMQPConnection

    static func open(configuration: WorkerConfiguration, logger: Logger) async throws -> BrokerConnections {
        let consumer = try await AMQPConnection.connect(
            to: configuration.amqpURL, name: "baton worker \(configuration.workerID) consume", maxBodyBytes: ProtocolV1.maxBodyBytes, logger: logger
        )
        do {
            try await Topology.declare(on: consumer, partitionCount: configuration.partitioner.count, logger: logger)
            let publisher = try await AMQPConnection.connect(to: configuration.amqpURL, name: "baton worker \(configuration.workerID) publish", logger: logger)
            return BrokerConnections(consumer: consumer, publisher: publisher)
        } catch {
            await consumer.close()
            throw error
        }
    }

    var isOpen: Bool { consumer.isOpen && publisher.isOpen }

    func close() async {
        await consumer.close()
        await publisher.close()
    }
}

/// The echo mode was asked for outside a scratch virtual host.
public struct EchoRefused: Error, CustomStringConvertible {
    /// The virtual host it was asked for.
    public let virtualHost: String

    public var description: String {
        "echo mode answers every claim as granted without deciding it, so it runs only in a scratch virtual host named baton-scratch-... (baton bench makes one), not in '\(LogValue.escape(virtualHost))'"
    }
}
