import BatonCore
@testable import BatonWorker
import Testing

/// The partition worker's decisions about what to do next, with no broker and no database: the tests
/// play both, checking every settle the machine asks for against the broker's rules.
@Suite struct PartitionStateMachineTests {
    typealias Machine = PartitionStateMachine

    /// Plays the broker and the store around one machine.
    struct Harness {
        var machine: Machine
        var now = ContinuousClock.now
        private var nextTag: UInt64 = 1
        /// Delivered and not yet settled, as the broker sees it.
        private(set) var unsettled: Set<UInt64> = []
        /// Replies published, in order.
        private(set) var replies: [Reply] = []
        /// Coalesced reply messages published, decoded, in order.
        private(set) var batchReplies: [[UInt8]] = []
        /// Every action, in order.
        private(set) var actions: [Machine.Action] = []
        /// Ticks published.
        private(set) var ticks = 0
        private(set) var events: [OutboxEntry] = []

        init(batchSize: Int = 256, ackLimit: Int = 64, linger: Duration = .zero, ackDelay: Duration = .zero) {
            machine = Machine(
                configuration: Machine.Configuration(
                    partition: 3, batchSize: batchSize, ackLimit: ackLimit, sweepInterval: .seconds(1), tickInterval: .seconds(3),
                    linger: linger, ackDelay: ackDelay, partitions: 4
                ),
                now: now
            )
        }

        /// A claim (or another request) as a frontend publishes it.
        mutating func message(_ request: Request, user: String? = "alice", replyTo: String = "amq.rabbitmq.reply-to.x", exchange: String = ProtocolV1.requestsExchange) -> AMQPMessage {
            message(body: ProtocolCodec.encode(request), user: user, replyTo: replyTo, exchange: exchange)
        }

        mutating func message(body: [UInt8], user: String? = "alice", replyTo: String = "amq.rabbitmq.reply-to.x", exchange: String = ProtocolV1.requestsExchange, messageID: String? = nil) -> AMQPMessage {
            defer { nextTag += 1 }
            return AMQPMessage(
                body: body, properties: AMQPProperties(correlationID: "c\(nextTag)", replyTo: replyTo, messageID: messageID, userID: user),
                deliveryTag: nextTag, exchange: exchange
            )
        }

        mutating func tickMessage() -> AMQPMessage {
            message(body: [], user: nil, replyTo: "", messageID: Machine.tickPrefix + "w")
        }

        static func claim(_ id: String, _ buffer: String = "a.txt") -> Request {
            Request(requestID: id, command: .claim(buffer: buffer, holder: Holder(user: "alice", connection: "c"), leaseMilliseconds: 30_000))
        }

        /// Records what the machine asked for, playing the broker's part of it; returns the actions.
        @discardableResult
        mutating func take(_ new: [Machine.Action]) -> [Machine.Action] {
            for action in new {
                actions.append(action)
                switch action {
                case .send(let publishes, let settles, _):
                    for publish in publishes {
                        guard case .publish(let message) = publish else { continue }
                        if let reply = try? ProtocolCodec.decodeReply(message.body) {
                            replies.append(reply)
                        } else {
                            batchReplies.append(message.body)
                        }
                    }
                    for settle in settles {
                        switch settle {
                        case .ack(let tag, let multiple):
                            // The broker refuses (closing the channel) an ack of a tag that is not outstanding.
                            #expect(unsettled.contains(tag), "ack of tag \(tag), which is not outstanding")
                            if multiple { unsettled = unsettled.filter { $0 > tag } } else { unsettled.remove(tag) }
                        case .reject(let tag, let requeue):
                            #expect(!requeue)
                            #expect(unsettled.remove(tag) != nil, "reject of tag \(tag), which is not outstanding")
                        case .publish:
                            Issue.record("a publish among settles")
                        }
                    }
                case .publishTick:
                    ticks += 1
                case .publishEvents(let entries):
                    events += entries
                default:
                    break
                }
            }
            return new
        }

