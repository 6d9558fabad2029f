import BatonAMQP
import BatonClient
import BatonCore
import BatonPostgres
import Foundation
import Logging

/// What `baton bench` runs: which workloads against which systems, for how long, on what.
public struct BenchSettings: Sendable {
    /// The systems a bench can measure.
    public static let systems = ["baton", "postgres", "postgres-recorded", "naive", "echo"] + membershipSystems
    /// Replica ids in PostgreSQL without Baton (`join-storm` only): SERIALIZABLE with retries, as a collab
    /// server does it, and READ COMMITTED without, the control.
    public static let membershipSystems = ["postgres-serializable", "postgres-read-committed"]
    /// The direct PostgreSQL systems measured at their best pool (the others run at 16).
    static let pooledSystems = ["postgres", "postgres-recorded"] + membershipSystems
    /// Pool sizes direct PostgreSQL is tried at when no pool size is given.
    public static let poolSizes = [8, 16, 32, 64]
    /// The systems the callers sweep measures.
    public static let sweepSystems = ["baton", "postgres", "postgres-recorded"]

    public var workloads: [Workload] = Workload.allCases
    public var systems: [String] = BenchSettings.systems
    /// Seconds each system runs each workload.
    public var duration: Double = 10
    /// Concurrent clients; nil: each workload's default.
    public var clients: Int?
    /// Distinct buffers; nil: each workload's default.
    public var buffers: Int?
    public var partitions = 16
    public var batchSize = 256
    /// Frontends, each one `BatonClient` (one AMQP connection) shared by its callers, as a collab server
    /// process runs one; nil: each workload's default (``Workload/defaultFrontends``).
    public var connections: Int?
    /// PostgreSQL connections of the direct and naive systems; nil: direct PostgreSQL at its best size.
    public var poolSize: Int?
    /// The rpc-ceiling tool, run first when given.
    public var rpcCeiling: String?
    /// Where the bench workers log (a temporary file each when nil).
    public var workerLog: URL?
    /// Whether Baton also runs at a fixed rate of half its peak.
    public var halfPeak = true
    /// After the closed loop, an open-loop run at twice its peak (does the throughput hold?).
    public var overload = false
    /// How long a polling client sleeps after a denial (one-buffer-poll), jittered ±50 %.
    public var pollInterval: Duration = .milliseconds(20)
    /// The PostgreSQL server (the scratch database `<database>_bench` is made on it).
    public var serverURL: PostgresURL
    /// The broker as the worker user, and as the frontend user (pointed into the scratch virtual host).
    public var workerAMQPURL: AMQPURL
    public var frontendAMQPURL: AMQPURL
    /// Caller counts of the callers sweep: `hot` again with each count of callers on one frontend, for
    /// Baton and both direct PostgreSQL systems (empty: no sweep).
    public var sweepCallers: [Int] = []
    /// The command line, recorded in the results.
    public var command = ""
    /// The `baton` executable the bench workers run.
    public var executable = WorkerProcess.batonExecutable

    public init(serverURL: PostgresURL, workerAMQPURL: AMQPURL, frontendAMQPURL: AMQPURL) {
        self.serverURL = serverURL
        self.workerAMQPURL = workerAMQPURL
        self.frontendAMQPURL = frontendAMQPURL
    }

    /// Refuses a value out of range, naming it and what is allowed (the command line's names).
    public func validate() throws(SettingsError) {
        guard (1...3600).contains(duration) else { throw SettingsError("--duration \(duration) is not allowed: use 1 to 3600 seconds") }
        try SettingsError.check(clients, "--clients", 1...4096)
        try SettingsError.check(partitions, "--partitions", 1...1024)
        try SettingsError.check(batchSize, "--batch-size", 1...10_000)
        try SettingsError.check(connections, "--connections", 1...64)
        try SettingsError.check(poolSize, "--pool-size", 1...256)
        try SettingsError.check(Int(pollInterval.components.seconds * 1000 + pollInterval.components.attoseconds / 1_000_000_000_000_000), "--poll-interval", 1...10_000, unit: " milliseconds")
        if let buffers, buffers < 1 { throw SettingsError("--buffers \(buffers) is not allowed: use 1 or more") }
        for callers in sweepCallers { try SettingsError.check(callers, "--sweep-callers", 1...4096) }
    }

    /// The clients of `workload`: the setting, or the workload's default.
    public func clients(_ workload: Workload) -> Int { clients ?? workload.defaultClients }
}

