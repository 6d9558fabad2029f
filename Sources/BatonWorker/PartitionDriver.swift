import BatonAMQP
import BatonCore
import BatonPostgres
import Foundation
import Logging
import Synchronization

/// A partition's channels: one consuming (and acking) on the consumer connection, one on the publisher
/// connection for events and ticks in confirm mode, and the worker's ``ReplyLink`` for replies.
struct PartitionChannels: Sendable {
    let consume: AMQPChannel
    let publish: AMQPChannel
    /// Replies, without confirms (the broker would confirm each one), on their own connection.
    let reply: ReplyLink
    /// The queue's depth for the metric, read off the consumer connection (``QueueDepthProbe``).
    let depths: QueueDepthProbe

    /// Publishes a batch's replies and settles its deliveries, without waiting for either. The two go to
    /// different connections, so an ack may leave before its reply, and a reply may be lost while its
    /// ack is not (the reply connection died): the batch's decisions are committed, and a client that got
    /// no reply sends the request again and gets it from the request's record. Redelivering instead would
    /// send the same reply to the same address, which may be what killed the reply connection. Acks go
    /// to one channel from one caller at a time, queued even on the consumer's own I/O thread (deliveries
    /// report there, store results on the database's thread), so batches settle in order.
    func send(_ publishes: [ChannelAction], settle settles: [ChannelAction]) {
        if !publishes.isEmpty { reply.enqueue(publishes) }
        if !settles.isEmpty { consume.enqueue(settles, queued: true) }
    }

    /// Waits until every batch handed to ``send(_:settle:)`` is published and settled (or failed).
    func drain() async {
        await reply.barrier()
        await consume.barrier()
    }

    /// Closes the partition's own channels (the reply link is the worker's).
    func close() async {
        await consume.close()
        await publish.close()
    }
}

/// What decides a partition's batches: its PostgreSQL store, or in the bench's echo mode the worker's
/// ``EchoResponder`` (no store at all).
enum PartitionBackend: Sendable {
    case store(OwnershipStore)
    case echo(EchoResponder)

    var store: OwnershipStore? {
        if case .store(let store) = self { return store }
        return nil
    }
}

/// Runs one partition's ``PartitionStateMachine`` without a task of its own on the decision path:
/// deliveries are fed to it on the consumer connection's I/O thread, store results on the PostgreSQL
/// connection's thread, ticks on the worker's ``DeadlineTimer`` thread when the machine's next deadline
/// comes, stop from whoever stops the worker; whichever thread reports an event performs the actions the
/// machine returns, in the order the machine returned them (a thread that reports an event while another
/// performs leaves its actions to that one).
///
/// The hot path (delivery → apply → reply and ack) thus crosses one thread per service and never the
/// cooperative pool. The rare operations (taking the partition, sweeping, waiting to retry) run in tasks
/// and report back as events.
final class PartitionDriver: Sendable {
    typealias Machine = PartitionStateMachine

    private struct State {
        var machine: Machine
        var queued: [Machine.Action] = []
        var performing = false
        var exit: Machine.Exit?
        var waiter: CheckedContinuation<Machine.Exit, Never>?
        var consumerError: AMQPError?
        /// This driver's client of the timer, and the deadline last given to it.
        var timerID: Int?
        var deadline: ContinuousClock.Instant?
    }

    private let state: Mutex<State>
    private let partition: Int
    private let backend: PartitionBackend
    private var store: OwnershipStore? { backend.store }
    private let worker: Worker
    private let channels: PartitionChannels
    private let pump: EventPump?
    private let metrics: PartitionMetrics
    private let publisher: AMQPConnection
    /// The connection the partition consumes and acks on (for ``WorkerConfiguration/afterCommit``).
    private let consumer: AMQPConnection
    private let timer: DeadlineTimer
    private let logger: Logger

