import BatonCore

/// One partition as the store sees it (`baton status`).
public struct PartitionStatus: Sendable, Hashable {
    public var partition: Int
    /// The fencing epoch (bumped by every take).
    public var epoch: Int64
    /// The worker that took it last.
    public var owner: String?
    /// Leases held and not expired.
    public var liveHolders: Int
    /// Leases expired and not yet swept.
    public var expiredPending: Int
    /// Outbox rows not yet published (after the partition's delivered position).
    public var undeliveredEvents: Int
}

extension OwnershipStore {
    /// Every partition's epoch, owner and counts, after checking the schema and N.
    public static func status(on connection: PostgresConnection, partitionCount: Int) async throws -> [PartitionStatus] {
        try await connection.withSession { session in
            try Migrator.verify(session, partitionCount: partitionCount)
            return try session.query(SQL.partitionStatus).decode(from: "baton_partitions") { row in
                PartitionStatus(
                    partition: try row.decode(0, "partition"), epoch: try row.decode(1, "epoch"), owner: try row.optional(2, "owner"),
                    liveHolders: try row.decode(3, "live holder count"), expiredPending: try row.decode(4, "expired lease count"),
                    undeliveredEvents: try row.decode(5, "undelivered event count")
                )
            }
        }
    }

    /// The worker that took `partition` last, if any.
    public static func owner(of partition: Int, on connection: PostgresConnection) async throws -> String? {
        try await connection.withSession { session in
            try session.query(SQL.partitionOwner, [String(partition)]).decode(from: "baton_partitions") { try $0.optional(0, "owner") }.first ?? nil
        }
    }
}

extension SQL {
    static let partitionStatus = PreparedStatement(name: "baton_partition_status", sql: """
        SELECT p.partition, p.epoch, p.owner,
               (SELECT count(*) FROM baton_buffers b WHERE b.partition = p.partition
                    AND b.holder_connection IS NOT NULL AND b.expires_at > clock_timestamp()),
               (SELECT count(*) FROM baton_buffers b WHERE b.partition = p.partition
                    AND b.holder_connection IS NOT NULL AND b.expires_at <= clock_timestamp()),
               (SELECT count(*) FROM baton_outbox o WHERE o.partition = p.partition
                    AND o.id > coalesce((SELECT d.through FROM baton_outbox_delivery d WHERE d.partition = p.partition), 0))
        FROM baton_partitions p ORDER BY p.partition
        """)

    static let partitionOwner = PreparedStatement(name: "baton_partition_owner", sql: "SELECT owner FROM baton_partitions WHERE partition = $1")
}
