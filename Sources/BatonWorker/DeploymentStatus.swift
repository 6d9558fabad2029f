import BatonAMQP
import BatonCore
import BatonPostgres
import Foundation
import Logging

/// One row per partition of a deployment as `baton status` shows it: the store's view (epoch, owner,
/// leases, undelivered events) and the broker's (ready messages, consumers of the partition queue).
public struct DeploymentStatus: Sendable {
    public struct Row: Sendable, Encodable {
        public var store: PartitionStatus
        public var messagesReady: Int?
        public var consumers: Int?

        enum CodingKeys: String, CodingKey {
            case partition, epoch, owner, consumers
            case liveHolders = "live_holders"
            case expiredPending = "expired_pending"
            case undeliveredEvents = "undelivered_events"
            case messagesReady = "messages_ready"
        }

        public func encode(to encoder: any Encoder) throws {
            var container = encoder.container(keyedBy: CodingKeys.self)
            try container.encode(store.partition, forKey: .partition)
            try container.encode(store.epoch, forKey: .epoch)
            try container.encode(store.owner, forKey: .owner)  // null when never taken
            try container.encode(store.liveHolders, forKey: .liveHolders)
            try container.encode(store.expiredPending, forKey: .expiredPending)
            try container.encode(store.undeliveredEvents, forKey: .undeliveredEvents)
            try container.encode(messagesReady, forKey: .messagesReady)
            try container.encode(consumers, forKey: .consumers)
        }
    }

    /// The partitions, in order.
    public var rows: [Row]
    /// Why the broker's columns are empty, when it could not be reached.
    public var brokerError: String?
    /// The broker node the queue columns were read through.
    public var brokerURL: AMQPURL?

    /// Reads the store at `databaseURL` (checking the schema and N) and the partition queues through the
    /// first of `amqpURLs` (a cluster's nodes) that answers.
    public static func read(databaseURL: PostgresURL, amqpURLs: [AMQPURL], partitioner: Partitioner, logger: Logger) async throws -> DeploymentStatus {
        let count = partitioner.count
        let options = PostgresConnectionOptions(applicationName: "baton status")
        var status = DeploymentStatus(rows: try await PostgresConnection.withConnection(to: databaseURL, options: options, logger: logger) { connection in
            try await OwnershipStore.status(on: connection, partitionCount: count).map { Row(store: $0) }
        })
        do {
            let (connection, node) = try await AMQPConnection.connect(toFirstOf: amqpURLs, name: "baton status", logger: logger)
            status.brokerURL = amqpURLs[node]
            try await withClosing(connection, close: { await $0.close() }) { amqp in
                var channel = try await amqp.openChannel()
                for index in status.rows.indices {
                    do {
                        let queue = try await channel.inspectQueue(ProtocolV1.requestQueue(status.rows[index].store.partition))
                        status.rows[index].messagesReady = queue.messages
                        status.rows[index].consumers = queue.consumers
                    } catch let error as AMQPError where error.code == .channelClosed {
                        channel = try await amqp.openChannel()  // 404: the queue is missing (run baton topology)
                    }
                }
            }
        } catch {
            status.brokerError = "\(error)"
        }
        return status
    }

    /// What `baton status --json` prints: the rows, the node the queue columns came through (its password
    /// redacted) and why they are empty when the broker could not be reached (keys left out when nil).
    public func json() throws -> String {
        struct Output: Encodable {
            let partitions: [Row]
            let broker: String?
            let brokerError: String?

            enum CodingKeys: String, CodingKey {
                case partitions, broker
                case brokerError = "broker_error"
            }
        }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        return String(decoding: try encoder.encode(Output(partitions: rows, broker: brokerURL?.description, brokerError: brokerError)), as: UTF8.self)
    }

    /// The rows as a table, with a total line.
    public func table() -> [String] {
        func pad(_ value: some CustomStringConvertible, _ width: Int) -> String {
            let text = value.description
            return String(repeating: " ", count: max(0, width - text.count)) + text
        }
        var lines = ["partition  epoch  owner                 live  expired  undelivered  ready  consumers"]
        for row in rows {
            lines.append([
                pad(row.store.partition, 9), pad(row.store.epoch, 5), (row.store.owner ?? "-").padding(toLength: 20, withPad: " ", startingAt: 0),
                pad(row.store.liveHolders, 4), pad(row.store.expiredPending, 7), pad(row.store.undeliveredEvents, 11),
                pad(row.messagesReady.map(String.init) ?? "-", 5), pad(row.consumers.map(String.init) ?? "-", 9),
            ].joined(separator: "  "))
        }
        let live = rows.reduce(0) { $0 + $1.store.liveHolders }
        let pending = rows.reduce(0) { $0 + $1.store.expiredPending }
        lines.append("total: \(live) live holders, \(pending) expired leases awaiting the sweep")
        return lines
    }
}