    init(
        partition: Int, backend: PartitionBackend, worker: Worker, channels: PartitionChannels, pump: EventPump?, metrics: PartitionMetrics,
        publisher: AMQPConnection, consumer: AMQPConnection, timer: DeadlineTimer, logger: Logger
    ) {
        let configuration = worker.configuration
        let machine = Machine(
            configuration: Machine.Configuration(
                partition: partition, batchSize: configuration.batchSize, ackLimit: Int(configuration.prefetch) / 4,
                sweepInterval: configuration.sweepInterval, tickInterval: max(.seconds(1), configuration.sweepInterval * 3),
                linger: configuration.linger, ackDelay: configuration.ackDelay,
                partitions: configuration.partitioner.count, memberGraceMilliseconds: configuration.memberGrace.wholeMilliseconds
            ),
            now: .now
        )
        state = Mutex(State(machine: machine))
        self.partition = partition
        self.backend = backend
        self.worker = worker
        self.channels = channels
        self.pump = pump
        self.metrics = metrics
        self.publisher = publisher
        self.consumer = consumer
        self.timer = timer
        self.logger = logger
        let id = timer.add { [weak self] in self?.deadlineCame() }
        state.withLock { $0.timerID = id }
    }

    /// Ends the driver's timer (after ``finished()``).
    func detach() {
        if let id = state.withLock({ $0.timerID }) { timer.remove(id) }
    }

    /// The machine's deadline came (on the timer's thread, which cleared it).
    private func deadlineCame() {
        state.withLock { $0.deadline = nil }
        worker.statistics.withLock { $0.deadlines += 1 }
        handle { $0.tick(now: $1) }
    }

    /// Feeds one event to the machine and performs what it asks, in order.
    func handle(_ event: (inout Machine, ContinuousClock.Instant) -> [Machine.Action]) {
        let now = ContinuousClock.now
        // The one place the machine learns of the broker's alarm: before every event, so that no batch
        // starts while replies cannot leave.
        let blocked = publisher.blockedReason
        var logs: [Machine.LogLine] = []
        var actions = state.withLock { state -> [Machine.Action]? in
            state.machine.setBlocked(blocked)
            state.queued += event(&state.machine, now)
            logs = state.machine.takeLogs()
            // Set under the lock, so that two threads reporting events cannot leave the earlier one's.
            let deadline = state.machine.nextDeadline(now: now)
            if deadline != state.deadline, let id = state.timerID {
                state.deadline = deadline
                timer.set(id, to: deadline)
            }
            guard !state.performing, !state.queued.isEmpty else { return nil }
            state.performing = true
            defer { state.queued.removeAll() }
            return state.queued
        }
        for line in logs { write(line) }
        while let next = actions {
            for action in next { perform(action) }
            actions = state.withLock { state in
                guard !state.queued.isEmpty else {
                    state.performing = false
                    return nil
                }
                defer { state.queued.removeAll() }
                return state.queued
            }
        }
    }

    /// Writes a line the machine said.
    private func write(_ line: Machine.LogLine) {
        let level: Logger.Level = switch line.level {
        case .debug: .debug
        case .info: .info
        case .notice: .notice
        case .warning: .warning
        case .error: .error
        }
        logger.log(level: level, "\(line.message)", metadata: line.metadata.mapValues { .string($0) })
    }

    /// Deliveries from the consumer (on its connection's I/O thread).
    func deliver(_ messages: [AMQPMessage]) {
        handle { $0.deliveries(messages, now: $1) }
    }

    /// The consumer ended (why, when it was not the application closing it).
    func consumerEnded(_ error: AMQPError?) {
        state.withLock { $0.consumerError = error }
        handle { $0.consumerEnded(now: $1) }
    }

    /// Why the consumer ended, if it did on its own.
    var consumerError: AMQPError? { state.withLock { $0.consumerError } }

    /// Waits until the machine finishes.
    func finished() async -> Machine.Exit {
        await withCheckedContinuation { continuation in
            let exit = state.withLock { state -> Machine.Exit? in
                if state.exit == nil { state.waiter = continuation }
                return state.exit
            }
            if let exit { continuation.resume(returning: exit) }
        }
    }

