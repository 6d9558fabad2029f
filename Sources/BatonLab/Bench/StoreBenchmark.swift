import BatonCore
import BatonPostgres
import Foundation
import Logging

/// The ownership store alone (`baton bench-store`): claims per second with one request per transaction
/// against batches, in a scratch database (`<database>_bench_store`) on the same server.
public struct StoreBenchmark: Sendable {
    /// The PostgreSQL server.
    public var serverURL: PostgresURL
    public var partitioner: Partitioner
    /// Claims applied one per transaction, and in batches of `batchSize`.
    public var single = 3000
    public var batched = 50_000
    public var batchSize = 256
    let say: @Sendable (String) -> Void

    public init(serverURL: PostgresURL, partitioner: Partitioner, say: @escaping @Sendable (String) -> Void) {
        self.serverURL = serverURL
        self.partitioner = partitioner
        self.say = say
    }

    /// Runs both and returns the claims/s of each.
    public func run(logger: Logger) async throws -> (single: Double, batched: Double) {
        var scratch = serverURL
        scratch.database = serverURL.database + "_bench_store"
        try await ScratchDeployment.resetDatabase(scratch, server: serverURL, partitionCount: partitioner.count, logger: logger)
        let options = PostgresConnectionOptions(applicationName: "baton bench-store", planForKeyLookups: true)
        let rates = try await PostgresConnection.withConnection(to: scratch, options: options, logger: logger) { connection in
            let store = try await OwnershipStore.open(connection: connection, partitioner: partitioner, logger: logger)
            var epochs: [Int: Int64] = [:]
            for partition in 0..<partitioner.count { epochs[partition] = try await store.takePartition(partition, owner: "bench-store") }
            say("bench-store: \(partitioner.count) partitions, scratch database \(scratch)")
            let single = try await measure(store, label: "single", count: self.single, batchSize: 1, epochs: epochs)
            let batched = try await measure(store, label: "batched", count: self.batched, batchSize: batchSize, epochs: epochs)
            return (single, batched)
        }
        try await ScratchDeployment.dropDatabase(scratch, server: serverURL, logger: logger)
        return rates
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
                granted += result.replies.filter { $0?.status == .granted }.count
            }
        }
        guard granted == count else {
            throw ScratchError("only \(granted) of \(count) cold claims were granted")
        }
        let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        let rate = Double(count) / seconds
        say("  \(label): \(count) claims in \(batches.count) transactions, \(String(format: "%.2f", seconds)) s, \(Int(rate)) claims/s")
        return rate
    }
}
