import ArgumentParser
import BatonAMQP
import BatonClient
import BatonCore
import BatonPostgres
import BatonWorker
import Foundation
import BatonTesting
import Logging
import Synchronization

/// `baton chaos`: a steady load with a history recorder while faults are injected in turn,
/// then a verdict on invariants 1-5 over the whole history.
struct Chaos: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a load while killing, pausing and restarting workers, RabbitMQ and PostgreSQL; then check every invariant.",
        discussion: """
            Works in a scratch database (<database>_chaos) and a virtual host of its own (made through the management API), \
            with two workers it starts itself (active and standby) that die with it; a deployment's queues are never touched. \
            Broker and database faults use scripts/services (or BATON_SERVICES_SCRIPT) and affect the whole broker and server. Ends with \
            one line: verdict=PASS|FAIL operations=N faults=F double_grants=D lost_grants=L unanswered=U (exit 1 on FAIL).
            """
    )

    static let allFaults = ["kill", "pause", "broker", "database", "garbage"]

    @OptionGroup var database: DatabaseOptions
    @OptionGroup var broker: BrokerOptions
    @OptionGroup var scratchOptions: ScratchOptions

    @Option(help: "Faults to inject, in order (kill, pause, broker, database, garbage); repeat (default: all).")
    var fault: [String] = []

    @Option(help: "Partitions of the scratch deployment, 1-1024.") var partitions = 4
    @Option(help: "Concurrent clients, 1-256.") var clients = 8
    @Option(help: "Hot buffers the clients contend for.") var buffers = 20
    @Option(name: .customLong("settle-seconds"), help: "Load before the first fault and after each one, 1-600.") var settle = 5
    @Option(name: .customLong("pause-seconds"), help: "How long the active worker stays SIGSTOPped, more than twice its heartbeat (2 s), 5-600.") var pause = 8
    @Option(help: "Write the history (replies seen, audit rows, faults) as JSON here.") var history: String?

    func validate() throws {
        for name in fault where !Self.allFaults.contains(name) {
            throw ValidationError("fault '\(name)' is unknown: use \(Self.allFaults.joined(separator: ", "))")
        }
        guard (1...256).contains(clients) else { throw ValidationError("--clients \(clients) is not allowed: use 1 to 256") }
        guard (1...600).contains(settle) else { throw ValidationError("--settle-seconds \(settle) is not allowed: use 1 to 600") }
        guard (5...600).contains(pause) else { throw ValidationError("--pause-seconds \(pause) is not allowed: use 5 to 600") }
        guard buffers >= 1 else { throw ValidationError("--buffers \(buffers) is not allowed: use 1 or more") }
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

    func run() async throws {
        var logger = try database.logger("baton.chaos")
        logger.logLevel = max(logger.logLevel, .warning)
        let faults = fault.isEmpty ? Self.allFaults : fault
        let serverURL = try database.databaseURL()
        var scratch = serverURL
        scratch.database = serverURL.database + "_chaos"
        let partitioner = try Partitioner(count: partitions)
        let services = ProcessInfo.processInfo.environment["BATON_SERVICES_SCRIPT"] ?? "scripts/services"
        guard FileManager.default.isExecutableFile(atPath: services) else {
            throw ValidationError("cannot find \(services) (run from the repository or set BATON_SERVICES_SCRIPT): broker and database faults need it")
        }
        let namespace = try await ScratchBroker.create(purpose: "chaos", admin: try scratchOptions.admin())
        // A short heartbeat so that a paused worker is noticed by the broker within seconds.
        var workerAMQP = namespace.url(try broker.amqpURL())
        workerAMQP.heartbeatSeconds = 2
        let workers = Workers(scratch: scratch, amqpURL: workerAMQP, partitioner: partitioner)
        do {
            try await run(
                namespace: namespace, workers: workers, serverURL: serverURL, scratch: scratch, partitioner: partitioner,
                faults: faults, services: services, logger: logger
            )
        } catch {
            // However the run fails, its workers go with it (they would also stop on their own when this
            // process ends: they watch their standard input).
            _ = await workers.stopAll()
            await namespace.delete()
            throw error
        }
        await namespace.delete()
    }

    private func run(
        namespace: ScratchBroker, workers: Workers, serverURL: PostgresURL, scratch: PostgresURL, partitioner: Partitioner,
        faults: [String], services: String, logger: Logger
    ) async throws {
        let clientURL = namespace.url(try BrokerOptions.environmentURL(.frontend))
        try await prepare(serverURL: serverURL, scratch: scratch, partitioner: partitioner, amqpURL: workers.amqpURL, logger: logger)
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
        say("chaos: \(clients) clients over \(buffers) hot buffers, \(partitions) partitions, faults: \(faults.joined(separator: ", "))")
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
                try await Self.run(services, "broker-stop")
                try await Task.sleep(for: .seconds(3))
                try await Self.run(services, "broker-start")
            case "database":
                say("  fault database: PostgreSQL restarted")
                at = ContinuousClock.now
                try await Self.run(services, "db-restart")
            default:
                say("  fault garbage: 200 malformed and oversize messages")
                unansweredMalformed += try await Self.garbage(amqpURL: clientURL, partitions: partitions, logger: logger)
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
        if let history {
            try Self.writeHistory(history, calls: calls, audit: audit, faults: injected)
        }
        say(verdict.description)
        if !verdict.passed { throw ExitCode(1) }
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

    private func prepare(serverURL: PostgresURL, scratch: PostgresURL, partitioner: Partitioner, amqpURL: AMQPURL, logger: Logger) async throws {
        let admin = try await PostgresConnection.connect(to: serverURL, logger: logger)
        let name = scratch.database
        _ = try await admin.withSession { session in
            try session.query("DROP DATABASE IF EXISTS \(name) WITH (FORCE)")
            try session.query("CREATE DATABASE \(name)")
        }
        await admin.close()
        let connection = try await PostgresConnection.connect(to: scratch, logger: logger)
        try await Migrator.migrate(connection, partitionCount: partitioner.count, logger: logger)
        await connection.close()
        let amqp = try await AMQPConnection.connect(to: amqpURL, name: "baton chaos setup", logger: logger)
        try await BatonWorker.Topology.declare(on: amqp, partitionCount: partitioner.count)
        await amqp.close()
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
        let connection = try await PostgresConnection.connect(to: url, logger: logger)
        defer { Task { await connection.close() } }
        return try await OwnershipStore.open(connection: connection, partitioner: partitioner, logger: logger).auditTrail()
    }

    static func run(_ script: String, _ argument: String) async throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: script)
        process.arguments = [argument]
        process.standardInput = FileHandle.nullDevice
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        // Foundation did not always notice this child's exit here (it stayed a zombie after
        // `pg_ctl restart`), so reap it ourselves, falling back to Foundation's status.
        let pid = process.processIdentifier
        var status: Int32 = 0
        while true {
            let reaped = waitpid(pid, &status, WNOHANG)
            if reaped == pid {
                let code = (status >> 8) & 0xFF
                guard code == 0 else { throw RuntimeFailure("\(script) \(argument) exited with status \(code)") }
                return
            }
            if reaped == -1 {
                if process.isRunning { try await Task.sleep(for: .milliseconds(50)); continue }
                guard process.terminationStatus == 0 else {
                    throw RuntimeFailure("\(script) \(argument) exited with status \(process.terminationStatus)")
                }
                return
            }
            try await Task.sleep(for: .milliseconds(50))
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
final class Workers: Sendable {
    let scratch: PostgresURL
    let amqpURL: AMQPURL
    let partitioner: Partitioner
    private struct State {
        var processes: [String: ChildProcess] = [:]
        var killed: Set<String> = []
        var logs: [URL] = []
    }
    private let state = Mutex(State())

    init(scratch: PostgresURL, amqpURL: AMQPURL, partitioner: Partitioner) {
        self.scratch = scratch
        self.amqpURL = amqpURL
        self.partitioner = partitioner
    }

    var logs: [URL] { state.withLock { $0.logs } }

    func spawn(_ id: String) async throws {
        var environment = ProcessInfo.processInfo.environment
        environment["BATON_DATABASE_URL"] = scratch.connectionString
        environment["BATON_AMQP_URL"] = amqpURL.connectionString
        let log = FileManager.default.temporaryDirectory.appendingPathComponent("baton-chaos-\(id).log")
        try? FileManager.default.removeItem(at: log)
        let process = try ChildProcess(
            executable: URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath(),
            arguments: ["worker", "--partitions", "all", "--partition-count", String(partitioner.count), "--worker-id", id,
                        "--metrics-port", "0", "--sweep-interval-ms", "500", "--log-level", "info", "--exit-with-parent"],
            environment: environment, log: log
        )
        state.withLock {
            $0.processes[id] = process
            $0.logs.append(log)
        }
        try await Task.sleep(for: .seconds(1))  // register in order: the first is active, later ones stand by
    }

    /// The worker that holds partition 0 now (the database records the owner of every epoch).
    func active(in scratch: PostgresURL, logger: Logger) async throws -> String {
        let connection = try await PostgresConnection.connect(to: scratch, logger: logger)
        let owner: String?
        do {
            owner = try await connection.withSession { session in try session.query("SELECT owner FROM baton_partitions WHERE partition = 0").first() }
        } catch {
            await connection.close()
            throw error
        }
        await connection.close()
        let live = state.withLock { state in owner.map { state.processes[$0] != nil && !state.killed.contains($0) } ?? false }
        guard let owner, live else {
            throw RuntimeFailure("no live worker holds partition 0 (owner: \(owner ?? "none"))")
        }
        return owner
    }

    func kill(_ id: String, signal: Int32) {
        let process = state.withLock { state -> ChildProcess? in
            if signal == SIGKILL { state.killed.insert(id) }
            return state.processes[id]
        }
        process?.signal(signal)
    }

    /// Stops every worker with SIGTERM (SIGCONT first, in case one is paused); returns how many had died
    /// without being killed on purpose, or exited with an error.
    func stopAll() async -> Int {
        let (processes, killed) = state.withLock { ($0.processes, $0.killed) }
        var crashes = 0
        for (id, process) in processes {
            if process.isRunning {
                process.signal(SIGCONT)
                let status = await process.stop()
                if let status, status != 0, status < 128 { crashes += 1 }
            } else if !killed.contains(id) {
                crashes += 1
            }
        }
        return crashes
    }
}

/// Writes a line to standard output at once (no buffering, so progress shows up in a pipe too).
func say(_ line: String = "") {
    FileHandle.standardOutput.write(Data((line + "\n").utf8))
}
