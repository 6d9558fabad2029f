import BatonCommandLine
import BatonOperations
import ArgumentParser
import Foundation
import BatonLab

/// `baton chaos`: a steady load with a history recorder while faults are injected in turn,
/// then a verdict on invariants 1-5 over the whole history.
struct Chaos: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a load while killing, pausing and restarting workers, RabbitMQ and PostgreSQL; then check every invariant.",
        discussion: """
            Works in a scratch database (<database>_chaos) and a virtual host of its own (made through the management API), \
            with two workers it starts itself (active and standby) that die with it; a deployment's queues are never touched. \
            Broker and database faults use scripts/services (or BATON_SERVICES_SCRIPT) and affect the whole broker and server. Ends with \
            one line: verdict=PASS|FAIL operations=N faults=F double_grants=D lost_grants=L unanswered=U line_jumps=J (exit 1 on FAIL).

            With --cluster the services are those of `scripts/services cluster` (three RabbitMQ nodes, a PostgreSQL \
            primary and its synchronous standby; the URLs list every node) and the faults are: leader-kill (SIGKILL of the \
            node leading partition 0's quorum queue, restarted after 5 s), node-stop (stop_app/start_app of that node), \
            node-pause (SIGSTOP of that node past the 4 s net tick) and db-failover (SIGKILL of the primary, pg_ctl \
            promote of the standby, the old primary rebuilt as the new standby). --async-replication is the negative \
            control: the same failover with asynchronous replication, repeated (--failovers) until a grant is lost.
            """
    )

    @OptionGroup var database: DatabaseOptions
    @OptionGroup var broker: BrokerOptions
    @OptionGroup var scratchOptions: ScratchOptions

    @Option(help: "Faults to inject, in order (kill, pause, broker, database, garbage; with --cluster: leader-kill, node-stop, node-pause, db-failover); repeat (default: all of the mode).")
    var fault: [String] = []

    @Flag(help: "Run against the three broker nodes and the PostgreSQL pair of `scripts/services cluster`, with the faults across nodes.")
    var cluster = false
    @Flag(name: .customLong("async-replication"), help: "With --cluster: switch the PostgreSQL pair to asynchronous replication for the run (the negative control); the faults default to db-failover.")
    var asyncReplication = false
    @Option(help: "How many times db-failover runs, 1-50 (default 1; 10 with --async-replication, which stops at the first lost grant).")
    var failovers: Int?
    @Option(name: .customLong("node-pause-seconds"), help: "How long node-pause keeps a broker node SIGSTOPped, past its 4 s net tick: 15-300.")
    var nodePause = 20

    @Option(help: "Partitions of the scratch deployment, 1-1024.") var partitions = 4
    @Option(help: "Concurrent clients, 1-256.") var clients = 8
    @Option(help: "Clients that join and leave two buffers' collaborators meanwhile (protocol section 20), 0-64; the verdict counts duplicate replica ids.") var members = 4
    @Option(name: .customLong("waiting-clients"), help: "How many of the clients wait in line (wait_ms, up to 3 s, on the first fifth of the buffers), 0 to --clients (default: half).") var waitingClients: Int?
    @Option(help: "Hot buffers the clients contend for.") var buffers = 20
    @Option(name: .customLong("settle-seconds"), help: "Load before the first fault and after each one, 1-600.") var settle = 5
    @Option(name: .customLong("pause-seconds"), help: "How long the active worker stays SIGSTOPped, more than twice its heartbeat (2 s), 5-600.") var pause = 8
    @Option(help: "Write the history (replies seen, audit rows, faults) as JSON here.") var history: String?

    /// The run's settings from the arguments; the lab checks them.
    func settings() throws -> ChaosSettings {
        let services = ProcessInfo.processInfo.environment["BATON_SERVICES_SCRIPT"] ?? "scripts/services"
        var settings = ChaosSettings(
            serverURL: try database.databaseURL(), workerAMQPURLs: try broker.amqpURLs(), frontendAMQPURLs: try BrokerOptions.environmentURLs(.frontend),
            services: URL(fileURLWithPath: services)
        )
        settings.cluster = cluster
        settings.asyncReplication = asyncReplication
        settings.faults = !fault.isEmpty ? fault : !cluster ? ChaosSettings.allFaults : asyncReplication ? ["db-failover"] : ChaosSettings.clusterFaults
        settings.failovers = failovers ?? (asyncReplication ? 10 : 1)
        settings.nodePause = nodePause
        settings.partitions = partitions
        settings.clients = clients
        settings.waitingClients = waitingClients
        settings.members = members
        settings.buffers = buffers
        settings.settle = settle
        settings.pause = pause
        settings.history = history
        return settings
    }

    func validate() throws {
        do { try settings().validate() } catch let error as SettingsError { throw ValidationError(error.description) }
    }

    func run() async throws {
        var logger = try database.logger("baton.chaos")
        logger.logLevel = max(logger.logLevel, .warning)
        let settings = try settings()
        guard FileManager.default.isExecutableFile(atPath: settings.services.path) else {
            throw ValidationError("cannot find \(settings.services.path) (run from the repository or set BATON_SERVICES_SCRIPT): broker and database faults need it")
        }
        let verdict = try await ScratchBroker.with(purpose: "chaos", admin: try scratchOptions.admin()) { namespace in
            try await ChaosRun(settings: settings, namespace: namespace, logger: logger, say: { say($0) }).run()
        }
        say(verdict.description)
        if !verdict.passed { throw ExitCode(1) }
    }
}

/// Writes a line to standard output at once (no buffering, so progress shows up in a pipe too).
@Sendable func say(_ line: String = "") {
    FileHandle.standardOutput.write(Data((line + "\n").utf8))
}