    private func perform(_ action: Machine.Action) {
        switch action {
        case .publishTick:
            channels.publish.enqueue([.publish(OutgoingMessage(
                exchange: "", routingKey: worker.configuration.queueName(partition), body: [],
                properties: AMQPProperties(messageID: Machine.tickPrefix + worker.configuration.workerID)
            ))])
        case .takePartition:
            guard let store else {
                // The broker echo (no store) stands in for the database: epoch 1, at once.
                return handle { $0.partitionTaken(.success(1), now: $1) }
            }
            let owner = worker.configuration.workerID
            Task {
                let result: Result<Int64, Machine.Failure>
                do {
                    result = .success(try await store.takePartition(partition, owner: owner))
                } catch {
                    result = .failure(Self.classify(error))
                }
                handle { $0.partitionTaken(result, now: $1) }
            }
        case .apply(let requests, let epoch):
            let store: OwnershipStore
            switch backend {
            case .echo(let echo):
                let result = echo.apply(requests, partition: partition)
                return handle { $0.applied(.success(result), now: $1) }
            case .store(let backing):
                store = backing
            }
            let afterCommit = worker.configuration.afterCommit
            store.apply(requests, partition: partition, epoch: epoch) { [self] result in
                let outcome = result.mapError(Self.classify)
                if let afterCommit, case .success = outcome {
                    Task {
                        await afterCommit(partition, consumer)
                        handle { $0.applied(outcome, now: $1) }
                    }
                } else {
                    handle { $0.applied(outcome, now: $1) }
                }
            }
        case .read(let requests, let messages):
            guard let store else {
                let replies = EchoResponder.read(requests, partition: partition)
                return handle { $0.read(.success(replies), now: $1) }
            }
            Task {
                let result: Result<[Reply], Machine.Failure>
                do {
                    result = .success(try await read(requests, messages: messages, from: store))
                } catch {
                    result = .failure(Self.classify(error))
                }
                handle { $0.read(result, now: $1) }
            }
        case .retry(let delay, _):
            worker.statistics.withLock { $0.databaseRetries += 1 }
            WorkerMetrics.databaseRetries.increment()
            Task {
                await worker.sleep(delay)
                handle { $0.retryDue(now: $1) }
            }
        case .send(let publishes, let settles, let report):
            channels.send(publishes, settle: settles)
            record(report, replies: publishes.count)
        case .publishEvents(let changes):
            pump?.send(changes)
        case .sweep(let epoch):
            Task {
                let lost = await sweep(epoch: epoch)
                handle { $0.swept(lost: lost, now: $1) }
            }
        case .active(let epoch):
            if epoch != nil { pump?.start() }
            metrics.epoch.record(epoch ?? 0)
            metrics.active.record(epoch == nil ? 0 : 1)
        case .stalled(let reason):
            worker.health.withLock { $0.stalled[partition] = reason }
        case .finish(let exit):
            let waiter = state.withLock { state in
                state.exit = exit
                defer { state.waiter = nil }
                return state.waiter
            }
            waiter?.resume(returning: exit)
        }
    }

    private func record(_ report: Machine.BatchReport, replies: Int) {
        guard report.messages > 0 else { return }
        metrics.batchSize.record(report.requests)
        metrics.requests(report.counts)
        metrics.lineAnswers(report.lineAnswers)
        metrics.replies.increment(by: replies)
        for reason in report.deadLetters { metrics.deadLetter(reason) }
        metrics.batchDuration.recordNanoseconds(report.duration.nanoseconds)
        if report.transactions > 0 { metrics.commitDuration.recordNanoseconds(report.commitTime.nanoseconds) }
        if report.fromMemory > 0 { metrics.memoryTransactions.increment(by: report.fromMemory) }
        if report.transactions > report.fromMemory { metrics.readTransactions.increment(by: report.transactions - report.fromMemory) }
        worker.statistics.withLock {
            $0.requests += report.requests
            $0.messages += report.messages
            $0.replayed += report.replayed
            $0.rejected += report.rejected
            $0.failed += report.failed
            $0.transactions += report.transactions
            $0.fromMemory += report.fromMemory
            $0.commitTime += report.commitTime
            $0.batches += 1
        }
    }

    /// Answers `events` requests from the partition's history, one read each, in order.
    /// How long the `events` reads of one batch may hold the partition: reads past it are answered with
    /// no events and `more` (read again from the same position), and are served in later batches, so that
    /// a message of reads never holds other frontends' decisions up for long.
    static let readBudget = Duration.milliseconds(50)

