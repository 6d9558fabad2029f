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
    /// Further nodes of the same broker cluster, tried in order when ``amqpURL``'s node does not answer
    /// (and, after a node died, from the one that worked last).
    public var amqpAlternates: [AMQPURL] = []
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
    /// them); at most one per partition. Nil: ``automaticDatabaseConnections(serving:)``.
    public var databaseConnections: Int?
    /// How long to wait for more requests after the first of a batch.
    public var linger: Duration = .zero
    /// How long a partition's ack may wait for later batches to share it when nothing else waits (see
    /// ``DeferredAck``); the partition's timer sends it when that time is up, unless a batch's ack took it
    /// along first.
    public var ackDelay: Duration = .milliseconds(20)
    /// How long a replica id stays reserved for its user after the membership expired or its connection
    /// was released (docs/design/replica-slots.md, "reconnect grace").
    public var memberGrace: Duration = .milliseconds(Roster.defaultGraceMilliseconds)
    /// Events as one message per commit (`<p>.changes`, the default) or one message per change
    /// (`<p>.<kind>`, for consumers that bind by kind); docs/protocol.md, section 7.
    public var eventsPerCommit = true
    /// How long a busy partition gathers its committed changes before it publishes them: at most one
    /// event publish per partition per linger; a change after a quiet spell goes at once. 50 ms took
    /// 14-20 % off the worker's CPU per claim in `baton bench` (docs/benchmarks.md, tenth session) for
    /// events of a busy partition up to 50 ms later.
    public var eventLinger: Duration = .milliseconds(50)
    /// How often each partition expires leases (and settles waits that ran out).
    public var sweepInterval: Duration = .seconds(1)
    /// Prune idempotency records and published events older than `retention` every `interval`, on a
    /// connection of its own (``OwnershipStore/pruneAlone(retention:chunk:)``: one worker at a time); nil
    /// leaves pruning to `baton prune`.
    public var prune: (interval: Duration, retention: Duration)?
    /// How long to wait before consuming a partition again after losing it.
    public var rejoinDelay: Duration = .seconds(2)
    /// This worker's name in `baton_partitions.owner` and in the broker's connection list.
    public var workerID: String
    /// The queue consumed for a partition (`baton.requests.<p>`); tests point it elsewhere to run duplicate consumers.
    public var queueName: @Sendable (Int) -> String = { ProtocolV1.requestQueue($0) }
    /// Benchmark ceiling: decide every request from the worker's memory at once, without PostgreSQL
    /// (`baton bench`'s "broker echo", ``EchoResponder``: no records, no events). It runs only in a scratch
    /// virtual host (`baton-scratch-...`, as `baton bench` makes), so it can never answer a deployment's
    /// claims.
    public var echo = false
    /// Fault injection for tests: called after a batch commits and before its replies and acks are sent,
    /// with the connection the partition consumes and acks on.
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
    /// What runs when the worker is asked to stop (``whenStopping(_:)``), by id.
    private let stopHandlers = Mutex<(next: Int, handlers: [Int: @Sendable () -> Void])>((0, [:]))
    let statistics = Mutex(WorkerStatistics())
    let health = Mutex(WorkerReadiness())
    /// The broker connections in use, for what readiness reads off them when asked.
    private let current = Mutex<BrokerConnections?>(nil)
    /// The index, in ``WorkerConfiguration/amqpURL`` and its alternates, of the node to try first: the
    /// one reached last, or the next one once its connection has died.
    private let brokerNode = Atomic<Int>(0)

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
        if let connections = current.withLock({ $0 }) {
            readiness.publishingBlocked = connections.publisher.blockedReason
            readiness.replyConnected = connections.replies.isOpen
        }
        return readiness
    }

    public func run() async throws {
        try await withGracefulShutdownHandler {
            try await serve()
        } onGracefulShutdown: {
            self.requestStop()
        }
    }

    /// Asks the worker to stop as on SIGTERM (for embedding without a ServiceGroup).
    public func requestStop() {
        let handlers = stopHandlers.withLock { state -> [@Sendable () -> Void] in
            stopping.store(true, ordering: .relaxed)
            defer { state.handlers.removeAll() }
            return Array(state.handlers.values)
        }
        for handler in handlers { handler() }
    }

    var isStopping: Bool { stopping.load(ordering: .relaxed) }

    /// Runs `handler` once when the worker is asked to stop (at once when it already was); the id is for
    /// ``forgetStopHandler(_:)``.
    @discardableResult
    func whenStopping(_ handler: @escaping @Sendable () -> Void) -> Int? {
        let id = stopHandlers.withLock { state -> Int? in
            guard !stopping.load(ordering: .relaxed) else { return nil }
            state.next += 1
            state.handlers[state.next] = handler
            return state.next
        }
        if id == nil { handler() }
        return id
    }

    /// Removes a handler of ``whenStopping(_:)`` that is no longer wanted.
    func forgetStopHandler(_ id: Int?) {
        guard let id else { return }
        _ = stopHandlers.withLock { $0.handlers.removeValue(forKey: id) }
    }

    private func serve() async throws {
        WorkerMetrics.register()
        if configuration.echo, !configuration.amqpURL.virtualHost.hasPrefix("baton-scratch-") {
            throw EchoRefused(virtualHost: configuration.amqpURL.virtualHost)
        }
        let stores = configuration.echo ? [:] : try await openStores()
        // Each partition's store, or in echo mode the one echo of the process (so that a partition's memory
        // outlives its runner).
        let backends: [Int: PartitionBackend] = if configuration.echo {
            Self.echoBackends(configuration)
        } else {
            stores.mapValues { .store($0) }
        }
        health.withLock { $0.databaseConnected = true }
        let pruner = configuration.echo ? nil : configuration.prune.map { prune in Task { await self.pruneEvery(prune.interval, retention: prune.retention) } }
        defer { pruner?.cancel() }
        var backoff = Backoff()
        // The partitions' deadlines (ticks, sweeps, deferred acks), on one thread.
        let timer = DeadlineTimer()
        defer { timer.stop() }
        // The topology is declared on the first connection only: it is durable, and declaring a quorum
        // queue asks its leader, which after a node froze may be a node the cluster has not yet declared
        // down (the declaration then waits until it has). A queue found missing later is declared again
        // by its partition's runner.
        var declared = false
        while !isStopping {
            let connections: BrokerConnections
            do {
                connections = try await BrokerConnections.open(
                    configuration: configuration, from: brokerNode.load(ordering: .relaxed), declaringTopology: !declared, logger: logger
                )
                declared = true
                brokerNode.store(connections.node, ordering: .relaxed)
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
            current.withLock { $0 = connections }
            logger.info("worker connected", metadata: [
                "baton.amqp": "\(connections.url)", "baton.partitions": "\(PartitionSetDescription(configuration.partitions))",
            ])
            // A reply connection the broker closed (an address it could not resolve) is replaced while the
            // consumers go on; the queue depths are read on a connection of their own. Neither is waited
            // for when the connections end: each may then be connecting to a node that froze, which holds
            // the attempt for the whole connect timeout, and the worker reconnects to the next node at
            // once. Both end on their own (`while` turns false, the probe is stopped), and a connection
            // either opens after that is closed at once.
            let replyUpkeep = Task {
                await connections.replies.maintain(
                    url: connections.url, name: BrokerConnections.replyConnectionName(self.configuration), logger: self.logger,
                    while: { !self.isStopping && connections.isOpen }, refused: { self.statistics.withLock { $0.replySendersRefused += 1 } }
                )
            }
            let depthProbe = Task { await connections.depths.run() }
            defer {
                // Not waited for (above); cancelled only so that a sleep between attempts ends early.
                replyUpkeep.cancel()
                depthProbe.cancel()
            }
            await withTaskGroup(of: Void.self) { group in
                for partition in configuration.partitions {
                    guard let backend = backends[partition] else { continue }
                    group.addTask { await self.runPartition(partition, backend: backend, connections: connections, timer: timer) }
                }
                // Runners stop on their own when the worker stops (they finish their batch in hand and close
                // their channels); this one waits for that or for either connection to end.
                group.addTask {
                    await self.untilStoppingOrEnded(connections)
                    // One of the two connections died: end the others too, so that every runner stops
                    // (their unacked deliveries go back to the queues) and the worker reconnects them all,
                    // trying the next node first: a node that froze (a stopped VM) still accepts TCP
                    // connections and would hold each attempt for the whole connect timeout. Without a
                    // closing handshake: the node that lost one connection may be frozen, and a graceful
                    // close of the others would wait for their heartbeats (a second in the chaos run).
                    connections.depths.stop()
                    if !self.isStopping {
                        connections.abandon()
                        self.brokerNode.store((connections.node + 1) % (1 + self.configuration.amqpAlternates.count), ordering: .relaxed)
                    }
                }
                await group.waitForAll()
            }
            health.withLock {
                $0.brokerConnected = false
                $0.consuming.removeAll()
            }
            current.withLock { $0 = nil }
            await connections.close()
        }
        var shared: [ObjectIdentifier: OwnershipStore] = [:]
        for store in stores.values { shared[ObjectIdentifier(store)] = store }
        for store in shared.values { await store.connection.close() }
        let stats = self.stats
        logger.info("worker stopped", metadata: [
            "baton.requests": "\(stats.requests)", "baton.batches": "\(stats.batches)", "baton.replayed": "\(stats.replayed)",
            "baton.rejected": "\(stats.rejected)", "baton.events": "\(stats.events)", "baton.fence_losses": "\(stats.fenceLosses)",
            "baton.expired": "\(stats.expired)", "baton.database_retries": "\(stats.databaseRetries)",
            "baton.mean_batch": "\(stats.batches > 0 ? Double(stats.requests) / Double(stats.batches) : 0)",
            "baton.from_memory": "\(stats.transactions > 0 ? Double(stats.fromMemory) / Double(stats.transactions) : 0)",
            "baton.mean_commit_ms": "\(stats.batches > 0 ? Double(stats.commitTime.components.attoseconds / 1_000_000_000_000 + stats.commitTime.components.seconds * 1_000_000) / 1000 / Double(stats.batches) : 0)",
        ])
    }

    /// Returns when the worker is asked to stop or either of `connections`' two ends, whichever comes
    /// first (no look every few milliseconds: each of them reports).
    private func untilStoppingOrEnded(_ connections: BrokerConnections) async {
        let latch = Latch()
        let stop = whenStopping { latch.open() }
        defer { forgetStopHandler(stop) }
        for connection in [connections.consumer, connections.publisher] {
            // Each ends when its connection does (at the latest when the worker closes it after this cycle).
            Task {
                _ = await connection.closed()
                latch.open()
            }
        }
        await latch.wait()
    }

    /// How long a partition's consume waits for the broker's answer before its channel is dropped and
    /// the consume tried again (after 500 ms) on a new one. A quorum queue answers a consume from its
    /// leader, and a channel opened before the cluster declared a frozen node down still asks the old
    /// leader (docs/operations.md, "A frozen broker node"): a new channel asks the new one.
    static let consumeAnswerTimeout = Duration.seconds(2)

    /// The PostgreSQL connections a worker serving `partitions` opens unless told: one per 16 partitions,
    /// at most 4 (1 at the default N = 16, 4 at 64). Partitions that share a connection commit together,
    /// one WAL flush per group: on the 2-core machine of docs/benchmarks.md, 1 connection instead of 4 at
    /// 16 partitions cut PostgreSQL's CPU per claim by about 40 % and the incident's p99 by a third, for
    /// about 6 % fewer claims on `hot` (8 buffers, whose partitions 4 connections commit in parallel).
    public static func automaticDatabaseConnections(serving partitions: Int) -> Int {
        min(4, max(1, (partitions + 15) / 16))
    }

    /// At most ``WorkerConfiguration/databaseConnections`` stores (one PostgreSQL connection each),
    /// shared by the partitions in turn: partition i of the served list uses store i mod K. A store runs
    /// one statement at a time, so partitions sharing one commit one after the other; the number of
    /// connections (and their threads) no longer grows with the partitions served.
    private func openStores() async throws -> [Int: OwnershipStore] {
        let count = max(1, min(configuration.databaseConnections ?? Self.automaticDatabaseConnections(serving: configuration.partitions.count), configuration.partitions.count))
        var shared: [OwnershipStore] = []
        var backoff = Backoff()
        while shared.count < count {
            do {
                let connection = try await PostgresConnection.connect(
                    to: configuration.databaseURL, options: .worker(applicationName: "baton worker \(shared.count + 1)/\(count)"), logger: logger
                )
                shared.append(try await OwnershipStore.open(
                    connection: connection, partitioner: configuration.partitioner,
                    memberGraceMilliseconds: configuration.memberGrace.wholeMilliseconds, logger: logger
                ))
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
    }

    /// A partition runner hit a failure retrying cannot mend (the schema); it starts over.
    private struct RunnerFailure: Error, CustomStringConvertible {
        let reason: String
        var description: String { reason }
    }

    /// Every served partition answered by one ``EchoResponder``.
    private static func echoBackends(_ configuration: WorkerConfiguration) -> [Int: PartitionBackend] {
        let echo = EchoResponder(partitioner: configuration.partitioner, graceMilliseconds: configuration.memberGrace.wholeMilliseconds)
        return Dictionary(configuration.partitions.map { ($0, .echo(echo)) }, uniquingKeysWith: { first, _ in first })
    }

    private func runPartition(_ partition: Int, backend: PartitionBackend, connections: BrokerConnections, timer: DeadlineTimer) async {
        var logger = self.logger
        logger[metadataKey: "baton.partition"] = "\(partition)"
        let metrics = PartitionMetrics(partition: partition)
        while !isStopping, connections.isOpen {
            let runner = PartitionRunner(
                partition: partition, backend: backend, configuration: configuration, logger: logger, worker: self, connections: connections,
                metrics: metrics, timer: timer
            )
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
                    if (error as? AMQPError)?.replyCode == 404 {
                        // The queue (or an exchange) is gone, deleted since the worker declared them.
                        do {
                            try await Topology.declare(on: connections.consumer, partitionCount: configuration.partitioner.count, logger: logger)
                            logger.notice("declared the topology again: the partition's queue was missing")
                        } catch {
                            logger.warning("declaring the topology again failed", metadata: ["baton.error": "\(error)"])
                        }
                    }
                }
            }
        }
    }

    /// Prunes every `interval` (the first after one interval, each with ±10 % jitter so that workers
    /// started together spread out) until the worker stops; a failure is logged and retried next time.
    private func pruneEvery(_ interval: Duration, retention: Duration) async {
        while !isStopping, !Task.isCancelled {
            await sleep(interval * Double.random(in: 0.9...1.1))
            if isStopping || Task.isCancelled { return }
            let started = ContinuousClock.now
            do {
                let pruned = try await PostgresConnection.withConnection(
                    to: configuration.databaseURL, options: PostgresConnectionOptions(applicationName: "baton worker prune"), logger: logger
                ) { connection in
                    try await OwnershipStore.open(connection: connection, partitioner: configuration.partitioner, logger: logger)
                        .pruneAlone(retention: retention)
                }
                if let (requests, outbox) = pruned {
                    WorkerMetrics.pruned.increment(by: requests + outbox)
                    logger.info("pruned", metadata: [
                        "baton.requests": "\(requests)", "baton.events": "\(outbox)", "baton.retention": "\(retention)",
                        "baton.took": "\(ContinuousClock.now - started)",
                    ])
                } else {
                    logger.debug("another session is pruning; skipped")
                }
            } catch {
                logger.warning("pruning failed; will try again", metadata: ["baton.error": "\(error)", "baton.retry_in": "\(interval)"])
            }
        }
    }

    /// Sleeps, returning early when the worker stops or the calling task is cancelled (one timer, not a
    /// wake-up every 50 ms to look).
    func sleep(_ duration: Duration) async {
        let sleeper = Task { try? await Task.sleep(for: duration) }
        let id = whenStopping { sleeper.cancel() }
        await withTaskCancellationHandler {
            await sleeper.value
        } onCancel: {
            sleeper.cancel()
        }
        forgetStopHandler(id)
    }

    /// Consumes one partition until the worker stops, the channel dies, or the partition is taken by
    /// another worker: opens its channels, starts its consumer and hands everything to a
    /// ``PartitionDriver``, then closes the channels once every reply and ack handed out is written.
    private struct PartitionRunner {
        let partition: Int
        let backend: PartitionBackend
        let configuration: WorkerConfiguration
        var logger: Logger
        let worker: Worker
        let connections: BrokerConnections
        let metrics: PartitionMetrics
        let timer: DeadlineTimer

        func run() async throws {
            let consume = try await connections.consumer.openChannel()
            let publish: AMQPChannel
            do {
                publish = try await connections.publisher.openChannel()
            } catch {
                await consume.close()
                throw error
            }
            let channels = PartitionChannels(consume: consume, publish: publish, reply: connections.replies, depths: connections.depths)
            let exit: PartitionStateMachine.Exit
            let driver: PartitionDriver
            do {
                try await publish.enableConfirms()
                try await consume.qos(prefetch: configuration.prefetch)
                let metrics = self.metrics
                let worker = self.worker
                let pump = backend.store.map { store in
                    EventPump(
                        partition: partition, store: store, channel: publish, perCommit: configuration.eventsPerCommit, logger: logger,
                        linger: configuration.eventLinger
                    ) { count in
                        worker.statistics.withLock { $0.events += count }
                        metrics.events.increment(by: count)
                    }
                }
                driver = PartitionDriver(
                    partition: partition, backend: backend, worker: worker, channels: channels, pump: pump, metrics: metrics,
                    publisher: connections.publisher, consumer: connections.consumer, timer: timer, logger: logger
                )
                do {
                    _ = try await consume.consume(
                        queue: configuration.queueName(partition), answerWithin: Worker.consumeAnswerTimeout,
                        onDeliveries: { driver.deliver($0) },
                        onEnd: { driver.consumerEnded($0) }
                    )
                } catch {
                    driver.detach()
                    await pump?.finish()
                    throw error
                }
                _ = worker.health.withLock { $0.consuming.insert(partition) }
                // The first tick (a standby's tick through the queue); the driver then keeps the machine's
                // next deadline on the timer. Stop comes from whoever stops the worker.
                driver.handle { $0.tick(now: $1) }
                let stop = worker.whenStopping { driver.handle { $0.stop(now: $1) } }
                exit = await driver.finished()
                worker.forgetStopHandler(stop)
                driver.detach()
                await channels.drain()
                await pump?.finish()
            } catch {
                await channels.close()
                throw error
            }
            await channels.close()
            switch exit {
            case .stopped:
                return
            case .ownershipLost:
                throw RunnerExit.ownershipLost
            case .consumerEnded:
                throw driver.consumerError ?? AMQPError(code: .closed, message: "the consumer of partition \(partition) ended")
            case .failed(let reason):
                throw RunnerFailure(reason: reason)
            }
        }
    }

}

