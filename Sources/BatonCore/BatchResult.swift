// What the store hands back to the worker for a batch: plain values, so that the partition machine
// that consumes them stays free of the database's types.

/// An ownership change as stored in the outbox, with its row id.
public struct OutboxEntry: Sendable, Hashable {
    /// The outbox row id (ascending in commit order within a partition).
    public let id: Int64
    /// The partition.
    public let partition: Int
    /// The change.
    public let change: OwnershipChange

    /// The change with its position (its id), as events carry it.
    public var positioned: PositionedChange { PositionedChange(seq: id, partition: partition, change: change) }

    /// Creates an entry.
    public init(id: Int64, partition: Int, change: OwnershipChange) {
        self.id = id
        self.partition = partition
        self.change = change
    }
}

/// What applying one batch produced.
public struct BatchResult: Sendable {
    /// One reply per request, in the batch's order (nil for a claim that waits in line: it is answered
    /// when it leaves the line). A request id seen before gets its stored reply.
    public let replies: [Reply?]
    /// The ownership changes written to the outbox, in decision order.
    public let changes: [OutboxEntry]
    /// How many requests were answered from idempotency records instead of being decided.
    public let replayed: Int
    /// The answers to waiters that left their lines (granted or denied), already recorded under their
    /// request ids: to publish to their reply addresses.
    public var answers: [WaiterAnswer] = []
    /// Transaction attempts used (more than 1 after compare-and-set misses).
    public let attempts: Int
    /// How many partitions' batches were committed in the same transaction as this one (1: alone).
    public var groupSize = 1
    /// Whether the batch was decided from what the store remembers of its partition, without reading its
    /// rows first (docs/store.md, "Partition memory").
    public var fromMemory = false

    /// Creates a result.
    public init(replies: [Reply?], changes: [OutboxEntry], replayed: Int, attempts: Int) {
        self.replies = replies
        self.changes = changes
        self.replayed = replayed
        self.attempts = attempts
    }
}
