import BatonCore

/// One partition's worker, as a state machine with no I/O: events in (deliveries, store results, ticks,
/// the consumer's end, stop), actions out (take the partition, apply a batch, send replies and settle,
/// publish events, sweep, publish a tick, wait and retry, finish), and lines for the log out
/// (``takeLogs()``). It imports BatonCore only: deliveries, publishes and settles are the broker's plain
/// values, store results BatonCore's; the driver moves them and writes the log. In the style of postgres-nio's
/// `ConnectionStateMachine`: whoever drives it (``PartitionDriver``) performs the actions and reports
/// their outcomes back as events, in the order it got them.
///
/// One operation on the store is in flight at a time (taking the partition, applying a chunk of a batch,
/// sweeping), and batches are decided in delivery order, one after the other: the serializer's order is
/// the queue's. Deliveries that arrive meanwhile wait in the machine, and the next batch takes up to
/// ``Configuration/batchSize`` of them at once.
struct PartitionStateMachine {
    struct Configuration {
        var partition: Int
        /// Deliveries per batch, and requests per store transaction.
        var batchSize: Int
        /// At most this many deliveries stay unacked behind a deferred ack (see ``DeferredAck``).
        var ackLimit: Int
        var sweepInterval: Duration
        /// How often a standby publishes a tick through the queue (so that the active consumer takes the
        /// partition and sweeps it even when no request arrives).
        var tickInterval: Duration
        /// How long a batch waits for more deliveries after its first (zero: it starts at once).
        var linger: Duration = .zero
        /// How long the closing ack may wait for later batches' (``DeferredAck``; zero: at once).
        var ackDelay: Duration = .zero
        /// N, the deployment's partition count (for `describe` and for checking the buffer of `events`).
        var partitions = 1
        /// The deployment's reconnect grace of replica ids, for `describe`.
        var memberGraceMilliseconds = Roster.defaultGraceMilliseconds
    }

    /// Why the machine finished.
    enum Exit: Equatable {
        /// Asked to stop; the batch in hand was answered first.
        case stopped
        /// Another worker took the partition (a newer epoch).
        case ownershipLost
        /// The consumer ended (channel or connection closed); unsettled deliveries return to the queue.
        case consumerEnded
        /// A failure retrying cannot mend (the schema); the runner starts over.
        case failed(String)
    }

    /// How a store call failed, as far as the machine cares (the driver classifies errors).
    enum Failure: Error {
        /// The epoch is stale: nothing was written.
        case ownershipLost
        /// The database refused what the write contains: retrying the same write cannot succeed.
        case data(Refusal)
        /// Unavailable or broken for now: hold the batch unacked and retry with backoff.
        case transient(String)
        /// Cannot go on (schema mismatch).
        case fatal(String)
    }

    /// What the database said when it refused a write (the driver reads it off the store's error).
    struct Refusal: Equatable, CustomStringConvertible {
        /// The SQLSTATE, when the server refused it.
        var sqlState: String?
        var message: String
        var description: String { "\(sqlState.map { "SQLSTATE \($0): " } ?? "")\(message)" }
    }

    /// A line for the log: the machine decides what to say, the driver writes it.
    struct LogLine: Equatable {
        enum Level: Equatable { case debug, info, notice, warning, error }
        var level: Level
        var message: String
        var metadata: [String: String]
    }

    enum Action {
        case publishTick
        case takePartition
        /// Apply `requests` (in order) as owner of `epoch`; report with ``applied(_:now:)``.
        case apply(requests: [Request], epoch: Int64)
        /// Read the history the `events` requests ask for, after the batch's decisions; report with ``read(_:now:)``.
        case read(requests: [Request], messages: [UInt64])
        /// Call ``retryDue()`` after `delay` (a store call failed for now).
        case retry(after: Duration, error: String)
        /// Publish the replies, then (once they are written) settle the deliveries.
        case send(publishes: [ChannelAction], settles: [ChannelAction], report: BatchReport)
        /// Publish committed ownership changes as events (off the decision path).
        case publishEvents([OutboxEntry])
        /// Expire leases; report with ``swept(_:)``.
        case sweep(epoch: Int64)
        /// Took the partition at `epoch` (or, nil, stands by again).
        case active(epoch: Int64?)
        /// The store failed and the partition cannot make progress (the error), or recovered (nil).
        case stalled(String?)
        case finish(Exit)
    }

