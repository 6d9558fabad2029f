import BatonAMQP
import BatonClient
import BatonCore
import BatonPostgres
import Foundation
import Logging
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// What `baton chaos` runs.
public struct ChaosSettings: Sendable {
    /// The faults it knows, in the order it injects them by default.
    public static let allFaults = ["kill", "pause", "broker", "database", "garbage"]

    public var faults = ChaosSettings.allFaults
    public var partitions = 4
    public var clients = 8
    /// Hot buffers the clients contend for.
    public var buffers = 20
    /// Seconds of load before the first fault and after each one.
    public var settle = 5
    /// Seconds the active worker stays SIGSTOPped.
    public var pause = 8
    /// Where to write the history as JSON, if anywhere.
    public var history: String?
    /// The PostgreSQL server (the scratch database `<database>_chaos` is made on it).
    public var serverURL: PostgresURL
    /// The broker as the worker user, and as the frontend user (pointed into the scratch virtual host).
    public var workerAMQPURL: AMQPURL
    public var frontendAMQPURL: AMQPURL
    /// The script that stops and starts the services (`scripts/services`).
    public var services: URL
    /// The `baton` executable the workers run.
    public var executable = WorkerProcess.currentExecutable

    public init(serverURL: PostgresURL, workerAMQPURL: AMQPURL, frontendAMQPURL: AMQPURL, services: URL) {
        self.serverURL = serverURL
        self.workerAMQPURL = workerAMQPURL
        self.frontendAMQPURL = frontendAMQPURL
        self.services = services
    }
}

/// A chaos run: a steady load with a history recorder while faults are injected in turn, then a
/// verdict on invariants 1-5 over the whole history. Its workers (active and standby) are child
/// processes that die with this process; it works in a scratch database and virtual host.
public struct ChaosRun: Sendable {
    let settings: ChaosSettings
    let namespace: ScratchBroker
    let logger: Logger
    let say: @Sendable (String) -> Void

    public init(settings: ChaosSettings, namespace: ScratchBroker, logger: Logger, say: @escaping @Sendable (String) -> Void) {
        self.settings = settings
        self.namespace = namespace
        self.logger = logger
        self.say = say
    }

    /// One call and what came of it.
    struct Call: Sendable {
        var started: ContinuousClock.Instant
        var finished: ContinuousClock.Instant
        var granted: ChaosChecker.ObservedGrant?
        var failed: String?
    }

    final class Recorder: Sendable {
        let calls = Mutex<[Call]>([])
        let stop = Atomic<Bool>(false)
    }

    /// Runs the load and the faults; returns the verdict (its description is the verdict line).
    public func run() async throws -> ChaosChecker.Verdict {
        var scratch = settings.serverURL
        scratch.database = settings.serverURL.database + "_chaos"
        let partitioner = try Partitioner(count: settings.partitions)
        // A short heartbeat so that a paused worker is noticed by the broker within seconds.
        var workerAMQP = namespace.url(settings.workerAMQPURL)
        workerAMQP.heartbeatSeconds = 2
        let workers = ChaosWorkers(executable: settings.executable, scratch: scratch, amqpURL: workerAMQP, partitioner: partitioner)
        do {
            return try await run(workers: workers, scratch: scratch, partitioner: partitioner)
        } catch {
            // However the run fails, its workers go with it (they would also stop on their own when this
            // process ends: they watch their standard input).
            _ = await workers.stopAll()
            throw error
        }
    }