        @discardableResult
        mutating func deliver(_ messages: [AMQPMessage]) -> [Machine.Action] {
            unsettled.formUnion(messages.map(\.deliveryTag))
            return take(machine.deliveries(messages, now: now))
        }

        /// The requests of the apply the machine asked for last, if its last actions ask for one.
        static func applied(_ actions: [Machine.Action]) -> [Request]? {
            for action in actions.reversed() {
                if case .apply(let requests, _) = action { return requests }
            }
            return nil
        }

        /// Answers an apply as the store would: each claim granted with token 1.
        mutating func commit(_ requests: [Request]) -> [Machine.Action] {
            let replies = requests.map { Reply(requestID: $0.requestID, status: .granted, buffer: $0.buffer, token: 1, partition: 3) }
            let changes = requests.enumerated().map { index, request in
                OutboxEntry(id: Int64(events.count + index + 1), partition: 3, change: OwnershipChange(
                    kind: .granted, buffer: request.buffer ?? "", holder: Holder(user: "alice", connection: "c"), token: 1,
                    at: Timestamp(milliseconds: 1), expiresAt: Timestamp(milliseconds: 2)
                ))
            }
            return take(machine.applied(.success(BatchResult(replies: replies, changes: changes, replayed: 0, attempts: 1)), now: now))
        }

        mutating func fail(_ failure: Machine.Failure) -> [Machine.Action] {
            take(machine.applied(.failure(failure), now: now))
        }

        mutating func taken(_ epoch: Int64 = 7) -> [Machine.Action] {
            take(machine.partitionTaken(.success(epoch), now: now))
        }

        mutating func tick(after: Duration = .milliseconds(50), blocked: String? = nil) -> [Machine.Action] {
            now += after
            machine.setBlocked(blocked)
            return take(machine.tick(now: now))
        }
    }

    static func finished(_ actions: [Machine.Action]) -> Machine.Exit? {
        for case .finish(let exit) in actions { return exit }
        return nil
    }

    static func read(_ actions: [Machine.Action]) -> [Request]? {
        for case .read(let requests, _) in actions { return requests }
        return nil
    }

    @Test func describeIsAnsweredAtOnceWithoutTheStoreOrAUser() {
        var harness = Harness()
        harness.deliver([harness.message(Harness.claim("warm"))])
        _ = harness.commit(Harness.applied(harness.taken())!)
        let actions = harness.deliver([harness.message(Request(requestID: "d", command: .describe), user: nil)])
        #expect(Harness.applied(actions) == nil && Self.read(actions) == nil, "nothing for the store")
        let reply = harness.replies.last
        #expect(reply?.status == .description && reply?.deployment?.partitions == 4 && reply?.deployment?.revision == ProtocolV1.revision)
        #expect(reply?.partition == 3 && harness.unsettled.isEmpty)
    }

    @Test func eventsAreReadAfterTheBatchsDecisionsAndAnsweredInPlace() {
        var harness = Harness()
        harness.deliver([harness.message(Harness.claim("warm"))])
        _ = harness.commit(Harness.applied(harness.taken())!)
        // One delivery batch: a claim, an events read (no user needed), and a coalesced message holding a
        // claim and a read.
        let read = Request(requestID: "e1", command: .events(buffer: nil, after: 0, limit: 10))
        let coalesced = ProtocolCodec.encodeBatch([Harness.claim("r2", "b2"), Request(requestID: "e2", command: .events(buffer: nil, after: 5, limit: 10))])
        var actions = harness.deliver([
            harness.message(Harness.claim("r1", "b1")), harness.message(read, user: nil), harness.message(body: coalesced),
        ])
        let decided = Harness.applied(actions)
        #expect(decided?.map(\.requestID) == ["r1", "r2"], "reads never go to the store's apply")
        actions = harness.commit(decided!)
        let reads = Self.read(actions)
        #expect(reads?.map(\.requestID) == ["e1", "e2"], "read after the batch's decisions, in order")
        #expect(harness.replies.map(\.requestID) == ["warm"], "nothing is answered before the reads")
        let page = EventPage(events: [], position: 9, more: false, missed: false)
        _ = harness.take(harness.machine.read(.success(reads!.map { Reply(requestID: $0.requestID, status: .events, partition: 3, events: page) }), now: harness.now))
        #expect(harness.replies.map(\.requestID) == ["warm", "r1", "e1"])
        #expect(harness.replies.last?.events?.position == 9)
        let batch = try? ProtocolCodec.decodeReplies(harness.batchReplies.last ?? [])
        #expect(batch?.map(\.requestID) == ["r2", "e2"] && batch?.last?.status == .events, "the coalesced read is answered in its place")
        #expect(harness.unsettled.isEmpty)
    }