/// The closing ack of a partition's batches, deferred while more deliveries wait or for up to `delay`:
/// acks are cumulative (`multiple`), so a later ack covers earlier batches, and the quorum queue records
/// one settle command for several batches (a settle per message was about a fifth of the broker's CPU
/// per claim on `hot`, docs/benchmarks.md). Replies leave before their ack, so a deferred ack delays
/// nobody's answer; a delivery left unacked when the worker dies is redelivered and answered from its
/// record. At most `limit` deliveries stay unacked this way (a quarter of the prefetch, so deliveries
/// never stall on it).
struct DeferredAck {
    let limit: Int
    /// How long an ack may wait for later batches when nothing else is waiting (zero: it goes at once).
    let delay: Duration
    private var tag: UInt64?
    private var count = 0
    /// When the oldest deferred batch was settled.
    private var since: ContinuousClock.Instant?

    init(limit: Int, delay: Duration = .zero) {
        self.limit = limit
        self.delay = delay
    }

    /// Records a batch whose accepted deliveries end at `last` at `now`; returns the ack to send now, if any.
    mutating func settle(_ last: UInt64?, count batch: Int, moreWaiting: Bool, now: ContinuousClock.Instant) -> ChannelAction? {
        if let last { tag = max(tag ?? 0, last) }
        count += batch
        if tag != nil, since == nil { since = now }
        guard count < limit else { return flush() }
        if moreWaiting { return nil }
        return due(now: now)
    }

