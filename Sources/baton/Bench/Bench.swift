import ArgumentParser
import BatonAMQP
import BatonClient
import BatonCore
import BatonPostgres
import BatonWorker
import BatonTesting
import Foundation
import Logging

/// `baton bench`: the same workloads against Baton, direct PostgreSQL, naive SQL and the broker echo.
struct Bench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Benchmark Baton end to end against direct PostgreSQL, naive check-then-act SQL and the broker's own ceiling.",
        discussion: """
            Runs in a scratch database (<database>_bench) with a worker it starts itself; stop other workers first. \
            Writes DIR/results.json, DIR/results.svg and prints a table per workload. Build with -c release for real numbers.
            """
    )

    static let systems = ["baton", "postgres", "naive", "echo"]

    @OptionGroup var database: DatabaseOptions
    @OptionGroup var broker: BrokerOptions
    @OptionGroup var scratchOptions: ScratchOptions

    @Option(name: .customLong("workload"), help: "open-storm, hot or renew-heavy; repeat for several (default: all).")
    var workloadNames: [String] = []

    @Option(name: .customLong("system"), help: "baton, postgres, naive or echo; repeat for several (default: all).")
    var systemNames: [String] = []

    @Option(help: "Seconds each system runs each workload, 1-3600.")
    var duration: Double = 10

    @Option(name: .customLong("clients"), help: "Concurrent clients (closed loop), 1-4096 (default: 64; incident 1024, 256 users on each of 4 frontends).")
    var clientsFlag: Int?

    /// The clients of `workload`: the flag, or the workload's default.
    func clients(_ workload: Workload) -> Int { clientsFlag ?? workload.defaultClients }

    @Option(help: "Distinct buffers (default: open-storm 100000, hot 8; renew-heavy uses one per client).")
    var buffers: Int?

    @Option(help: "Partitions of the scratch deployment, 1-1024.")
    var partitions = 16

    @Option(name: .customLong("batch-size"), help: "The worker's batch size, 1-10000.")
    var batchSize = 256

    @Option(help: "AMQP connections the Baton clients share, 1-64.")
    var connections = 4

    @Option(name: .customLong("pool-size"), help: "PostgreSQL connections of the direct and naive systems, 1-256 (default: direct PostgreSQL runs at the best of 8, 16, 32 and 64, found by a short run of each; naive at 16).")
    var poolSizeFlag: Int?

    static let poolSizes = [8, 16, 32, 64]

    @Option(name: .customLong("rpc-ceiling"), help: "The rpc-ceiling tool (plain rabbitmq-c in C; it uses its own queue rpc-ceiling.q in the broker's virtual host /): run it first, with the broker admin's credentials, and set Baton's transport against it in the table.")
    var rpcCeiling: String?

    @Option(help: "Folder for results.json and results.svg.")
    var output = "bench-results"

    @Option(name: .customLong("worker-log"), help: "Append the bench workers' logs (level info: batches, commit times at exit) to this file.")
    var workerLog: String?

    @Flag(name: .customLong("no-half-peak"), help: "Skip the fixed-rate run at half of Baton's peak.")
    var noHalfPeak = false

    func validate() throws {
        for name in workloadNames where Workload(rawValue: name) == nil {
            throw ValidationError("workload '\(name)' is unknown: use \(Workload.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        for name in systemNames where !Self.systems.contains(name) {
            throw ValidationError("system '\(name)' is unknown: use \(Self.systems.joined(separator: ", "))")
        }
        guard (1...3600).contains(duration) else { throw ValidationError("--duration \(duration) is not allowed: use 1 to 3600 seconds") }
        if let clients = clientsFlag, !(1...4096).contains(clients) { throw ValidationError("--clients \(clients) is not allowed: use 1 to 4096") }
        guard (1...1024).contains(partitions) else { throw ValidationError("--partitions \(partitions) is not allowed: use 1 to 1024") }
        guard (1...10_000).contains(batchSize) else { throw ValidationError("--batch-size \(batchSize) is not allowed: use 1 to 10000") }
        guard (1...64).contains(connections) else { throw ValidationError("--connections \(connections) is not allowed: use 1 to 64") }
        if let poolSize = poolSizeFlag, !(1...256).contains(poolSize) { throw ValidationError("--pool-size \(poolSize) is not allowed: use 1 to 256") }
        if let buffers, buffers < 1 { throw ValidationError("--buffers \(buffers) is not allowed: use 1 or more") }
    }

    func run() async throws {
        var logger = try database.logger("baton.bench")
        logger.logLevel = max(logger.logLevel, .warning)
        let workloads = workloadNames.isEmpty ? Workload.allCases : workloadNames.compactMap(Workload.init(rawValue:))
        let systems = systemNames.isEmpty ? Self.systems : Self.systems.filter(systemNames.contains)
        let serverURL = try database.databaseURL()
        // A virtual host of its own: the bench's workers and clients never touch a deployment's queues.
        let namespace = try await ScratchBroker.create(purpose: "bench", admin: try scratchOptions.admin())
        do {
            try await run(namespace: namespace, serverURL: serverURL, logger: logger, workloads: workloads, systems: systems)
        } catch {
            await namespace.delete()
            throw error
        }
        await namespace.delete()
    }

    private func run(namespace: ScratchBroker, serverURL: PostgresURL, logger: Logger, workloads: [Workload], systems: [String]) async throws {
        let amqpURL = namespace.url(try broker.amqpURL())
        let clientURL = namespace.url(try BrokerOptions.environmentURL(.frontend))
        let partitioner = try Partitioner(count: partitions)
        var scratch = serverURL
        scratch.database = serverURL.database + "_bench"
        let runID = String(UUID().uuidString.prefix(8)).lowercased()
        let command = CommandLine.arguments.map { $0.contains(" ") ? "'\($0)'" : $0 }.joined(separator: " ")
        var report = BenchReport(command: command, machine: try await BenchReport.machine(serverURL: serverURL, logger: logger))
        print("baton bench: \(workloads.map(\.rawValue).joined(separator: ", ")) × \(systems.joined(separator: ", ")); \(Int(duration)) s each, \(clientsFlag.map(String.init) ?? "64 (incident 1024)") clients, \(partitions) partitions, batch \(batchSize)")

        if let tool = rpcCeiling {
            print("\nrpc-ceiling (plain rabbitmq-c, one quorum queue, this broker):")
            report.ceiling = try await RPCCeiling.measure(tool: tool, amqpURL: amqpURL, admin: namespace.admin, seconds: min(8, max(2, Int(duration))))
            for run in report.ceiling { print("  \(run.summary)") }
        }
        for workload in workloads {
            let buffers = self.buffers ?? workload.defaultBuffers
            print("\n\(workload.rawValue): \(workload == .renewHeavy ? "\(clients(workload)) holders renewing" : workload == .incident ? "\(clients(workload)) users opening files in pairs within 100 ms" : "\(buffers) buffers")")
            try await resetScratch(serverURL: serverURL, scratch: scratch, partitioner: partitioner, amqpURL: amqpURL, logger: logger)
            var results: [String: SystemResult] = [:]
            for system in systems {
                results[system] = try await measure(
                    system: system, workload: workload, buffers: buffers, scratch: scratch, amqpURL: amqpURL, clientURL: clientURL,
                    partitioner: partitioner, runID: runID, namespace: namespace, logger: logger
                )
                FileHandle.standardError.write(Data("\r\u{1B}[K".utf8))
                print("  \(system.padding(toLength: 9, withPad: " ", startingAt: 0)) \(results[system]!.summary)")
            }
            report.workloads[workload.rawValue] = WorkloadResult(systems: results)
        }
        let folder = URL(fileURLWithPath: output)
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        try report.json().write(to: folder.appendingPathComponent("results.json"))
        try Data(report.svg().utf8).write(to: folder.appendingPathComponent("results.svg"))
        print("")
        print(report.table())
        print("wrote \(folder.appendingPathComponent("results.json").path) and \(folder.appendingPathComponent("results.svg").path)")
    }

    private func measure(
        system: String, workload: Workload, buffers: Int, scratch: PostgresURL, amqpURL: AMQPURL, clientURL: AMQPURL,
        partitioner: Partitioner, runID: String, namespace: ScratchBroker, logger: Logger
    ) async throws -> SystemResult {
        let label = "\(workload.rawValue)/\(system)"
        switch system {
        case "postgres", "naive":
            // Direct PostgreSQL at its own best: unless --pool-size is given, a short run at each pool size
            // picks the best one, and that one is measured (so a ratio is never bought with a weak baseline).
            var size = poolSizeFlag ?? 16
            var sweep: [Int: Double] = [:]
            if poolSizeFlag == nil, system == "postgres" {
                for candidate in Self.poolSizes {
                    let sql = try await SQLSystem.make(style: .conditional, url: scratch, poolSize: candidate, logger: logger)
                    let runner = BenchRunner(workload: workload, system: sql, clients: clients(workload), buffers: buffers, label: "\(label) pool \(candidate)", runID: runID + "s\(candidate)")
                    do {
                        sweep[candidate] = await runner.closedLoop(duration: .seconds(max(2, duration / 3)), tokens: try await runner.prepare()).perSecond
                        await sql.close()
                    } catch {
                        await sql.close()
                        throw error
                    }
                }
                size = sweep.max { $0.value < $1.value }?.key ?? size
            }
            let sql = try await SQLSystem.make(style: system == "postgres" ? .conditional : .naive, url: scratch, poolSize: size, logger: logger)
            let runner = BenchRunner(workload: workload, system: sql, clients: clients(workload), buffers: buffers, label: label, runID: runID)
            var measurement: Measurement
            do {
                measurement = await runner.closedLoop(duration: .seconds(duration), tokens: try await runner.prepare())
                measurement.doubleGrants = try await sql.doubleGrants()
                await sql.close()
            } catch {
                await sql.close()
                throw error
            }
            var result = SystemResult(measurement: measurement)
            result.poolSize = size
            result.poolSweep = sweep
            return result
        default:
            let echo = system == "echo"
            let worker = try BenchWorker.start(echo: echo, scratch: scratch, amqpURL: amqpURL, partitioner: partitioner, batchSize: batchSize, log: workerLog.map { URL(fileURLWithPath: $0) })
            do {
                var result = try await measureBaton(
                    worker: worker, echo: echo, workload: workload, buffers: buffers, scratch: scratch, clientURL: clientURL,
                    partitioner: partitioner, label: label, runID: runID, namespace: namespace, logger: logger
                )
                if let (batch, commit) = await worker.stop() {
                    result.meanBatch = batch
                    if !echo { result.meanCommitMilliseconds = commit }
                }
                return result
            } catch {
                _ = await worker.stop()
                throw error
            }
        }
    }

    private func measureBaton(
        worker: BenchWorker, echo: Bool, workload: Workload, buffers: Int, scratch: PostgresURL, clientURL: AMQPURL,
        partitioner: Partitioner, label: String, runID: String, namespace: ScratchBroker, logger: Logger
    ) async throws -> SystemResult {
            var configuration = BatonClientConfiguration(amqpURL: clientURL, partitioner: partitioner)
            configuration.timeout = .seconds(10)
            configuration.name = "baton bench"
            let batonClients = (0..<connections).map { _ in BatonClient(configuration: configuration, logger: logger) }
            let baton = BatonSystem(clients: batonClients, databaseURL: echo ? nil : scratch, logger: logger)
            defer { Task { await baton.close() } }
            try await worker.waitUntilServing(batonClients[0])
            for client in batonClients { _ = try await client.inspect("bench/warm-up") }
            let runner = BenchRunner(workload: workload, system: baton, clients: clients(workload), buffers: buffers, label: label, runID: runID)
            let tokens = try await runner.prepare()
            let sampler = worker.sampleMemory()
            let cpuBefore = BenchWorker.cpuMicroseconds(pid: worker.process.pid)
            let sentBefore = batonClients.reduce(0) { $0 + $1.statistics.messages }
            let callsBefore = batonClients.reduce(0) { $0 + $1.statistics.requests }
            let publishedBefore = try? await namespace.admin.publishedMessages(in: namespace.virtualHost)
            var measurement = await runner.closedLoop(duration: .seconds(duration), tokens: tokens)
            var result = SystemResult(measurement: measurement)
            if let before = cpuBefore, let after = BenchWorker.cpuMicroseconds(pid: worker.process.pid), measurement.operations > 0 {
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
            if !noHalfPeak && measurement.perSecond > 0 {
                let rate = measurement.perSecond / 2
                let half = await BenchRunner(workload: workload, system: baton, clients: clients(workload), buffers: buffers, label: "\(label) at half peak", runID: runID + "h")
                    .openLoop(rate: rate, duration: .seconds(max(1, duration / 2)), tokens: tokens)
                result.halfPeak = HalfPeak(rate: rate, measurement: half)
            }
            sampler.cancel()
            result.workerMemory = await sampler.value
            measurement.doubleGrants = try await baton.doubleGrants()
            result.measurement.doubleGrants = measurement.doubleGrants
            return result
    }

    /// PostgreSQL connections the bench worker holds on the scratch database now.
    private static func workerConnections(_ scratch: PostgresURL, logger: Logger) async throws -> Int {
        let connection = try await PostgresConnection.connect(to: scratch, logger: logger)
        do {
            let count = try await connection.withSession { session in
                Int(try session.query(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name LIKE 'baton worker%'"
                ).first() ?? "") ?? 0
            }
            await connection.close()
            return count
        } catch {
            await connection.close()
            throw error
        }
    }

    private func resetScratch(serverURL: PostgresURL, scratch: PostgresURL, partitioner: Partitioner, amqpURL: AMQPURL, logger: Logger) async throws {
        let admin = try await PostgresConnection.connect(to: serverURL, logger: logger)
        let name = scratch.database
        do {
            _ = try await admin.withSession { session in
                try session.query("DROP DATABASE IF EXISTS \(name) WITH (FORCE)")
                try session.query("CREATE DATABASE \(name)")
            }
        } catch {
            await admin.close()
            throw RuntimeFailure("cannot create the scratch database '\(name)' on \(serverURL): \(error); use a --database-url whose user may create databases")
        }
        await admin.close()
        let connection = try await PostgresConnection.connect(to: scratch, logger: logger)
        try await Migrator.migrate(connection, partitionCount: partitioner.count, logger: logger)
        await connection.close()
        let broker = try await AMQPConnection.connect(to: amqpURL, name: "baton bench topology", logger: logger)
        try await BatonWorker.Topology.declare(on: broker, partitionCount: partitioner.count)
        await broker.close()
    }
}

/// A `baton worker` child process serving the scratch deployment; it dies with the bench.
struct BenchWorker: Sendable {
    let process: ChildProcess
    /// Where the worker logs (at level info): the file of --worker-log, or a temporary one.
    let log: URL
    let temporary: Bool

    static func start(echo: Bool, scratch: PostgresURL, amqpURL: AMQPURL, partitioner: Partitioner, batchSize: Int, log kept: URL?) throws -> BenchWorker {
        let log = kept ?? FileManager.default.temporaryDirectory.appendingPathComponent("baton-bench-worker-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).log")
        var environment = ProcessInfo.processInfo.environment
        environment["BATON_DATABASE_URL"] = scratch.connectionString
        environment["BATON_AMQP_URL"] = amqpURL.connectionString
        let process = try ChildProcess(
            executable: URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath(),
            arguments: ["worker", "--partitions", "all", "--partition-count", String(partitioner.count),
                        "--batch-size", String(batchSize), "--worker-id", echo ? "bench-echo" : "bench", "--log-level", "info",
                        "--metrics-port", "0", "--exit-with-parent"] + (echo ? ["--echo"] : []),
            environment: environment, log: log
        )
        return BenchWorker(process: process, log: log, temporary: kept == nil)
    }

    func waitUntilServing(_ client: BatonClient) async throws {
        let deadline = ContinuousClock.now + .seconds(30)
        while ContinuousClock.now < deadline {
            if let status = process.reap() { throw RuntimeFailure("the bench worker exited with status \(status)") }
            if (try? await client.inspect("bench/ready")) != nil { return }
        }
        throw RuntimeFailure("the bench worker did not answer within 30 s")
    }

    /// Samples the worker's resident memory every second until cancelled.
    func sampleMemory() -> Task<WorkerMemory, Never> {
        let pid = process.pid
        return Task {
            var memory = WorkerMemory()
            while !Task.isCancelled {
                if let rss = BenchWorker.residentMiB(pid: pid) {
                    memory.samples.append(rss)
                }
                try? await Task.sleep(for: .seconds(1))
            }
            if let rss = BenchWorker.residentMiB(pid: pid) { memory.samples.append(rss) }
            return memory
        }
    }

    /// The process's user + system CPU time so far, in microseconds (/proc/PID/stat).
    static func cpuMicroseconds(pid: Int32) -> Int64? {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8), let close = stat.lastIndex(of: ")") else { return nil }
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        guard fields.count > 13, let user = Int64(fields[11]), let system = Int64(fields[12]) else { return nil }
        let ticks = Int64(sysconf(Int32(_SC_CLK_TCK)))
        return (user + system) * 1_000_000 / max(1, ticks)
    }

    static func residentMiB(pid: Int32) -> Double? {
        guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
              let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") }),
              let kilobytes = Double(line.split(separator: " ").dropFirst().first ?? "")
        else { return nil }
        return kilobytes / 1024
    }

    /// Stops the worker; returns its mean batch (requests per batch) and mean commit time (ms) over its
    /// life, from the line it logs when it stops.
    func stop() async -> (meanBatch: Double, meanCommitMilliseconds: Double)? {
        _ = await process.stop()
        defer { if temporary { try? FileManager.default.removeItem(at: log) } }
        guard let text = try? String(contentsOf: log, encoding: .utf8),
              let line = text.split(separator: "\n").last(where: { $0.contains("worker stopped") })
        else { return nil }
        func value(_ key: String) -> Double? {
            guard let range = line.range(of: "\(key)=") else { return nil }
            return Double(line[range.upperBound...].prefix { !$0.isWhitespace })
        }
        guard let batch = value("baton.mean_batch"), let commit = value("baton.mean_commit_ms") else { return nil }
        return (batch, commit)
    }
}

