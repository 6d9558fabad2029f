import BatonCommandLine
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
        // The nodes of a cluster, as workers take them: the first that answers.
        let status = try await DeploymentStatus.read(
            databaseURL: try database.databaseURL(), amqpURLs: try broker.amqpURLs(.worker), partitioner: partitioner, logger: try database.logger("baton.status")
        )
        if json {
            print(try status.json())
            return
        }
        print("Baton at \(try database.databaseURL()): \(partitioner.count) partitions, schema version \(Migrator.latestVersion)")
        if let brokerError = status.brokerError { print("broker unreachable (queue columns empty): \(brokerError)") }
        if let broker = status.brokerURL { print("queues read through \(broker)") }
        for line in status.table() { print(line) }
    }
}