/// One bench: the same workloads against Baton, direct PostgreSQL, naive SQL and the broker echo, in a
/// scratch database and a scratch virtual host, with workers it starts itself.
public struct BenchSession: Sendable {
    let settings: BenchSettings
    let namespace: ScratchBroker
    let logger: Logger
    /// Where progress lines go.
    let say: @Sendable (String) -> Void

    public init(settings: BenchSettings, namespace: ScratchBroker, logger: Logger, say: @escaping @Sendable (String) -> Void) {
        self.settings = settings
        self.namespace = namespace
        self.logger = logger
        self.say = say
    }

    /// Runs every workload against every system and returns the report.
    public func run() async throws -> BenchReport {
        let workloads = settings.workloads
        let systems = settings.systems
        let duration = settings.duration
        let serverURL = settings.serverURL
        let amqpURL = namespace.url(settings.workerAMQPURL)
        let clientURL = namespace.url(settings.frontendAMQPURL)
        let partitioner = try Partitioner(count: settings.partitions)
        var scratch = serverURL
        scratch.database = serverURL.database + "_bench"
        let runID = String(UUID().uuidString.prefix(8)).lowercased()
        var report = BenchReport(command: settings.command, machine: try await BenchReport.machine(serverURL: serverURL, logger: logger))
        say("baton bench: \(workloads.map(\.rawValue).joined(separator: ", ")) × \(systems.joined(separator: ", ")); \(Int(duration)) s each, \(settings.clients.map(String.init) ?? "64 (incident 1024)") clients, \(settings.partitions) partitions, batch \(settings.batchSize)")

        if let tool = settings.rpcCeiling {
            say("\nrpc-ceiling (plain rabbitmq-c, one quorum queue, this broker):")
            report.ceiling = try await RPCCeiling.measure(tool: tool, amqpURL: amqpURL, admin: namespace.admin, seconds: min(8, max(2, Int(duration))))
            for run in report.ceiling { say("  \(run.summary)") }
        }
        for workload in workloads {
            let buffers = settings.buffers ?? workload.defaultBuffers
            let clients = settings.clients(workload)
            let shape = switch workload {
            case .renewHeavy: "\(clients) holders renewing"
            case .incident: "\(clients) users opening files in pairs within 100 ms"
            case .oneBufferWait: "\(clients) clients wanting one buffer, waiting in its line"
            case .oneBufferPoll: "\(clients) clients wanting one buffer, polling every \(settings.pollInterval) ±50 %"
            case .joinStorm: "\(clients) users joining and leaving \(buffers) shared projects in bursts"
            default: "\(buffers) buffers"
            }
            say("\n\(workload.rawValue): \(shape)")
            try await ScratchDeployment.reset(database: scratch, server: serverURL, amqpURL: amqpURL, partitionCount: partitioner.count, logger: logger)
            var results: [String: SystemResult] = [:]
            for system in systems {
                guard workload.runs(on: system) else {
                    say("  \(system.padding(toLength: 23, withPad: " ", startingAt: 0)) not run: \(workload.notRun(on: system))")
                    continue
                }
                results[system] = try await measure(
                    system: system, workload: workload, buffers: buffers, scratch: scratch, amqpURL: amqpURL, clientURL: clientURL,
                    partitioner: partitioner, runID: runID
                )
                FileHandle.standardError.write(Data("\r\u{1B}[K".utf8))
                say("  \(system.padding(toLength: 23, withPad: " ", startingAt: 0)) \(results[system]!.summary)")
            }
            report.workloads[workload.rawValue] = WorkloadResult(systems: results)
        }
        try await sweep(into: &report, scratch: scratch, amqpURL: amqpURL, clientURL: clientURL, partitioner: partitioner, runID: runID)
        return report
    }

    /// The callers sweep: `hot` with each of ``BenchSettings/sweepCallers`` callers sharing one frontend,
    /// for Baton and both direct PostgreSQL systems (closed loop only), reported as the workloads `hot@N`.
    /// How many requests share a message decides most of Baton's cost; this shows where that pays.
    private func sweep(
        into report: inout BenchReport, scratch: PostgresURL, amqpURL: AMQPURL, clientURL: AMQPURL, partitioner: Partitioner, runID: String
    ) async throws {
        let systems = settings.systems.filter(BenchSettings.sweepSystems.contains)
        guard !settings.sweepCallers.isEmpty, !systems.isEmpty else { return }
        for callers in settings.sweepCallers {
            var swept = settings
            swept.clients = callers
            swept.connections = 1
            swept.halfPeak = false
            swept.overload = false
            let session = BenchSession(settings: swept, namespace: namespace, logger: logger, say: say)
            let name = "\(Workload.hot.rawValue)@\(callers)"
            say("\n\(name): \(Workload.hot.defaultBuffers) buffers, \(callers) callers on one frontend")
            try await ScratchDeployment.reset(database: scratch, server: settings.serverURL, amqpURL: amqpURL, partitionCount: partitioner.count, logger: logger)
            var results: [String: SystemResult] = [:]
            for system in systems {
                results[system] = try await session.measure(
                    system: system, workload: .hot, buffers: settings.buffers ?? Workload.hot.defaultBuffers, scratch: scratch, amqpURL: amqpURL,
                    clientURL: clientURL, partitioner: partitioner, runID: runID
                )
                FileHandle.standardError.write(Data("\r\u{1B}[K".utf8))
                say("  \(system.padding(toLength: 23, withPad: " ", startingAt: 0)) \(results[system]!.summary)")
            }
            report.workloads[name] = WorkloadResult(systems: results)
            report.sweep.append(callers)
        }
    }