    /// What one batch did, for statistics and metrics.
    struct BatchReport: Equatable {
        var messages = 0
        var requests = 0
        var replayed = 0
        var rejected = 0
        var failed = 0
        var transactions = 0
        /// Transactions decided from the partition's memory, without a read.
        var fromMemory = 0
        /// Requests by "operation|outcome".
        var counts: [String: Int] = [:]
        /// Dead-letter reasons, one per message dead-lettered.
        var deadLetters: [String] = []
        /// Waiters that left their lines in this batch, by answer (granted or denied).
        var lineAnswers: [String: Int] = [:]
        var commitTime: Duration = .zero
        var duration: Duration = .zero
    }

    /// Where the partition is, as one value whose cases carry what each needs (in the style of
    /// postgres-nio's `ConnectionStateMachine.State`): who owns the partition, what is in flight, and the
    /// batch that waits for it. Only what cuts across every state (deliveries waiting, the sweep's clock,
    /// the broker's alarm, the retry backoff, the deferred ack, stopping) is kept beside it.
    private enum State {
        /// Not the partition's owner: ticks go through the queue so that the active consumer takes it.
        case standingBy(Standby)
        /// The owner at `epoch`, doing `work`.
        case owner(epoch: Int64, Work)
        /// Done: nothing more is decided.
        case finished(Exit)
    }

    private enum Standby {
        case idle
        /// The store is fencing out any previous owner (``Action/takePartition``).
        case taking
        /// Taking failed for now: retried after ``Action/retry(after:error:)``.
        case waitingToRetry
    }

    /// What the owner has in flight (each case with the batch it is for).
    private enum Work {
        case idle
        /// A chunk of the batch is being applied by the store, since `since`.
        case applying(Batch, since: ContinuousClock.Instant)
        /// The batch's `events` reads are being read, after its decisions.
        case reading(Batch)
        case sweeping
        /// A store call failed for now: the batch (if any) is decided again after the backoff.
        case waitingToRetry(Batch?)
    }

    /// The batch being decided.
    private struct Batch {
        let started: ContinuousClock.Instant
        var requests: [Request] = []
        /// For each request: its delivery and, for a coalesced message, its place in it.
        var origins: [(message: AMQPMessage, element: Int?)] = []
        /// The replies of each coalesced delivery, by delivery tag, filled in place.
        var batchReplies: [UInt64: (message: AMQPMessage, replies: [Reply?])] = [:]
        var publishes: [ChannelAction] = []
        var settles: [ChannelAction] = []
        var lastAck: UInt64?
        /// Decided replies, aligned with `requests[..<replies.count]`; nil for a claim that waits in line.
        var replies: [Reply?] = []
        /// Answers to waiters that left their lines in this batch's decisions.
        var answers: [WaiterAnswer] = []
        var changes: [OutboxEntry] = []
        /// Ranges of `requests` still to decide, in order; a range the database refuses is split in halves.
        var work: [Range<Int>] = []
        /// The `events` reads of the batch, answered after its decisions, and their delivery and place.
        var reads: [(request: Request, message: AMQPMessage, element: Int?)] = []
        /// Their replies, once read.
        var readReplies: [Reply]?
        var report = BatchReport()
    }

    let configuration: Configuration
    /// Lines for the log since ``takeLogs()`` last took them.
    private var logs: [LogLine] = []
    private var state = State.standingBy(.idle)
    private var pending: [AMQPMessage] = []
    private var stopping = false
    private var consumerEnded = false
    private var lastTick: ContinuousClock.Instant?
    private var nextSweep: ContinuousClock.Instant
    private var sweepDue = false
    private var blockedReason: String?
    private var warnedBlocked = false
    private var backoff = Backoff(initial: .milliseconds(100), maximum: .seconds(3))
    private var stalled = false
    /// When the batch waiting for more deliveries starts anyway (``Configuration/linger``).
    private var lingerEnds: ContinuousClock.Instant?
    private var acks: DeferredAck

    init(configuration: Configuration, now: ContinuousClock.Instant) {
        self.configuration = configuration
        nextSweep = now + configuration.sweepInterval
        acks = DeferredAck(limit: max(1, configuration.ackLimit), delay: configuration.ackDelay)
    }

    /// Deliveries waiting for a batch (not yet taken into one).
    var waiting: Int { pending.count }

    /// The epoch the partition is owned at, nil while standing by (or finished).
    var epoch: Int64? {
        if case .owner(let epoch, _) = state { return epoch }
        return nil
    }

    /// Why the machine finished, nil while it runs.
    var exit: Exit? {
        if case .finished(let exit) = state { return exit }
        return nil
    }