    @Test func aReadThatFailsIsRetriedAndAnEventsReadOfAnotherPartitionsBufferIsMisrouted() {
        var harness = Harness()
        harness.deliver([harness.message(Harness.claim("warm"))])
        _ = harness.commit(Harness.applied(harness.taken())!)
        // Partition 3 of 4: find a buffer of another partition.
        let partitioner = try! Partitioner(count: 4)
        let foreign = (0..<100).map { "f\($0)" }.first { partitioner.partition(of: $0) != 3 }!
        harness.deliver([harness.message(Request(requestID: "m", command: .events(buffer: foreign, after: 0, limit: 1)), user: nil)])
        #expect(harness.replies.last?.error?.code == .misrouted && harness.unsettled.isEmpty, "refused and dead-lettered at once")

        let actions = harness.deliver([harness.message(Request(requestID: "e", command: .events(buffer: nil, after: nil, limit: 1)), user: nil)])
        #expect(Self.read(actions)?.map(\.requestID) == ["e"])
        let retry = harness.take(harness.machine.read(.failure(.transient("database down")), now: harness.now))
        #expect(retry.contains { if case .retry = $0 { true } else { false } }, "held and retried")
        let again = harness.take(harness.machine.retryDue(now: harness.now))
        #expect(Self.read(again)?.map(\.requestID) == ["e"], "the same read again")
        _ = harness.take(harness.machine.read(.success([Reply(requestID: "e", status: .events, partition: 3, events: EventPage(events: [], position: 1, more: false, missed: false))]), now: harness.now))
        #expect(harness.replies.last?.requestID == "e" && harness.unsettled.isEmpty)
    }

    @Test func aStandbyTicksThenTakesThePartitionOnItsFirstDelivery() {
        var harness = Harness()
        harness.tick()
        #expect(harness.ticks == 1, "a standby publishes a tick at once")
        harness.tick(after: .seconds(1))
        #expect(harness.ticks == 1, "and then once per tick interval")
        harness.tick(after: .seconds(2))
        #expect(harness.ticks == 2)

        let first = harness.message(Harness.claim("r1"))
        let actions = harness.deliver([first])
        guard case .takePartition? = actions.last else {
            Issue.record("expected takePartition, got \(actions)")
            return
        }
        let applying = harness.taken(7)
        guard case .apply(let requests, let epoch)? = applying.last else {
            Issue.record("expected apply, got \(applying)")
            return
        }
        #expect(requests.map(\.requestID) == ["r1"] && epoch == 7)
        #expect(requests.first?.principal == "alice", "the principal comes from the broker's user_id")
        _ = harness.commit(requests)
        #expect(harness.replies.map(\.requestID) == ["r1"])
        #expect(harness.unsettled.isEmpty, "the delivery is acked after its reply")
        #expect(harness.events.count == 1)
        harness.tick(after: .seconds(5))
        #expect(harness.ticks == 2, "an active partition publishes no ticks")
    }