    private func measure(
        system: String, workload: Workload, buffers: Int, scratch: PostgresURL, amqpURL: AMQPURL, clientURL: AMQPURL,
        partitioner: Partitioner, runID: String
    ) async throws -> SystemResult {
        let label = "\(workload.rawValue)/\(system)"
        let clients = settings.clients(workload)
        let duration = settings.duration
        switch system {
        case "postgres", "postgres-recorded", "naive", "postgres-serializable", "postgres-read-committed":
            // Direct PostgreSQL at its own best: unless a pool size is given, a short run at each pool size
            // picks the best one, and that one is measured (so a ratio is never bought with a weak baseline).
            var size = settings.poolSize ?? 16
            var sweep: [Int: Double] = [:]
            if settings.poolSize == nil, BenchSettings.pooledSystems.contains(system) {
                for candidate in BenchSettings.poolSizes {
                    sweep[candidate] = try await withSQLSystem(system, url: scratch, poolSize: candidate) { sql in
                        let runner = BenchRunner(workload: workload, system: sql, clients: clients, buffers: buffers, label: "\(label) pool \(candidate)", runID: runID + "s\(candidate)", pollInterval: settings.pollInterval)
                        return await runner.closedLoop(duration: .seconds(max(2, duration / 3)), tokens: try await runner.prepare()).perSecond
                    }
                }
                size = sweep.max { $0.value < $1.value }?.key ?? size
            }
            let (measurement, cpu, transactions, halfPeak) = try await withSQLSystem(system, url: scratch, poolSize: size) { sql in
                let runner = BenchRunner(workload: workload, system: sql, clients: clients, buffers: buffers, label: label, runID: runID, pollInterval: settings.pollInterval)
                let tokens = try await runner.prepare()
                let transactionsBefore = try? await Self.transactions(scratch, logger: logger)
                let cpuBefore = MachineCPU.read(worker: nil)
                let retriesBefore = sql.serializationRetries
                var measurement = await runner.closedLoop(duration: .seconds(duration), tokens: tokens)
                let cpu = MachineCPU.read(worker: nil).perOperation(since: cpuBefore, operations: measurement.operations)
                measurement.serializationRetries = retriesBefore.flatMap { before in sql.serializationRetries.map { $0 - before } }
                // The statistics of a backend's transactions reach pg_stat_database within a second.
                try await Task.sleep(for: .milliseconds(1_500))
                let transactions = try? await Self.transactions(scratch, logger: logger)
                measurement.doubleGrants = try await sql.doubleGrants()
                let perOperation = transactionsBefore.flatMap { before in transactions.map { Double($0 - before) / Double(max(1, measurement.operations)) } }
                // Direct PostgreSQL at half its own peak too, so that Baton's latency there has its baseline.
                var halfPeak: OpenLoopRun?
                if settings.halfPeak, system != "naive", measurement.perSecond > 0, !workload.isLine {
                    let rate = measurement.perSecond / 2
                    let half = await BenchRunner(workload: workload, system: sql, clients: clients, buffers: buffers, label: "\(label) at half peak", runID: runID + "h")
                        .openLoop(rate: rate, duration: .seconds(max(1, duration / 2)), tokens: tokens)
                    halfPeak = OpenLoopRun(rate: rate, measurement: half)
                }
                return (measurement, cpu, perOperation, halfPeak)
            }
            var result = SystemResult(measurement: measurement)
            result.halfPeak = halfPeak
            result.machineCPU = cpu
            result.databaseTransactionsPerOperation = transactions
            result.poolSize = size
            result.poolSweep = sweep
            return result
        default:
            let echo = system == "echo"
            let worker = try WorkerProcess.start(
                executable: settings.executable, id: echo ? "bench-echo" : "bench", databaseURL: scratch, amqpURL: amqpURL, partitionCount: partitioner.count,
                arguments: ["--batch-size", String(settings.batchSize), "--log-level", "info"] + (echo ? ["--echo"] : []), log: settings.workerLog
            )
            do {
                var result = try await measureBaton(worker: worker, echo: echo, workload: workload, buffers: buffers, scratch: scratch, clientURL: clientURL, partitioner: partitioner, label: label, runID: runID)
                if let summary = await worker.stop() {
                    result.meanBatch = summary.meanBatch
                    if !echo {
                        result.meanCommitMilliseconds = summary.meanCommitMilliseconds
                        result.fromMemory = summary.fromMemory
                    }
                }
                return result
            } catch {
                await worker.stop()
                throw error
            }
        }
    }