    /// The deferred ack, if it has waited `delay` at `now`.
    mutating func due(now: ContinuousClock.Instant) -> ChannelAction? {
        guard let since, now - since >= delay else { return nil }
        return flush()
    }

    /// When the deferred ack is due, if one is deferred.
    var dueAt: ContinuousClock.Instant? { tag == nil ? nil : since.map { $0 + delay } }

    /// The ack of everything deferred, if anything is.
    mutating func flush() -> ChannelAction? {
        defer {
            tag = nil
            count = 0
            since = nil
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
    /// Reply senders (a broker node or an address) whose reply made the broker close the probe
    /// connection (``ReplyLink``): their replies are dropped for a while.
    public var replySendersRefused = 0
    /// Time spent in the store's batch transactions.
    public var commitTime: Duration = .zero
    /// Times a partition's deadline came (``DeadlineTimer``): an idle partition's standby ticks, sweeps
    /// and deferred acks, not a wake-up every few milliseconds.
    public var deadlines = 0
    /// Batch transactions decided from a partition's memory, without reading first.
    public var fromMemory = 0
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
    /// The connection that carries replies is open (it is replaced on its own when the broker closes it).
    public var replyConnected = false

    /// Ready: both services connected, every served partition consumed and making progress, and the
    /// broker not blocking replies.
    public var isReady: Bool {
        brokerConnected && databaseConnected && replyConnected && Set(partitions).isSubset(of: consuming) && stalled.isEmpty && publishingBlocked == nil
    }
}

extension Duration {
    var nanoseconds: Int64 {
        let (seconds, attoseconds) = components
        return seconds * 1_000_000_000 + attoseconds / 1_000_000_000
    }
}

/// Opened once, by whoever comes first; waited for by one task at a time.
final class Latch: Sendable {
    private let state = Mutex<(opened: Bool, waiter: CheckedContinuation<Void, Never>?)>((false, nil))

    func open() {
        let waiter = state.withLock { state -> CheckedContinuation<Void, Never>? in
            state.opened = true
            defer { state.waiter = nil }
            return state.waiter
        }
        waiter?.resume()
    }

    func wait() async {
        await withCheckedContinuation { continuation in
            let opened = state.withLock { state -> Bool in
                if !state.opened { state.waiter = continuation }
                return state.opened
            }
            if opened { continuation.resume() }
        }
    }
}

/// A worker's two broker connections, as RabbitMQ advises: one consumes and acks (and never
/// publishes, so a resource alarm never blocks it and its heartbeats go on), the other publishes
/// replies, events and ticks.
struct BrokerConnections: Sendable {
    let consumer: AMQPConnection
    let publisher: AMQPConnection
    /// Replies, on a connection of their own that is replaced when it dies (``ReplyLink``).
    let replies: ReplyLink
    /// The request queues' depths, read on a connection of its own (opened on the first sample).
    let depths: QueueDepthProbe
    /// The node both are connected to: its index among the configured URLs, and its URL.
    let node: Int
    let url: AMQPURL

    /// Connects both to the first node that answers, from `first` on.
    static func open(configuration: WorkerConfiguration, from first: Int, declaringTopology: Bool, logger: Logger) async throws -> BrokerConnections {
        let urls = [configuration.amqpURL] + configuration.amqpAlternates
        let (consumer, node) = try await AMQPConnection.connect(
            toFirstOf: urls, from: first, name: "baton worker \(configuration.workerID) consume", maxBodyBytes: ProtocolV1.maxBodyBytes, logger: logger
        )
        do {
            if declaringTopology { try await Topology.declare(on: consumer, partitionCount: configuration.partitioner.count, logger: logger) }
            let publisher = try await AMQPConnection.connect(to: urls[node], name: "baton worker \(configuration.workerID) publish", logger: logger)
            do {
                let replies = try await ReplyLink.open(url: urls[node], name: replyConnectionName(configuration), logger: logger)
                let depths = QueueDepthProbe(
                    url: urls[node], name: "baton worker \(configuration.workerID) inspect", queueName: configuration.queueName, logger: logger
                )
                return BrokerConnections(consumer: consumer, publisher: publisher, replies: replies, depths: depths, node: node, url: urls[node])
            } catch {
                await publisher.close()
                throw error
            }
        } catch {
            await consumer.close()
            throw error
        }
    }

    static func replyConnectionName(_ configuration: WorkerConfiguration) -> String {
        "baton worker \(configuration.workerID) reply"
    }

    var isOpen: Bool { consumer.isOpen && publisher.isOpen }

    func close() async {
        depths.stop()
        await consumer.close()
        await publisher.close()
        await replies.close()
    }

    /// Ends every connection at once, without the closing handshake (see ``AMQPConnection/closeSoon()``).
    func abandon() {
        depths.stop()
        consumer.closeSoon()
        publisher.closeSoon()
        replies.closeSoon()
    }
}

/// The echo mode was asked for outside a scratch virtual host.
public struct EchoRefused: Error, CustomStringConvertible {
    /// The virtual host it was asked for.
    public let virtualHost: String

    public var description: String {
        "echo mode decides claims in the worker's memory without recording them, so it runs only in a scratch virtual host named baton-scratch-... (baton bench makes one), not in '\(LogValue.escape(virtualHost))'"
    }
}
