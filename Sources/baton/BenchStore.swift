import ArgumentParser
import BatonCore
import BatonPostgres
import Foundation
import Logging

/// Measures the ownership store alone: claims per second with one request per
/// transaction against batches, in a scratch database on the same server.
struct BenchStore: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench-store",
        abstract: "Measure the store's claims/s, one request per transaction vs batches (uses a scratch database)."
    )

    @OptionGroup var database: DatabaseOptions

    @Option(help: "Claims applied one per transaction.")
    var single = 3000

    @Option(help: "Claims applied in batches.")
    var batched = 50_000

    @Option(name: .customLong("batch-size"), help: "Requests per batch, 1-10000.")
    var batchSize = 256

    func validate() throws {
        guard single >= 1, batched >= 1 else { throw ValidationError("--single and --batched must be at least 1, got \(single) and \(batched)") }
        guard (1...10_000).contains(batchSize) else { throw ValidationError("--batch-size \(batchSize) is not allowed: use 1 to 10000") }
    }

    func run() async throws {
        let logger = try database.logger("baton.bench-store")
        let partitioner = try database.partitioner()
        let serverURL = try database.databaseURL()
        var scratch = serverURL
        scratch.database = serverURL.database + "_bench_store"

        let admin = try await PostgresConnection.connect(to: serverURL, logger: logger)
        let name = scratch.database
        do {
            _ = try await admin.withSession { session in
                try session.query("DROP DATABASE IF EXISTS \(name)")
                try session.query("CREATE DATABASE \(name)")
            }
        } catch {
            await admin.close()
            throw RuntimeFailure("cannot create the scratch database '\(name)' on \(serverURL): \(error); use a --database-url whose user may create databases")
        }
        let connection = try await PostgresConnection.connect(
            to: scratch, options: PostgresConnectionOptions(applicationName: "baton bench-store", planForKeyLookups: true), logger: logger
        )
        try await Migrator.migrate(connection, partitionCount: partitioner.count, logger: logger)
        let store = try await OwnershipStore.open(connection: connection, partitioner: partitioner, logger: logger)
        var epochs: [Int: Int64] = [:]
        for partition in 0..<partitioner.count { epochs[partition] = try await store.takePartition(partition, owner: "bench-store") }

        print("bench-store: \(partitioner.count) partitions, scratch database \(scratch)")
        let singleRate = try await measure(store, label: "single", count: single, batchSize: 1, epochs: epochs)
        let batchRate = try await measure(store, label: "batched", count: batched, batchSize: batchSize, epochs: epochs)
        print("single_claims_per_s=\(Int(singleRate)) batch_size=\(batchSize) batched_claims_per_s=\(Int(batchRate)) ratio=\(String(format: "%.1f", batchRate / singleRate))")

        await connection.close()
        _ = try? await admin.withSession { session in try session.query("DROP DATABASE IF EXISTS \(name)") }
        await admin.close()
    }

    /// Applies `count` claims on cold buffers, `batchSize` per transaction and partition; returns claims/s.
    private func measure(_ store: OwnershipStore, label: String, count: Int, batchSize: Int, epochs: [Int: Int64]) async throws -> Double {
        var byPartition: [Int: [Request]] = [:]
        for index in 0..<count {
            let buffer = "bench/\(label)/\(index)"
            let request = Request(requestID: "\(label)-\(index)", command: .claim(
                buffer: buffer, holder: Holder(user: "bench", connection: "bench-\(index % 64)"), leaseMilliseconds: 60_000
            ))
            byPartition[store.partitioner.partition(of: buffer), default: []].append(request)
        }
        var batches: [(Int, [Request])] = []
        for (partition, requests) in byPartition {
            for start in stride(from: 0, to: requests.count, by: batchSize) {
                batches.append((partition, Array(requests[start..<min(start + batchSize, requests.count)])))
            }
        }
        let clock = ContinuousClock()
        var granted = 0
        let elapsed = try await clock.measure {
            for (partition, batch) in batches {
                let result = try await store.apply(batch, partition: partition, epoch: epochs[partition]!)
                granted += result.replies.filter { $0.status == .granted }.count
            }
        }
        guard granted == count else {
            throw RuntimeFailure("only \(granted) of \(count) cold claims were granted")
        }
        let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        let rate = Double(count) / seconds
        print("  \(label): \(count) claims in \(batches.count) transactions, \(String(format: "%.2f", seconds)) s, \(Int(rate)) claims/s")
        return rate
    }
}