    /// How long the worker's idle CPU is read before each Baton run.
    static let idleWindow = Duration.seconds(3)

    private func measureBaton(
        worker: WorkerProcess, echo: Bool, workload: Workload, buffers: Int, scratch: PostgresURL, clientURL: AMQPURL,
        partitioner: Partitioner, label: String, runID: String
    ) async throws -> SystemResult {
        var configuration = BatonClientConfiguration(amqpURL: clientURL, partitioner: partitioner)
        configuration.timeout = .seconds(10)
        configuration.name = "baton bench"
        let batonClients = (0..<(settings.connections ?? workload.defaultFrontends)).map { _ in BatonClient(configuration: configuration, logger: logger) }
        return try await withClosing(BatonSystem(clients: batonClients, databaseURL: echo ? nil : scratch, logger: logger), close: { await $0.close() }) { baton in
            try await measureBaton(baton, worker: worker, echo: echo, workload: workload, buffers: buffers, scratch: scratch, label: label, runID: runID)
        }
    }

    private func measureBaton(
        _ baton: BatonSystem, worker: WorkerProcess, echo: Bool, workload: Workload, buffers: Int, scratch: PostgresURL, label: String, runID: String
    ) async throws -> SystemResult {
        let clients = settings.clients(workload)
        let duration = settings.duration
        let batonClients = baton.clients
        try await worker.waitUntilServing(batonClients[0])
        for client in batonClients { _ = try await client.inspect("bench/warm-up") }
        // The worker's CPU while it serves its partitions and nothing is sent (an idle deployment's cost).
        let idleStart = (worker.cpuNanoseconds, ContinuousClock.now)
        try await Task.sleep(for: Self.idleWindow)
        let workerIdleCPU = idleStart.0.flatMap { before in
            worker.cpuNanoseconds.map { Double($0 - before) / 1e6 / (ContinuousClock.now - idleStart.1).seconds }
        }
        let runner = BenchRunner(workload: workload, system: baton, clients: clients, buffers: buffers, label: label, runID: runID, pollInterval: settings.pollInterval)
        let tokens = try await runner.prepare()
        let sampler = sampleMemory(worker)
        let cpuBefore = worker.cpuMicroseconds
        let sentBefore = batonClients.reduce(0) { $0 + $1.statistics.messages }
        let callsBefore = batonClients.reduce(0) { $0 + $1.statistics.requests }
        let publishedBefore = try? await namespace.admin.publishedMessages(in: namespace.virtualHost)
        let transactionsBefore = echo ? nil : try? await Self.transactions(scratch, logger: logger)
        let machineBefore = MachineCPU.read(worker: worker.process.pid)
        let measurement = await runner.closedLoop(duration: .seconds(duration), tokens: tokens)
        var result = SystemResult(measurement: measurement)
        result.workerIdleCPU = workerIdleCPU
        result.machineCPU = MachineCPU.read(worker: worker.process.pid).perOperation(since: machineBefore, operations: measurement.operations)
        if let before = cpuBefore, let after = worker.cpuMicroseconds, measurement.operations > 0 {
            result.workerCPUPerOperation = Double(after - before) / Double(measurement.operations)
        }
        let sent = batonClients.reduce(0) { $0 + $1.statistics.messages } - sentBefore
        let calls = batonClients.reduce(0) { $0 + $1.statistics.requests } - callsBefore
        if sent > 0 { result.requestsPerMessage = Double(calls) / Double(sent) }
        if !echo { result.databaseConnections = try? await Self.workerConnections(scratch, logger: logger) }
        // Every message the broker took during the run (requests, replies, events), once its statistics
        // caught up (they are sampled every 5 s by default).
        try await Task.sleep(for: .milliseconds(5_500))
        if let before = publishedBefore, let after = try? await namespace.admin.publishedMessages(in: namespace.virtualHost), measurement.operations > 0 {
            result.brokerMessagesPerOperation = Double(after - before) / Double(measurement.operations)
        }
        if let before = transactionsBefore, let after = try? await Self.transactions(scratch, logger: logger), measurement.operations > 0 {
            result.databaseTransactionsPerOperation = Double(after - before) / Double(measurement.operations)
        }
        if settings.halfPeak && measurement.perSecond > 0 && !workload.isLine {
            let rate = measurement.perSecond / 2
            let half = await BenchRunner(workload: workload, system: baton, clients: clients, buffers: buffers, label: "\(label) at half peak", runID: runID + "h")
                .openLoop(rate: rate, duration: .seconds(max(1, duration / 2)), tokens: tokens)
            result.halfPeak = OpenLoopRun(rate: rate, measurement: half)
        }
        if settings.overload && measurement.perSecond > 0 && !workload.isLine {
            // The closed loop's callers are bound by their own round trips, so Baton's peak is found open
            // loop: the rate doubles (short runs) until the answers fall behind it. Then operations start
            // at twice that peak whatever the answers: calls queue in the frontends and time out (errors);
            // what matters is that the answers per second hold near the peak instead of collapsing under
            // resends.
            var rate = measurement.perSecond * 2
            var peak = measurement.perSecond
            for step in 0..<5 {
                let probe = await BenchRunner(workload: workload, system: baton, clients: clients, buffers: buffers, label: "\(label) at \(Int(rate))/s", runID: runID + "p\(step)")
                    .openLoop(rate: rate, duration: .seconds(max(1, duration / 4)), tokens: tokens)
                peak = max(peak, probe.perSecond)
                if probe.perSecond < rate * 0.9 || probe.errors > 0 { break }
                rate *= 2
            }
            let sentBefore = batonClients.reduce(0) { $0 + $1.statistics.requests }
            let over = await BenchRunner(workload: workload, system: baton, clients: clients, buffers: buffers, label: "\(label) at twice the peak", runID: runID + "o")
                .openLoop(rate: peak * 2, duration: .seconds(max(1, duration / 2)), tokens: tokens)
            let sent = batonClients.reduce(0) { $0 + $1.statistics.requests } - sentBefore
            let calls = over.operations + over.errors
            result.overload = OpenLoopRun(rate: peak * 2, measurement: over, requestsPerCall: calls > 0 ? Double(sent) / Double(calls) : nil, peak: peak)
        }
        sampler.cancel()
        result.workerMemory = await sampler.value
        result.measurement.doubleGrants = try await baton.doubleGrants()
        if workload == .joinStorm { result.measurement.membershipViolations = try await baton.membershipViolations() }
        return result
    }