    /// The log lines since the last call, in order (the driver writes them after each event).
    mutating func takeLogs() -> [LogLine] {
        defer { logs.removeAll() }
        return logs
    }

    /// Says `message` in the log, with the partition and (once taken) its epoch.
    private mutating func log(_ level: LogLine.Level, _ message: String, _ metadata: [String: String] = [:]) {
        var metadata = metadata
        metadata["baton.partition"] = String(configuration.partition)
        if let epoch { metadata["baton.epoch"] = String(epoch) }
        logs.append(LogLine(level: level, message: message, metadata: metadata))
    }

    // MARK: - Events

    /// Deliveries from the partition's queue, in order.
    mutating func deliveries(_ messages: [AMQPMessage], now: ContinuousClock.Instant) -> [Action] {
        guard exit == nil else { return [] }
        pending += messages
        return advance(now: now)
    }

    /// The clock moved on.
    mutating func tick(now: ContinuousClock.Instant) -> [Action] {
        guard exit == nil else { return [] }
        var actions: [Action] = []
        if case .standingBy = state, !stopping, lastTick.map({ now - $0 >= configuration.tickInterval }) ?? true {
            lastTick = now
            actions.append(.publishTick)
        }
        if let settle = acks.due(now: now) {
            // A deferred ack that waited long enough; it goes the way of every batch's replies and acks,
            // so it cannot overtake an earlier ack.
            actions.append(.send(publishes: [], settles: [settle], report: BatchReport()))
        }
        if now >= nextSweep {
            // Advance even while standing by.
            nextSweep = now + configuration.sweepInterval
            if epoch != nil { sweepDue = true }
        }
        return actions + advance(now: now)
    }

    /// How often a machine holding deliveries while the broker blocks its publisher looks again (the
    /// alarm is read before every event; its end is not an event of its own).
    static let blockedRecheck = Duration.milliseconds(50)

    /// When the machine next wants ``tick(now:)``, if it waits for nothing but events: a standby's next
    /// tick through the queue, the owner's next sweep, a deferred ack's end (while nothing else is in
    /// flight, whose end settles it anyway), a batch's linger, a look at the broker's alarm while
    /// deliveries wait for it to clear. The driver asks after every event and keeps one timer, so that
    /// an idle partition never wakes between them. Ticking earlier (or more often) is harmless.
    func nextDeadline(now: ContinuousClock.Instant) -> ContinuousClock.Instant? {
        var next: ContinuousClock.Instant?
        func consider(_ at: ContinuousClock.Instant?) {
            guard let at else { return }
            if next.map({ at < $0 }) ?? true { next = at }
        }
        let idle: Bool
        switch state {
        case .finished:
            return nil
        case .standingBy(let phase):
            if !stopping { consider(lastTick.map { $0 + configuration.tickInterval } ?? now) }
            idle = if case .idle = phase { true } else { false }
            if case .waitingToRetry = phase { consider(acks.dueAt) }
        case .owner(_, let work):
            if !sweepDue { consider(nextSweep) }
            idle = if case .idle = work { true } else { false }
            if case .waitingToRetry = work { consider(acks.dueAt) }
        }
        guard idle else { return next }
        consider(acks.dueAt)
        if !pending.isEmpty {
            if blockedReason != nil {
                consider(now + Self.blockedRecheck)
            } else {
                consider(lingerEnds)
            }
        }
        return next
    }

    /// Whether the broker blocks the publisher connection now (checked before a batch starts).
    mutating func setBlocked(_ reason: String?) {
        blockedReason = reason
        if reason == nil { warnedBlocked = false }
    }

    /// The partition was taken at `epoch`, or taking it failed.
    mutating func partitionTaken(_ result: Result<Int64, Failure>, now: ContinuousClock.Instant) -> [Action] {
        guard case .standingBy(.taking) = state else { return [] }
        state = .standingBy(.idle)
        switch result {
        case .success(let taken):
            state = .owner(epoch: taken, .idle)
            log(.info, "took partition")
            return recovered() + [.active(epoch: taken)] + advance(now: now)
        case .failure(let failure):
            return failed(failure, batch: nil)
        }
    }

