import BatonAMQP
import BatonClient
import BatonCore
import Foundation
import Testing

/// What frontends get around a claim, end to end through the broker and the database: `describe`,
/// reading the history by position, watching without gaps, and kept leases.
@Suite(.serialized) struct FrontendKitTests {
    // MARK: - describe and events

    @Test func describeTellsNAndTheRevision() async throws {
        let deployment = try await Deployment.make(partitions: 3)
        let worker = deployment.startWorker()
        let client = deployment.client()
        let description = try await client.describe()
        #expect(description.partitions == 3)
        #expect(description.protocolVersion == 1 && description.revision == ProtocolV1.revision)
        #expect(Set(description.ops) == Set(Operation.allCases.map(\.rawValue)))
        // Any partition answers it, with or without user_id.
        let raw = try await deployment.connect("describe without user_id", as: deployment.frontendURL)
        let reply = try await RawCall.send(#"{"v":1,"op":"describe","request_id":"d1"}"#, routingKey: "2", on: raw, userID: nil)
        #expect(reply["status"] as? String == "description" && reply["partitions"] as? Int == 3 && reply["partition"] as? Int == 2)
        await raw.close()
        await client.close()
        await worker.stop()
    }

    @Test func theHistoryIsReadByPositionInCommitOrder() async throws {
        let deployment = try await Deployment.make(partitions: 2)
        let worker = deployment.startWorker()
        let client = deployment.client()
        let buffer = "history/\(UUID().uuidString)"
        let partition = deployment.partitioner.partition(of: buffer)
        let start = try await client.events(partition: partition, after: nil)
        #expect(start.events.isEmpty && !start.more && !start.missed)

        var tokens: [Int64] = []
        for round in 0..<3 {
            guard case .granted(let lease) = try await client.claim(buffer, user: "u", connection: "c\(round)", lease: .seconds(5)) else {
                throw TestFailure("claim \(round) was not granted")
            }
            tokens.append(lease.token)
            _ = try await client.release(buffer, connection: "c\(round)", token: lease.token)
        }
        let page = try await client.events(partition: partition, after: start.position, buffer: buffer)
        #expect(page.events.map(\.change.kind) == [.granted, .released, .granted, .released, .granted, .released])
        #expect(page.events.map(\.change.token) == [1, 1, 2, 2, 3, 3])
        #expect(page.events.allSatisfy { $0.partition == partition })
        #expect(zip(page.events, page.events.dropFirst()).allSatisfy { $0.seq < $1.seq }, "positions grow in commit order")
        #expect(page.position >= page.events.last!.seq && !page.more)

        // A limit cuts the page; reading on from its position gives the rest, without gaps or repeats.
        let first = try await client.events(partition: partition, after: start.position, buffer: buffer, limit: 4)
        #expect(first.events.count == 4 && first.more && first.position == first.events.last!.seq)
        let rest = try await client.events(partition: partition, after: first.position, buffer: buffer)
        #expect((first.events + rest.events).map(\.seq) == page.events.map(\.seq))
        // Nothing after the head.
        #expect(try await client.events(partition: partition, after: page.position, buffer: buffer).events.isEmpty)
        // A position beyond this history (saved from another deployment) reads nothing and says where the history is.
        let foreign = try await client.events(partition: partition, after: page.position + 1_000_000)
        #expect(foreign.events.isEmpty && foreign.position < page.position + 1_000_000 && !foreign.more)
        let watched = Shared<[WatchEvent]>([])
        let watching = Task { for try await event in client.watch(.partition(partition), from: [partition: page.position + 1_000_000]) { watched.update { $0.append(event) } } }
        #expect(await Deployment.eventually { !watched.value.isEmpty })
        watching.cancel()
        #expect(watched.value.first == .missed(partition: partition), "a watch from a foreign position reports missed changes")

        // A buffer of another partition is misrouted, and the message says where it belongs.
        do {
            _ = try await client.events(partition: 1 - partition, after: 0, buffer: buffer)
            Issue.record("an events read of a buffer on the wrong partition was answered")
        } catch let error as BatonClientError {
            #expect(error.errorCode == .misrouted && error.message.contains("routing key '\(partition)'"))
        }
        await client.close()
        await worker.stop()
    }

    @Test func aPositionOlderThanThePrunedHistoryIsReportedMissed() async throws {
        let deployment = try await Deployment.make(partitions: 1)
        let worker = deployment.startWorker()
        let client = deployment.client()
        for index in 0..<3 { _ = try await client.claim("old/\(index)", user: "u", connection: "c") }
        let before = try await client.events(partition: 0, after: 0)
        #expect(before.events.count == 3 && !before.missed)
        // Age the published rows past a retention and prune them, as `baton prune` does.
        let store = try await TestDatabase.store(deployment.databaseURL, partitions: 1)
        #expect(try await Deployment.eventually {
            try await store.undelivered(partition: 0).isEmpty
        }, "the events were published and marked delivered")
        _ = try await store.connection.withSession { try $0.query("UPDATE baton_outbox SET at = at - interval '2 hours'") }
        #expect(try await store.prune(retention: .seconds(3600)).outbox == 3)
        _ = try await client.claim("new", user: "u", connection: "c")