    @Test func oneStoreCallAtATimeAndTheNextBatchTakesEverythingThatWaited() {
        var harness = Harness()
        harness.deliver([harness.message(Harness.claim("r1"))])
        let first = Harness.applied(harness.taken())!
        var more: [AMQPMessage] = []
        for index in 2...5 { more.append(harness.message(Harness.claim("r\(index)", "b\(index)"))) }
        #expect(Harness.applied(harness.deliver(Array(more[0..<2]))) == nil, "no second apply while one is in flight")
        #expect(Harness.applied(harness.deliver(Array(more[2...]))) == nil)
        #expect(harness.machine.waiting == 4)
        let second = harness.commit(first)
        #expect(Harness.applied(second)?.map(\.requestID) == ["r2", "r3", "r4", "r5"], "the next batch takes all that waited, in order")
        #expect(harness.unsettled.count == 5, "the first batch's ack is deferred while more waits")
        _ = harness.commit(Harness.applied(second)!)
        #expect(harness.unsettled.isEmpty, "one cumulative ack settles both batches")
        #expect(harness.replies.map(\.requestID) == ["r1", "r2", "r3", "r4", "r5"])
    }

    @Test func aBatchLargerThanTheBatchSizeIsAppliedInChunksInOrder() {
        var harness = Harness(batchSize: 2)
        harness.deliver([harness.message(Harness.claim("warm"))])
        _ = harness.commit(Harness.applied(harness.taken())!)
        let bodies = (1...3).map { Harness.claim("r\($0)", "b\($0)") }
        let message = harness.message(body: ProtocolCodec.encodeBatch(bodies))
        var actions = harness.deliver([message])
        var chunks: [[String]] = []
        while let requests = Harness.applied(actions) {
            chunks.append(requests.map(\.requestID))
            actions = harness.commit(requests)
        }
        #expect(chunks == [["r1", "r2"], ["r3"]])
        #expect(harness.batchReplies.count == 1, "a coalesced message is answered in one message")
        #expect(harness.unsettled.isEmpty)
    }

    @Test func aRequestTheDatabaseRefusesIsIsolatedAndTheRestAreDecided() {
        var harness = Harness()
        harness.deliver([harness.message(Harness.claim("warm"))])
        _ = harness.commit(Harness.applied(harness.taken())!)
        let messages = (1...4).map { harness.message(Harness.claim("r\($0)", "b\($0)")) }
        var actions = harness.deliver(messages)
        let refusal = Machine.Refusal(sqlState: "22001", message: "value too long")
        var attempts: [[String]] = []
        while let requests = Harness.applied(actions) {
            attempts.append(requests.map(\.requestID))
            actions = requests.contains { $0.requestID == "r3" } ? harness.fail(.data(refusal)) : harness.commit(requests)
        }
        #expect(attempts == [["r1", "r2", "r3", "r4"], ["r1", "r2"], ["r3", "r4"], ["r3"], ["r4"]])
        #expect(harness.replies.map(\.requestID) == ["warm", "r1", "r2", "r3", "r4"], "replies keep the queue's order")
        #expect(harness.replies[3].error?.code == .internalError)
        #expect(harness.replies[3].error?.message.contains("SQLSTATE 22001: value too long") == true)
        let logged = harness.machine.takeLogs()
        #expect(logged.contains { $0.level == .error && $0.metadata["baton.request_id"] == "r3" && $0.metadata["baton.epoch"] == "7" }, "\(logged)")
        #expect(harness.unsettled.isEmpty, "the refused one is dead-lettered, the others acked")
        let rejected = harness.actions.flatMap { action -> [UInt64] in
            guard case .send(_, let settles, _) = action else { return [] }
            return settles.compactMap { if case .reject(let tag, _) = $0 { tag } else { nil } }
        }
        #expect(rejected == [messages[2].deliveryTag])
    }