    /// The store applied the chunk handed out by the last ``Action/apply(requests:epoch:)``, or failed.
    mutating func applied(_ result: Result<BatchResult, Failure>, now: ContinuousClock.Instant) -> [Action] {
        guard case .owner(let epoch, .applying(var batch, let since)) = state, let range = batch.work.first else { return [] }
        state = .owner(epoch: epoch, .idle)
        batch.report.commitTime += now - since
        switch result {
        case .success(let result):
            batch.work.removeFirst()
            batch.replies += result.replies
            batch.answers += result.answers
            batch.changes += result.changes
            batch.report.replayed += result.replayed
            batch.report.transactions += 1
            if result.fromMemory { batch.report.fromMemory += 1 }
            return recovered() + advance(now: now, with: batch)
        case .failure(.data(let error)):
            batch.work.removeFirst()
            if range.count > 1 {
                // Decide the halves in order until the request that causes it stands alone.
                let middle = range.lowerBound + range.count / 2
                batch.work.insert(contentsOf: [range.lowerBound..<middle, middle..<range.upperBound], at: 0)
            } else {
                let request = batch.requests[range.lowerBound]
                log(.error, "the database refused a request; answering it with an error and dead-lettering it", [
                    "baton.request_id": LogValue.escape(request.requestID), "baton.buffer": LogValue.escape(request.buffer ?? "-"),
                    "baton.error": "\(error)",
                ])
                let refusal = ProtocolError(
                    code: .internalError,
                    message: "the database refused to record this request (\(error)); nothing changed and the request was dead-lettered for an operator",
                    requestID: request.requestID, buffer: request.buffer
                )
                batch.replies.append(Reply.rejection(refusal, partition: configuration.partition, at: nil))
                batch.report.failed += 1
            }
            return advance(now: now, with: batch)
        case .failure(let failure):
            return failed(failure, batch: batch)
        }
    }

    /// The store read what the batch's `events` requests asked for (one reply each, in order), or failed.
    mutating func read(_ result: Result<[Reply], Failure>, now: ContinuousClock.Instant) -> [Action] {
        guard case .owner(let epoch, .reading(var batch)) = state else { return [] }
        state = .owner(epoch: epoch, .idle)
        switch result {
        case .success(let replies):
            batch.readReplies = replies
            return recovered() + advance(now: now, with: batch)
        case .failure(let failure):
            return failed(failure, batch: batch)
        }
    }

    /// The sweep finished (or the partition was lost meanwhile).
    mutating func swept(lost: Bool, now: ContinuousClock.Instant) -> [Action] {
        guard case .owner(let epoch, .sweeping) = state else { return [] }
        state = .owner(epoch: epoch, .idle)
        if lost { return finish(.ownershipLost) }
        return advance(now: now)
    }

    /// The wait asked for by ``Action/retry(after:error:)`` is over.
    mutating func retryDue(now: ContinuousClock.Instant) -> [Action] {
        switch state {
        case .standingBy(.waitingToRetry):
            state = .standingBy(.idle)
            return advance(now: now)
        case .owner(let epoch, .waitingToRetry(let batch)):
            state = .owner(epoch: epoch, .idle)
            return advance(now: now, with: batch)
        default:
            return []
        }
    }

    /// The consumer ended: no more deliveries. What is in flight completes; then the machine finishes.
    mutating func consumerEnded(now: ContinuousClock.Instant) -> [Action] {
        guard exit == nil else { return [] }
        consumerEnded = true
        return advance(now: now)
    }

    /// Stop: the batch being applied is answered first; one waiting to retry is dropped unanswered (its
    /// deliveries return to the queue and are decided by the next consumer).
    mutating func stop(now: ContinuousClock.Instant) -> [Action] {
        guard exit == nil else { return [] }
        stopping = true
        switch state {
        case .standingBy(.taking), .standingBy(.waitingToRetry):
            state = .standingBy(.idle)
        case .owner(let epoch, .waitingToRetry):
            state = .owner(epoch: epoch, .idle)
        default:
            break
        }
        return advance(now: now)
    }

    // MARK: - Transitions

    /// A store call failed; `batch` is the batch it was for (decided again after the backoff).
    private mutating func failed(_ failure: Failure, batch: Batch?) -> [Action] {
        let reason: String
        switch failure {
        case .ownershipLost:
            return finish(.ownershipLost)
        case .fatal(let error):
            return finish(.failed(error))
        case .transient(let error):
            reason = error
        case .data(let error):
            // Only a batch can be split to isolate a refused request; anything else is retried.
            reason = "\(error)"
        }
        if stopping || consumerEnded {
            // Its deliveries return to the queue unanswered; the next consumer decides them.
            return finish(stopping ? .stopped : .consumerEnded)
        }
        let delay = backoff.next()
        log(.warning, "database call failed; holding the batch unacked and retrying", ["baton.error": reason, "baton.retry_in": "\(delay)"])
        if case .owner(let epoch, _) = state {
            state = .owner(epoch: epoch, .waitingToRetry(batch))
        } else {
            state = .standingBy(.waitingToRetry)
        }
        stalled = true
        return [.stalled(reason), .retry(after: delay, error: reason)]
    }