    /// Runs `body` with the direct PostgreSQL system named `system`, `poolSize` connections, closed afterwards.
    private func withSQLSystem<T: Sendable>(_ system: String, url: PostgresURL, poolSize: Int, _ body: (any BenchSystem) async throws -> T) async throws -> T {
        switch system {
        case "postgres-serializable", "postgres-read-committed":
            try await SQLMembershipSystem.with(isolation: system == "postgres-serializable" ? .serializable : .readCommitted, url: url, poolSize: poolSize, logger: logger, body)
        default:
            try await SQLSystem.with(style: system == "postgres" ? .conditional : system == "postgres-recorded" ? .recorded : .naive, url: url, poolSize: poolSize, logger: logger, body)
        }
    }

    /// Samples the worker's resident memory every second until cancelled.
    private func sampleMemory(_ worker: WorkerProcess) -> Task<WorkerMemory, Never> {
        Task {
            var memory = WorkerMemory()
            while !Task.isCancelled {
                if let rss = worker.residentMiB { memory.samples.append(rss) }
                try? await Task.sleep(for: .seconds(1))
            }
            if let rss = worker.residentMiB { memory.samples.append(rss) }
            return memory
        }
    }

    /// Transactions committed and rolled back in the scratch database so far (`pg_stat_database`).
    private static func transactions(_ url: PostgresURL, logger: Logger) async throws -> Int64 {
        try await PostgresConnection.withConnection(to: url, logger: logger) { connection in
            try await connection.withSession { session in
                try session.query("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()").first().flatMap(Int64.init) ?? 0
            }
        }
    }

    /// PostgreSQL connections the bench worker holds on the scratch database now.
    private static func workerConnections(_ scratch: PostgresURL, logger: Logger) async throws -> Int {
        try await PostgresConnection.withConnection(to: scratch, logger: logger) { connection in
            try await connection.withSession { session in
                Int(try session.query(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name LIKE 'baton worker%'"
                ).first() ?? "") ?? 0
            }
        }
    }
}