    private func run(workers: ChaosWorkers, scratch: PostgresURL, partitioner: Partitioner) async throws -> ChaosChecker.Verdict {
        let (faults, clients, buffers, settle, pause) = (settings.faults, settings.clients, settings.buffers, settings.settle, settings.pause)
        let clientURL = namespace.url(settings.frontendAMQPURL)
        try await ScratchDeployment.reset(database: scratch, server: settings.serverURL, amqpURL: workers.amqpURL, partitionCount: partitioner.count, logger: logger)
        try await workers.spawn("worker-a")
        try await workers.spawn("worker-b")

        var configuration = BatonClientConfiguration(amqpURL: clientURL, partitioner: partitioner)
        configuration.timeout = .seconds(60)
        configuration.name = "baton chaos"
        let clientPool = (0..<2).map { _ in BatonClient(configuration: configuration, logger: logger) }
        _ = try await clientPool[0].inspect("chaos/warm-up")

        let recorder = Recorder()
        let load = (0..<clients).map { index in
            Task { await Self.loadLoop(client: clientPool[index % clientPool.count], index: index, buffers: buffers, recorder: recorder) }
        }
        say("chaos: \(clients) clients over \(buffers) hot buffers, \(partitioner.count) partitions, faults: \(faults.joined(separator: ", "))")
        try await Task.sleep(for: .seconds(settle))

        var injected: [(String, ContinuousClock.Instant)] = []
        var faultEnds: [ContinuousClock.Instant] = []
        var unansweredMalformed = 0
        for name in faults {
            var at = ContinuousClock.now
            switch name {
            case "kill":
                let active = try await workers.active(in: scratch, logger: logger)
                say("  fault kill: SIGKILL \(active) (the active worker), a new standby starts")
                at = ContinuousClock.now
                workers.kill(active, signal: SIGKILL)
                try await workers.spawn("worker-\(UUID().uuidString.prefix(4).lowercased())")
            case "pause":
                let active = try await workers.active(in: scratch, logger: logger)
                say("  fault pause: SIGSTOP \(active) for \(pause) s, then SIGCONT (its late writes must be fenced out)")
                at = ContinuousClock.now
                workers.kill(active, signal: SIGSTOP)
                try await Task.sleep(for: .seconds(pause))
                workers.kill(active, signal: SIGCONT)
            case "broker":
                say("  fault broker: RabbitMQ stopped for 3 s, then started")
                at = ContinuousClock.now
                try await ChildProcess.run(settings.services, ["broker-stop"])
                try await Task.sleep(for: .seconds(3))
                try await ChildProcess.run(settings.services, ["broker-start"])
            case "database":
                say("  fault database: PostgreSQL restarted")
                at = ContinuousClock.now
                try await ChildProcess.run(settings.services, ["db-restart"])
            default:
                say("  fault garbage: 200 malformed and oversize messages")
                unansweredMalformed += try await Self.garbage(amqpURL: clientURL, partitions: partitioner.count, logger: logger)
            }
            injected.append((name, at))
            faultEnds.append(ContinuousClock.now)
            try await Task.sleep(for: .seconds(settle))
        }

        recorder.stop.store(true, ordering: .relaxed)
        for task in load { await task.value }
        for client in clientPool { await client.close() }
        let crashes = await workers.stopAll()

        // Judge.
        let calls = recorder.calls.withLock { $0 }
        let audit = try await Self.audit(scratch, partitioner: partitioner, logger: logger)
        let verdict = ChaosChecker.judge(.init(
            changes: audit.changes, finalTokens: audit.finalTokens, observedGrants: calls.compactMap(\.granted),
            operations: calls.count, unanswered: calls.filter { $0.failed != nil }.count, faults: injected.count,
            crashes: crashes, unansweredMalformed: unansweredMalformed
        ))
        say("")
        for ((name, at), end) in zip(injected, faultEnds) {
            let after = calls.filter { $0.started > at && $0.failed == nil }.map(\.finished).min()
            // Calls that overlapped the fault: from its start until its action ended (a stopped broker
            // comes back only after the 3 s and the restart).
            let slowest = calls.filter { $0.finished > at && $0.started < end }.map { $0.finished - $0.started }.max()
            say("  \(name): first answer to a call made after the fault came \(after.map { Self.format($0 - at) } ?? "never"), slowest call around it \(slowest.map(Self.format) ?? "-")")
        }
        let fenced = workers.logs.reduce(0) { count, log in
            count + ((try? String(contentsOf: log, encoding: .utf8)) ?? "").components(separatedBy: "partition ownership lost").count - 1
        }
        say("  fenced out: \(fenced) late batch or sweep writes of a worker that had lost its partition (worker logs: \(workers.logs.map(\.path).joined(separator: ", ")))")
        say("  audit: \(audit.changes.count) changes, \(verdict.violations.count) invariant violations; grants seen by clients: \(calls.compactMap(\.granted).count); worker crashes: \(crashes); malformed without a reply: \(unansweredMalformed)")
        for violation in verdict.violations.prefix(5) { say("    \(violation)") }
        for failure in Set(calls.compactMap(\.failed)).prefix(5) { say("    unanswered: \(failure)") }
        if let history = settings.history {
            try Self.writeHistory(history, calls: calls, audit: audit, faults: injected)
        }
        return verdict
    }

