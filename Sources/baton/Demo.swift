import ArgumentParser
import BatonClient
import BatonCore
import BatonPostgres
import BatonTesting
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
    @Flag(help: "Race with the incident's check-then-act SQL on PostgreSQL instead of Baton.") var naive = false

    func validate() throws {
        guard (1...1_000_000).contains(rounds) else { throw ValidationError("--rounds \(rounds) is not allowed: use 1 to 1000000") }
        guard (0...10_000).contains(spread) else { throw ValidationError("--spread-ms \(spread) is not allowed: use 0 to 10000") }
        guard (1...1000).contains(concurrency) else { throw ValidationError("--concurrency \(concurrency) is not allowed: use 1 to 1000") }
    }

    func run() async throws {
        let race = IncidentRace(rounds: rounds, spread: .milliseconds(max(spread, 0)), concurrency: concurrency)
        let runID = UUID().uuidString.prefix(8).lowercased()
        let result: IncidentRace.Result
        if naive {
            result = try await runNaive(race, runID: String(runID))
        } else {
            result = try await runBaton(race, runID: String(runID))
        }
        print("\(naive ? "naive check-then-act" : "baton"): \(result.rounds) rounds of two users opening one new buffer within \(spread) ms")
        print("  grants:        \(result.grants) (expected \(result.rounds), one per round)")
        print("  double grants: \(result.doubleGrants)")
        if result.errors > 0 { print("  errors:        \(result.errors)") }
        print("  claim latency: p50 \(String(format: "%.2f", result.percentile(0.5))) ms, p99 \(String(format: "%.2f", result.percentile(0.99))) ms")
        print(result.description)
        if !naive && (result.doubleGrants > 0 || result.errors > 0) { throw ExitCode(1) }
    }

    private func runBaton(_ race: IncidentRace, runID: String) async throws -> IncidentRace.Result {
        var configuration = BatonClientConfiguration(amqpURL: try broker.amqpURL(.frontend), partitioner: try database.partitioner())
        configuration.name = "baton demo"
        let logger = try database.logger("baton.demo")
        // Each user has their own connection, as two collab servers would.
        let clients = [BatonClient(configuration: configuration, logger: logger), BatonClient(configuration: configuration, logger: logger)]
        _ = try await clients[0].inspect("demo/\(runID)/warm-up")
        _ = try await clients[1].inspect("demo/\(runID)/warm-up")
        let result = await race.run(buffer: { "demo/\(runID)/\($0)" }) { user, buffer in
            switch try await clients[user].claim(buffer, user: "user-\(user)", connection: "demo-\(runID)-\(user)", lease: .seconds(60)) {
            case .granted: true
            case .denied: false
            }
        }
        for client in clients { await client.close() }
        return result
    }

    private func runNaive(_ race: IncidentRace, runID: String) async throws -> IncidentRace.Result {
        let logger = try database.logger("baton.demo")
        let url = try database.databaseURL()
        let setup = try await PostgresConnection.connect(to: url, logger: logger)
        try await setup.withSession { session in
            try session.execute(script: """
                SET client_min_messages = warning;
                CREATE TABLE IF NOT EXISTS baton_demo_naive (buffer text PRIMARY KEY, owner text, token bigint NOT NULL DEFAULT 0);
                """)
        }
        await setup.close()
        // The incident's code: "is it free?" then "make me the owner", one connection per user.
        var connections: [PostgresConnection] = []
        for _ in 0..<2 { connections.append(try await PostgresConnection.connect(to: url, logger: logger)) }
        let pool = connections
        let check = PreparedStatement(name: "demo_check", sql: "SELECT owner FROM baton_demo_naive WHERE buffer = $1")
        let act = PreparedStatement(name: "demo_act", sql: """
            INSERT INTO baton_demo_naive (buffer, owner, token) VALUES ($1, $2, 1)
            ON CONFLICT (buffer) DO UPDATE SET owner = $2, token = baton_demo_naive.token + 1
            """)
        let result = await race.run(buffer: { "demo/\(runID)/\($0)" }) { user, buffer in
            let connection = pool[user]
            let free = try await connection.withSession { session in try session.query(check, [buffer]).first() == nil }
            guard free else { return false }
            try await Task.sleep(for: .milliseconds(2))  // the application's work between check and act
            _ = try await connection.withSession { session in try session.query(act, [buffer, "user-\(user)"]) }
            return true
        }
        for connection in pool { await connection.close() }
        return result
    }
}
