import BatonCommandLine
import BatonOperations
import ArgumentParser
import BatonLab
import Foundation

struct Demo: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Replay the incident: two users open the same new buffer within 100 ms, R times; count double grants.",
        discussion: "Needs a running worker (scripts/run). --naive runs the same race with check-then-act SQL instead."
    )

    @OptionGroup var database: DatabaseOptions
    @OptionGroup var broker: BrokerOptions

    @Option(help: "Rounds, 1-1000000.") var rounds = 1000
    @Option(name: .customLong("spread-ms"), help: "Largest gap between the two claims of a round, 0-10000 ms.") var spread = 100
    @Option(help: "Rounds in flight at once, 1-1000.") var concurrency = 32
    @Option(name: .customLong("timeout-ms"), help: "How long each claim (and the first call, which waits for a worker) may take, retries included, 100-600000.")
    var timeoutMilliseconds = 5000
    @Flag(help: "Race with the incident's check-then-act SQL on PostgreSQL instead of Baton.") var naive = false

    func validate() throws {
        guard (1...1_000_000).contains(rounds) else { throw ValidationError("--rounds \(rounds) is not allowed: use 1 to 1000000") }
        guard (0...10_000).contains(spread) else { throw ValidationError("--spread-ms \(spread) is not allowed: use 0 to 10000") }
        guard (1...1000).contains(concurrency) else { throw ValidationError("--concurrency \(concurrency) is not allowed: use 1 to 1000") }
        guard (100...600_000).contains(timeoutMilliseconds) else {
            throw ValidationError("--timeout-ms \(timeoutMilliseconds) is not allowed: use 100 to 600000")
        }
    }

    func run() async throws {
        let race = IncidentRace(rounds: rounds, spread: .milliseconds(max(spread, 0)), concurrency: concurrency)
        let runID = UUID().uuidString.prefix(8).lowercased()
        let result: IncidentRace.Result
        if naive {
            result = try await race.runNaive(url: try database.databaseURL(), runID: String(runID), logger: try database.logger("baton.demo"))
        } else {
            result = try await race.runBaton(amqpURLs: try broker.amqpURLs(.frontend), partitioner: try database.partitioner(), timeout: .milliseconds(timeoutMilliseconds), runID: String(runID), logger: try database.logger("baton.demo"))
        }
        print("\(naive ? "naive check-then-act" : "baton"): \(result.rounds) rounds of two users opening one new buffer within \(spread) ms")
        print("  grants:        \(result.grants) (expected \(result.rounds), one per round)")
        print("  double grants: \(result.doubleGrants)")
        if result.errors > 0 { print("  errors:        \(result.errors)") }
        print("  claim latency: p50 \(String(format: "%.2f", result.percentile(0.5))) ms, p99 \(String(format: "%.2f", result.percentile(0.99))) ms")
        print(result.description)
        if !naive && (result.doubleGrants > 0 || result.errors > 0) { throw ExitCode(1) }
    }
}
