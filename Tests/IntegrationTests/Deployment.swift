import BatonAMQP
import BatonClient
import BatonCore
import BatonPostgres
import BatonWorker
import Foundation
import Logging
import Synchronization
import Testing

/// A fresh Baton deployment for one end-to-end test: its own database, a clean broker
/// topology, in-process or child-process workers, and clients.
///
/// The broker's queue names are fixed by the protocol, so tests that use it run one at a time
/// (``EndToEndTests`` is serialized).
struct Deployment {
    let databaseURL: PostgresURL
    let amqpURL: AMQPURL
    let partitioner: Partitioner

    static func make(partitions: Int = 4) async throws -> Deployment {
        let databaseURL = try await TestDatabase.migrated(partitions: partitions)
        let amqpURL = try AMQPURL(TestBroker.urlText)
        let connection = try await TestBroker.connect("test reset")
        // Remove what earlier runs left (queues of any N up to 64, dead letters), then declare afresh.
        let channel = try await connection.openChannel()
        for partition in 0..<64 { try await channel.deleteQueue(ProtocolV1.requestQueue(partition)) }
        try await channel.deleteQueue(ProtocolV1.deadLetterQueue)
        await channel.close()
        try await Topology.declare(on: connection, partitionCount: partitions)
        await connection.close()
        return Deployment(databaseURL: databaseURL, amqpURL: amqpURL, partitioner: try Partitioner(count: partitions))
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
    func startWorker(id: String = "w-\(UUID().uuidString.prefix(6))", configure: (inout WorkerConfiguration) -> Void = { _ in }) -> RunningWorker {
        var configuration = workerConfiguration(id: id)
        configure(&configuration)
        let worker = Worker(configuration: configuration, logger: TestDatabase.logger)
        let task = Task { try await worker.run() }
        return RunningWorker(worker: worker, task: task)
    }

    func client(timeout: Duration = .seconds(10)) -> BatonClient {
        var configuration = BatonClientConfiguration(amqpURL: amqpURL, partitioner: partitioner)
        configuration.timeout = timeout
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

    /// Starts `baton worker` as a child process for this deployment.
    func spawnWorker(id: String, metricsPort: Int = 0, extra: [String] = []) throws -> Process {
        try Self.launchBaton(
            [
                "worker", "--partitions", "all", "--partition-count", String(partitioner.count), "--worker-id", id,
                "--sweep-interval-ms", "200", "--log-level", "info", "--metrics-port", String(metricsPort),
            ] + extra,
            databaseURL: databaseURL,
            log: FileManager.default.temporaryDirectory.appendingPathComponent("baton-test-worker-\(id).log")
        )
    }

    /// Starts the `baton` executable with `arguments`, the test services' URLs, and its output in `log`.
    static func launchBaton(_ arguments: [String], databaseURL: PostgresURL, log: URL, in directory: URL? = nil) throws -> Process {
        let process = Process()
        process.executableURL = batonExecutable
        process.arguments = arguments
        if let directory { process.currentDirectoryURL = directory }
        var environment = ProcessInfo.processInfo.environment
        environment["BATON_DATABASE_URL"] = databaseURL.connectionString
        environment["BATON_AMQP_URL"] = TestBroker.urlText
        process.environment = environment
        _ = FileManager.default.createFile(atPath: log.path, contents: nil)
        let handle = try FileHandle(forWritingTo: log)
        process.standardOutput = handle
        process.standardError = handle
        try process.run()
        return process
    }

    /// Runs `scripts/services ARGUMENT` (broker-stop, broker-start).
    static func services(_ argument: String) throws {
        let process = Process()
        process.executableURL = repositoryRoot.appendingPathComponent("scripts/services")
        process.arguments = [argument]
        try process.run()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else {
            throw TestFailure("scripts/services \(argument) exited with \(process.terminationStatus)")
        }
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
