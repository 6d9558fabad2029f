import BatonCore
import Metrics

/// The metrics of one partition, created once and labelled `partition` (swift-metrics; the
/// executable exports them with swift-prometheus).
struct PartitionMetrics: Sendable {
    let partition: Int
    private let dimensions: [(String, String)]
    /// Requests per batch.
    let batchSize: Recorder
    /// From taking a batch to having replied and acked it.
    let batchDuration: Metrics.Timer
    /// The store's transaction for a batch.
    let commitDuration: Metrics.Timer
    /// Replies published.
    let replies: Counter
    /// Times this worker lost the partition's fence.
    let fenceLosses: Counter
    /// The epoch this worker holds (0 when it does not hold the partition).
    let epoch: Gauge
    /// 1 while this worker is the partition's active consumer and holds its epoch.
    let active: Gauge
    /// Messages ready in the partition's queue (its backlog), sampled each sweep.
    let queueReady: Gauge
    /// Events published and confirmed.
    let events: Counter
    /// Leases expired by the sweep.
    let expired: Counter
    /// Claims waiting in the partition's lines, sampled each sweep.
    let waiters: Gauge
    /// Claims waiting in the partition's longest line (each holds at most ``ProtocolV1/maxLineLength``).
    let longestLine: Gauge
    /// Store transactions by how they were decided: `memory` (no read) or `read`.
    let memoryTransactions: Counter
    let readTransactions: Counter

    init(partition: Int) {
        self.partition = partition
        let dimensions = [("partition", String(partition))]
        self.dimensions = dimensions
        batchSize = Recorder(label: "baton_batch_size", dimensions: dimensions, aggregate: true)
        batchDuration = Metrics.Timer(label: "baton_batch_duration_seconds", dimensions: dimensions)
        commitDuration = Metrics.Timer(label: "baton_commit_duration_seconds", dimensions: dimensions)
        replies = Counter(label: "baton_replies_total", dimensions: dimensions)
        fenceLosses = Counter(label: "baton_fence_losses_total", dimensions: dimensions)
        epoch = Gauge(label: "baton_partition_epoch", dimensions: dimensions)
        active = Gauge(label: "baton_partition_active", dimensions: dimensions)
        queueReady = Gauge(label: "baton_queue_messages_ready", dimensions: dimensions)
        events = Counter(label: "baton_events_published_total", dimensions: dimensions)
        expired = Counter(label: "baton_leases_expired_total", dimensions: dimensions)
        waiters = Gauge(label: "baton_line_waiters", dimensions: dimensions)
        longestLine = Gauge(label: "baton_line_longest", dimensions: dimensions)
        memoryTransactions = Counter(label: "baton_store_transactions_total", dimensions: dimensions + [("decided_from", "memory")])
        readTransactions = Counter(label: "baton_store_transactions_total", dimensions: dimensions + [("decided_from", "read")])
    }

    /// Counts waiters that left their lines, by answer (`granted`: handed the buffer; `denied`: the wait
    /// ran out, or their connection was released).
    func lineAnswers(_ counts: [String: Int]) {
        for (status, count) in counts {
            Counter(label: "baton_line_answers_total", dimensions: dimensions + [("status", status)]).increment(by: count)
        }
    }

    /// Counts decided requests by operation and reply status.
    func requests(_ counts: [String: Int]) {
        for (key, count) in counts {
            let parts = key.split(separator: "|", maxSplits: 1).map(String.init)
            Counter(label: "baton_requests_total", dimensions: dimensions + [("op", parts[0]), ("status", parts[1])]).increment(by: count)
        }
    }

    /// Counts a request dead-lettered, by reason (the protocol error code).
    func deadLetter(_ reason: String) {
        Counter(label: "baton_dead_letters_total", dimensions: dimensions + [("reason", reason)]).increment()
    }
}

/// Worker-wide metrics.
enum WorkerMetrics {
    static let reconnects = Counter(label: "baton_amqp_reconnects_total")
    /// Reply connections replaced while the consumers went on (``ReplyLink``).
    static let replyReconnects = Counter(label: "baton_amqp_reply_reconnects_total")
    /// Replies not published because their address made the broker close the probe connection lately (``ReplyLink``).
    static let repliesDropped = Counter(label: "baton_replies_dropped_total")
    /// Reply senders (a broker node, or an address) refused after their reply closed the probe connection.
    static let replySendersRefused = Counter(label: "baton_reply_senders_refused_total")
    static let databaseRetries = Counter(label: "baton_database_retries_total")
    /// Idempotency records and events the worker's scheduled prune deleted (``WorkerConfiguration/prune``).
    static let pruned = Counter(label: "baton_pruned_rows_total")

    /// Creates the worker-wide counters (Swift makes a `static let` on first use), so that they are
    /// exported at 0 from the start: a counter that first appears at 1 hides that increment from
    /// Prometheus's `rate` and `increase`, which the alert rules use.
    static func register() {
        _ = [reconnects, replyReconnects, repliesDropped, replySendersRefused, databaseRetries, pruned]
    }
}