    @Test func aFailingDatabaseHoldsTheBatchAndRetriesTheSameRequests() {
        var harness = Harness()
        harness.deliver([harness.message(Harness.claim("r1"))])
        let requests = Harness.applied(harness.taken())!
        let failed = harness.fail(.transient("connection refused"))
        #expect(failed.contains { if case .stalled("connection refused") = $0 { true } else { false } })
        guard case .retry? = failed.last else {
            Issue.record("expected a retry, got \(failed)")
            return
        }
        #expect(harness.unsettled.count == 1, "nothing settled while the database fails")
        #expect(Harness.applied(harness.deliver([harness.message(Harness.claim("r2", "b"))])) == nil, "no other apply while waiting to retry")
        let again = harness.take(harness.machine.retryDue(now: harness.now))
        #expect(Harness.applied(again) == requests)
        let done = harness.commit(requests)
        #expect(done.contains { if case .stalled(nil) = $0 { true } else { false } }, "recovery is reported")
        _ = harness.commit(Harness.applied(done)!)
        #expect(harness.replies.map(\.requestID) == ["r1", "r2"])
    }

    @Test func losingTheFenceFinishesAfterSettlingWhatWasAnswered() {
        var harness = Harness()
        harness.deliver([harness.message(Harness.claim("r1"))])
        let first = Harness.applied(harness.taken())!
        harness.deliver([harness.message(Harness.claim("r2", "b"))])
        let second = harness.commit(first)
        #expect(harness.unsettled.count == 2, "r1's ack deferred behind r2")
        let lost = harness.fail(.ownershipLost)
        #expect(Self.finished(lost) == .ownershipLost)
        #expect(harness.unsettled == [2], "r1 (answered) is acked; r2 (not decided) returns to the queue")
        #expect(Harness.applied(second)?.map(\.requestID) == ["r2"])
        #expect(harness.deliver([harness.message(Harness.claim("r3"))]).isEmpty, "a finished machine does nothing")
    }

    @Test func stopAnswersTheBatchInHandThenFinishes() {
        var harness = Harness()
        harness.deliver([harness.message(Harness.claim("r1"))])
        let requests = Harness.applied(harness.taken())!
        harness.deliver([harness.message(Harness.claim("r2", "b"))])
        #expect(Self.finished(harness.take(harness.machine.stop(now: harness.now))) == nil, "the batch in hand first")
        let end = harness.commit(requests)
        #expect(Self.finished(end) == .stopped)
        #expect(Harness.applied(end) == nil, "what waited is left to the queue")
        #expect(harness.replies.map(\.requestID) == ["r1"] && harness.unsettled == [2])
    }

    @Test func stopWhileWaitingToRetryLeavesTheBatchToTheQueue() {
        var harness = Harness()
        harness.deliver([harness.message(Harness.claim("r1"))])
        _ = harness.taken()
        _ = harness.fail(.transient("down"))
        let end = harness.take(harness.machine.stop(now: harness.now))
        #expect(Self.finished(end) == .stopped)
        #expect(end.contains { if case .stalled(nil) = $0 { true } else { false } }, "no longer reported stalled")
        #expect(harness.replies.isEmpty && harness.unsettled == [1])
        #expect(harness.take(harness.machine.retryDue(now: harness.now)).isEmpty, "a late retry does nothing")
    }

    /// Taking the partition fails for now: the machine stands by, says it is stalled, takes it again after
    /// the backoff (and only then), and decides the deliveries that waited at the epoch it got.
    @Test func takingThePartitionFailsThenIsTakenAgainAfterTheBackoff() {
        var harness = Harness()
        harness.deliver([harness.message(Harness.claim("r1"))])
        let failed = harness.take(harness.machine.partitionTaken(.failure(.transient("no database")), now: harness.now))
        #expect(failed.contains { if case .retry = $0 { true } else { false } } && harness.machine.epoch == nil)
        #expect(harness.deliver([harness.message(Harness.claim("r2"))]).isEmpty, "nothing starts while waiting to retry")
        #expect(harness.take(harness.machine.partitionTaken(.success(9), now: harness.now)).isEmpty, "a result nobody asked for is ignored")
        let again = harness.take(harness.machine.retryDue(now: harness.now))
        guard case .takePartition? = again.last else { Issue.record("expected takePartition, got \(again)"); return }
        let applying = harness.taken(8)
        #expect(applying.contains { if case .stalled(nil) = $0 { true } else { false } }, "no longer reported stalled")
        #expect(Harness.applied(applying)?.map(\.requestID) == ["r1", "r2"] && harness.machine.epoch == 8)
    }

