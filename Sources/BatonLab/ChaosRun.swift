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
    /// The faults it knows for one broker and one database, in the order it injects them by default.
    public static let allFaults = ["kill", "pause", "broker", "database", "garbage"]
    /// The faults across the nodes of `scripts/services cluster` (``cluster``), in their default order.
    public static let clusterFaults = ["leader-kill", "node-stop", "node-pause", "db-failover"]

    public var faults = ChaosSettings.allFaults
    public var partitions = 4
    public var clients = 8
    /// How many of the clients make waiting claims (`wait_ms`, on the first fifth of the buffers, so that
    /// lines form); nil: half of them.
    public var waitingClients: Int?
    /// Hot buffers the clients contend for.
    public var buffers = 20
    /// Clients that join and leave the collaborators of two buffers meanwhile (protocol section 20): each
    /// joins from a new connection, then leaves, or every third round drops its connection
    /// (`release_connection`, so that its next join reclaims its id within the grace).
    public var members = 4
    /// Seconds of load before the first fault and after each one.
    public var settle = 5
    /// Seconds the active worker stays SIGSTOPped.
    public var pause = 8
    /// Whether the services are the three broker nodes and the PostgreSQL pair of `scripts/services cluster`.
    public var cluster = false
    /// Seconds a broker node stays SIGSTOPped (`node-pause`): past the cluster's net tick (4 s).
    public var nodePause = 20
    /// Run with asynchronous replication (the negative control): `db-failover` repeats up to
    /// ``failovers`` times, until a grant is lost or issued twice.
    public var asyncReplication = false
    /// How many times `db-failover` runs (it stops early once a grant is lost or issued twice).
    public var failovers = 1
    /// Where to write the history as JSON, if anywhere.
    public var history: String?
    /// The PostgreSQL server (the scratch database `<database>_chaos` is made on it); may list several hosts.
    public var serverURL: PostgresURL
    /// The broker nodes as the worker user, and as the frontend user (pointed into the scratch virtual host).
    public var workerAMQPURLs: [AMQPURL]
    public var frontendAMQPURLs: [AMQPURL]
    /// The script that stops and starts the services (`scripts/services`).
    public var services: URL
    /// The `baton` executable the workers run.
    public var executable = WorkerProcess.batonExecutable

    /// Refuses a value out of range, naming it and what is allowed (the command line's names).
    public func validate() throws(SettingsError) {
        let known = cluster ? ChaosSettings.clusterFaults + ["kill", "pause", "garbage"] : ChaosSettings.allFaults
        for name in faults where !known.contains(name) {
            throw SettingsError("fault '\(name)' is not allowed\(cluster ? " with --cluster" : ""): use \(known.joined(separator: ", "))\(cluster ? "" : " (the faults across nodes need --cluster)")")
        }
        if asyncReplication, !cluster { throw SettingsError("--async-replication needs --cluster (the PostgreSQL pair of scripts/services cluster)") }
        try SettingsError.check(failovers, "--failovers", 1...50)
        try SettingsError.check(nodePause, "--node-pause-seconds", 15...300)
        try SettingsError.check(clients, "--clients", 1...256)
        try SettingsError.check(members, "--members", 0...64)
        try SettingsError.check(settle, "--settle-seconds", 1...600)
        try SettingsError.check(pause, "--pause-seconds", 5...600)
        if let waitingClients, !(0...clients).contains(waitingClients) {
            throw SettingsError("--waiting-clients \(waitingClients) is not allowed: use 0 to --clients (\(clients))")
        }
        guard buffers >= 1 else { throw SettingsError("--buffers \(buffers) is not allowed: use 1 or more") }
        if cluster, workerAMQPURLs.count < 2 || frontendAMQPURLs.count < 2 || serverURL.alternates.isEmpty {
            throw SettingsError("--cluster needs every node in the URLs: eval \"$(scripts/services cluster env)\" (or run scripts/chaos --cluster)")
        }
    }

    public init(serverURL: PostgresURL, workerAMQPURLs: [AMQPURL], frontendAMQPURLs: [AMQPURL], services: URL) {
        precondition(!workerAMQPURLs.isEmpty && !frontendAMQPURLs.isEmpty, "a chaos run needs a broker")
        self.serverURL = serverURL
        self.workerAMQPURLs = workerAMQPURLs
        self.frontendAMQPURLs = frontendAMQPURLs
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
        /// The partition of the call's buffer.
        var partition: Int
        var started: ContinuousClock.Instant
        var finished: ContinuousClock.Instant
        var granted: ChaosChecker.ObservedGrant?
        var failed: String?
        /// A claim that may wait in its buffer's line (`wait_ms`): its time includes that wait.
        var waits = false
    }

    final class Recorder: Sendable {
        let calls = Mutex<[Call]>([])
        /// The memberships clients were told they have (`joined` replies).
        let joins = Mutex<[ChaosChecker.ObservedGrant]>([])
        let stop = Atomic<Bool>(false)
        let waitingGrants = Atomic<Int>(0)
        let waitingDenials = Atomic<Int>(0)
    }

    /// Load client `index`'s holder (one claim at a time each, which the line check relies on).
    static func holder(_ index: Int) -> Holder { Holder(user: "user-\(index)", connection: "chaos-\(index)") }

    /// Runs the load and the faults; returns the verdict (its description is the verdict line).
    public func run() async throws -> ChaosChecker.Verdict {
        var scratch = settings.serverURL
        scratch.database = settings.serverURL.database + "_chaos"
        let partitioner = try Partitioner(count: settings.partitions)
        // A short heartbeat so that a paused worker is noticed by the broker within seconds (and a paused
        // broker node by the worker).
        let workerAMQP = settings.workerAMQPURLs.map { url in
            var url = namespace.url(url)
            url.heartbeatSeconds = 2
            return url
        }
        let workers = ChaosWorkers(executable: settings.executable, scratch: scratch, amqpURLs: workerAMQP, partitioner: partitioner)
        if settings.asyncReplication { try await services(["cluster", "db-sync", "off"]) }
        do {
            let verdict = try await run(workers: workers, scratch: scratch, partitioner: partitioner)
            if settings.asyncReplication { try await services(["cluster", "db-sync", "on"]) }
            return verdict
        } catch {
            // However the run fails, its workers go with it (they would also stop on their own when this
            // process ends: they watch their standard input), and replication is synchronous again.
            _ = await workers.stopAll()
            if settings.asyncReplication { _ = try? await services(["cluster", "db-sync", "on"]) }
            throw error
        }
    }

    /// The number (1-3) of the cluster node that leads `queue` of the scratch virtual host, from
    /// `scripts/services cluster queue-leader ... --json`.
    private func queueLeader(_ queue: String) async throws -> String {
        let line = try await services(["cluster", "queue-leader", namespace.virtualHost, queue, "--json"])
        guard let object = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any], let node = object["node"] as? Int, (1...3).contains(node) else {
            throw ChildProcessError("scripts/services cluster queue-leader answered '\(line.prefix(200))', not {\"node\": 1-3}")
        }
        return String(node)
    }

    /// Runs `scripts/services` with `arguments`; returns its last line of output.
    @discardableResult
    func services(_ arguments: [String], timeout: Duration = .seconds(300)) async throws -> String {
        let output = try await ChildProcess.run(settings.services, arguments, timeout: timeout)
        return output.split(separator: "\n").last.map(String.init) ?? ""
    }

    private func run(workers: ChaosWorkers, scratch: PostgresURL, partitioner: Partitioner) async throws -> ChaosChecker.Verdict {
        let (faults, clients, buffers, settle, pause) = (settings.faults, settings.clients, settings.buffers, settings.settle, settings.pause)
        // Clients, like workers, notice a frozen broker node (SIGSTOP) by the missed heartbeats.
        let clientURLs = settings.frontendAMQPURLs.map { url in
            var url = namespace.url(url)
            url.heartbeatSeconds = 2
            return url
        }
        let clientURL = clientURLs[0]
        try await ScratchDeployment.reset(database: scratch, server: settings.serverURL, amqpURL: workers.amqpURLs[0], partitionCount: partitioner.count, logger: logger)
        try await workers.spawn("worker-a")
        try await workers.spawn("worker-b")

        var configuration = BatonClientConfiguration(amqpURL: clientURL, partitioner: partitioner)
        configuration.amqpAlternates = Array(clientURLs.dropFirst())
        configuration.timeout = .seconds(60)
        configuration.name = "baton chaos"
        let clientPool = (0..<2).map { _ in BatonClient(configuration: configuration, logger: logger) }
        _ = try await clientPool[0].inspect("chaos/warm-up")

        let recorder = Recorder()
        let waiting = min(clients, settings.waitingClients ?? clients / 2)
        let lined = max(1, buffers / 5)
        let load = (0..<clients).map { index in
            Task {
                let client = clientPool[index % clientPool.count]
                if index < waiting {
                    await Self.waitingLoop(client: client, index: index, buffers: lined, partitioner: partitioner, recorder: recorder)
                } else {
                    await Self.loadLoop(client: client, index: index, buffers: buffers, partitioner: partitioner, recorder: recorder)
                }
            }
        }
        let grace = try await clientPool[0].describe().memberGraceMilliseconds ?? Roster.defaultGraceMilliseconds
        let joining = (0..<settings.members).map { index in
            Task { await Self.memberLoop(client: clientPool[index % clientPool.count], index: index, partitioner: partitioner, recorder: recorder) }
        }
        let lines = LineWatcher(scratch: scratch, logger: logger)
        let watching = Task { await lines.run(until: recorder) }
        say("chaos: \(clients) clients over \(buffers) hot buffers (\(waiting) of them waiting in line for the first \(lined)), \(settings.members) joining and leaving 2 buffers' collaborators, \(partitioner.count) partitions, faults: \(faults.joined(separator: ", "))")
        try await Task.sleep(for: .seconds(settle))

        var injected: [(String, ContinuousClock.Instant)] = []
        var faultEnds: [ContinuousClock.Instant] = []
        var unansweredMalformed = 0
        var plan = faults.flatMap { $0 == "db-failover" ? Array(repeating: $0, count: settings.failovers) : [$0] }
        while !plan.isEmpty {
            let name = plan.removeFirst()
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
                try await services(["broker-stop"])
                try await Task.sleep(for: .seconds(3))
                try await services(["broker-start"])
            case "database":
                say("  fault database: PostgreSQL restarted")
                at = ContinuousClock.now
                try await services(["db-restart"])
            case "leader-kill", "node-stop", "node-pause":
                at = try await nodeFault(name)
            case "db-failover":
                say("  fault db-failover: SIGKILL of the PostgreSQL primary, pg_ctl promote of the standby, the old primary rebuilt as the new standby")
                at = ContinuousClock.now
                say("    " + (try await services(["cluster", "db-failover"])))
                say("    " + (try await services(["cluster", "db-rejoin"])))
            default:
                say("  fault garbage: 200 malformed and oversize messages")
                unansweredMalformed += try await Self.garbage(amqpURL: clientURL, partitions: partitioner.count, logger: logger)
            }
            injected.append((name, at))
            faultEnds.append(ContinuousClock.now)
            try await Task.sleep(for: .seconds(settle))
            if name == "db-failover", settings.asyncReplication, plan.contains(name) {
                // The negative control repeats the failover until the checker sees a grant lost or issued twice.
                let calls = recorder.calls.withLock { $0 }
                let audit = try await Self.audit(scratch, partitioner: partitioner, logger: logger)
                let interim = ChaosChecker.judge(.init(
                    changes: audit.changes, finalTokens: audit.finalTokens, observedGrants: calls.compactMap(\.granted),
                    operations: calls.count, unanswered: 0, faults: injected.count
                ))
                say("    after failover \(injected.filter { $0.0 == name }.count): lost_grants=\(interim.lostGrants) double_grants=\(interim.doubleGrants)")
                if interim.lostGrants > 0 || interim.doubleGrants > 0 { plan.removeAll { $0 == name } }
            }
        }

        recorder.stop.store(true, ordering: .relaxed)
        for task in load + joining { await task.value }
        await watching.value
        for client in clientPool { await client.close() }
        let crashes = await workers.stopAll()

        // Judge.
        let calls = recorder.calls.withLock { $0 }
        let audit = try await Self.audit(scratch, partitioner: partitioner, logger: logger)
        let sightings = Array(lines.sightings.withLock { $0 }.values)
        let verdict = ChaosChecker.judge(.init(
            changes: audit.changes, finalTokens: audit.finalTokens, observedGrants: calls.compactMap(\.granted),
            operations: calls.count, unanswered: calls.filter { $0.failed != nil }.count, faults: injected.count,
            crashes: crashes, unansweredMalformed: unansweredMalformed,
            sightings: sightings, waitingHolders: Set((0..<waiting).map(Self.holder)),
            observedMemberships: recorder.joins.withLock { $0 }, memberGraceMilliseconds: grace
        ))
        say("")
        for ((name, at), end) in zip(injected, faultEnds) {
            say("  \(name): \(Self.recovery(calls, at: at, end: end, partitions: partitioner.count))")
        }
        let fenced = workers.logs.reduce(0) { count, log in
            count + ((try? String(contentsOf: log, encoding: .utf8)) ?? "").components(separatedBy: "partition ownership lost").count - 1
        }
        say("  fenced out: \(fenced) late batch or sweep writes of a worker that had lost its partition (worker logs: \(workers.logs.map(\.path).joined(separator: ", ")))")
        say("  audit: \(audit.changes.count) changes, \(verdict.violations.count) invariant violations; grants seen by clients: \(calls.compactMap(\.granted).count); worker crashes: \(crashes); malformed without a reply: \(unansweredMalformed)")
        let memberChanges = audit.changes.filter { !$0.kind.isOwnership }
        say("  members: \(recorder.joins.withLock { $0.count }) joins answered, \(memberChanges.count) membership changes in the history (\(memberChanges.filter { $0.kind == .memberReclaimed }.count) reclaimed within the grace of \(grace) ms); duplicate replica ids: \(verdict.duplicateReplicaIDs)")
        let waiters = Set(sightings.map { "\($0.buffer)#\($0.position)" }).count
        say("  lines: \(waiters) waiting claims seen in line (\(sightings.count) sightings, \(lines.failures.load(ordering: .relaxed)) failed looks), \(recorder.waitingGrants.load(ordering: .relaxed)) waiting claims granted, \(recorder.waitingDenials.load(ordering: .relaxed)) denied when their wait ran out; line jumps: \(verdict.lineJumps)")
        for violation in verdict.violations.prefix(5) { say("    \(violation)") }
        for failure in Set(calls.compactMap(\.failed)).prefix(5) { say("    unanswered: \(failure)") }
        if let history = settings.history {
            try Self.writeHistory(history, calls: calls, audit: audit, faults: injected)
        }
        return verdict
    }

    /// A fault on the broker node that leads partition 0's queue; returns when it began.
    private func nodeFault(_ name: String) async throws -> ContinuousClock.Instant {
        let node = try await queueLeader(ProtocolV1.requestQueue(0))
        // What the fault does, its command and the one that undoes it, and how long it lasts.
        let (what, action, undo, seconds) = switch name {
        case "leader-kill": ("SIGKILL of RabbitMQ node \(node) (it leads partition 0's quorum queue), started again after 5 s", "kill", "start", 5)
        case "node-stop": ("rabbitmqctl stop_app on node \(node) (it leads partition 0's quorum queue), start_app after 5 s", "stop-app", "start-app", 5)
        default: (
            "SIGSTOP of node \(node) (it leads partition 0's quorum queue) for \(settings.nodePause) s, past the 4 s net tick, then SIGCONT",
            "pause", "resume", settings.nodePause
        )
        }
        say("  fault \(name): \(what)")
        let at = ContinuousClock.now
        try await services(["cluster", "node", action, node])
        try await Task.sleep(for: .seconds(seconds))
        try await services(["cluster", "node", undo, node])
        do {
            say("    " + (try await services(["cluster", "wait", "60"])))
        } catch {
            // What an operator does when the cluster stays partitioned (docs/operations.md).
            say("    the cluster was not whole 60 s after the fault ended; " + (try await services(["cluster", "heal"])))
        }
        return at
    }

    /// How the load came through a fault that began `at` and whose action ended at `end`: when every
    /// partition had answered a call made after the fault began (the recovery time), and the slowest
    /// call that overlapped the fault.
    static func recovery(_ calls: [Call], at: ContinuousClock.Instant, end: ContinuousClock.Instant, partitions: Int) -> String {
        var firstAnswer: [Int: ContinuousClock.Instant] = [:]
        for call in calls where call.started > at && call.failed == nil {
            firstAnswer[call.partition] = min(firstAnswer[call.partition] ?? call.finished, call.finished)
        }
        let recovered = firstAnswer.count == partitions ? firstAnswer.max { $0.value < $1.value } : nil
        let around = calls.filter { $0.finished > at && $0.started < end }
        let slowestCall = around.max { $0.finished - $0.started < $1.finished - $1.started }
        let slowest = slowestCall.map { $0.finished - $0.started }
        // A claim that waits in line is answered when it leaves the line (up to its wait_ms after the
        // worker first saw it): its time is not all the fault's.
        let slowestNotWaiting = around.filter { !$0.waits }.map { $0.finished - $0.started }.max()
        let recovery = recovered.map { "recovery \(format($0.value - at)) (every partition answered a call made after the fault; partition \($0.key) last)" }
            ?? "recovery never: \(partitions - firstAnswer.count) of \(partitions) partitions answered no call made after the fault"
        // Where the slowest call sat, from the fault's start T: what to read the logs around.
        let which = slowestCall.map { call in
            "; partition \(call.partition), made at T\(offset(call.started - at)), \(call.failed == nil ? "answered" : "failed") at T\(offset(call.finished - at))"
        } ?? ""
        return "\(recovery), slowest call around it \(slowest.map(format) ?? "-") (\(slowestNotWaiting.map(format) ?? "-") not counting claims that wait in line\(which))"
    }

    /// `+1.234 s` or `-0.120 s`.
    static func offset(_ duration: Duration) -> String {
        duration < .zero ? "-" + format(.zero - duration) : "+" + format(duration)
    }

    static func format(_ duration: Duration) -> String {
        String(format: "%.3f s", Double(duration.components.seconds) + Double(duration.components.attoseconds) / 1e18)
    }

    /// Claim a hot buffer, hold it briefly, release it; record every call. Waiting clients wait in the
    /// buffer's line up to 3 s and hold it 20 ms.
    static func loadLoop(client: BatonClient, index: Int, buffers: Int, partitioner: Partitioner, recorder: Recorder, wait: Duration? = nil) async {
        let holder = holder(index)
        while !recorder.stop.load(ordering: .relaxed) {
            let buffer = "chaos/\(Int.random(in: 0..<buffers))"
            let partition = partitioner.partition(of: buffer)
            let started = ContinuousClock.now
            do {
                let result = try await client.claim(buffer, user: holder.user, connection: holder.connection, lease: .seconds(30), wait: wait)
                var call = Call(partition: partition, started: started, finished: .now, waits: wait != nil)
                if wait != nil {
                    if case .granted = result { recorder.waitingGrants.add(1, ordering: .relaxed) } else { recorder.waitingDenials.add(1, ordering: .relaxed) }
                }
                if case .granted(let lease) = result {
                    call.granted = ChaosChecker.ObservedGrant(buffer: buffer, holder: holder, token: lease.token)
                    recorder.calls.withLock { $0.append(call) }
                    try? await Task.sleep(for: wait == nil ? .milliseconds(5) : .milliseconds(20))
                    let releaseStarted = ContinuousClock.now
                    do {
                        _ = try await client.release(buffer, connection: holder.connection, token: lease.token)
                        recorder.calls.withLock { $0.append(Call(partition: partition, started: releaseStarted, finished: .now)) }
                    } catch {
                        recorder.calls.withLock { $0.append(Call(partition: partition, started: releaseStarted, finished: .now, failed: "\(error)")) }
                    }
                } else {
                    recorder.calls.withLock { $0.append(call) }
                }
            } catch {
                recorder.calls.withLock { $0.append(Call(partition: partition, started: started, finished: .now, failed: "\(error)", waits: wait != nil)) }
            }
        }
    }

    /// Join one of two buffers' collaborators from a new connection, stay 10 ms, then leave, or every
    /// third round drop the connection (`release_connection`: the id waits for this user through the
    /// grace, and the next join reclaims it); record every call and every membership told.
    static func memberLoop(client: BatonClient, index: Int, partitioner: Partitioner, recorder: Recorder) async {
        let user = "member-\(index)"
        var round = 0
        while !recorder.stop.load(ordering: .relaxed) {
            round += 1
            let buffer = "chaos/room-\(index % 2)"
            let connection = "member-\(index)-\(round)"
            let partition = partitioner.partition(of: buffer)
            let started = ContinuousClock.now
            do {
                let membership = try await client.join(buffer, user: user, connection: connection, lease: .seconds(30))
                recorder.calls.withLock { $0.append(Call(partition: partition, started: started, finished: .now)) }
                recorder.joins.withLock {
                    $0.append(ChaosChecker.ObservedGrant(buffer: buffer, holder: Holder(user: user, connection: connection), token: membership.token))
                }
                try? await Task.sleep(for: .milliseconds(10))
                let endStarted = ContinuousClock.now
                do {
                    if round % 3 == 0 {
                        _ = try await client.releaseConnection(connection)
                    } else {
                        _ = try await client.leave(buffer, connection: connection, token: membership.token)
                    }
                    recorder.calls.withLock { $0.append(Call(partition: partition, started: endStarted, finished: .now)) }
                } catch {
                    recorder.calls.withLock { $0.append(Call(partition: partition, started: endStarted, finished: .now, failed: "\(error)")) }
                }
            } catch {
                recorder.calls.withLock { $0.append(Call(partition: partition, started: started, finished: .now, failed: "\(error)")) }
            }
        }
    }

    static func waitingLoop(client: BatonClient, index: Int, buffers: Int, partitioner: Partitioner, recorder: Recorder) async {
        await loadLoop(client: client, index: index, buffers: buffers, partitioner: partitioner, recorder: recorder, wait: .seconds(3))
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
                var entry: [String: Any] = ["start_s": offset(call.started), "end_s": offset(call.finished), "partition": call.partition, "waits": call.waits]
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
    /// The broker nodes, in the order the workers try them.
    let amqpURLs: [AMQPURL]
    let partitioner: Partitioner
    private struct State {
        var processes: [String: WorkerProcess] = [:]
        var killed: Set<String> = []
    }
    private let state = Mutex(State())

    init(executable: URL, scratch: PostgresURL, amqpURLs: [AMQPURL], partitioner: Partitioner) {
        self.executable = executable
        self.scratch = scratch
        self.amqpURLs = amqpURLs
        self.partitioner = partitioner
    }

    var logs: [URL] { state.withLock { $0.processes.values.map(\.log).sorted { $0.path < $1.path } } }

    func spawn(_ id: String) async throws {
        let worker = try WorkerProcess.start(
            executable: executable, id: id, databaseURL: scratch, amqpURL: amqpURLs[0], amqpAlternates: Array(amqpURLs.dropFirst()),
            partitionCount: partitioner.count,
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

/// Looks at every line in the scratch database every 20 ms during a chaos run (the waiters and when they
/// were seen, in database time), for the FIFO check; looks that fail (the database is restarting) are
/// counted and skipped.
final class LineWatcher: Sendable {
    let scratch: PostgresURL
    let logger: Logger
    /// The first sighting of each waiter, by buffer and position.
    let sightings = Mutex<[String: HistoryChecker.LineSighting]>([:])
    let failures = Atomic<Int>(0)

    init(scratch: PostgresURL, logger: Logger) {
        self.scratch = scratch
        self.logger = logger
    }

    func run(until recorder: ChaosRun.Recorder) async {
        var connection: PostgresConnection?
        while !recorder.stop.load(ordering: .relaxed) {
            do {
                if connection == nil { connection = try await PostgresConnection.connect(to: scratch, logger: logger) }
                // clock_timestamp() is read after the statement's snapshot: every row shown joined before it.
                let seen = try await connection!.withSession { session in
                    try session.query("""
                        SELECT buffer, position, holder_user, holder_connection, (extract(epoch FROM wait_until) * 1000)::int8,
                               (extract(epoch FROM clock_timestamp()) * 1000)::int8, request_id
                        FROM baton_waiters
                        """).decode(from: "baton_waiters") { row in
                        HistoryChecker.LineSighting(
                            buffer: try row.decode(0, "buffer", as: String.self), position: try row.decode(1, "position", as: Int64.self),
                            requestID: try row.decode(6, "request_id", as: String.self),
                            holder: Holder(user: try row.decode(2, "holder_user", as: String.self), connection: try row.decode(3, "holder_connection", as: String.self)),
                            waitUntil: Timestamp(milliseconds: try row.decode(4, "wait_until", as: Int64.self)),
                            seenAt: Timestamp(milliseconds: try row.decode(5, "now", as: Int64.self))
                        )
                    }
                }
                sightings.withLock { known in
                    // The first sighting of each waiter is all the check needs (it joined before then).
                    for sighting in seen where !known.keys.contains(sighting.key) { known[sighting.key] = sighting }
                }
            } catch {
                failures.add(1, ordering: .relaxed)
                if let stale = connection { await stale.close() }
                connection = nil
                try? await Task.sleep(for: .milliseconds(200))
            }
            try? await Task.sleep(for: .milliseconds(20))
        }
        if let connection { await connection.close() }
    }
}

extension HistoryChecker.LineSighting {
    fileprivate var key: String { "\(position)#\(buffer)" }
}
