import BatonAMQP
import BatonClient
import BatonCore
import BatonPostgres
import BatonLab
import BatonWorker
import Foundation
import Logging
import Synchronization
import Testing

/// A fresh Baton deployment for one end-to-end test: its own database, its own virtual host on the
/// test broker (so nothing touches a real deployment's queues), in-process or child-process workers,
/// and clients. Child processes die with the test process.
struct Deployment {
    let databaseURL: PostgresURL
    /// The worker's user, in the deployment's virtual host.
    let amqpURL: AMQPURL
    /// A frontend's user.
    let frontendURL: AMQPURL
    /// An operator's user.
    let operatorURL: AMQPURL
    let partitioner: Partitioner
    let namespace: ScratchBroker

    static func make(partitions: Int = 4, deadLetterLimit: Int = Topology.defaultDeadLetterLimit) async throws -> Deployment {
        let databaseURL = try await TestDatabase.migrated(partitions: partitions)
        let namespace = try await TestBroker.namespace()
        let amqpURL = namespace.url(try AMQPURL(TestBroker.urlText))
        let connection = try await AMQPConnection.connect(to: amqpURL, name: "test topology", logger: TestDatabase.logger)
        try await Topology.declare(on: connection, partitionCount: partitions, deadLetterLimit: deadLetterLimit)
        await connection.close()
        return Deployment(
            databaseURL: databaseURL, amqpURL: amqpURL, frontendURL: namespace.url(try AMQPURL(TestBroker.frontendURLText)),
            operatorURL: namespace.url(try AMQPURL(TestBroker.operatorURLText)), partitioner: try Partitioner(count: partitions),
            namespace: namespace
        )
    }

    /// A raw AMQP connection to the deployment's virtual host (default: as the worker's user).
    func connect(_ name: String, as url: AMQPURL? = nil) async throws -> AMQPConnection {
        try await AMQPConnection.connect(to: url ?? amqpURL, name: name, logger: TestDatabase.logger)
    }

    func workerConfiguration(id: String) -> WorkerConfiguration {
        var configuration = WorkerConfiguration(
            amqpURL: amqpURL, databaseURL: databaseURL, partitioner: partitioner,
            partitions: Array(0..<partitioner.count), workerID: id
        )
        configuration.rejoinDelay = .milliseconds(300)
        configuration.sweepInterval = .milliseconds(200)
        return configuration
    }

    /// Starts an in-process worker; stop it with ``RunningWorker/stop()``.
    func startWorker(
        id: String = "w-\(UUID().uuidString.prefix(6))", logger: Logger = TestDatabase.logger, configure: (inout WorkerConfiguration) -> Void = { _ in }
    ) -> RunningWorker {
        var configuration = workerConfiguration(id: id)
        configure(&configuration)
        let worker = Worker(configuration: configuration, logger: logger)
        let task = Task { try await worker.run() }
        return RunningWorker(worker: worker, task: task)
    }

    /// A client as a frontend (or as `url`'s user).
    func client(timeout: Duration = .seconds(10), as url: AMQPURL? = nil, resendAfter: Duration? = nil) -> BatonClient {
        var configuration = BatonClientConfiguration(amqpURL: url ?? frontendURL, partitioner: partitioner)
        configuration.timeout = timeout
        if let resendAfter { configuration.resendAfter = resendAfter }
        configuration.name = "test client"
        return BatonClient(configuration: configuration, logger: TestDatabase.logger)
    }

    /// Audit rows and final tokens of this deployment's database.
    func audit() async throws -> (changes: [OwnershipChange], finalTokens: [ExactString: Int64]) {
        try await TestDatabase.audit(databaseURL)
    }

    /// Waits until `condition` holds, polling; false on timeout.
    static func eventually(_ timeout: Duration = .seconds(10), _ condition: () async throws -> Bool) async rethrows -> Bool {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if try await condition() { return true }
            try? await Task.sleep(for: .milliseconds(50))
        }
        return try await condition()
    }

    /// The `baton` executable built next to the test bundle.
    static var batonExecutable: URL {
        let beside = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent("baton")
        if FileManager.default.isExecutableFile(atPath: beside.path) { return beside }
        return repositoryRoot.appendingPathComponent(".build/debug/baton")
    }

    static var repositoryRoot: URL {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    }

    /// Starts `baton worker` as a child process for this deployment; it dies with the test process.
    func spawnWorker(id: String, metricsPort: Int = 0, extra: [String] = []) throws -> ChildProcess {
        try WorkerProcess.start(
            executable: Self.batonExecutable, id: id, databaseURL: databaseURL, amqpURL: amqpURL, partitionCount: partitioner.count,
            arguments: ["--sweep-interval-ms", "200", "--log-level", "info", "--metrics-port", String(metricsPort)] + extra,
            environment: environment(), log: FileManager.default.temporaryDirectory.appendingPathComponent("baton-test-worker-\(id).log")
        ).process
    }

    /// Starts the `baton` executable with `arguments`, this deployment's database and broker users, and
    /// its output in `log` (a fresh file).
    func launchBaton(_ arguments: [String], log: URL, in directory: URL? = nil, environment base: [String: String]? = nil) throws -> ChildProcess {
        try? FileManager.default.removeItem(at: log)
        return try ChildProcess(executable: Self.batonExecutable, arguments: arguments, environment: environment(base), log: log, directory: directory)
    }

    /// The environment of a `baton` child: this deployment's URLs for every role.
    func environment(_ base: [String: String]? = nil) -> [String: String] {
        var environment = base ?? ProcessInfo.processInfo.environment
        environment["BATON_DATABASE_URL"] = databaseURL.connectionString
        environment["BATON_AMQP_URL"] = amqpURL.connectionString
        environment["BATON_FRONTEND_AMQP_URL"] = frontendURL.connectionString
        environment["BATON_OPERATOR_AMQP_URL"] = operatorURL.connectionString
        environment["BATON_BROKER_ADMIN_URL"] = TestBroker.adminURLText
        return environment
    }

    /// Runs `scripts/services ARGUMENT` (broker-stop, broker-start, broker-alarm on|off) without blocking a thread.
    static func services(_ arguments: String...) async throws {
        try await ChildProcess.run(repositoryRoot.appendingPathComponent("scripts/services"), arguments, timeout: .seconds(120))
    }
}

struct TestFailure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// An in-process worker and the task running it.
struct RunningWorker {
    let worker: Worker
    let task: Task<Void, any Error>

    func stop() async {
        worker.requestStop()
        _ = try? await task.value
    }
}

/// A value shared between test tasks.
final class Shared<Value: Sendable>: Sendable {
    private let mutex: Mutex<Value>
    init(_ value: Value) { mutex = Mutex(value) }
    var value: Value { mutex.withLock { $0 } }
    func update<R>(_ body: (inout Value) -> R) -> R { mutex.withLock { body(&$0) } }
}