    private mutating func recovered() -> [Action] {
        backoff.reset()
        guard stalled else { return [] }
        stalled = false
        return [.stalled(nil)]
    }

    private mutating func finish(_ exit: Exit) -> [Action] {
        state = .finished(exit)
        var actions: [Action] = []
        // A deferred ack goes out before the channels close (else its deliveries come back and are
        // answered again from their records).
        if let settle = acks.flush() { actions.append(.send(publishes: [], settles: [settle], report: BatchReport())) }
        if stalled { actions.append(.stalled(nil)) }
        return actions + [.finish(exit)]
    }

    /// Starts whatever can start now: the next chunk of the batch in hand (`batch`, whose last store call
    /// just returned), its reads, its replies, a sweep, taking the partition, the next batch.
    private mutating func advance(now: ContinuousClock.Instant, with batch: Batch? = nil) -> [Action] {
        var actions: [Action] = []
        var inHand = batch
        while true {
            // Only an idle machine starts something; a store call in flight reports back first.
            switch state {
            case .standingBy(.idle), .owner(_, .idle): break
            default: return actions
            }
            if var batch = inHand, case .owner(let epoch, _) = state {
                if let range = batch.work.first {
                    state = .owner(epoch: epoch, .applying(batch, since: now))
                    actions.append(.apply(requests: Array(batch.requests[range]), epoch: epoch))
                    return actions
                }
                if !batch.reads.isEmpty, batch.readReplies == nil {
                    state = .owner(epoch: epoch, .reading(batch))
                    actions.append(.read(requests: batch.reads.map(\.request), messages: batch.reads.map(\.message.deliveryTag)))
                    return actions
                }
                batch.report.duration = now - batch.started
                inHand = nil
                actions += complete(batch, now: now)
                continue
            }
            if stopping { return actions + finish(.stopped) }
            if consumerEnded { return actions + finish(.consumerEnded) }
            if sweepDue, case .owner(let epoch, _) = state {
                sweepDue = false
                state = .owner(epoch: epoch, .sweeping)
                actions.append(.sweep(epoch: epoch))
                return actions
            }
            guard !pending.isEmpty else { return actions }
            if let blockedReason {
                // Replies cannot leave while the broker blocks our publisher (memory or disk alarm): hold
                // the deliveries unacked until it unblocks. The consumer connection never publishes, so it
                // is never blocked and keeps its heartbeats.
                if !warnedBlocked {
                    warnedBlocked = true
                    log(.warning, "the broker blocks publishing (resource alarm): holding the batch until it unblocks", ["baton.reason": blockedReason])
                }
                return actions
            }
            guard case .owner = state else {
                // We are the active consumer: take the partition, fencing out any previous owner.
                state = .standingBy(.taking)
                actions.append(.takePartition)
                return actions
            }
            if configuration.linger > .zero, pending.count < configuration.batchSize {
                // Wait a little for more, once per batch, from its first delivery.
                guard let ends = lingerEnds else {
                    // ``nextDeadline(now:)`` now says when it ends.
                    lingerEnds = now + configuration.linger
                    return actions
                }
                if now < ends { return actions }
            }
            lingerEnds = nil
            let taken = Array(pending.prefix(configuration.batchSize))
            pending.removeFirst(taken.count)
            inHand = admit(taken, now: now)
        }
    }

    // MARK: - Batches

    /// The message id of a tick: an empty message a worker sends through its partition's queue so that
    /// the active consumer takes the partition and sweeps it even when no request arrives.
    static let tickPrefix = "baton-tick:"

