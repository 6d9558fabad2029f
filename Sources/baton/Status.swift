import BatonOperations
import ArgumentParser
import BatonPostgres
import BatonWorker
import Foundation

struct Status: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "One row per partition: queue backlog and consumers (broker), owner, epoch, live holders, expired leases, undelivered events (database)."
    )

    @OptionGroup var database: DatabaseOptions
    @OptionGroup var broker: BrokerOptions

    @Flag(help: "Print JSON instead of a table.")
    var json = false

    func run() async throws {
        let partitioner = try database.partitioner()
        let status = try await DeploymentStatus.read(
            databaseURL: try database.databaseURL(), amqpURL: try broker.amqpURL(.worker), partitioner: partitioner, logger: try database.logger("baton.status")
        )
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            print(String(decoding: try encoder.encode(["partitions": status.rows]), as: UTF8.self))
            return
        }
        print("Baton at \(try database.databaseURL()): \(partitioner.count) partitions, schema version \(Migrator.latestVersion)")
        if let brokerError = status.brokerError { print("broker unreachable (queue columns empty): \(brokerError)") }
        for line in status.table() { print(line) }
    }
}