    /// Stop while the store takes the partition: the machine finishes at once without an epoch, and the
    /// late answer changes nothing.
    @Test func stopWhileTakingThePartitionFinishesWithoutDecidingAnything() {
        var harness = Harness()
        harness.deliver([harness.message(Harness.claim("r1"))])
        let end = harness.take(harness.machine.stop(now: harness.now))
        #expect(Self.finished(end) == .stopped && harness.machine.exit == .stopped)
        #expect(harness.take(harness.machine.partitionTaken(.success(7), now: harness.now)).isEmpty)
        #expect(harness.machine.epoch == nil && harness.unsettled == [1], "the delivery goes back to the queue")
    }

    @Test func theConsumerEndingLetsTheApplyInFlightFinishFirst() {
        var harness = Harness()
        harness.deliver([harness.message(Harness.claim("r1"))])
        let requests = Harness.applied(harness.taken())!
        #expect(Self.finished(harness.take(harness.machine.consumerEnded(now: harness.now))) == nil)
        #expect(Self.finished(harness.commit(requests)) == .consumerEnded)
        #expect(harness.replies.map(\.requestID) == ["r1"], "the committed decision is still answered")
    }

    @Test func noBatchStartsWhileTheBrokerBlocksPublishing() {
        var harness = Harness()
        harness.deliver([harness.message(Harness.claim("warm"))])
        _ = harness.commit(Harness.applied(harness.taken())!)
        harness.tick(blocked: "memory alarm")
        #expect(Harness.applied(harness.deliver([harness.message(Harness.claim("r1", "b"))])) == nil)
        #expect(Harness.applied(harness.tick(blocked: "memory alarm")) == nil)
        #expect(Harness.applied(harness.tick(blocked: nil))?.map(\.requestID) == ["r1"], "it starts once the alarm clears")
    }

    @Test func sweepsRunBetweenBatchesOnlyWhileActive() {
        var harness = Harness()
        harness.tick(after: .seconds(2))
        #expect(!harness.actions.contains { if case .sweep = $0 { true } else { false } }, "a standby does not sweep")
        harness.deliver([harness.message(Harness.claim("r1"))])
        let requests = Harness.applied(harness.taken(9))!
        let due = harness.tick(after: .seconds(2))
        #expect(!due.contains { if case .sweep = $0 { true } else { false } }, "not while a batch is in flight")
        let after = harness.commit(requests)
        guard case .sweep(let epoch)? = after.last else {
            Issue.record("expected a sweep after the batch, got \(after)")
            return
        }
        #expect(epoch == 9)
        #expect(Harness.applied(harness.deliver([harness.message(Harness.claim("r2", "b"))])) == nil, "no batch during the sweep")
        #expect(Harness.applied(harness.take(harness.machine.swept(lost: false, now: harness.now)))?.map(\.requestID) == ["r2"])
        #expect(Self.finished(harness.take(harness.machine.swept(lost: true, now: harness.now))) == nil, "a sweep result nobody asked for is ignored")
    }