    static func isTick(_ message: AMQPMessage) -> Bool {
        message.body.isEmpty && message.properties.messageID?.hasPrefix(tickPrefix) == true
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
    private static func admit(_ message: AMQPMessage) -> Admission {
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
                return .batch(elements.map { element in
                    element.flatMap { request in
                        guard request.waiting == nil else {
                            return .failure(ProtocolError(
                                code: .invalidRequest,
                                message: "a claim with wait_ms must be sent alone, not in a coalesced message: its answer comes when it leaves the line",
                                requestID: request.requestID, buffer: request.buffer
                            ))
                        }
                        return authorize(request, from: message)
                    }
                })
            }
        } catch {
            return .single(.failure(error))
        }
    }

    /// Checks what the broker says about the sender: the exchange (`force_release` only through
    /// `baton.admin`) and the principal (`user_id`), which it records on the request.
    private static func authorize(_ request: Request, from message: AMQPMessage) -> Result<Request, ProtocolError> {
        var request = request
        if request.operation == .forceRelease, message.exchange != ProtocolV1.adminExchange {
            return .failure(ProtocolError(
                code: .invalidRequest,
                message: "op 'force_release' is accepted only through the \(ProtocolV1.adminExchange) exchange (got '\(LogValue.escape(message.exchange))'); operators publish it there",
                requestID: request.requestID, buffer: request.buffer
            ))
        }
        request.principal = message.properties.userID
        if request.waiting != nil {
            // A waiting claim is answered later, at the reply address of the delivery that asked last,
            // which the store keeps as text: refused here when it cannot hold them exactly.
            if let problem = storedPropertyProblem(message.properties) {
                return .failure(ProtocolError(code: .invalidRequest, message: problem, requestID: request.requestID, buffer: request.buffer))
            }
            request.waiting?.replyTo = message.properties.replyTo
            request.waiting?.correlationID = message.properties.correlationID
        }
        if request.principal == nil, request.operation != .inspect, request.operation != .forceRelease, !request.operation.isRead {
            return .failure(ProtocolError(
                code: .unauthenticated,
                message: "op '\(request.operation)' needs the AMQP property user_id set to the broker user you log in as (RabbitMQ checks it): a lease belongs to the user that claimed it, and only that user may renew or release it",
                requestID: request.requestID, buffer: request.buffer
            ))
        }
        return .success(request)
    }

    /// Why a waiting claim's `reply_to` or `correlation_id` cannot be kept with it in the store (text
    /// without U+0000), or nil.
    static func storedPropertyProblem(_ properties: AMQPProperties) -> String? {
        if let bytes = properties.correlationIDBytes, bytes.contains(0) || String(validating: bytes, as: UTF8.self) == nil {
            return "a claim with wait_ms needs a correlation_id of UTF-8 text without U+0000 (it is kept with the claim until its answer), got \(bytes.count) bytes that are not: use a text correlation_id, or no wait_ms"
        }
        if let replyTo = properties.replyTo, replyTo.utf8.contains(0) {
            return "a claim with wait_ms needs a reply_to without U+0000 (it is kept with the claim until its answer): use the reply address the broker gave you"
        }
        return nil
    }

    /// Starts a batch: admits each delivery, answers (and dead-letters) what is refused, and lines up the
    /// valid requests for the store in chunks of ``Configuration/batchSize``.
    ///
    /// A delivery carries one request or a coalesced batch of them. A single request that is refused is
    /// answered and dead-lettered, as always; in a batch, each element is answered in its place (in one
    /// reply message, in order) and the message is acked, since its other elements were decided.
    private mutating func admit(_ messages: [AMQPMessage], now: ContinuousClock.Instant) -> Batch {
        let partition = configuration.partition
        var batch = Batch(started: now)
        batch.report.messages = messages.count
        batch.lastAck = messages.filter(Self.isTick).map(\.deliveryTag).max()
        func refuse(_ error: ProtocolError) {
            log(.notice, "rejected a malformed request", [
                "baton.error_code": "\(error.code)", "baton.request_id": LogValue.escape(error.requestID ?? "-"), "baton.reason": LogValue.escape(error.message),
            ])
        }
        /// Malformed or not allowed: answered if it can be, then dead-lettered. It never reaches the database.
        func refuseMessage(_ message: AMQPMessage, _ error: ProtocolError) {
            refuse(error)
            if let reply = Self.replyMessage(ProtocolCodec.encode(Reply.rejection(error, partition: partition, at: nil)), to: message) {
                batch.publishes.append(.publish(reply))
            }
            batch.settles.append(.reject(deliveryTag: message.deliveryTag, requeue: false))
            batch.report.deadLetters.append(error.code.rawValue)
            batch.report.rejected += 1
        }
        func accept(_ request: Request, _ message: AMQPMessage, element: Int?) {
            if case .forceRelease(let buffer, let reason) = request.command {
                log(.notice, "force release", [
                    "baton.buffer": LogValue.escape(buffer), "baton.reason": LogValue.escape(reason ?? "-"),
                    "baton.request_id": LogValue.escape(request.requestID), "baton.principal": LogValue.escape(request.principal ?? "-"),
                ])
            }
            batch.requests.append(request)
            batch.origins.append((message, element))
        }
        for message in messages where !Self.isTick(message) {
            switch Self.admit(message) {
            case .single(.success(let request)) where request.operation.isRead:
                switch answerAtOnce(request) {
                case .success(let reply?):
                    if let answer = Self.replyMessage(ProtocolCodec.encode(reply), to: message) { batch.publishes.append(.publish(answer)) }
                    batch.lastAck = max(batch.lastAck ?? 0, message.deliveryTag)
                    batch.report.counts["\(request.operation.rawValue)|\(reply.status.rawValue)", default: 0] += 1
                case .success(nil):
                    batch.reads.append((request, message, nil))
                case .failure(let error):
                    refuseMessage(message, error)
                }
            case .single(.success(let request)):
                accept(request, message, element: nil)
            case .single(.failure(let error)):
                refuseMessage(message, error)
            case .batch(let elements):
                var replies = [Reply?](repeating: nil, count: elements.count)
                for (index, element) in elements.enumerated() {
                    switch element.flatMap({ request in answerAtOnce(request).map { (request, $0) } }) {
                    case .success((let request, let reply?)):
                        replies[index] = reply
                        batch.report.counts["\(request.operation.rawValue)|\(reply.status.rawValue)", default: 0] += 1
                    case .success((let request, nil)) where request.operation == .events:
                        batch.reads.append((request, message, index))
                    case .success((let request, nil)):
                        accept(request, message, element: index)
                    case .failure(let error):
                        refuse(error)
                        replies[index] = Reply.rejection(error, partition: partition, at: nil)
                        batch.report.counts["-|\(error.code.rawValue)", default: 0] += 1
                    }
                }
                batch.batchReplies[message.deliveryTag] = (message, replies)
            case .unanswerable(let replyTo):
                log(.warning, "refused a request whose reply_to is not a reply queue of its sender; dead-lettered without an answer", [
                    "baton.reply_to": LogValue.escape(replyTo), "baton.correlation_id": LogValue.escape(message.properties.correlationID ?? "-"),
                    "baton.principal": LogValue.escape(message.properties.userID ?? "-"),
                ])
                batch.settles.append(.reject(deliveryTag: message.deliveryTag, requeue: false))
                batch.report.deadLetters.append("reply_to_refused")
                batch.report.rejected += 1
            }
        }
        batch.report.requests = batch.requests.count
        // At most batchSize requests per transaction, however many a delivery batch carries (coalesced
        // messages hold up to 256 each): one transaction stays short.
        batch.work = stride(from: 0, to: batch.requests.count, by: configuration.batchSize).map {
            $0..<min($0 + configuration.batchSize, batch.requests.count)
        }
        return batch
    }

    /// The reply to a request answered without the store (`describe`), nil for one that goes on (a
    /// decision, or an `events` read after the batch's decisions), or why a read is refused (an `events`
    /// whose buffer belongs to another partition).
    private func answerAtOnce(_ request: Request) -> Result<Reply?, ProtocolError> {
        let partition = configuration.partition
        switch request.command {
        case .describe:
            return .success(Reply(
                requestID: request.requestID, status: .description, partition: partition,
                deployment: DeploymentDescription(partitions: configuration.partitions, memberGraceMilliseconds: configuration.memberGraceMilliseconds)
            ))
        case .events(let buffer?, _, _):
            if let partitioner = try? Partitioner(count: configuration.partitions), partitioner.partition(of: buffer) != partition {
                let right = partitioner.partition(of: buffer)
                return .failure(ProtocolError(
                    code: .misrouted,
                    message: "buffer '\(LogValue.escape(buffer))' belongs to partition \(right) of \(configuration.partitions), not \(partition): publish its events request with routing key '\(right)'",
                    requestID: request.requestID, buffer: buffer
                ))
            }
            return .success(nil)
        default:
            return .success(nil)
        }
    }

    /// Answers a decided batch: replies (rejections first, so that the closing multiple-ack covers
    /// exactly the accepted deliveries), then its settles, then its events.
    private mutating func complete(_ batch: Batch, now: ContinuousClock.Instant) -> [Action] {
        var batch = batch
        let partition = configuration.partition
        for (request, (origin, decided)) in zip(batch.requests, zip(batch.origins, batch.replies)) {
            guard let reply = decided else {
                // Waits in line: its state is in the database, so the delivery is done; the answer comes later.
                batch.report.counts["claim|waiting", default: 0] += 1
                batch.lastAck = max(batch.lastAck ?? 0, origin.message.deliveryTag)
                continue
            }
            batch.report.counts["\(request.operation.rawValue)|\(reply.error?.code.rawValue ?? reply.status.rawValue)", default: 0] += 1
            if reply.status == .error, reply.error?.code != .deadlineExceeded {
                log(.notice, "rejected a request", [
                    "baton.request_id": LogValue.escape(reply.requestID ?? "-"), "baton.reason": LogValue.escape(reply.error?.message ?? ""),
                ])
            }
            if let element = origin.element {
                batch.batchReplies[origin.message.deliveryTag]?.replies[element] = reply
                continue
            }
            if let answer = Self.replyMessage(ProtocolCodec.encode(reply), to: origin.message) { batch.publishes.append(.publish(answer)) }
            if reply.status == .error, reply.error?.code != .deadlineExceeded {
                batch.report.deadLetters.append(reply.error?.code.rawValue ?? "error")
                batch.settles.append(.reject(deliveryTag: origin.message.deliveryTag, requeue: false))
                batch.report.rejected += 1
            } else {
                // Expired requests are acked, not dead-lettered: nothing is wrong with them, their caller gave up.
                batch.lastAck = max(batch.lastAck ?? 0, origin.message.deliveryTag)
            }
        }
        batch.publishes += Self.answerMessages(batch.answers)
        for answer in batch.answers { batch.report.lineAnswers[answer.reply.status.rawValue, default: 0] += 1 }
        for (read, reply) in zip(batch.reads, batch.readReplies ?? []) {
            batch.report.counts["events|\(reply.status.rawValue)", default: 0] += 1
            if let element = read.element {
                batch.batchReplies[read.message.deliveryTag]?.replies[element] = reply
            } else {
                if let answer = Self.replyMessage(ProtocolCodec.encode(reply), to: read.message) { batch.publishes.append(.publish(answer)) }
                batch.lastAck = max(batch.lastAck ?? 0, read.message.deliveryTag)
            }
        }
        for (tag, answered) in batch.batchReplies.sorted(by: { $0.key < $1.key }) {
            let replies = answered.replies.map {
                $0 ?? Reply(requestID: nil, status: .error, partition: partition, error: ReplyError(code: .internalError, message: "no decision"))
            }
            for part in ProtocolCodec.encodeBatchReply(replies) {
                if let answer = Self.replyMessage(part, to: answered.message) { batch.publishes.append(.publish(answer)) }
            }
            batch.lastAck = max(batch.lastAck ?? 0, tag)
        }
        if let settle = acks.settle(batch.lastAck, count: batch.report.messages, moreWaiting: !pending.isEmpty, now: now) { batch.settles.append(settle) }
        var actions: [Action] = [.send(publishes: batch.publishes, settles: batch.settles, report: batch.report)]
        if !batch.changes.isEmpty { actions.append(.publishEvents(batch.changes)) }
        return actions
    }

    /// The answers to waiters that left their lines, each to the reply address of the delivery that asked
    /// last (none when it asked for none, or for one the worker refuses to send).
    static func answerMessages(_ answers: [WaiterAnswer]) -> [ChannelAction] {
        answers.compactMap { answer in
            guard let replyTo = answer.waiter.replyTo, ProtocolV1.isAcceptedReplyTo(replyTo) else { return nil }
            return .publish(OutgoingMessage(
                exchange: "", routingKey: replyTo, body: ProtocolCodec.encode(answer.reply),
                properties: AMQPProperties(contentType: ProtocolV1.contentType, correlationID: answer.waiter.correlationID),
                mandatory: false
            ))
        }
    }

    /// The reply message carrying `body` to `message`'s sender, or nil when it asked for none (or for one
    /// the worker refuses to send).
    private static func replyMessage(_ body: [UInt8], to message: AMQPMessage) -> OutgoingMessage? {
        guard let replyTo = message.properties.replyTo, ProtocolV1.isAcceptedReplyTo(replyTo) else { return nil }
        var properties = AMQPProperties(contentType: ProtocolV1.contentType)
        properties.correlationIDBytes = message.properties.correlationIDBytes  // unchanged, binary or not (3.1)
        return OutgoingMessage(exchange: "", routingKey: replyTo, body: body, properties: properties, mandatory: false)
    }
}
