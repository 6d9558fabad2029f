import BatonCommandLine
import BatonOperations
import ArgumentParser
import BatonLab
import Foundation

/// `baton bench`: the same workloads against Baton, direct PostgreSQL, naive SQL and the broker echo.
struct Bench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Benchmark Baton end to end against direct PostgreSQL, naive check-then-act SQL and the broker's own ceiling.",
        discussion: """
            Runs in a scratch database (<database>_bench) with a worker it starts itself; stop other workers first. \
            Writes DIR/results.json, DIR/results.svg and prints a table per workload. Build with -c release for real numbers.
            """
    )

    @OptionGroup var database: DatabaseOptions
    @OptionGroup var broker: BrokerOptions
    @OptionGroup var scratchOptions: ScratchOptions

    @Option(name: .customLong("workload"), help: "open-storm, hot, renew-heavy, incident, one-buffer-wait, one-buffer-poll or join-storm; repeat for several (default: all).")
    var workloadNames: [String] = []

    @Option(name: .customLong("system"), help: "baton, postgres, postgres-recorded (direct PostgreSQL with an idempotency record per request, as Baton writes), naive, echo, postgres-serializable or postgres-read-committed (replica ids in PostgreSQL as a collab server allocates them, at SERIALIZABLE with up to 10 retries, or at READ COMMITTED without: join-storm only); repeat for several (default: all).")
    var systemNames: [String] = []

    @Option(help: "Seconds each system runs each workload, 1-3600.")
    var duration: Double = 10

    @Option(name: .customLong("clients"), help: "Concurrent clients (closed loop), 1-4096 (default: 64; incident and join-storm 1024, 256 users on each of 4 frontends).")
    var clientsFlag: Int?

    @Option(help: "Distinct buffers (default: open-storm 100000, hot 8, join-storm 16 projects; renew-heavy uses one per client).")
    var buffers: Int?

    @Option(help: "Partitions of the scratch deployment, 1-1024.")
    var partitions = 16

    @Option(name: .customLong("batch-size"), help: "The worker's batch size, 1-10000.")
    var batchSize = 256

    @Option(help: "Frontends: Baton clients (one AMQP connection each) that the load's callers share, as a collab server process runs one, 1-64 (default: 1; incident 4).")
    var connections: Int?

    @Option(name: .customLong("pool-size"), help: "PostgreSQL connections of the direct and naive systems, 1-256 (default: direct PostgreSQL runs at the best of 8, 16, 32 and 64, found by a short run of each; naive at 16).")
    var poolSizeFlag: Int?

    @Option(name: .customLong("rpc-ceiling"), help: "The rpc-ceiling tool (plain rabbitmq-c in C; it uses its own queue rpc-ceiling.q in the broker's virtual host /): run it first, with the broker admin's credentials, and set Baton's transport against it in the table.")
    var rpcCeiling: String?

    @Option(help: "Folder for results.json and results.svg.")
    var output = "bench-results"

    @Option(name: .customLong("worker-log"), help: "Append the bench workers' logs (level info: batches, commit times at exit) to this file.")
    var workerLog: String?

    @Option(name: .customLong("poll-interval"), help: "Milliseconds a polling client of one-buffer-poll sleeps after a denial (jittered ±50 %), 1-10000.")
    var pollInterval = 20

    @Flag(name: .customLong("no-half-peak"), help: "Skip the fixed-rate runs at half of each system's peak (Baton and both direct PostgreSQL systems).")
    var noHalfPeak = false

    @Option(name: .customLong("sweep-callers"), help: "After the workloads, hot again with this many callers on one frontend, for baton, postgres and postgres-recorded (a callers sweep); repeat for several, 1-4096 (default: 256 and 1024 when every workload runs).")
    var sweepCallers: [Int] = []

    @Flag(name: .customLong("no-sweep"), help: "Skip the callers sweep.")
    var noSweep = false

    @Flag(help: "After each Baton run, a fixed-rate run at twice its peak for half the duration: answers per second, errors, latency and requests sent per call under overload.")
    var overload = false

    func validate() throws {
        for name in workloadNames where Workload(rawValue: name) == nil {
            throw ValidationError("workload '\(name)' is unknown: use \(Workload.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        for name in systemNames where !BenchSettings.systems.contains(name) {
            throw ValidationError("system '\(name)' is unknown: use \(BenchSettings.systems.joined(separator: ", "))")
        }
        do { try settings().validate() } catch let error as SettingsError { throw ValidationError(error.description) }
    }

    /// The run's settings from the arguments; the lab checks them.
    func settings() throws -> BenchSettings {
        var settings = BenchSettings(
            serverURL: try database.databaseURL(), workerAMQPURL: try broker.amqpURL(), frontendAMQPURL: try BrokerOptions.environmentURL(.frontend)
        )
        if !workloadNames.isEmpty { settings.workloads = workloadNames.compactMap(Workload.init(rawValue:)) }
        if !systemNames.isEmpty { settings.systems = BenchSettings.systems.filter(systemNames.contains) }
        settings.duration = duration
        settings.clients = clientsFlag
        settings.buffers = buffers
        settings.partitions = partitions
        settings.batchSize = batchSize
        settings.connections = connections
        settings.poolSize = poolSizeFlag
        settings.rpcCeiling = rpcCeiling
        settings.workerLog = workerLog.map { URL(fileURLWithPath: $0) }
        settings.halfPeak = !noHalfPeak
        settings.overload = overload
        settings.pollInterval = .milliseconds(pollInterval)
        // The sweep is part of a full run; a run of chosen workloads sweeps only when asked to.
        settings.sweepCallers = noSweep ? [] : !sweepCallers.isEmpty ? sweepCallers : workloadNames.isEmpty ? [256, 1024] : []
        settings.command = CommandLine.arguments.map { $0.contains(" ") ? "'\($0)'" : $0 }.joined(separator: " ")
        return settings
    }

    func run() async throws {
        var logger = try database.logger("baton.bench")
        logger.logLevel = max(logger.logLevel, .warning)
        let settings = try settings()
        // A virtual host of its own: the bench's workers and clients never touch a deployment's queues.
        let report = try await ScratchBroker.with(purpose: "bench", admin: try scratchOptions.admin()) { namespace in
            try await BenchSession(settings: settings, namespace: namespace, logger: logger, say: { say($0) }).run()
        }
        let folder = URL(fileURLWithPath: output)
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        try report.json().write(to: folder.appendingPathComponent("results.json"))
        try Data(report.svg().utf8).write(to: folder.appendingPathComponent("results.svg"))
        print("")
        print(report.table())
        print("wrote \(folder.appendingPathComponent("results.json").path) and \(folder.appendingPathComponent("results.svg").path)")
    }
}