    /// Reads what `requests` (`events`, from the deliveries `messages`) ask for, within ``readBudget`` and
    /// ``ProtocolV1/maxReplyBytesPerMessage`` per delivery.
    private func read(_ requests: [Request], messages: [UInt64], from store: OwnershipStore) async throws -> [Reply] {
        var replies: [Reply] = []
        var bytesLeft: [UInt64: Int] = [:]
        let started = ContinuousClock.now
        var lastRead: Timestamp?
        for (request, message) in zip(requests, messages) {
            guard case .events(let buffer, let after, let limit) = request.command else { continue }
            let left = bytesLeft[message, default: ProtocolV1.maxReplyBytesPerMessage]
            if let after, let at = lastRead, ContinuousClock.now - started > Self.readBudget || left < ProtocolCodec.maxEventsReplyBytes {
                // Deferred: nothing read, nothing missed; the reader asks again from where it was.
                replies.append(Reply(
                    requestID: request.requestID, status: .events, buffer: buffer, at: at, partition: partition,
                    events: EventPage(events: [], position: after, more: true, missed: false)
                ))
                continue
            }
            let (page, at) = try await store.events(partition: partition, after: after, buffer: buffer, limit: limit)
            lastRead = at
            let reply = Reply(requestID: request.requestID, status: .events, buffer: buffer, at: at, partition: partition, events: ProtocolCodec.fitting(page))
            bytesLeft[message] = left - ProtocolCodec.encode(reply).count
            replies.append(reply)
        }
        return replies
    }

    /// How a store error reads to the machine.
    static func classify(_ error: any Error) -> Machine.Failure {
        switch error {
        case let error as StoreError where error.code == .partitionOwnershipLost:
            .ownershipLost
        case let error as StoreError where error.code == .contention:
            // The store re-read and retried the write 8 times, and only this worker (it holds the epoch)
            // writes the partition: retrying the same batch cannot succeed. Splitting it isolates the
            // request that causes it (answered internal_error and dead-lettered) instead of holding the
            // partition forever.
            .data(Machine.Refusal(sqlState: nil, message: error.message))
        case let error as SchemaError:
            .fatal("\(error)")
        case let error as PostgresError where error.isCausedByData || error.code == .unexpectedResult:
            .data(Machine.Refusal(sqlState: error.sqlState, message: error.message))
        default:
            .transient("\(error)")
        }
    }

    /// Expires leases. Returns true when the partition was lost.
    private func sweep(epoch: Int64) async -> Bool {
        guard let store else { return false }
        let configuration = worker.configuration
        do {
            // Waits that ran out are settled oldest first; while more are due than one sweep settles, the
            // sweep goes on (for up to a quarter of the interval) so that the answers keep up with them.
            var expired: [OutboxEntry] = []
            let started = ContinuousClock.now
            while true {
                let (changes, answers, more) = try await store.sweepWithLines(partition: partition, epoch: epoch)
                expired += changes
                // Waiters handed a buffer at a lease's expiry, or whose wait ran out: answered now.
                channels.send(Machine.answerMessages(answers), settle: [])
                metrics.lineAnswers(Dictionary(answers.map { ($0.reply.status.rawValue, 1) }, uniquingKeysWith: +))
                if !more || ContinuousClock.now - started > configuration.sweepInterval / 4 { break }
            }
            // Expiries are changes like any other: the pump publishes them in position order.
            pump?.send(expired)
            let gauge = metrics.queueReady
            channels.depths.sample(partition) { gauge.record($0) }
            if let lines = try? await store.lineSizes(partition: partition) {
                metrics.waiters.record(lines.waiters)
                metrics.longestLine.record(lines.longest)
            }
            if !expired.isEmpty {
                metrics.expired.increment(by: expired.count)
                worker.statistics.withLock { $0.expired += expired.count }
                logger.debug("expired leases", metadata: ["baton.count": "\(expired.count)"])
            }
        } catch let error as StoreError where error.code == .partitionOwnershipLost {
            return true
        } catch {
            logger.warning("lease sweep failed; will retry", metadata: ["baton.error": "\(error)"])
        }
        return false
    }
}
