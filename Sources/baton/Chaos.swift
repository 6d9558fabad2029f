import ArgumentParser
import Foundation
import BatonTesting

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
        for name in fault where !ChaosSettings.allFaults.contains(name) {
            throw ValidationError("fault '\(name)' is unknown: use \(ChaosSettings.allFaults.joined(separator: ", "))")
        }
        guard (1...256).contains(clients) else { throw ValidationError("--clients \(clients) is not allowed: use 1 to 256") }
        guard (1...600).contains(settle) else { throw ValidationError("--settle-seconds \(settle) is not allowed: use 1 to 600") }
        guard (5...600).contains(pause) else { throw ValidationError("--pause-seconds \(pause) is not allowed: use 5 to 600") }
        guard buffers >= 1 else { throw ValidationError("--buffers \(buffers) is not allowed: use 1 or more") }
    }

    func run() async throws {
        var logger = try database.logger("baton.chaos")
        logger.logLevel = max(logger.logLevel, .warning)
        let services = ProcessInfo.processInfo.environment["BATON_SERVICES_SCRIPT"] ?? "scripts/services"
        guard FileManager.default.isExecutableFile(atPath: services) else {
            throw ValidationError("cannot find \(services) (run from the repository or set BATON_SERVICES_SCRIPT): broker and database faults need it")
        }
        var settings = ChaosSettings(
            serverURL: try database.databaseURL(), workerAMQPURL: try broker.amqpURL(), frontendAMQPURL: try BrokerOptions.environmentURL(.frontend),
            services: URL(fileURLWithPath: services)
        )
        if !fault.isEmpty { settings.faults = fault }
        settings.partitions = partitions
        settings.clients = clients
        settings.buffers = buffers
        settings.settle = settle
        settings.pause = pause
        settings.history = history
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
