import BatonCommandLine
import ArgumentParser
import BatonLab
import Foundation

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
        var benchmark = StoreBenchmark(serverURL: try database.databaseURL(), partitioner: try database.partitioner(), say: { say($0) })
        benchmark.single = single
        benchmark.batched = batched
        benchmark.batchSize = batchSize
        let rates = try await benchmark.run(logger: try database.logger("baton.bench-store"))
        say("single_claims_per_s=\(Int(rates.single)) batch_size=\(batchSize) batched_claims_per_s=\(Int(rates.batched)) ratio=\(String(format: "%.1f", rates.batched / rates.single))")
    }
}