    static func format(_ duration: Duration) -> String {
        String(format: "%.3f s", Double(duration.components.seconds) + Double(duration.components.attoseconds) / 1e18)
    }

    /// Claim a hot buffer, hold it briefly, release it; record every call.
    static func loadLoop(client: BatonClient, index: Int, buffers: Int, recorder: Recorder) async {
        let holder = Holder(user: "user-\(index)", connection: "chaos-\(index)")
        while !recorder.stop.load(ordering: .relaxed) {
            let buffer = "chaos/\(Int.random(in: 0..<buffers))"
            let started = ContinuousClock.now
            do {
                let result = try await client.claim(buffer, user: holder.user, connection: holder.connection, lease: .seconds(30))
                var call = Call(started: started, finished: .now)
                if case .granted(let lease) = result {
                    call.granted = ChaosChecker.ObservedGrant(buffer: buffer, holder: holder, token: lease.token)
                    recorder.calls.withLock { $0.append(call) }
                    try? await Task.sleep(for: .milliseconds(5))
                    let releaseStarted = ContinuousClock.now
                    do {
                        _ = try await client.release(buffer, connection: holder.connection, token: lease.token)
                        recorder.calls.withLock { $0.append(Call(started: releaseStarted, finished: .now)) }
                    } catch {
                        recorder.calls.withLock { $0.append(Call(started: releaseStarted, finished: .now, failed: "\(error)")) }
                    }
                } else {
                    recorder.calls.withLock { $0.append(call) }
                }
            } catch {
                recorder.calls.withLock { $0.append(Call(started: started, finished: .now, failed: "\(error)")) }
            }
        }
    }

    /// Publishes malformed and oversize requests; returns how many of those with a reply_to got no error reply.
    static func garbage(amqpURL: AMQPURL, partitions: Int, logger: Logger) async throws -> Int {
        let connection = try await AMQPConnection.connect(to: amqpURL, name: "baton chaos garbage", logger: logger)
        let channel = try await connection.openChannel()
        let (_, replies) = try await channel.consume(queue: ProtocolV1.directReplyTo, noAck: true)
        let bodies: [[UInt8]] = [
            Array("not json".utf8), Array("[]".utf8), Array(#"{"v":1}"#.utf8), Array(#"{"v":9,"op":"claim"}"#.utf8),
            Array(#"{"v":1,"op":"steal","request_id":"x"}"#.utf8), [0xFF, 0xFE, 0x00], [UInt8](repeating: 0x7B, count: 70_000),
            Array(#"{"v":1,"op":"claim","request_id":"x","buffer":"b","user":"u","connection":"c","lease_ms":1}"#.utf8),
        ]
        var expected = 0
        for index in 0..<200 {
            let withReply = index % 4 != 0
            if withReply { expected += 1 }
            try await channel.publish(OutgoingMessage(
                exchange: ProtocolV1.requestsExchange, routingKey: String(index % partitions), body: bodies[index % bodies.count],
                properties: AMQPProperties(correlationID: "garbage-\(index)", replyTo: withReply ? ProtocolV1.directReplyTo : nil),
                mandatory: true
            ))
        }
        var answered = Set<String>()
        let deadline = ContinuousClock.now + .seconds(30)
        while answered.count < expected, ContinuousClock.now < deadline {
            for message in try await replies.next(max: 256, timeout: .seconds(1)) {
                if let reply = try? ProtocolCodec.decodeReply(message.body), reply.status == .error, let id = message.properties.correlationID {
                    answered.insert(id)
                }
            }
        }
        await connection.close()
        return expected - answered.count
    }

    static func audit(_ url: PostgresURL, partitioner: Partitioner, logger: Logger) async throws -> (changes: [OwnershipChange], finalTokens: [ExactString: Int64]) {
        try await PostgresConnection.withConnection(to: url, logger: logger) { connection in
            try await OwnershipStore.open(connection: connection, partitioner: partitioner, logger: logger).auditTrail()
        }
    }

    static func writeHistory(_ path: String, calls: [Call], audit: (changes: [OwnershipChange], finalTokens: [ExactString: Int64]), faults: [(String, ContinuousClock.Instant)]) throws {
        let start = calls.map(\.started).min() ?? .now
        func offset(_ instant: ContinuousClock.Instant) -> Double {
            let d = instant - start
            return Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
        }
        let object: [String: Any] = [
            "faults": faults.map { ["fault": $0.0, "at_s": offset($0.1)] },
            "calls": calls.map { call -> [String: Any] in
                var entry: [String: Any] = ["start_s": offset(call.started), "end_s": offset(call.finished)]
                if let grant = call.granted { entry["granted"] = ["buffer": grant.buffer, "user": grant.holder.user, "connection": grant.holder.connection, "token": grant.token] }
                if let failed = call.failed { entry["failed"] = failed }
                return entry
            },
            "audit": audit.changes.map { ["kind": $0.kind.rawValue, "buffer": $0.buffer, "user": $0.holder.user, "connection": $0.holder.connection, "token": $0.token, "at": $0.at.rfc3339] },
        ]
        try JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]).write(to: URL(fileURLWithPath: path))
    }
}

/// The chaos run's worker processes; each dies with this process however it ends.
final class ChaosWorkers: Sendable {
    let executable: URL
    let scratch: PostgresURL
    let amqpURL: AMQPURL
    let partitioner: Partitioner
    private struct State {
        var processes: [String: WorkerProcess] = [:]
        var killed: Set<String> = []
    }
    private let state = Mutex(State())

