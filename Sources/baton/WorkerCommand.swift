import BatonCommandLine
import ArgumentParser
import BatonAMQP
import BatonCore
import BatonOperations
import BatonWorker
import Foundation
import Logging

struct WorkerCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "worker",
        abstract: "Serve partitions: consume claims, decide them in PostgreSQL, reply, publish events."
    )

    @OptionGroup var database: DatabaseOptions
    @OptionGroup var broker: BrokerOptions

    @Option(name: .customLong("partitions"), help: ArgumentHelp(
        "Partitions to serve: all, 0-15, or 0,3,5-7 (env BATON_PARTITIONS; default all). Workers listing the same partition are hot standbys.",
        valueName: "set"
    ))
    var partitionsFlag: String?

    @Option(name: .customLong("batch-size"), help: "Requests per transaction, 1-10000 (env BATON_BATCH_SIZE; default 256).")
    var batchSizeFlag: Int?

    @Option(name: .customLong("database-connections"), help: "PostgreSQL connections the partitions share, 1-64 (env BATON_DATABASE_CONNECTIONS; default one per 16 partitions served, at most 4).")
    var databaseConnectionsFlag: Int?

    @Option(name: .customLong("prefetch"), help: "Unacknowledged deliveries per partition, 1-65535 (env BATON_PREFETCH; default 256).")
    var prefetchFlag: Int?

    @Option(name: .customLong("sweep-interval-ms"), help: "How often each partition expires leases, 100-60000 ms (env BATON_SWEEP_INTERVAL_MS; default 1000).")
    var sweepFlag: Int?

    @Option(name: .customLong("events"), help: ArgumentHelp(
        "Events as one message per commit (per-commit, routing key <p>.changes) or one per change (per-change, <p>.<kind>, for consumers that bind by kind) (env BATON_EVENTS; default per-commit).",
        valueName: "per-commit|per-change"
    ))
    var eventsFlag: String?

    @Option(name: .customLong("event-linger-ms"), help: "How long a busy partition gathers committed changes before publishing them as events: at most one event publish per partition this often; a change after a quiet spell goes at once. 0-1000 ms (env BATON_EVENT_LINGER_MS; default 50).")
    var eventLingerFlag: Int?

    @Option(name: .customLong("metrics-port"), help: "Port of /metrics, /health/live and /health/ready; 0 turns them off (env BATON_METRICS_PORT; default 9464).")
    var metricsPortFlag: Int?

    @Option(name: .customLong("metrics-host"), help: "Address the metrics endpoint listens on (env BATON_METRICS_HOST; default 0.0.0.0).")
    var metricsHostFlag: String?

    @Option(name: .customLong("linger-us"), help: "How long a partition waits for more requests after the first of a batch, 0-100000 µs (env BATON_LINGER_US; default 0: clients coalesce the calls that wait, and a linger adds its length to every answer at low load).")
    var lingerFlag: Int?

    @Option(name: .customLong("ack-delay-ms"), help: "How long a partition's ack may wait to cover later batches too, 0-1000 ms (env BATON_ACK_DELAY_MS; default 20). Replies never wait for it; one cumulative ack costs the quorum queue one settle command for several messages.")
    var ackDelayFlag: Int?

    @Option(name: .customLong("member-grace-ms"), help: "How long a collaborator's replica id stays reserved for its user after the membership expired or its connection was released, 0-3600000 ms (env BATON_MEMBER_GRACE_MS; default 30000). A leave has no grace.")
    var memberGraceFlag: Int?

    @Option(name: .customLong("prune-every-minutes"), help: "Delete idempotency records and published events older than --retention-minutes this often, 1-10080, as `baton prune` does (one worker at a time; env BATON_PRUNE_EVERY_MINUTES; default 0: never, leave it to `baton prune`).")
    var pruneEveryFlag: Int?

    @Option(name: .customLong("retention-minutes"), help: "What the scheduled prune keeps, 10-525600 minutes (env BATON_RETENTION_MINUTES; default 1440, one day).")
    var retentionFlag: Int?

    @Flag(help: .hidden)
    var echo = false

    /// Scratch runs (tests, bench, chaos) start workers with this: standard input is a pipe only the
    /// parent writes to, and its end of file (the parent died, however) stops the worker.
    @Flag(name: .customLong("exit-with-parent"), help: .hidden)
    var exitWithParent = false

    @Option(name: .customLong("worker-id"), help: "This worker's name in the database and the broker (env BATON_WORKER_ID; default host-pid-random).")
    var workerIDFlag: String?

    func workerConfiguration() throws -> WorkerConfiguration {
        let partitioner = try database.partitioner()
        let partitions = try Setting.parse(partitionsFlag, "BATON_PARTITIONS", default: "all") { try PartitionSet(parsing: $0, count: partitioner.count) }
        let nodes = try broker.amqpURLs()
        var configuration = WorkerConfiguration(
            amqpURL: nodes[0], databaseURL: try database.databaseURL(), partitioner: partitioner,
            partitions: partitions.partitions,
            workerID: Setting.text(workerIDFlag, "BATON_WORKER_ID", default: Worker.defaultID())
        )
        configuration.amqpAlternates = Array(nodes.dropFirst())
        configuration.batchSize = try Setting.integer(batchSizeFlag, "BATON_BATCH_SIZE", default: 256, range: 1...10_000, name: "batch size")
        configuration.databaseConnections = try Setting.integer(
            databaseConnectionsFlag, "BATON_DATABASE_CONNECTIONS",
            default: Worker.automaticDatabaseConnections(serving: partitions.partitions.count), range: 1...64, name: "database connections"
        )
        configuration.prefetch = UInt16(try Setting.integer(prefetchFlag, "BATON_PREFETCH", default: 256, range: 1...65_535, name: "prefetch"))
        configuration.echo = echo
        configuration.linger = .microseconds(try Setting.integer(lingerFlag, "BATON_LINGER_US", default: 0, range: 0...100_000, name: "linger"))
        configuration.ackDelay = .milliseconds(try Setting.integer(ackDelayFlag, "BATON_ACK_DELAY_MS", default: 20, range: 0...1000, name: "ack delay"))
        configuration.memberGrace = .milliseconds(try Setting.integer(
            memberGraceFlag, "BATON_MEMBER_GRACE_MS", default: Int(Roster.defaultGraceMilliseconds), range: 0...3_600_000, name: "member grace"
        ))
        let events = Setting.text(eventsFlag, "BATON_EVENTS", default: "per-commit")
        guard events == "per-commit" || events == "per-change" else {
            throw ValidationError("events '\(events)' is not allowed: use per-commit or per-change")
        }
        configuration.eventsPerCommit = events == "per-commit"
        configuration.eventLinger = .milliseconds(try Setting.integer(
            eventLingerFlag, "BATON_EVENT_LINGER_MS", default: 50, range: 0...1000, name: "event linger"
        ))
        let pruneEvery = try Setting.integer(pruneEveryFlag, "BATON_PRUNE_EVERY_MINUTES", default: 0, range: 0...10_080, name: "prune interval")
        let retention = try Setting.integer(retentionFlag, "BATON_RETENTION_MINUTES", default: 1440, range: 10...525_600, name: "retention")
        if pruneEvery > 0 { configuration.prune = (interval: .seconds(pruneEvery * 60), retention: .seconds(retention * 60)) }
        configuration.sweepInterval = .milliseconds(try Setting.integer(sweepFlag, "BATON_SWEEP_INTERVAL_MS", default: 1000, range: 100...60_000, name: "sweep interval"))
        return configuration
    }

    func metricsPort() throws -> Int {
        try Setting.integer(metricsPortFlag, "BATON_METRICS_PORT", default: 9464, range: 0...65_535, name: "metrics port")
    }

    func validate() throws {
        _ = try workerConfiguration()
        _ = try metricsPort()
    }

    func run() async throws {
        // Also makes the libraries' loggers (service lifecycle, hummingbird) log at this level and in this format.
        let logger = try database.logger("baton.worker")
        let format = try database.log.logFormat()
        let worker = Worker(configuration: try workerConfiguration(), logger: logger)
        if exitWithParent { ProcessSignals.exitWithParent { logger.warning("the parent process is gone (standard input closed): stopping") } }
        do {
            try await OperationsServer.serve(worker, host: Setting.text(metricsHostFlag, "BATON_METRICS_HOST", default: "0.0.0.0"), port: try metricsPort(), build: BatonVersion.labels, logger: logger)
        } catch where format == .json {
            // A log shipper reading JSON lines gets the reason as one too, not argument-parser's plain `Error:` line.
            logger.critical("worker failed", metadata: ["baton.error": "\(error)"])
            throw ExitCode.failure
        }
    }
}

struct Topology: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Declare the exchanges and the N partition queues (idempotent; workers do it too)."
    )

    @OptionGroup var database: DatabaseOptions
    @OptionGroup var broker: BrokerOptions

    func run() async throws {
        let logger = try database.logger("baton.topology")
        let partitioner = try database.partitioner()
        // The nodes of a cluster, as workers take them: the first that answers.
        let urls = try broker.amqpURLs()
        let (connection, node) = try await AMQPConnection.connect(toFirstOf: urls, name: "baton topology", logger: logger)
        try await withClosing(connection, close: { await $0.close() }) { connection in
            try await BatonWorker.Topology.declare(on: connection, partitionCount: partitioner.count)
        }
        print("declared \(ProtocolV1.requestsExchange), \(ProtocolV1.eventsExchange), \(ProtocolV1.deadLetterExchange) and \(partitioner.count) partition queues on \(urls[node])")
    }
}
