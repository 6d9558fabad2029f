import BatonCore
import BatonPostgres
import Testing

@Suite struct MigrationTests {
    @Test func concurrentMigrationsApplyEachVersionOnce() async throws {
        let url = try await TestDatabase.create()
        let results = try await withThrowingTaskGroup(of: [Int].self) { group in
            for _ in 0..<4 {
                group.addTask {
                    let connection = try await PostgresConnection.connect(to: url, logger: TestDatabase.logger)
                    let applied = try await Migrator.migrate(connection, partitionCount: 16, logger: TestDatabase.logger)
                    await connection.close()
                    return applied
                }
            }
            return try await group.reduce(into: []) { $0.append($1) }
        }
        #expect(results.flatMap { $0 }.sorted() == Migrator.migrations.map(\.version), "each migration applied exactly once: \(results)")

        let connection = try await PostgresConnection.connect(to: url, logger: TestDatabase.logger)
        #expect(try await Migrator.migrate(connection, partitionCount: 16, logger: TestDatabase.logger) == [], "a second run applies nothing")
        let rows = try await connection.withSession { session in
            (try session.query("SELECT count(*) FROM baton_partitions").first(), try session.query("SELECT count(*) FROM baton_schema_migrations").first())
        }
        #expect(rows.0 == "16")
        #expect(rows.1 == "\(Migrator.migrations.count)")
        await connection.close()
    }

    @Test func anotherPartitionCountIsRefusedNamingBoth() async throws {
        let url = try await TestDatabase.migrated(partitions: 16)
        let connection = try await PostgresConnection.connect(to: url, logger: TestDatabase.logger)
        let error = try await #require(throws: SchemaError.self) {
            try await Migrator.migrate(connection, partitionCount: 8, logger: TestDatabase.logger)
        }
        #expect(error.message.contains("16 partitions"))
        #expect(error.message.contains("asked for 8"))

        let storeError = try await #require(throws: SchemaError.self) {
            try await OwnershipStore.open(connection: connection, partitioner: try Partitioner(count: 32), logger: TestDatabase.logger)
        }
        #expect(storeError.message.contains("16") && storeError.message.contains("32"))
        await connection.close()
    }

    @Test func storeRefusesAnUnmigratedDatabase() async throws {
        let url = try await TestDatabase.create()
        let connection = try await PostgresConnection.connect(to: url, logger: TestDatabase.logger)
        let error = try await #require(throws: SchemaError.self) {
            try await OwnershipStore.open(connection: connection, partitioner: try Partitioner(count: 16), logger: TestDatabase.logger)
        }
        #expect(error.message.contains("baton migrate"))
        await connection.close()
    }
}
