import BatonAMQP
import Foundation

/// The broker's own RPC ceiling, measured in the same run by the `rpc-ceiling` tool (plain rabbitmq-c in
/// C, one quorum queue, an echo consumer answering by direct reply-to; it uses its own queue
/// `rpc-ceiling.q` in the virtual host `/`).
struct RPCCeiling: Sendable {
    /// One run of the tool: `window` requests in flight, `perMessage` requests' worth of bytes per message.
    struct Run: Sendable {
        var window: Int
        var perMessage: Int
        var messagesPerSecond: Double
        var requestsPerSecond: Double
        var p50: Double
        var p99: Double

        var json: [String: Any] {
            ["window": window, "k": perMessage, "rpc_per_s": messagesPerSecond, "requests_per_s": requestsPerSecond, "p50_ms": p50, "p99_ms": p99]
        }

        var summary: String {
            String(format: "window %3d, %2d per message: %6.0f RPC/s (%7.0f requests/s), p50 %.2f ms, p99 %.2f ms", window, perMessage, messagesPerSecond, requestsPerSecond, p50, p99)
        }
    }

    /// The windows the bench runs: 16, 64 and 256 in flight with one request per message, and 64 with 16.
    static let shapes = [(16, 1), (64, 1), (256, 1), (64, 16)]

    /// Runs `tool` once per shape, `seconds` each, against the broker of `amqpURL` as the administrator.
    static func measure(tool: String, amqpURL: AMQPURL, admin: BrokerAdmin, seconds: Int) async throws -> [Run] {
        var environment = ProcessInfo.processInfo.environment
        environment["RPC_HOST"] = amqpURL.host
        environment["RPC_PORT"] = String(amqpURL.port)
        environment["RPC_USER"] = admin.credentials.user
        environment["RPC_PASS"] = admin.credentials.password
        var runs: [Run] = []
        for (window, perMessage) in shapes {
            let log = FileManager.default.temporaryDirectory.appendingPathComponent("baton-rpc-ceiling-\(getpid())-\(window)-\(perMessage).log")
            try? FileManager.default.removeItem(at: log)
            defer { try? FileManager.default.removeItem(at: log) }
            let process = try ChildProcess(
                executable: URL(fileURLWithPath: tool), arguments: [String(window), String(seconds), String(perMessage)], environment: environment, log: log
            )
            let status = await process.wait(timeout: .seconds(seconds + 60))
            let output = (try? String(contentsOf: log, encoding: .utf8)) ?? ""
            guard status == 0, let run = parse(output, window: window, perMessage: perMessage) else {
                throw ScratchError("\(tool) \(window) \(seconds) \(perMessage) failed (status \(status.map(String.init) ?? "none")): \(output.suffix(300))")
            }
            runs.append(run)
        }
        return runs
    }

    /// Reads `rpc_per_s=... claims_per_s=... p50_ms=... p99_ms=...` from the tool's output.
    static func parse(_ output: String, window: Int, perMessage: Int) -> Run? {
        guard let line = output.split(separator: "\n").last(where: { $0.contains("rpc_per_s=") }) else { return nil }
        var values: [String: Double] = [:]
        for field in line.split(separator: " ") {
            let pair = field.split(separator: "=", maxSplits: 1)
            if pair.count == 2, let value = Double(pair[1]) { values[String(pair[0])] = value }
        }
        guard let rpc = values["rpc_per_s"], let requests = values["claims_per_s"], let p50 = values["p50_ms"], let p99 = values["p99_ms"] else { return nil }
        return Run(window: window, perMessage: perMessage, messagesPerSecond: rpc, requestsPerSecond: requests, p50: p50, p99: p99)
    }
}