        let after = try await client.events(partition: 0, after: 0)
        #expect(after.missed, "the reader learns that changes it never saw were pruned")
        #expect(after.events.map(\.change.buffer) == ["new"], "and gets what is kept")
        let current = try await client.events(partition: 0, after: before.position)
        #expect(!current.missed && current.events.map(\.change.buffer) == ["new"], "a position within the kept history misses nothing")
        let watched = Shared<[WatchEvent]>([])
        let watching = Task { for try await event in client.watch(.partition(0), from: [0: 1]) { watched.update { $0.append(event) } } }
        #expect(await Deployment.eventually { watched.value.count == 2 })
        watching.cancel()
        #expect(watched.value.first == .missed(partition: 0))
        await store.connection.close()
        await client.close()
        await worker.stop()
    }

    @Test func liveEventsCarryTheirPartitionAndPosition() async throws {
        let deployment = try await Deployment.make(partitions: 2)
        let worker = deployment.startWorker()
        let consumer = try await deployment.connect("events", as: deployment.frontendURL)
        let channel = try await consumer.openChannel()
        let queue = try await channel.declareServerNamedQueue()
        try await channel.bindQueue(queue, exchange: ProtocolV1.eventsExchange, routingKey: "#")
        let (_, deliveries) = try await channel.consume(queue: queue, noAck: true)
        let client = deployment.client()
        let buffer = "live/\(UUID().uuidString)"
        guard case .granted(let lease) = try await client.claim(buffer, user: "u", connection: "c") else { throw TestFailure("not granted") }
        var live: [PositionedChange] = []
        let deadline = ContinuousClock.now + .seconds(10)
        while live.isEmpty, ContinuousClock.now < deadline {
            for message in try await deliveries.next(max: 16, timeout: .milliseconds(200)) {
                live += try ProtocolCodec.decodeEventMessage(message.body).filter { $0.change.buffer == buffer }
            }
        }
        let read = try await client.events(partition: lease.partition, after: 0, buffer: buffer)
        #expect(live.count == 1 && live.first?.partition == lease.partition && live.first?.seq ?? 0 > 0)
        #expect(live.map(\.seq) == read.events.map(\.seq), "the live event and the history agree on its position")
        await consumer.close()
        await client.close()
        await worker.stop()
    }

    // MARK: - watch

    @Test func aWatchYieldsABuffersChangesInOrderAndResumesWithoutGaps() async throws {
        let deployment = try await Deployment.make(partitions: 2)
        // One event message per commit (no linger), so that the count of messages below is known.
        let worker = deployment.startWorker { $0.eventLinger = .zero }
        let client = deployment.client()
        let buffer = "watched/\(UUID().uuidString)"
        let partition = deployment.partitioner.partition(of: buffer)
        let neighbour = (0..<1000).lazy.map { "neighbour/\($0)/\(UUID().uuidString)" }.first { deployment.partitioner.partition(of: $0) == partition }!

        // Positions start from now: take it before anything happens, so the watch misses nothing.
        let start = try await client.events(partition: partition, after: nil).position
        let collected = Shared<[PositionedChange]>([])
        let watching = Task {
            for try await event in client.watch(.buffer(buffer), from: [partition: start]) {
                if case .change(let change) = event { collected.update { $0.append(change) } }
            }
        }
        func cycle(_ connection: String) async throws {
            guard case .granted(let lease) = try await client.claim(buffer, user: "u", connection: connection, lease: .seconds(5)) else {
                throw TestFailure("claim on \(connection) was not granted")
            }
            // A neighbour in the same partition: its changes reach the watch's queue too, and are dropped.
            if case .granted(let other) = try await client.claim(neighbour, user: "u", connection: connection, lease: .seconds(5)) {
                _ = try await client.release(neighbour, connection: connection, token: other.token)
            }
            _ = try await client.release(buffer, connection: connection, token: lease.token)
        }
        try await cycle("a")
        try await cycle("b")
        #expect(await Deployment.eventually { collected.value.count == 4 })
        watching.cancel()
        _ = await watching.result
        let seen = collected.value
        #expect(seen.map(\.change.kind) == [.granted, .released, .granted, .released])
        #expect(seen.allSatisfy { $0.change.buffer == buffer })
        let statistics = client.statistics
        #expect(statistics.eventMessages >= 4, "the watch's queue got its partition's messages (\(statistics.eventMessages))")

        // Changes while nobody watches; a new watch from the saved position yields exactly them, in order.
        try await cycle("c")
        try await cycle("d")
        let resumed = Shared<[PositionedChange]>([])
        let again = Task {
            for try await event in client.watch(.buffer(buffer), from: [partition: seen.last!.seq]) {
                if case .change(let change) = event { resumed.update { $0.append(change) } }
            }
        }
        #expect(await Deployment.eventually { resumed.value.count == 4 })
        try await Task.sleep(for: .milliseconds(300))
        again.cancel()
        _ = await again.result
        #expect(resumed.value.map(\.change.holder.connection) == ["c", "c", "d", "d"])
        #expect(zip([seen.last!] + resumed.value, resumed.value).allSatisfy { $0.seq < $1.seq })
        await client.close()
        await worker.stop()
    }

    @Test func aWatchOfEverythingSurvivesItsConnectionBeingClosed() async throws {
        let deployment = try await Deployment.make(partitions: 2)
        let worker = deployment.startWorker()
        let client = deployment.client()
        let prefix = "all/\(UUID().uuidString)"
        var positions: [Int: Int64] = [:]
        for partition in 0..<2 { positions[partition] = try await client.events(partition: partition, after: nil).position }
        let collected = Shared<[PositionedChange]>([])
        let watching = Task {
            for try await event in client.watch(.all, from: positions) {
                if case .change(let change) = event, change.change.buffer.hasPrefix(prefix) { collected.update { $0.append(change) } }
            }
        }
        for index in 0..<4 { _ = try await client.claim("\(prefix)/\(index)", user: "u", connection: "c") }
        #expect(await Deployment.eventually { collected.value.count == 4 })
        // The broker closes the watch's connection (as a node failure would); changes made meanwhile still arrive.
        let admin = try TestBroker.admin()
        #expect(try await Deployment.eventually {
            try await admin.closeConnections(named: "test client watch", in: deployment.namespace.virtualHost) >= 1
        }, "the watch's connection was listed and closed")
        for index in 4..<8 { _ = try await client.claim("\(prefix)/\(index)", user: "u", connection: "c") }
        #expect(await Deployment.eventually(.seconds(15)) { collected.value.count == 8 })
        watching.cancel()
        _ = await watching.result
        let byPartition = Dictionary(grouping: collected.value, by: \.partition)
        for (_, changes) in byPartition {
            #expect(zip(changes, changes.dropFirst()).allSatisfy { $0.seq < $1.seq }, "in order, once")
        }
        #expect(Set(collected.value.map(\.change.buffer)).count == 8)
        await client.close()
        await worker.stop()
    }

    /// What a one-buffer watch costs (docs/protocol.md, section 18): its queue receives every event message
    /// of its partition, and it reads the history only when its buffer changed. Prints the numbers.
    @Test func aOneBufferWatchReceivesItsPartitionsMessagesAndReadsOnlyForItsBuffer() async throws {
        let partitions = 8
        let deployment = try await Deployment.make(partitions: partitions)
        let worker = deployment.startWorker()
        let client = deployment.client()
        let loadClient = deployment.client()
        let watched = "cost/watched/\(UUID().uuidString)"
        let partition = deployment.partitioner.partition(of: watched)
        let start = try await client.events(partition: partition, after: nil).position
        let seen = Shared<Int>(0)
        let watching = Task {
            for try await event in client.watch(.buffer(watched), from: [partition: start]) {
                if case .change = event { seen.update { $0 += 1 } }
            }
        }
        try await Task.sleep(for: .milliseconds(300))
        let before = client.statistics
        // Load on every partition: 400 claims of other buffers, 40 concurrently, and 5 grant/release cycles
        // of the watched buffer among them.
        let others = (0..<400).map { "cost/other/\($0)/\(UUID().uuidString)" }
        let othersInPartition = others.filter { deployment.partitioner.partition(of: $0) == partition }.count
        try await withThrowingTaskGroup(of: Void.self) { group in
            for chunk in stride(from: 0, to: others.count, by: 10) {
                group.addTask { for buffer in others[chunk..<min(chunk + 10, others.count)] { _ = try await loadClient.claim(buffer, user: "u", connection: "load") } }
            }
            group.addTask {
                for round in 0..<5 {
                    if case .granted(let lease) = try await loadClient.claim(watched, user: "u", connection: "w\(round)") {
                        _ = try await loadClient.release(watched, connection: "w\(round)", token: lease.token)
                    }
                }
            }
            try await group.waitForAll()
        }
        #expect(await Deployment.eventually { seen.value == 10 })
        try await Task.sleep(for: .milliseconds(500))
        watching.cancel()
        let after = client.statistics
        let messages = after.eventMessages - before.eventMessages
        let reads = after.requests - before.requests
        print("one-buffer watch, N=\(partitions): 10 changes of the buffer among \(othersInPartition) grants of others in its partition and \(others.count - othersInPartition) elsewhere: \(messages) event messages received, \(reads) history reads")
        #expect(seen.value == 10)
        #expect(messages >= 1 && messages <= othersInPartition + 10, "only its partition's messages reach its queue")
        #expect(reads <= 10, "at most one read per change of the watched buffer (\(reads))")
        await loadClient.close()
        await client.close()
        await worker.stop()
    }

    // MARK: - kept leases

    @Test func renewalsKeepALeasePastSeveralLeaseLengths() async throws {
        let deployment = try await Deployment.make(partitions: 2)
        let worker = deployment.startWorker()
        let client = deployment.client()
        let buffer = "kept/\(UUID().uuidString)"
        guard case .kept(let lease) = try await client.keep(buffer, user: "u", connection: "c", keeping: LeaseKeeping(lease: .seconds(2))) else {
            throw TestFailure("not granted")
        }
        let states = Shared<[LeaseState]>([])
        let watching = Task { for await state in lease.states() { states.update { $0.append(state) } } }
        try await Task.sleep(for: .milliseconds(5000))
        #expect(lease.state.isHeld, "\(lease.state)")
        let status = try await client.inspect(buffer)
        #expect(status.holder?.holder.connection == "c" && status.holder?.token == lease.token, "the same grant, 2.5 lease lengths later")
        #expect(client.statistics.requests >= 1 + 6, "renewed about every third of the lease (\(client.statistics.requests) requests)")
        try await lease.release()
        #expect(lease.state == .lost(.released))
        _ = await watching.result
        #expect(states.value.last == .lost(.released))
        #expect(try await client.inspect(buffer).holder == nil)
        await client.close()
        await worker.stop()
    }

    @Test func aLeaseTakenByForceReleaseIsReportedLostBeforeItsExpiry() async throws {
        let deployment = try await Deployment.make(partitions: 2)
        let worker = deployment.startWorker()
        let client = deployment.client()
        let operatorClient = deployment.client(as: deployment.operatorURL)
        let buffer = "forced/\(UUID().uuidString)"
        let leaseLength = Duration.seconds(3)
        let sent = ContinuousClock.now
        guard case .kept(let lease) = try await client.keep(buffer, user: "u", connection: "c", keeping: LeaseKeeping(lease: leaseLength)) else {
            throw TestFailure("not granted")
        }
        #expect(try await operatorClient.forceRelease(buffer, reason: "test") == lease.token)
        var lost: (LeaseState, ContinuousClock.Instant)?
        for await state in lease.states() where !state.isHeld { lost = (state, .now) }
        let (state, when) = try #require(lost)
        #expect(state == .lost(.notOwner(current: nil)))
        #expect(when < sent + leaseLength, "reported \(when - sent) after the claim was sent, before the lease's end")
        await operatorClient.close()
        await client.close()
        await worker.stop()
    }

    @Test func aLeaseWhoseWorkerStoppedIsReportedLostBeforeItsExpiry() async throws {
        let deployment = try await Deployment.make(partitions: 2)
        let worker = deployment.startWorker()
        let client = deployment.client()
        let buffer = "orphaned/\(UUID().uuidString)"
        let leaseLength = Duration.seconds(5)
        let sent = ContinuousClock.now
        guard case .kept(let lease) = try await client.keep(buffer, user: "u", connection: "c", keeping: LeaseKeeping(lease: leaseLength)) else {
            throw TestFailure("not granted")
        }
        await worker.stop()
        var seen: [LeaseState] = []
        var lostAt: ContinuousClock.Instant?
        for await state in lease.states() {
            seen.append(state)
            if !state.isHeld { lostAt = .now }
        }
        let when = try #require(lostAt)
        // The database, asked right away, still has the lease live: the client gave up before it ended.
        let store = try await TestDatabase.store(deployment.databaseURL, partitions: 2)
        let live = try await store.connection.withSession { session in
            try session.query("SELECT expires_at > clock_timestamp() FROM baton_buffers WHERE buffer = $1", [buffer]).first()
        }
        await store.connection.close()
        #expect(live == "t", "the lease was still live in the database when the client reported it lost")
        #expect(seen.last == .lost(.unconfirmed))
        #expect(seen.contains { if case .renewingLate = $0 { true } else { false } }, "late before lost: \(seen)")
        #expect(when < sent + leaseLength, "reported \(when - sent) after the claim was sent, before the lease's end")
        // A new worker grants the buffer afresh, with the next token, once the lease has expired.
        let again = deployment.startWorker()
        var grant: Lease?
        _ = try await Deployment.eventually {
            if case .granted(let granted) = try await client.claim(buffer, user: "v", connection: "d") { grant = granted }
            return grant != nil
        }
        #expect(grant?.token == lease.token + 1)
        await client.close()
        await again.stop()
    }

    @Test func withLeaseReleasesOnReturnErrorAndCancellation() async throws {
        let deployment = try await Deployment.make(partitions: 2)
        let worker = deployment.startWorker()
        let client = deployment.client()
        let buffer = "scoped/\(UUID().uuidString)"
        let token = try await client.withLease(buffer, user: "u", connection: "c", lease: .seconds(10)) { lease in
            #expect(lease.state.isHeld)
            return lease.token
        }
        #expect(try await client.inspect(buffer).holder == nil && token == 1, "released on return")

        struct Boom: Error {}
        await #expect(throws: Boom.self) {
            try await client.withLease(buffer, user: "u", connection: "c") { _ in throw Boom() }
        }
        #expect(try await client.inspect(buffer).holder == nil, "released on error")

        let cancelled = Task {
            try await client.withLease(buffer, user: "u", connection: "c") { _ in try await Task.sleep(for: .seconds(60)) }
        }
        #expect(try await Deployment.eventually { try await client.inspect(buffer).holder != nil })
        cancelled.cancel()
        _ = await cancelled.result
        #expect(try await client.inspect(buffer).holder == nil, "released on cancellation")

        // A claim whose caller is cancelled while it is out leaves no grant behind.
        let other = "cancelled-claim/\(UUID().uuidString)"
        let claiming = Task { try await client.keep(other, user: "u", connection: "c") }
        claiming.cancel()
        if case .success(.kept(let lease)) = await claiming.result { try await lease.release() }
        #expect(try await Deployment.eventually { try await client.inspect(other).holder == nil }, "no grant left behind")

        // Someone else's buffer: LeaseDenied, and the body never runs.
        _ = try await client.claim("held/\(buffer)", user: "x", connection: "x")
        await #expect(throws: LeaseDenied.self) {
            try await client.withLease("held/\(buffer)", user: "u", connection: "c") { _ in Issue.record("the body ran without the lease") }
        }
        await client.close()
        await worker.stop()
    }
}

/// One request published by hand, and its reply as a JSON object.
enum RawCall {
    static func send(_ body: String, routingKey: String, on connection: AMQPConnection, userID: String?, timeout: Duration = .seconds(10)) async throws -> [String: Any] {
        let channel = try await connection.openChannel()
        let (_, replies) = try await channel.consume(queue: ProtocolV1.directReplyTo, noAck: true)
        try await channel.publish(OutgoingMessage(
            exchange: ProtocolV1.requestsExchange, routingKey: routingKey, body: Array(body.utf8),
            properties: AMQPProperties(contentType: ProtocolV1.contentType, correlationID: "raw", replyTo: ProtocolV1.directReplyTo, userID: userID)
        ))
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if let message = try await replies.next(max: 1, timeout: .milliseconds(200)).first {
                await channel.close()
                return try JSONSerialization.jsonObject(with: Data(message.body)) as? [String: Any] ?? [:]
            }
        }
        await channel.close()
        throw TestFailure("no reply to \(body)")
    }
}
