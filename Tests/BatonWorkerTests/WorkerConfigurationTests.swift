@testable import BatonWorker
import Testing

/// Settings the worker derives from what it serves: pure, no broker or database.
@Suite struct WorkerConfigurationTests {
    /// One PostgreSQL connection per 16 partitions served, at least 1 and at most 4: partitions sharing a
    /// connection commit together (one WAL flush per group), which on a small machine costs PostgreSQL
    /// less per claim than more connections would (docs/benchmarks.md, ninth session).
    @Test func databaseConnectionsGrowWithThePartitionsServedUpToFour() {
        let served = [1, 2, 15, 16, 17, 32, 33, 48, 49, 64, 65, 1024]
        #expect(served.map(Worker.automaticDatabaseConnections(serving:)) == [1, 1, 1, 1, 2, 2, 3, 3, 4, 4, 4, 4])
    }
}