    @Test func refusedMessagesAndTicksAreSettledOnceEachAndNeverReachTheStore() {
        var harness = Harness(ackLimit: 4)
        var messages = [harness.tickMessage()]
        messages.append(harness.message(body: Array("junk".utf8)))
        messages.append(harness.message(Harness.claim("r1"), user: nil))
        messages.append(harness.message(Harness.claim("r2"), replyTo: "baton.requests.0"))
        messages.append(harness.message(Request(requestID: "f", command: .forceRelease(buffer: "a.txt", reason: nil))))
        messages.append(harness.message(Harness.claim("ok", "b")))
        harness.deliver(messages)
        let requests = Harness.applied(harness.taken())
        #expect(requests?.map(\.requestID) == ["ok"])
        _ = harness.commit(requests ?? [])
        #expect(harness.unsettled.isEmpty, "every tag settled exactly once (the harness checks each)")
        #expect(harness.replies.map { $0.error?.code } == [.invalidRequest, .unauthenticated, .invalidRequest, nil])
        for _ in 0..<10 { harness.deliver([harness.message(body: Array("junk".utf8))]) }
        #expect(harness.unsettled.isEmpty)
    }

    @Test func aLingerWaitsForMoreOnceThenStartsTheBatch() {
        var harness = Harness(batchSize: 3, linger: .milliseconds(2))
        harness.deliver([harness.message(Harness.claim("warm"))])
        let warm = harness.taken()
        #expect(Harness.applied(warm) == nil, "lingering")
        #expect(harness.machine.nextDeadline(now: harness.now) == harness.now + .milliseconds(2), "the linger's end is the next deadline")
        #expect(Harness.applied(harness.deliver([harness.message(Harness.claim("r1", "b"))])) == nil, "still lingering")
        harness.now += .milliseconds(2)
        let started = harness.take(harness.machine.tick(now: harness.now))
        #expect(Harness.applied(started)?.map(\.requestID) == ["warm", "r1"], "after the linger, everything that came")
        let next = harness.commit(Harness.applied(started)!)
        #expect(Harness.applied(next) == nil)
        let full = harness.deliver((1...3).map { harness.message(Harness.claim("f\($0)", "f\($0)")) })
        #expect(Harness.applied(full)?.count == 3, "a full batch does not linger")
    }

    /// The broker echo is the store's stand-in, not a mode of the machine: the machine runs its whole path
    /// and the driver answers its applies with ``EchoResponder``, which decides from memory as the worker
    /// would (a held buffer is denied to another holder), so that a bench load makes the same calls
    /// against it as against Baton.
    @Test func theEchoDecidesTheMachinesAppliesFromMemory() throws {
        var harness = Harness()
        let partitioner = try Partitioner(count: 4)
        let buffer = try #require((0..<100).map { "echo-\($0).txt" }.first { partitioner.partition(of: $0) == 3 })
        let other = Request(requestID: "r2", command: .claim(buffer: buffer, holder: Holder(user: "bob", connection: "c2"), leaseMilliseconds: 30_000))
        let actions = harness.deliver([
            harness.message(Harness.claim("r1", buffer)), harness.message(other, user: "bob"), harness.message(Request(requestID: "r3", command: .inspect(buffer: buffer))),
        ])
        #expect(actions.contains { if case .takePartition = $0 { true } else { false } })
        let requests = try #require(Harness.applied(harness.taken(1)))
        let echo = EchoResponder(partitioner: partitioner)
        harness.take(harness.machine.applied(.success(echo.apply(requests, partition: 3)), now: harness.now))
        #expect(harness.replies.map(\.status) == [.granted, .denied, .state])
        #expect(harness.replies.last?.holder?.user == "alice")
        #expect(harness.unsettled.isEmpty)
        // Its memory outlives the batch: the holder releases, and then bob's claim is granted.
        let release = Request(requestID: "r4", command: .release(buffer: buffer, connection: "c", token: harness.replies[0].token ?? 0))
        let next = try #require(Harness.applied(harness.deliver([harness.message(release), harness.message(Request(requestID: "r5", command: other.command), user: "bob")])))
        harness.take(harness.machine.applied(.success(echo.apply(next, partition: 3)), now: harness.now))
        #expect(harness.replies.suffix(2).map(\.status) == [.released, .granted])
    }

