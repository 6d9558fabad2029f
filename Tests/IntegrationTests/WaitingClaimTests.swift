import BatonClient
import BatonCore
import BatonLab
import Foundation
import Testing

/// Claims that wait in line (docs/design/fair-waiting.md), end to end through the broker and the database.
@Suite(.serialized) struct WaitingClaimTests {
    @Test func tenWaitersAreGrantedInArrivalOrderWithStrictlyIncreasingTokens() async throws {
        let deployment = try await Deployment.make(partitions: 2)
        let worker = deployment.startWorker()
        let client = deployment.client(timeout: .seconds(10))
        let buffer = "line/\(UUID().uuidString)"
        guard case .granted(let first) = try await client.claim(buffer, user: "holder", connection: "h") else { throw TestFailure("not granted") }
        let grants = Shared<[(index: Int, token: Int64)]>([])
        var waiters: [Task<Void, any Error>] = []
        for index in 0..<10 {
            waiters.append(Task {
                let result = try await client.claim(buffer, user: "w\(index)", connection: "c\(index)", lease: .seconds(10), wait: .seconds(60))
                guard case .granted(let lease) = result else { throw TestFailure("waiter \(index): \(result)") }
                grants.update { $0.append((index, lease.token)) }
                try await Task.sleep(for: .milliseconds(20))
                _ = try await client.release(buffer, connection: "c\(index)", token: lease.token)
            })
            // Arrival order: each joins after the previous one is in line.
            #expect(try await Deployment.eventually { try await self.lineLength(deployment, buffer) == index + 1 })
        }
        #expect(grants.value.isEmpty, "nobody is granted while the buffer is held")
        _ = try await client.release(buffer, connection: "h", token: first.token)
        for waiter in waiters { try await waiter.value }
        #expect(grants.value.map(\.index) == Array(0..<10), "granted in arrival order")
        #expect(grants.value.map(\.token) == Array(2...11), "strictly increasing tokens, one per grant")
        let audit = try await deployment.audit()
        #expect(HistoryChecker.check(audit.changes, finalTokens: audit.finalTokens).passed)
        await client.close()
        await worker.stop()
    }

    @Test func aWaitThatRunsOutIsDeniedAndAClaimWithoutWaitDoesNotJumpTheLine() async throws {
        let deployment = try await Deployment.make(partitions: 2)
        let worker = deployment.startWorker()
        let client = deployment.client()
        let buffer = "line/\(UUID().uuidString)"
        _ = try await client.claim(buffer, user: "holder", connection: "h", lease: .seconds(30))
        let started = ContinuousClock.now
        let result = try await client.claim(buffer, user: "w", connection: "w", wait: .milliseconds(1500))
        guard case .denied(let holding) = result else { throw TestFailure("\(result)") }
        #expect(holding.holder.user == "holder" && ContinuousClock.now - started >= .milliseconds(1400), "denied when the wait ran out")
        #expect(try await lineLength(deployment, buffer) == 0)
        await client.close()
        await worker.stop()
    }

    @Test func aWaiterAcrossAWorkerKillIsGrantedExactlyOnce() async throws {
        let deployment = try await Deployment.make(partitions: 1)
        let active = try deployment.spawnWorker(id: "wait-active")
        let client = deployment.client(timeout: .seconds(15))
        let buffer = "line/\(UUID().uuidString)"
        guard case .granted(let first) = try await client.claim(buffer, user: "holder", connection: "h", lease: .seconds(3)) else { throw TestFailure("not granted") }
        let waiting = Task { try await client.claim(buffer, user: "w", connection: "w", lease: .seconds(30), wait: .seconds(60)) }
        #expect(try await Deployment.eventually { try await self.lineLength(deployment, buffer) == 1 })
        // The worker dies with the waiter in line; a standby takes over, and the lease's expiry hands the
        // buffer over from the line kept in the database.
        active.signal(SIGKILL)
        _ = await active.wait(timeout: .seconds(10))
        let standby = try deployment.spawnWorker(id: "wait-standby")
        let result = try await waiting.value
        guard case .granted(let lease) = result else { throw TestFailure("\(result)") }
        #expect(lease.token == first.token + 1)
        let audit = try await deployment.audit()
        let grants = audit.changes.filter { $0.kind == .granted && $0.buffer == buffer }
        #expect(grants.map(\.holder.user) == ["holder", "w"], "granted exactly once: \(grants)")
        #expect(HistoryChecker.check(audit.changes, finalTokens: audit.finalTokens).passed)
        #expect(try await lineLength(deployment, buffer) == 0)
        await client.close()
        _ = await standby.stop(grace: .seconds(5))
    }

