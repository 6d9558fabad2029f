import BatonAMQP
import BatonClient
import BatonCore
import BatonPostgres
import Foundation
import Logging

/// The incident as a repeatable race: in each round two users open the same new
/// buffer within `spread` of each other. Used by `baton demo` and the tests.
public struct IncidentRace: Sendable {
    /// The outcome of a run.
    public struct Result: Sendable, CustomStringConvertible {
        /// Rounds run.
        public var rounds = 0
        /// Claims granted (exactly one per round when nothing is wrong).
        public var grants = 0
        /// Rounds in which both users were granted.
        public var doubleGrants = 0
        /// Rounds in which nobody was granted (an error or timeout).
        /// Claims that failed with an error.
        public var errors = 0
        /// Every claim's latency.
        public var latencies: [Duration] = []

        /// The latency at quantile `q` (0...1), in milliseconds.
        public func percentile(_ q: Double) -> Double {
            guard !latencies.isEmpty else { return 0 }
            let sorted = latencies.sorted()
            let index = min(sorted.count - 1, Int((Double(sorted.count) * q).rounded(.up)) - 1)
            let (seconds, attoseconds) = sorted[max(0, index)].components
            return Double(seconds) * 1000 + Double(attoseconds) / 1e15
        }

        /// The machine-readable summary line.
        public var description: String {
            "rounds=\(rounds) grants=\(grants) double_grants=\(doubleGrants) p50_ms=\(String(format: "%.2f", percentile(0.5))) p99_ms=\(String(format: "%.2f", percentile(0.99)))"
        }
    }

    /// Rounds to run.
    public var rounds: Int
    /// The largest gap between the two users' claims.
    public var spread: Duration
    /// Rounds in flight at once.
    public var concurrency: Int

    /// Creates a race.
    public init(rounds: Int = 1000, spread: Duration = .milliseconds(100), concurrency: Int = 32) {
        self.rounds = rounds
        self.spread = spread
        self.concurrency = concurrency
    }

    /// Runs the race. `claim(user, buffer)` returns true when that user was granted the buffer.
    public func run(
        buffer: @escaping @Sendable (Int) -> String,
        claim: @escaping @Sendable (_ user: Int, _ buffer: String) async throws -> Bool,
        progress: (@Sendable (Int) -> Void)? = nil
    ) async -> Result {
        var result = Result()
        let spreadMicroseconds = max(1, Int(spread.components.seconds * 1_000_000 + spread.components.attoseconds / 1_000_000_000_000))
        await withTaskGroup(of: (granted: Int, errors: Int, latencies: [Duration]).self) { group in
            var next = 0
            func startRound() {
                let round = next
                next += 1
                let name = buffer(round)
                let delay = Duration.microseconds(Int.random(in: 0...spreadMicroseconds))
                let first = Int.random(in: 0...1)
                group.addTask {
                    await withTaskGroup(of: (Bool?, Duration).self) { pair in
                        for user in 0...1 {
                            pair.addTask {
                                if user != first { try? await Task.sleep(for: delay) }
                                let start = ContinuousClock.now
                                let granted = try? await claim(user, name)
                                return (granted, ContinuousClock.now - start)
                            }
                        }
                        var outcome = (granted: 0, errors: 0, latencies: [Duration]())
                        for await (granted, latency) in pair {
                            outcome.latencies.append(latency)
                            switch granted {
                            case true?: outcome.granted += 1
                            case false?: break
                            case nil: outcome.errors += 1
                            }
                        }
                        return outcome
                    }
                }
            }
            for _ in 0..<min(concurrency, rounds) { startRound() }
            for await round in group {
                result.rounds += 1
                result.grants += round.granted
                result.errors += round.errors
                result.latencies += round.latencies
                if round.granted > 1 { result.doubleGrants += 1 }
                progress?(result.rounds)
                if next < rounds { startRound() }
            }
        }
        return result
    }
}

extension IncidentRace {
    /// Races through Baton: two clients (one per user, as two collab servers would have), connected to
    /// the first of `amqpURLs` (a cluster's nodes) that answers; each call may take `timeout`.
    public func runBaton(
        amqpURLs: [AMQPURL], partitioner: Partitioner, timeout: Duration = .seconds(5), runID: String, logger: Logger
    ) async throws -> Result {
        var configuration = BatonClientConfiguration(amqpURL: amqpURLs[0], partitioner: partitioner)
        configuration.timeout = timeout
        configuration.amqpAlternates = Array(amqpURLs.dropFirst())
        configuration.name = "baton demo"
        // Each user has their own connection, as two collab servers would.
        let clients = [BatonClient(configuration: configuration, logger: logger), BatonClient(configuration: configuration, logger: logger)]
        _ = try await clients[0].inspect("demo/\(runID)/warm-up")
        _ = try await clients[1].inspect("demo/\(runID)/warm-up")
        let result = await run(buffer: { "demo/\(runID)/\($0)" }) { user, buffer in
            switch try await clients[user].claim(buffer, user: "user-\(user)", connection: "demo-\(runID)-\(user)", lease: .seconds(60)) {
            case .granted: true
            case .denied: false
            }
        }
        for client in clients { await client.close() }
        return result
    }

    /// Races with the incident's check-then-act SQL on PostgreSQL (table `baton_demo_naive`), one
    /// connection per user.
    public func runNaive(url: PostgresURL, runID: String, logger: Logger) async throws -> Result {
        try await PostgresConnection.withConnection(to: url, logger: logger) { setup in
            try await setup.withSession { session in
                try session.execute(script: """
                    SET client_min_messages = warning;
                    CREATE TABLE IF NOT EXISTS baton_demo_naive (buffer text PRIMARY KEY, owner text, token bigint NOT NULL DEFAULT 0);
                    """)
            }
        }
        // The incident's code: "is it free?" then "make me the owner", one connection per user.
        var connections: [PostgresConnection] = []
        for _ in 0..<2 { connections.append(try await PostgresConnection.connect(to: url, logger: logger)) }
        let pool = connections
        let check = PreparedStatement(name: "demo_check", sql: "SELECT owner FROM baton_demo_naive WHERE buffer = $1")
        let act = PreparedStatement(name: "demo_act", sql: """
            INSERT INTO baton_demo_naive (buffer, owner, token) VALUES ($1, $2, 1)
            ON CONFLICT (buffer) DO UPDATE SET owner = $2, token = baton_demo_naive.token + 1
            """)
        let result = await run(buffer: { "demo/\(runID)/\($0)" }) { user, buffer in
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