    init(executable: URL, scratch: PostgresURL, amqpURL: AMQPURL, partitioner: Partitioner) {
        self.executable = executable
        self.scratch = scratch
        self.amqpURL = amqpURL
        self.partitioner = partitioner
    }

    var logs: [URL] { state.withLock { $0.processes.values.map(\.log).sorted { $0.path < $1.path } } }

    func spawn(_ id: String) async throws {
        let worker = try WorkerProcess.start(
            executable: executable, id: id, databaseURL: scratch, amqpURL: amqpURL, partitionCount: partitioner.count,
            arguments: ["--sweep-interval-ms", "500", "--log-level", "info"],
            log: FileManager.default.temporaryDirectory.appendingPathComponent("baton-chaos-\(id).log")
        )
        state.withLock { $0.processes[id] = worker }
        try await Task.sleep(for: .seconds(1))  // register in order: the first is active, later ones stand by
    }

    /// The worker that holds partition 0 now (the database records the owner of every epoch).
    func active(in scratch: PostgresURL, logger: Logger) async throws -> String {
        let owner = try await PostgresConnection.withConnection(to: scratch, logger: logger) { connection in
            try await OwnershipStore.owner(of: 0, on: connection)
        }
        let live = state.withLock { state in owner.map { state.processes[$0] != nil && !state.killed.contains($0) } ?? false }
        guard let owner, live else {
            throw ScratchError("no live worker holds partition 0 (owner: \(owner ?? "none"))")
        }
        return owner
    }

    func kill(_ id: String, signal: Int32) {
        let worker = state.withLock { state -> WorkerProcess? in
            if signal == SIGKILL { state.killed.insert(id) }
            return state.processes[id]
        }
        worker?.process.signal(signal)
    }

    /// Stops every worker with SIGTERM (SIGCONT first, in case one is paused); returns how many had died
    /// without being killed on purpose, or exited with an error.
    func stopAll() async -> Int {
        let (workers, killed) = state.withLock { ($0.processes, $0.killed) }
        var crashes = 0
        for (id, worker) in workers {
            if worker.process.isRunning {
                worker.process.signal(SIGCONT)
                let status = await worker.process.stop()
                if let status, status != 0, status < 128 { crashes += 1 }
            } else if !killed.contains(id) {
                crashes += 1
            }
        }
        return crashes
    }
}