    @Test func aKeptLeaseWaitsInLineAndIsKeptFromARenewalAfterALongWait() async throws {
        let deployment = try await Deployment.make(partitions: 2)
        let worker = deployment.startWorker()
        let client = deployment.client()
        let buffer = "line/\(UUID().uuidString)"
        guard case .granted(let first) = try await client.claim(buffer, user: "holder", connection: "h") else { throw TestFailure("not granted") }
        let keeping = Task { try await client.keep(buffer, user: "w", connection: "w", keeping: LeaseKeeping(lease: .seconds(2)), wait: .seconds(30)) }
        #expect(try await Deployment.eventually { try await self.lineLength(deployment, buffer) == 1 })
        // Released after more than the lease's renewal time: the grant's lease is older than its answer on
        // the client's clock, so the keeper renews before it hands the lease over.
        try await Task.sleep(for: .milliseconds(1500))
        _ = try await client.release(buffer, connection: "h", token: first.token)
        guard case .kept(let lease) = try await keeping.value else { throw TestFailure("the waiter was not granted") }
        #expect(lease.token == first.token + 1)
        guard case .held(_, let safeUntil) = lease.state else { throw TestFailure("not held: \(lease.state)") }
        #expect(safeUntil > .now + .milliseconds(1000), "kept from the renewal just sent, not from the claim sent 1.5 s earlier")
        try await Task.sleep(for: .milliseconds(5000))  // two and a half lease lengths
        #expect(lease.state.isHeld)
        let status = try await client.inspect(buffer)
        #expect(status.holder?.token == lease.token && status.holder?.holder.user == "w")
        try await lease.release()
        let audit = try await deployment.audit()
        #expect(audit.changes.filter { $0.buffer == buffer }.map(\.kind) == [.granted, .released, .granted, .released], "held through its renewals, then released")
        await client.close()
        await worker.stop()
    }

    @Test func aCancelledWaitingClaimReturnsAtOnceAndWhatItIsGrantedLaterIsReleased() async throws {
        let deployment = try await Deployment.make(partitions: 2)
        let worker = deployment.startWorker()
        let client = deployment.client()
        let buffer = "line/\(UUID().uuidString)"
        guard case .granted(let first) = try await client.claim(buffer, user: "holder", connection: "h") else { throw TestFailure("not granted") }
        let waiting = Task { try await client.claim(buffer, user: "w", connection: "w", wait: .seconds(60)) }
        #expect(try await Deployment.eventually { try await self.lineLength(deployment, buffer) == 1 })
        let cancelled = ContinuousClock.now
        waiting.cancel()
        let result = await waiting.result
        #expect(ContinuousClock.now - cancelled < .seconds(1), "the wait ended at once")
        #expect(throws: CancellationError.self) { try result.get() }
        // Still in line (only its connection's release_connection could take it out); its turn comes, and
        // the client releases the grant nobody waits for any more.
        _ = try await client.release(buffer, connection: "h", token: first.token)
        #expect(try await Deployment.eventually(.seconds(15)) { try await client.inspect(buffer).holder == nil })
        let audit = try await deployment.audit()
        let changes = audit.changes.filter { $0.buffer == buffer }.map { "\($0.kind) \($0.holder.user)" }
        #expect(changes == ["granted holder", "released holder", "granted w", "released w"], "\(changes)")
        await client.close()
        await worker.stop()
    }

    @Test func aWaiterWhoseConnectionIsClosedGetsItsAnswerOnItsNewOne() async throws {
        let deployment = try await Deployment.make(partitions: 2)
        let worker = deployment.startWorker()
        let holderClient = deployment.client()
        var configuration = BatonClientConfiguration(amqpURL: deployment.frontendURL, partitioner: deployment.partitioner)
        configuration.timeout = .seconds(10)
        configuration.resendAfter = .seconds(20)  // no resend during the test: only the connection's end repeats the claim
        configuration.name = "test waiter"
        let waiterClient = BatonClient(configuration: configuration, logger: TestDatabase.logger)
        let buffer = "line/\(UUID().uuidString)"
        guard case .granted(let first) = try await holderClient.claim(buffer, user: "holder", connection: "h") else { throw TestFailure("not granted") }
        let waiting = Task { try await waiterClient.claim(buffer, user: "w", connection: "w", wait: .seconds(60)) }
        #expect(try await Deployment.eventually { try await self.lineLength(deployment, buffer) == 1 })
        // The broker closes the waiter's connection: its reply address dies with it. The client reconnects
        // and repeats the claim at once, which moves the answer to its new reply address.
        let admin = try TestBroker.admin()
        #expect(try await Deployment.eventually {
            try await admin.closeConnections(named: "test waiter", in: deployment.namespace.virtualHost) >= 1
        })
        try await Task.sleep(for: .milliseconds(500))
        let released = ContinuousClock.now
        _ = try await holderClient.release(buffer, connection: "h", token: first.token)
        guard case .granted(let lease) = try await waiting.value else { throw TestFailure("the waiter was not granted") }
        #expect(lease.token == first.token + 1)
        #expect(ContinuousClock.now - released < .seconds(1), "answered on the new connection, not found by a later resend")
        #expect(try await lineLength(deployment, buffer) == 0)
        await waiterClient.close()
        await holderClient.close()
        await worker.stop()
    }

    /// How many claims wait in `buffer`'s line, read from the database.
    func lineLength(_ deployment: Deployment, _ buffer: String) async throws -> Int {
        let store = try await TestDatabase.store(deployment.databaseURL, partitions: deployment.partitioner.count)
        defer { Task { await store.connection.close() } }
        let count = try await store.connection.withSession { session in
            try session.query("SELECT count(*) FROM baton_waiters WHERE buffer = $1", [buffer]).first()
        }
        return Int(count ?? "") ?? -1
    }
}
