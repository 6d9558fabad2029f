import BatonAMQP
import BatonClient
import BatonPostgres
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A `baton worker` child process serving a scratch deployment; it dies with this process however
/// this process ends (`--exit-with-parent`).
public struct WorkerProcess: Sendable {
    /// The process.
    public let process: ChildProcess
    /// Where it logs.
    public let log: URL
    private let removeLog: Bool

    /// Starts `executable worker` for every partition of the deployment at `databaseURL` and `amqpURL`
    /// (then `amqpAlternates`, other nodes of the broker),
    /// with `arguments` added (the metrics endpoint is off unless they give `--metrics-port`), logging to `log` (a temporary file, removed by ``stop()``, when nil).
    public static func start(
        executable: URL, id: String, databaseURL: PostgresURL, amqpURL: AMQPURL, amqpAlternates: [AMQPURL] = [], partitionCount: Int, arguments: [String] = [],
        environment: [String: String] = ProcessInfo.processInfo.environment, log: URL? = nil
    ) throws -> WorkerProcess {
        let file = log ?? FileManager.default.temporaryDirectory.appendingPathComponent("baton-worker-\(id)-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).log")
        try? FileManager.default.removeItem(at: file)
        var environment = environment
        environment["BATON_DATABASE_URL"] = databaseURL.connectionString
        environment["BATON_AMQP_URL"] = ([amqpURL] + amqpAlternates).map(\.connectionString).joined(separator: ",")
        let process = try ChildProcess(
            executable: executable,
            arguments: ["worker", "--partitions", "all", "--partition-count", String(partitionCount), "--worker-id", id, "--exit-with-parent"]
                + (arguments.contains("--metrics-port") ? [] : ["--metrics-port", "0"]) + arguments,
            environment: environment, log: file
        )
        return WorkerProcess(process: process, log: file, removeLog: log == nil)
    }

    /// The `baton` that lab runs start as their workers: the one beside this executable (`baton-lab`, or a
    /// test runner built with it), else this executable itself.
    public static var batonExecutable: URL {
        #if os(Linux)
        let current = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
        #else
        let current = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath()
        #endif
        let beside = current.deletingLastPathComponent().appendingPathComponent("baton")
        return FileManager.default.isExecutableFile(atPath: beside.path) ? beside : current
    }

    /// Returns once the worker answers `client`, or throws when it exits or `timeout` passes first.
    public func waitUntilServing(_ client: BatonClient, timeout: Duration = .seconds(30)) async throws {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if let status = process.reap() { throw ScratchError("the worker exited with status \(status); its log: \(log.path)") }
            if (try? await client.inspect("baton-testing/ready")) != nil { return }
        }
        throw ScratchError("the worker did not answer within \(timeout); its log: \(log.path)")
    }

    /// Its user + system CPU time so far, in microseconds (`/proc/PID/stat`).
    public var cpuMicroseconds: Int64? {
        guard let stat = try? String(contentsOfFile: "/proc/\(process.pid)/stat", encoding: .utf8), let close = stat.lastIndex(of: ")") else { return nil }
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        guard fields.count > 13, let user = Int64(fields[11]), let system = Int64(fields[12]) else { return nil }
        let ticks = Int64(sysconf(Int32(_SC_CLK_TCK)))
        return (user + system) * 1_000_000 / max(1, ticks)
    }

    /// Its CPU time so far, in nanoseconds: the sum of its threads' time on a CPU (`/proc/PID/task/*/schedstat`,
    /// finer than the clock ticks of `stat`; threads that ended are not counted, so read it over a window
    /// in which none ends).
    public var cpuNanoseconds: Int64? {
        guard let threads = try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(process.pid)/task") else { return nil }
        var total: Int64 = 0
        for thread in threads {
            guard let line = try? String(contentsOfFile: "/proc/\(process.pid)/task/\(thread)/schedstat", encoding: .utf8),
                  let onCPU = line.split(separator: " ").first.flatMap({ Int64($0) }) else { continue }
            total += onCPU
        }
        return total
    }

    /// Its resident memory now, in MiB (`/proc/PID/status`).
    public var residentMiB: Double? {
        guard let status = try? String(contentsOfFile: "/proc/\(process.pid)/status", encoding: .utf8),
              let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") }),
              let kilobytes = Double(line.split(separator: " ").dropFirst().first ?? "")
        else { return nil }
        return kilobytes / 1024
    }

    /// What a worker says of its life in the line it logs when it stops (at level info).
    public struct Summary: Sendable {
        /// Requests per batch.
        public var meanBatch: Double
        /// Milliseconds per store commit.
        public var meanCommitMilliseconds: Double
        /// The share of store transactions decided from a partition's memory, without a read (0-1).
        public var fromMemory: Double?
    }

    /// Stops the worker (SIGTERM, then SIGKILL after 10 s); returns its summary line's figures.
    @discardableResult
    public func stop() async -> Summary? {
        _ = await process.stop()
        defer { if removeLog { try? FileManager.default.removeItem(at: log) } }
        guard let text = try? String(contentsOf: log, encoding: .utf8),
              let line = text.split(separator: "\n").last(where: { $0.contains("worker stopped") })
        else { return nil }
        func value(_ key: String) -> Double? {
            guard let range = line.range(of: "\(key)=") else { return nil }
            return Double(line[range.upperBound...].prefix { !$0.isWhitespace })
        }
        guard let batch = value("baton.mean_batch"), let commit = value("baton.mean_commit_ms") else { return nil }
        return Summary(meanBatch: batch, meanCommitMilliseconds: commit, fromMemory: value("baton.from_memory"))
    }
}