    /// The machine writes no log itself: it says what happened in lines the driver writes, with the
    /// partition and the epoch.
    @Test func theMachineSaysWhatHappenedInLogLines() {
        var harness = Harness()
        harness.deliver([harness.message(Harness.claim("warm"))])
        _ = harness.commit(Harness.applied(harness.taken())!)
        let took = harness.machine.takeLogs()
        #expect(took.map(\.message) == ["took partition"] && took[0].metadata == ["baton.partition": "3", "baton.epoch": "7"] && took[0].level == .info)
        harness.deliver([harness.message(body: Array("{not json".utf8))])
        let refused = harness.machine.takeLogs()
        #expect(refused.count == 1 && refused[0].level == .notice && refused[0].message == "rejected a malformed request", "\(refused)")
        #expect(harness.machine.takeLogs().isEmpty, "each line is taken once")
    }

    /// The driver sleeps until the machine's next deadline and ticks it then: a standby's tick through the
    /// queue, the owner's sweep, a deferred ack while nothing is in flight, a look at the broker's alarm
    /// while deliveries wait; nothing once finished.
    @Test func theNextDeadlineIsWhatTheMachineWaitsFor() {
        var harness = Harness(ackDelay: .milliseconds(20))
        let start = harness.now
        #expect(harness.machine.nextDeadline(now: harness.now) == harness.now, "a new standby ticks at once")
        harness.tick(after: .zero)
        #expect(harness.ticks == 1)
        #expect(harness.machine.nextDeadline(now: harness.now) == harness.now + .seconds(3), "then every tick interval")

        harness.deliver([harness.message(Harness.claim("r1"))])
        let requests = Harness.applied(harness.taken())
        #expect(harness.machine.nextDeadline(now: harness.now) == start + .seconds(1), "while applying: the sweep only")
        _ = harness.commit(requests ?? [])
        #expect(harness.unsettled.count == 1)
        let ackDue = harness.now + .milliseconds(20)
        #expect(harness.machine.nextDeadline(now: harness.now) == ackDue, "idle with a deferred ack: its end")
        #expect(harness.tick(after: .milliseconds(20)).isEmpty == false && harness.unsettled.isEmpty, "the tick at the deadline acks")
        #expect(harness.machine.nextDeadline(now: harness.now) == start + .seconds(1), "then the sweep")

        harness.machine.setBlocked("memory alarm")
        harness.deliver([harness.message(Harness.claim("r2", "b"))])
        #expect(harness.machine.nextDeadline(now: harness.now) == harness.now + Machine.blockedRecheck, "held for the alarm: looked at again soon")
        harness.machine.setBlocked(nil)

        harness.take(harness.machine.stop(now: harness.now))
        #expect(harness.machine.exit == .stopped)
        #expect(harness.machine.nextDeadline(now: harness.now) == nil, "finished: no deadline")
    }

    @Test func aDeferredAckGoesAtTheFirstTickAfterItsDelayAndCoversEveryBatchSinceAfterTheirReplies() {
        var harness = Harness(ackDelay: .milliseconds(20))
        harness.deliver([harness.message(Harness.claim("r1"))])
        var requests = Harness.applied(harness.taken())
        _ = harness.commit(requests ?? [])
        #expect(harness.replies.map(\.requestID) == ["r1"], "the reply leaves at once")
        #expect(harness.unsettled.count == 1, "the ack waits for later batches")
        harness.now += .milliseconds(5)
        requests = Harness.applied(harness.deliver([harness.message(Harness.claim("r2", "b"))]))
        _ = harness.commit(requests ?? [])
        #expect(harness.replies.map(\.requestID) == ["r1", "r2"])
        #expect(harness.unsettled.count == 2)
        harness.tick(after: .milliseconds(10))
        #expect(harness.unsettled.count == 2, "15 ms after the first batch: not yet")
        harness.tick(after: .milliseconds(10))
        #expect(harness.unsettled.isEmpty, "one cumulative ack for both, at the first tick past 20 ms")
        let acks = harness.actions.filter { if case .send(_, let settles, _) = $0 { !settles.isEmpty } else { false } }
        #expect(acks.count == 1)
    }
}
