import ArgumentParser
import BatonAMQP
import BatonCore
import BatonPostgres
import Foundation

struct Status: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "One row per partition: queue backlog and consumers (broker), owner, epoch, live holders, expired leases, undelivered events (database)."
    )

    @OptionGroup var database: DatabaseOptions
    @OptionGroup var broker: BrokerOptions

    @Flag(help: "Print JSON instead of a table.")
    var json = false

    struct Row: Codable {
        var partition: Int
        var epoch: Int64
        var owner: String?
        var liveHolders: Int
        var expiredPending: Int
        var undeliveredEvents: Int
        var messagesReady: Int?
        var consumers: Int?

        enum CodingKeys: String, CodingKey {
            case partition, epoch, owner
            case liveHolders = "live_holders"
            case expiredPending = "expired_pending"
            case undeliveredEvents = "undelivered_events"
            case messagesReady = "messages_ready"
            case consumers
        }

        func encode(to encoder: any Encoder) throws {
            var container = encoder.container(keyedBy: CodingKeys.self)
            try container.encode(partition, forKey: .partition)
            try container.encode(epoch, forKey: .epoch)
            try container.encode(owner, forKey: .owner)  // null when never taken
            try container.encode(liveHolders, forKey: .liveHolders)
            try container.encode(expiredPending, forKey: .expiredPending)
            try container.encode(undeliveredEvents, forKey: .undeliveredEvents)
            try container.encode(messagesReady, forKey: .messagesReady)
            try container.encode(consumers, forKey: .consumers)
        }
    }

    func run() async throws {
        let logger = try database.logger("baton.status")
        let partitioner = try database.partitioner()
        let count = partitioner.count
        var rows = try await PostgresConnection.withConnection(to: try database.databaseURL(), options: .init(applicationName: "baton status"), logger: logger) { connection in
            try await OwnershipStore.status(on: connection, partitionCount: count).map { status in
                Row(
                    partition: status.partition, epoch: status.epoch, owner: status.owner, liveHolders: status.liveHolders,
                    expiredPending: status.expiredPending, undeliveredEvents: status.undeliveredEvents, messagesReady: nil, consumers: nil
                )
            }
        }
        // The broker's view: a passive declare per partition queue (ready messages, consumers).
        var brokerError: String?
        do {
            try await AMQPConnection.withConnection(to: try broker.amqpURL(.worker), name: "baton status", logger: logger) { amqp in
                var channel = try await amqp.openChannel()
                for index in rows.indices {
                    do {
                        let queue = try await channel.inspectQueue(ProtocolV1.requestQueue(rows[index].partition))
                        rows[index].messagesReady = queue.messages
                        rows[index].consumers = queue.consumers
                    } catch let error as AMQPError where error.code == .channelClosed {
                        channel = try await amqp.openChannel()  // 404: the queue is missing (run baton topology)
                    }
                }
            }
        } catch {
            brokerError = "\(error)"
        }
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            print(String(decoding: try encoder.encode(["partitions": rows]), as: UTF8.self))
            return
        }
        print("Baton at \(try database.databaseURL()): \(count) partitions, schema version \(Migrator.latestVersion)")
        if let brokerError { print("broker unreachable (queue columns empty): \(brokerError)") }
        print("partition  epoch  owner                 live  expired  undelivered  ready  consumers")
        for row in rows {
            print([
                pad(row.partition, 9), pad(row.epoch, 5), (row.owner ?? "-").padding(toLength: 20, withPad: " ", startingAt: 0),
                pad(row.liveHolders, 4), pad(row.expiredPending, 7), pad(row.undeliveredEvents, 11),
                pad(row.messagesReady.map(String.init) ?? "-", 5), pad(row.consumers.map(String.init) ?? "-", 9),
            ].joined(separator: "  "))
        }
        let live = rows.reduce(0) { $0 + $1.liveHolders }
        let pending = rows.reduce(0) { $0 + $1.expiredPending }
        print("total: \(live) live holders, \(pending) expired leases awaiting the sweep")
    }
}

/// `value` right-aligned in `width` columns.
func pad(_ value: some CustomStringConvertible, _ width: Int) -> String {
    let text = value.description
    return String(repeating: " ", count: max(0, width - text.count)) + text
}
