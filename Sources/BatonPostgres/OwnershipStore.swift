import BatonCore
import Logging
import Synchronization

/// Errors of the ownership store.
public struct StoreError: Error, Sendable, Hashable, CustomStringConvertible {
    /// What kind of failure this is; extensible.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private let name: String
        private init(_ name: String) { self.name = name }

        /// Another worker took the partition (its epoch is newer): stop consuming it. Nothing was written.
        public static let partitionOwnershipLost = Code("partition ownership lost")
        /// The partition does not exist in this deployment.
        public static let unknownPartition = Code("unknown partition")
        /// Concurrent writers kept changing the batch's buffers; nothing was written.
        public static let contention = Code("contention")
        /// A retention shorter than the minimum.
        public static let invalidArgument = Code("invalid argument")

        public var description: String { name }
    }

    /// What kind of failure this is.
    public let code: Code
    /// The partition concerned.
    public let partition: Int
    /// A message for a person.
    public let message: String

    public var description: String { "\(code) (partition \(partition)): \(message)" }
}

/// The PostgreSQL backstop: fenced, batched, idempotent ownership decisions, one partition at a time.
///
/// Decisions are BatonCore's ``PartitionState``; this type reads the rows a batch
/// touches, runs the decisions in queue order at database time, and writes the
/// result in one transaction guarded by the partition epoch and a per-buffer
/// compare-and-set on (token, version).
public final class OwnershipStore: Sendable {
    /// The connection the store uses; one store per connection.
    public let connection: PostgresConnection
    /// The deployment's partitioner (N).
    public let partitioner: Partitioner
    /// How many times a batch is retried after compare-and-set misses before failing with ``StoreError/Code/contention``.
    public let maxAttempts: Int
    private let logger: Logger
    /// Batches of the partitions sharing the connection, waiting for it (see ``apply(_:partition:epoch:)``).
    private let waiting = Mutex(WaitingBatches())
    /// What the store remembers of each partition it writes, by partition (docs/store.md, "Partition memory").
    private let memory = Mutex<[Int: PartitionMemory]>([:])
    /// The lease sweep's schedule of each partition this store writes (``ExpirySchedule``), by epoch.
    private let schedules = Mutex<[Int: ExpirySchedule]>([:])
    /// The database clock as each partition's last sweep read it, and when (to pick the due leases).
    private let sweepClock = Mutex<[Int: (database: Timestamp, local: ContinuousClock.Instant)]>([:])
    /// The names of each partition's stored buffers, by partition, loaded once per epoch and kept when the
    /// memory is forgotten (a failed write inserted nothing; one whose outcome is unknown may have, and the
    /// insert's compare-and-set catches a name missing here).
    private let names = Mutex<[Int: KnownNames]>([:])
    /// The most buffer names loaded into a partition's filter; a partition with more decides buffers it
    /// does not remember from a read.
    public static let maxFilterNames = 1_000_000

    private struct KnownNames {
        let epoch: Int64
        /// Nil when the partition has more names than ``OwnershipStore/maxFilterNames``.
        var filter: BufferFilter?
    }
    /// The most buffers without a line remembered per partition (buffers with a line are always remembered).
    public let memoryLimit: Int
    /// How long a replica id stays reserved for its user after the membership expired or its connection
    /// was released (docs/design/replica-slots.md).
    public let memberGraceMilliseconds: Int64
    /// The default of ``memoryLimit``.
    public static let defaultMemoryLimit = 16_384

    /// The shortest idempotency retention allowed: twice the longest a request can live
    /// (``ProtocolV1/maxRequestLifetimeMilliseconds``, enforced by its deadline and the queues' message
    /// TTL), so a repeat of any request still finds its original reply.
    public static let minimumRetention: Duration = .milliseconds(2 * ProtocolV1.maxRequestLifetimeMilliseconds)

    /// Creates a store over an open connection after checking the schema and N.
    public static func open(
        connection: PostgresConnection, partitioner: Partitioner, maxAttempts: Int = 8, memoryLimit: Int = OwnershipStore.defaultMemoryLimit,
        memberGraceMilliseconds: Int64 = Roster.defaultGraceMilliseconds, logger: Logger = Logger(label: "baton.store")
    ) async throws -> OwnershipStore {
        let count = partitioner.count
        try await connection.withSession { session in try Migrator.verify(session, partitionCount: count) }
        return OwnershipStore(
            connection: connection, partitioner: partitioner, maxAttempts: maxAttempts, memoryLimit: memoryLimit,
            memberGraceMilliseconds: memberGraceMilliseconds, logger: logger
        )
    }

    private init(connection: PostgresConnection, partitioner: Partitioner, maxAttempts: Int, memoryLimit: Int, memberGraceMilliseconds: Int64, logger: Logger) {
        self.connection = connection
        self.partitioner = partitioner
        self.maxAttempts = maxAttempts
        self.memoryLimit = max(1, memoryLimit)
        self.memberGraceMilliseconds = max(0, memberGraceMilliseconds)
        self.logger = logger
    }

    // MARK: - Partition fencing

    /// Takes `partition` by bumping its epoch (steal) and returns the new epoch.
    ///
    /// Waits for batches of the previous owner that are in flight (each is one statement, so it never
    /// waits on the previous owner's process; worker connections bound the wait with `lock_timeout`);
    /// after it returns, every batch fenced with an older epoch fails with
    /// ``StoreError/Code/partitionOwnershipLost``.
    public func takePartition(_ partition: Int, owner: String) async throws -> Int64 {
        let count = partitioner.count
        // A new epoch: what was remembered under the old one is never used again.
        forget([partition])
        names.withLock { $0[partition] = nil }
        schedules.withLock { $0[partition] = nil }
        let epoch = try await connection.withSession { session in
            let rows = try session.query(SQL.takePartition, [String(partition), owner])
            guard let epoch = rows.first().flatMap(Int64.init) else {
                throw StoreError(code: .unknownPartition, partition: partition, message: "partition \(partition) does not exist: this deployment has partitions 0-\(count - 1)")
            }
            return epoch
        }
        // The epoch's schedule collects the leases of its writes from now on; its first sweep adds the
        // rows' leases (a write whose outcome was unknown may commit after that read: its entry is here).
        schedules.withLock { $0[partition] = ExpirySchedule(epoch: epoch, leases: [], loaded: false) }
        return epoch
    }

    // MARK: - Batches

    /// Applies `requests` (in queue order) for `partition` as owner of `epoch`, all or nothing.
    ///
    /// Partitions sharing this store's connection commit together: the batches that wait for the
    /// connection when it comes free are applied in one transaction (one WAL flush for all of them, see
    /// ``maxGroupRequests``). When anything in that transaction fails (a lost fence, a compare-and-set
    /// miss, a refused write), nothing of it was written and each batch is applied again on its own,
    /// with its own retries and its own error.
    ///
    /// - Throws: ``StoreError`` with ``StoreError/Code/partitionOwnershipLost`` when the epoch is
    ///   stale (nothing written), ``StoreError/Code/contention`` after repeated compare-and-set
    ///   misses, or a ``PostgresError``.
    public func apply(_ requests: [Request], partition: Int, epoch: Int64) async throws -> BatchResult {
        try await withCheckedThrowingContinuation { continuation in
            apply(requests, partition: partition, epoch: epoch) { continuation.resume(with: $0) }
        }
    }

    /// Applies `requests` as ``apply(_:partition:epoch:)`` does, without suspending the caller:
    /// `completion` runs on the connection's thread with the result (it must not block).
    public func apply(
        _ requests: [Request], partition: Int, epoch: Int64, completion: @escaping @Sendable (Result<BatchResult, any Error>) -> Void
    ) {
        let schedule = waiting.withLock { waiting in
            waiting.batches.append(WaitingBatch(requests: requests, partition: partition, epoch: epoch, completion: completion))
            defer { waiting.scheduled = true }
            return !waiting.scheduled
        }
        if schedule { scheduleGroup() }
    }

    /// The most requests one group transaction takes; batches beyond it wait for the next one.
    public static let maxGroupRequests = 1024

    /// The batches waiting for the connection, and whether a job that takes them is queued.
    private struct WaitingBatches {
        var batches: [WaitingBatch] = []
        var scheduled = false
    }

    /// A batch waiting for the connection.
    private struct WaitingBatch: Sendable {
        let requests: [Request]
        let partition: Int
        let epoch: Int64
        let completion: @Sendable (Result<BatchResult, any Error>) -> Void
    }

    /// Queues one job that applies what waits when it runs.
    private func scheduleGroup() {
        connection.submit { [self] session in
            let (group, more) = waiting.withLock { waiting -> ([WaitingBatch], Bool) in
                var count = 0
                var taken = 0
                while taken < waiting.batches.count, taken == 0 || count + waiting.batches[taken].requests.count <= Self.maxGroupRequests {
                    count += waiting.batches[taken].requests.count
                    taken += 1
                }
                let group = Array(waiting.batches.prefix(taken))
                waiting.batches.removeFirst(taken)
                // With nothing left, the next batch to arrive (maybe from a completion below) queues a job.
                waiting.scheduled = !waiting.batches.isEmpty
                return (group, waiting.scheduled)
            }
            // Batches that did not fit go in the next job; so do those that arrive meanwhile.
            defer { if more { scheduleGroup() } }
            switch session {
            case .failure(let error):
                for batch in group { batch.completion(.failure(error)) }
            case .success(let session):
                applyGroup(group.sorted { $0.partition < $1.partition }, session)
            }
        }
    }

    private func applyGroup(_ group: [WaitingBatch], _ session: PostgresSession) {
        for attempt in 1...2 {
            do {
                let results = try applyPipelined(group, session)
                for (batch, result) in zip(group, results) { batch.completion(result) }
                return
            } catch let error as PostgresError where error.code == .connectionLost || error.code == .closed {
                // The outcome is unknown: what is remembered may not be what the database holds.
                forget(group.map(\.partition))
                for batch in group { batch.completion(.failure(error)) }
                return
            } catch {
                // Nothing of the group was written. Most often a batch decided from memory held a repeat (its
                // record was taken) or met a stale entry: forget the group's partitions, and the same group,
                // decided from reads this time, answers it. If that fails too (a lost fence, a write the
                // database refuses), each batch is decided alone, with its own retries and its own error.
                forget(group.map(\.partition))
                logger.debug("a group write failed", metadata: [
                    "baton.batches": "\(group.count)", "baton.attempt": "\(attempt)", "baton.error": "\(error)",
                ])
                if group.count == 1 { break }
            }
        }
        for batch in group {
            batch.completion(Result {
                try retrying(session, partition: batch.partition, what: "the batch of \(batch.requests.count) requests") { session, attempt in
                    try applyOnce(session, batch, attempt: attempt)
                }
            })
        }
    }

    /// Runs `body` on the store's connection, retrying from a fresh read
    /// after a compare-and-set miss, a deadlock or a serialization failure (each wrote nothing).
    private func retrying<T: Sendable>(
        partition: Int, what: String, _ body: @escaping @Sendable (PostgresSession, _ attempt: Int) throws -> T
    ) async throws -> T {
        try await connection.withSession { [self] session in try retrying(session, partition: partition, what: what, body) }
    }

    private func retrying<T>(_ session: PostgresSession, partition: Int, what: String, _ body: (PostgresSession, _ attempt: Int) throws -> T) throws -> T {
        for attempt in 1...maxAttempts {
            do {
                return try body(session, attempt)
            } catch let miss as CompareAndSetMiss {
                logger.debug("compare-and-set missed; retrying", metadata: [
                    "baton.partition": "\(partition)", "baton.attempt": "\(attempt)", "baton.missed": "\(miss.missed)",
                ])
            } catch let error as PostgresError where error.code == .server && error.isTransient {
                logger.debug("transaction aborted by the server; retrying", metadata: [
                    "baton.partition": "\(partition)", "baton.attempt": "\(attempt)", "baton.sqlstate": "\(error.sqlState ?? "")",
                ])
            }
        }
        throw StoreError(code: .contention, partition: partition, message: "\(what) lost \(maxAttempts) compare-and-set races in a row; nothing was written")
    }

    /// One batch alone: read, decide, write. Its partition's memory was forgotten before (the group it came
    /// in failed), so nothing is remembered; the next group loads it again.
    private func applyOnce(_ session: PostgresSession, _ batch: WaitingBatch, attempt: Int) throws -> BatchResult {
        forget([batch.partition])
        let (read, parameters) = BatchRead.statement(for: batch.requests, partition: batch.partition)
        let plan = try BatchPlan(read: session.query(read, parameters), requests: batch.requests, partition: batch.partition, epoch: batch.epoch, partitioner: partitioner, grace: memberGraceMilliseconds)
        noteInserted(plan.write, epoch: batch.epoch)
        noteLeases(plan.write, epoch: batch.epoch)
        return plan.result(outboxIDs: try plan.write(session), attempt: attempt)
    }

    /// Applies several partitions' batches with as few round trips as it can: a batch its partition's memory
    /// can decide is only written; the others are read first (all reads in one pipeline, with the lines of
    /// a partition whose memory is not loaded yet), and then every write goes in one pipeline, which commits
    /// them in one implicit transaction (one WAL flush). Throws when a statement failed (nothing was
    /// written; the caller applies each batch alone); a batch whose own outcome is an error (its fence was
    /// lost) gets it in its place.
    private func applyPipelined(_ group: [WaitingBatch], _ session: PostgresSession) throws -> [Result<BatchResult, any Error>] {
        let partitioner = self.partitioner
        var plans: [BatchPlan?] = group.map { memoryPlan($0, at: .now) }
        var statements: [(PreparedStatement, [String?])] = []
        var reading: [(index: Int, loads: Bool, loadsNames: Bool)] = []
        for index in group.indices where plans[index] == nil {
            let batch = group[index]
            let loads = !remembers(batch.partition, epoch: batch.epoch)
            let loadsNames = !knowsNames(batch.partition, epoch: batch.epoch)
            if loads { statements.append((SQL.loadLines, [String(batch.partition)])) }
            if loadsNames { statements.append((SQL.loadNames, [String(batch.partition), String(Self.maxFilterNames + 1)])) }
            statements.append(BatchRead.statement(for: batch.requests, partition: batch.partition))
            reading.append((index, loads, loadsNames))
        }
        if !statements.isEmpty {
            let reads = try session.pipeline(statements)
            let readAt = ContinuousClock.now
            var next = reads.makeIterator()
            for (index, loads, loadsNames) in reading {
                let batch = group[index]
                if loads, let lines = next.next() { try load(lines.get(), partition: batch.partition, epoch: batch.epoch, at: readAt) }
                if loadsNames, let stored = next.next() { try loadNames(stored.get(), partition: batch.partition, epoch: batch.epoch) }
                guard let read = next.next() else { throw PostgresError(code: .unexpectedResult, message: "a read pipeline returned fewer results than it had statements") }
                let plan = try BatchPlan(read: read.get(), requests: batch.requests, partition: batch.partition, epoch: batch.epoch, partitioner: partitioner, grace: memberGraceMilliseconds)
                noteRead(plan, partition: batch.partition, epoch: batch.epoch, at: readAt)
                plans[index] = plan
            }
        }
        let decided = plans.map { $0! }
        let writing = decided.indices.filter { !decided[$0].write.isEmpty }
        for index in writing {
            noteInserted(decided[index].write, epoch: group[index].epoch)
            noteLeases(decided[index].write, epoch: group[index].epoch)
        }
        let writes = try session.pipeline(writing.map { (decided[$0].write.statement, decided[$0].write.parameters) })
        let writtenAt = ContinuousClock.now
        var rows: [Int: PostgresRow] = [:]
        for (index, write) in zip(writing, writes) { rows[index] = PostgresRow(try write.get().rows.first ?? [], source: "the batch write") }
        return group.indices.map { index in
            Result {
                let plan = decided[index]
                do {
                    let written = try rows[index].map(plan.write.check)
                    remember(plan, partition: group[index].partition, epoch: group[index].epoch, clock: written?.clock, at: writtenAt)
                    var result = plan.result(outboxIDs: written?.ids ?? [], attempt: 1)
                    result.groupSize = group.count
                    return result
                } catch {
                    forget([group[index].partition])
                    throw error
                }
            }
        }
    }

    // MARK: - Partition memory

    /// Whether the store remembers `partition` as owner of `epoch` (its lines are loaded).
    private func remembers(_ partition: Int, epoch: Int64) -> Bool {
        memory.withLock { $0[partition]?.epoch == epoch }
    }

    /// Whether the store has the names of `partition`'s buffers for `epoch`.
    private func knowsNames(_ partition: Int, epoch: Int64) -> Bool {
        names.withLock { $0[partition]?.epoch == epoch }
    }

    /// Loads a partition's buffer names (``SQL/loadNames``) into a filter, or notes that it has too many.
    private func loadNames(_ rows: PostgresRows, partition: Int, epoch: Int64) throws {
        let stored = try rows.decode(from: "the buffer names of partition \(partition)") { ExactString(try $0.decode(0, "buffer")) }
        var filter: BufferFilter?
        if stored.count <= Self.maxFilterNames {
            var names = BufferFilter(expected: stored.count * 2)
            for name in stored { names.insert(name) }
            filter = names
        }
        names.withLock { $0[partition] = KnownNames(epoch: epoch, filter: filter) }
    }

    /// Forgets what the store remembers of `partitions`: their next batch loads their lines and reads.
    private func forget(_ partitions: [Int]) {
        memory.withLock { memories in
            for partition in partitions { memories[partition] = nil }
        }
    }

    /// Loads a partition's memory from ``SQL/loadLines`` (every line of the partition and its buffer),
    /// read at or before `local`. Leaves it unloaded when the epoch is not `epoch` (the batch read that
    /// follows fails the batch).
    private func load(_ rows: PostgresRows, partition: Int, epoch: Int64, at local: ContinuousClock.Instant) throws {
        var fence: (epoch: Int64?, clock: Timestamp)?
        var buffers: [ExactString: RememberedBuffer] = [:]
        var waiters: [WaiterRow] = []
        for row in try rows.decode(from: "the lines of partition \(partition)", BatchReadRow.init) {
            switch row {
            case .fence(let epoch, let clock): fence = (epoch, clock)
            case .buffer(let buffer): buffers[buffer.buffer] = RememberedBuffer(state: buffer.state, version: buffer.version)
            case .waiter(let waiter): waiters.append(waiter)
            case .stored: break
            }
        }
        guard let fence, fence.epoch == epoch else { return }
        for (buffer, line) in WaiterRow.lines(waiters) { buffers[buffer]?.state.line = line }
        var loaded = PartitionMemory(epoch: epoch, lines: buffers, limit: memoryLimit)
        loaded.read(clock: fence.clock, at: local)
        memory.withLock { $0[partition] = loaded }
    }

    /// A batch of `partition` was decided from a read at `local`: its clock reading and decision time.
    private func noteRead(_ plan: BatchPlan, partition: Int, epoch: Int64, at local: ContinuousClock.Instant) {
        memory.withLock { memories in
            guard memories[partition]?.epoch == epoch else { return }
            memories[partition]?.read(clock: plan.now, at: local)
        }
    }

    /// A batch (or sweep) of `partition` was written (or had nothing to write): remember the buffers as it
    /// left them, and the database clock the write read (at or before `local`).
    private func remember(_ plan: BatchPlan, partition: Int, epoch: Int64, clock: Timestamp?, at local: ContinuousClock.Instant) {
        memory.withLock { memories in
            guard memories[partition]?.epoch == epoch else { return }
            guard let remembered = plan.remembered else {
                memories[partition] = nil
                return
            }
            memories[partition]?.remember(remembered)
            memories[partition]?.recorded(plan.write.records.map(\.id))
            memories[partition]?.decided(at: plan.now)
            if let clock { memories[partition]?.read(clock: clock, at: local) }
        }
    }

    /// Adds the names `write` inserts to its partition's filter, before it is sent: whether it commits,
    /// fails or ends with its outcome unknown, the filter never lacks a stored name through it (a name
    /// that was not stored after all only costs a read).
    private func noteInserted(_ write: BatchWrite, epoch: Int64) {
        let inserted = write.buffers.filter { $0.expectedVersion == 0 }.map(\.buffer)
        guard !inserted.isEmpty else { return }
        names.withLock { known in
            guard known[write.partition]?.epoch == epoch, var filter = known[write.partition]?.filter else { return }
            known[write.partition]?.filter = nil  // uniquely referenced while it is changed
            for name in inserted where !filter.mightContain(name) { filter.insert(name) }
            // Past a tenth of its bits, the filter's false positives grow: load a larger one.
            known[write.partition] = filter.isFull ? nil : KnownNames(epoch: epoch, filter: filter)
        }
    }

    /// Schedules the leases `write` makes that the schedule may not cover (``BatchWrite/leases``: grants,
    /// and leases that now end earlier), before it is sent: whether it commits, fails or ends with its
    /// outcome unknown, the sweep never lacks a lease through it (one that was not made after all only
    /// costs a look at its row). A renewal to a later end needs no entry: the lease's own is due earlier.
    private func noteLeases(_ write: BatchWrite, epoch: Int64) {
        guard !write.leases.isEmpty else { return }
        schedules.withLock { schedules in
            guard schedules[write.partition]?.epoch == epoch else { return }
            for lease in write.leases { schedules[write.partition]?.add(lease.buffer, lease.end) }
        }
    }

    /// The batch decided from what the store remembers of its partition, without a read; nil when the
    /// memory cannot decide it: not loaded for this epoch, a clock reading too old, a buffer not
    /// remembered, a `release_connection` (it concerns buffers by holder), or a request the decision
    /// answers without a record of its own (a repeat must be told apart by its record, which only a read
    /// or a conflicting write shows).
    private func memoryPlan(_ batch: WaitingBatch, at local: ContinuousClock.Instant) -> BatchPlan? {
        let partitioner = self.partitioner
        let filter = names.withLock { known in known[batch.partition].flatMap { $0.epoch == batch.epoch ? $0.filter : nil } }
        return memory.withLock { memories -> BatchPlan? in
            guard let memory = memories[batch.partition], memory.epoch == batch.epoch, let now = memory.now(at: local) else { return nil }
            var initial: [ExactString: BufferState] = [:]
            var versions: [ExactString: Int64] = [:]
            var unstored: Set<ExactString> = []
            for request in batch.requests {
                // A resend or redelivery of a request recorded lately: its record answers it, from a read
                // (decided from memory, it would abort the group's write on its taken record).
                guard let name = request.buffer, !memory.recorded(ExactString(request.requestID)) else { return nil }
                let buffer = ExactString(name)
                if let remembered = memory[buffer] {
                    initial[buffer] = remembered.state
                    versions[buffer] = remembered.version
                } else if let filter, !filter.mightContain(buffer) {
                    // Never stored, as far as the filter knows: a buffer nobody ever claimed.
                    initial[buffer] = .fresh
                    versions[buffer] = 0
                    unstored.insert(buffer)
                } else {
                    return nil
                }
            }
            let plan = BatchPlan(
                requests: batch.requests, partition: batch.partition, epoch: batch.epoch, now: now, initial: initial, versions: versions,
                recorded: [:], waiting: memory.lined.isEmpty ? [:] : memory.waiting, partitioner: partitioner, grace: memberGraceMilliseconds, fromMemory: true
            )
            guard plan.decision.unrecorded == 0 else { return nil }
            // What the filter says is only trusted where the write checks it: every buffer taken as never
            // stored must be inserted by this write (only if still absent, or the write aborts). A decision
            // that writes no such buffer (an inspect, a renewal or a release of an unknown name) is read.
            if !unstored.isEmpty {
                let inserted = Set(plan.write.buffers.filter { $0.expectedVersion == 0 }.map(\.buffer))
                guard unstored.isSubset(of: inserted) else { return nil }
            }
            memories[batch.partition]?.decided(at: now)
            return plan
        }
    }

    /// The batch read: one statement that locks nothing and reads the partition's epoch, the replies
    /// already given to these request ids (redeliveries, client retries), the rows the batch touches,
    /// and the clock.

    /// A batch decided (from a read or from memory, by BatonCore's ``PartitionState/decideBatch(_:at:recorded:waiting:)``),
    /// and what to write (buffers by compare-and-set, idempotency records, outbox rows) in one fenced statement.
    private struct BatchPlan {
        /// The database time of the decisions.
        let now: Timestamp
        let decision: BatchDecision
        /// What the batch writes.
        let write: BatchWrite
        /// The buffers as the write leaves them, with their versions then; nil when the plan saw only part
        /// of some buffer's line (`release_connection` reads the buffers of a connection's waiters with
        /// that connection's waiters only), so that the partition's memory must be forgotten instead.
        let remembered: [ExactString: RememberedBuffer]?
        /// Whether the batch was decided from memory, without a read.
        let fromMemory: Bool

        /// Decides `requests` over `initial` (the touched buffers as read or remembered, with their row `versions`).
        init(
            requests: [Request], partition: Int, epoch: Int64, now: Timestamp, initial: [ExactString: BufferState], versions: [ExactString: Int64],
            recorded: [ExactString: RecordedReply], waiting: [ExactString: ExactString], partitioner: Partitioner, grace: Int64, fromMemory: Bool
        ) {
            var state = PartitionState(partition: partition, partitioner: partitioner, buffers: initial, graceMilliseconds: grace)
            // From memory, `now` trails the database's clock by up to the memory's margin (and the drift
            // of a reading at most a second old): deadlines are checked against the latest it may be.
            let latest = fromMemory ? now.adding(milliseconds: PartitionMemory.clockMarginMilliseconds + PartitionMemory.clockDriftMilliseconds) : nil
            decision = state.decideBatch(requests, at: now, recorded: recorded, waiting: waiting, latest: latest)
            self.now = now
            self.fromMemory = fromMemory
            let changed = Self.changedWrite(
                partition: partition, epoch: epoch, now: now, initial: initial, versions: versions, after: state.buffers,
                records: decision.records, changes: decision.changes
            )
            write = changed.write
            if requests.contains(where: { if case .releaseConnection = $0.command { true } else { false } }) {
                remembered = nil
            } else {
                var remembered = changed.remembered
                // Buffers read and found absent: remembered as never claimed (row version 0).
                for name in requests.compactMap(\.buffer) where remembered[ExactString(name)] == nil {
                    remembered[ExactString(name)] = RememberedBuffer(state: .fresh, version: 0)
                }
                self.remembered = remembered
            }
        }

        /// Decides `requests` from the batch read's rows.
        init(read: PostgresRows, requests: [Request], partition: Int, epoch: Int64, partitioner: Partitioner, grace: Int64) throws {
            var fence: (epoch: Int64?, clock: Timestamp)?
            var recorded: [ExactString: RecordedReply] = [:]
            var initial: [ExactString: BufferState] = [:]
            var versions: [ExactString: Int64] = [:]
            var waiters: [WaiterRow] = []
            for row in try read.decode(from: "the batch read of partition \(partition)", BatchReadRow.init) {
                switch row {
                case .fence(let epoch, let clock): fence = (epoch, clock)
                case .stored(let id, let reply, let fingerprint): recorded[id] = RecordedReply(reply: reply, fingerprint: fingerprint)
                case .buffer(let buffer):
                    initial[buffer.buffer] = buffer.state
                    versions[buffer.buffer] = buffer.version
                case .waiter(let waiter):
                    waiters.append(waiter)
                }
            }
            for (buffer, line) in WaiterRow.lines(waiters) { initial[buffer]?.line = line }
            guard let fence else {
                throw PostgresError(code: .unexpectedResult, message: "the batch read of partition \(partition) returned no fence row")
            }
            try OwnershipStore.checkEpoch(fence.epoch, partition: partition, epoch: epoch)
            self.init(
                requests: requests, partition: partition, epoch: epoch, now: fence.clock, initial: initial, versions: versions, recorded: recorded,
                // The request ids of claims waiting in line, with their buffers.
                waiting: Dictionary(waiters.map { (ExactString($0.waiter.requestID), $0.buffer) }, uniquingKeysWith: { first, _ in first }),
                partitioner: partitioner, grace: grace, fromMemory: false
            )
        }

        /// A sweep's plan: the buffers it changed (from `initial` to `after`), its changes, and the answers
        /// to waiters it settled (recorded under their request ids), no replies.
        init(
            partition: Int, epoch: Int64, now: Timestamp, initial: [ExactString: BufferState], versions: [ExactString: Int64],
            after: [ExactString: BufferState], changes: [AttributedChange], answers: [WaiterAnswer] = []
        ) {
            var decision = BatchDecision()
            decision.answers = answers
            decision.records = answers.map { RequestRecord(id: $0.waiter.requestID, reply: $0.reply, fingerprint: $0.waiter.fingerprint) }
            decision.changes = changes
            self.decision = decision
            self.now = now
            fromMemory = false
            let changed = Self.changedWrite(
                partition: partition, epoch: epoch, now: now, initial: initial, versions: versions, after: after, records: decision.records, changes: changes
            )
            write = changed.write
            remembered = changed.remembered
        }

        /// The write of the buffers that differ between `initial` (as read, with `versions`) and `after`, and
        /// every buffer of `after` as the write leaves it.
        private static func changedWrite(
            partition: Int, epoch: Int64, now: Timestamp, initial: [ExactString: BufferState], versions: [ExactString: Int64],
            after: [ExactString: BufferState], records: [RequestRecord], changes: [AttributedChange]
        ) -> (write: BatchWrite, remembered: [ExactString: RememberedBuffer]) {
            var changed: [(buffer: ExactString, state: BufferState, expectedToken: Int64, expectedVersion: Int64)] = []
            var remembered: [ExactString: RememberedBuffer] = [:]
            remembered.reserveCapacity(after.count)
            for (buffer, state) in after {
                let version = versions[buffer] ?? 0
                if initial[buffer] != state {
                    changed.append((buffer, state, initial[buffer]?.token ?? 0, version))
                    remembered[buffer] = RememberedBuffer(state: state, version: version + 1)
                } else {
                    remembered[buffer] = RememberedBuffer(state: state, version: version)
                }
            }
            var write = BatchWrite(
                partition: partition, epoch: epoch, now: now, buffers: changed.sorted { $0.buffer < $1.buffer }, records: records, changes: changes
            )
            write.lines(from: initial)
            for (buffer, state, expectedToken, _) in write.buffers {
                let before = initial[buffer]
                if state.holder != nil, let end = state.expiresAt,
                   // A grant, or a lease that now ends earlier than it did: its entry may be due too late.
                   state.token != expectedToken || before?.holder == nil || before?.expiresAt.map({ end < $0 }) ?? true {
                    write.leases.append((buffer, end.milliseconds))
                }
                // A roster whose earliest membership end is new or earlier (a join, a shorter renewal; an
                // expired member that a sweep turned into a reservation leaves the next one's end).
                if let end = state.roster.earliestExpiry, before?.roster.earliestExpiry.map({ end < $0 }) ?? true {
                    write.leases.append((buffer, end.milliseconds))
                }
            }
            return (write, remembered)
        }

        /// Writes the plan in one statement, unless there is nothing to write; returns the outbox ids.
        ///
        /// - Throws: ``CompareAndSetMiss`` when another writer changed a buffer or recorded a request id
        ///   first (the statement then aborts itself, SQLSTATE BT001, and writes nothing).
        func write(_ session: PostgresSession) throws -> [Int64] {
            guard !write.isEmpty else { return [] }
            do {
                return try write.check(PostgresRow(session.query(write.statement, write.parameters).rows.first ?? [], source: "the batch write")).ids
            } catch let error as PostgresError where error.sqlState == "BT001" {
                throw CompareAndSetMiss(missed: 1)
            }
        }

        func result(outboxIDs: [Int64], attempt: Int) -> BatchResult {
            let entries = zip(outboxIDs, write.changes).map { OutboxEntry(id: $0, partition: write.partition, change: $1.change) }
            var result = BatchResult(replies: decision.replies, changes: entries, replayed: decision.replayed, attempts: attempt)
            result.answers = decision.answers
            result.fromMemory = fromMemory
            return result
        }
    }

    // MARK: - Lease sweep

    /// Expires up to `limit` leases of `partition` that have run out on the database clock, fenced by `epoch`.
    ///
    /// Each expiry produces one `expired` change, once: the row is cleared in the same atomic statement.
    public func sweep(partition: Int, epoch: Int64, limit: Int = 1000) async throws -> [OutboxEntry] {
        try await sweepWithLines(partition: partition, epoch: epoch, limit: limit).changes
    }

    /// How many lines with waits that ran out one sweep settles at most (each of at most 256 claims):
    /// waits that all end at once are answered over several sweeps, never in one huge statement.
    public static let linesPerSweep = 32

    /// How far past the database clock (as last read, plus the time since) the sweep reads due leases.
    static let sweepSlackMilliseconds: Int64 = 20

    /// Whole milliseconds from `local` to now.
    static func elapsedMilliseconds(since local: ContinuousClock.Instant) -> Int64 {
        let elapsed = (ContinuousClock.now - local).components
        return elapsed.seconds * 1000 + elapsed.attoseconds / 1_000_000_000_000_000
    }

    /// The sweep with lines (docs/design/fair-waiting.md): leases that ran out are expired and their
    /// buffers handed to the heads of their lines; waits that ran out are denied. Returns the changes and
    /// the answers to waiters (recorded under their request ids), to publish. Lines are settled in the
    /// order their waits ran out, at most ``linesPerSweep`` a call; `more` says that others are due (the
    /// caller sweeps again at once).
    public func sweepWithLines(partition: Int, epoch: Int64, limit: Int = 1000) async throws -> (changes: [OutboxEntry], answers: [WaiterAnswer], more: Bool) {
        let partitioner = self.partitioner
        // No explicit transaction: a read, then the fenced, self-aborting compare-and-set write (one
        // statement). Nothing holds the partition row's lock while waiting on this process, so a worker
        // frozen here cannot stall the next owner's takePartition.
        return try await retrying(partition: partition, what: "the sweep") { [self] session, _ in
            // The schedule of the partition's leases: the rows' leases are added the first time in an epoch,
            // to what the epoch's writes scheduled already.
            if schedules.withLock({ $0[partition]?.epoch != epoch || $0[partition]?.loaded != true }) {
                let leases = try session.query(SQL.leases, [String(partition)]).decode(from: "the leases of partition \(partition)") { row in
                    (buffer: ExactString(try row.decode(0, "buffer")), end: try row.timestamp(1, "expires_at").milliseconds)
                }
                schedules.withLock { schedules in
                    if schedules[partition]?.epoch == epoch {
                        schedules[partition]?.load(leases)
                    } else {
                        schedules[partition] = ExpirySchedule(epoch: epoch, leases: leases)
                    }
                }
            }
            // The buffers whose leases are due by the database clock as last read, with a little slack (a
            // lease read early is found running and stays scheduled).
            var estimate = sweepClock.withLock { $0[partition].map { $0.database.milliseconds + Self.elapsedMilliseconds(since: $0.local) } }
            if estimate == nil {
                estimate = try session.query(SQL.clock).first().flatMap(Int64.init)
            }
            guard let estimate else { throw PostgresError(code: .unexpectedResult, message: "the clock read returned no row") }
            let scheduled = schedules.withLock { $0[partition]?.takeDue(by: estimate &+ Self.sweepSlackMilliseconds, limit: limit) }
            let candidates = scheduled?.buffers ?? []
            // Until the sweep has written, what it took is put back if anything fails.
            var finished = false
            defer {
                if !finished, let taken = scheduled?.taken, !taken.isEmpty {
                    schedules.withLock { schedules in
                        guard schedules[partition]?.epoch == epoch else { return }
                        schedules[partition]?.restore(taken)
                    }
                }
            }
            // Rows of `now, buffer..., epoch`: always one at least, with the clock and the epoch (and a NULL
            // buffer when no candidate is due).
            let readAt = ContinuousClock.now
            let rows = try session.query(SQL.dueBuffers, [String(partition), PostgresArray.text(candidates.map(\.string))])
                .decode(from: "the expiry read of partition \(partition)") { $0 }
            guard let first = rows.first else {
                throw PostgresError(code: .unexpectedResult, message: "the expiry read of partition \(partition) returned no clock row")
            }
            // An early check, without a lock (the write below is the fence): a worker that lost the
            // partition learns it even when nothing has expired.
            do {
                try Self.checkEpoch(try first.optional(10, "epoch").map { _ in try first.decode(10, "epoch") }, partition: partition, epoch: epoch)
            } catch {
                schedules.withLock { $0[partition] = nil }
                throw error
            }
            let now = try first.timestamp(0, "clock")
            sweepClock.withLock { $0[partition] = (now, readAt) }
            var initial: [ExactString: BufferState] = [:]
            var versions: [ExactString: Int64] = [:]
            // Candidates whose leases still run (renewed): scheduled at their rows' ends once the sweep has
            // written. Those without a lease leave the schedule.
            var running: [(buffer: ExactString, end: Int64)] = []
            for row in rows where try row.optional(1, "buffer") != nil {
                let buffer = try BufferRow(row, from: 1)
                // The lease's end and the roster's earliest membership end: due when either has come.
                let ends = [buffer.state.holder == nil ? nil : buffer.state.expiresAt, buffer.state.roster.earliestExpiry].compactMap { $0 }
                guard let end = ends.min() else { continue }
                if end <= now {
                    initial[buffer.buffer] = buffer.state
                    versions[buffer.buffer] = buffer.version
                    // What still runs after the sweep is scheduled again (below, from the plan's buffers).
                } else {
                    running.append((buffer.buffer, end.milliseconds))
                }
            }
            // Buffers whose waiters' waits ran out, those that ran out first first (``linesPerSweep`` at
            // most), and the lines of every buffer the sweep looks at.
            let linesLimit = min(limit, Self.linesPerSweep)
            let due = try session.query(SQL.waitingBuffers, [String(partition), String(now.milliseconds), String(linesLimit)])
                .decode(from: "the waiting read of partition \(partition)", { $0 })
            for row in due {
                let buffer = try BufferRow(row, from: 0)
                initial[buffer.buffer] = buffer.state
                versions[buffer.buffer] = buffer.version
            }
            if !initial.isEmpty {
                let waiters = try session.query(SQL.lines, [String(partition), PostgresArray.text(initial.keys.map(\.string))])
                    .decode(from: "the lines of partition \(partition)") { try WaiterRow($0, from: 0) }
                for (buffer, line) in WaiterRow.lines(waiters) { initial[buffer]?.line = line }
            }
            var state = PartitionState(partition: partition, partitioner: partitioner, buffers: initial, graceMilliseconds: memberGraceMilliseconds)
            let outcome = state.sweepWithLines(at: now)
            // What the sweep leaves running (a lease, or members, beside what it expired) is looked at again.
            for (buffer, swept) in state.buffers {
                if swept.holder != nil, let end = swept.expiresAt, now < end { running.append((buffer, end.milliseconds)) }
                if let end = swept.roster.earliestExpiry { running.append((buffer, end.milliseconds)) }
            }
            let plan = BatchPlan(
                partition: partition, epoch: epoch, now: now, initial: initial, versions: versions, after: state.buffers,
                changes: outcome.attributedChanges(to: nil).map { AttributedChange(change: $0.change, requestID: $0.requestID) }, answers: outcome.answers
            )
            let ids: [Int64]
            noteLeases(plan.write, epoch: epoch)
            do {
                ids = try plan.write(session)
            } catch {
                // A lost race or an unknown outcome: what the partition's memory holds may be stale.
                self.forget([partition])
                throw error
            }
            let result = plan.result(outboxIDs: ids, attempt: 1)
            finished = true
            schedules.withLock { schedules in
                guard schedules[partition]?.epoch == epoch else { return }
                for (buffer, end) in running { schedules[partition]?.add(buffer, end) }
            }
            // The sweep read every line of the buffers it looked at: remember them as it left them.
            self.remember(plan, partition: partition, epoch: epoch, clock: nil, at: .now)
            return (result.changes, result.answers, due.count == linesLimit)
        }
    }

    // MARK: - Outbox and retention

    /// Up to `limit` changes of `partition` not yet published (after its delivered position), oldest first.
    public func undelivered(partition: Int, limit: Int = 1000) async throws -> [OutboxEntry] {
        try await outbox(partition: partition, after: deliveredThrough(partition: partition), limit: limit)
    }

    /// Up to `limit` changes of `partition` after position `after`, oldest first.
    public func outbox(partition: Int, after: Int64, limit: Int) async throws -> [OutboxEntry] {
        try await connection.withSession { session in
            try session.query(SQL.outboxAfter, [String(partition), String(after), String(limit)]).decode(from: "baton_outbox") { row in
                OutboxEntry(id: try row.decode(0, "id"), partition: partition, change: try OwnershipChange(row: row, from: 1, principal: false))
            }
        }
    }

    /// The position up to which every change of `partition` was published (0: none yet).
    public func deliveredThrough(partition: Int) async throws -> Int64 {
        try await connection.withSession { session in
            try session.query(SQL.deliveredThrough, [String(partition)]).decode(from: "baton_outbox_delivery") { try $0.decode(0, "through", as: Int64.self) }.first ?? 0
        }
    }

    /// How many changes of a partition one `events` read looks at, at most: a read of one buffer's changes
    /// from an old position scans the partition's history in windows of this size (`more` says to go on),
    /// so no read, however far back it starts, holds the partition's decisions up for long.
    public static let eventsScanWindow = 4096

    /// Up to `limit` changes of `partition` after position `after` (of `buffer` only, when given), oldest
    /// first, with the position the read ends at (docs/protocol.md, section 18). Without `after`, only the
    /// partition's current position. The caller must not let the partition commit meanwhile (the worker reads
    /// between its partition's batches), so that the position covers exactly what was read.
    public func events(partition: Int, after: Int64?, buffer: String?, limit: Int) async throws -> (page: EventPage, at: Timestamp) {
        let window = Self.eventsScanWindow
        return try await connection.withSession { session in
            let head = try session.query(SQL.eventsHead, [String(partition)]).decode(from: "baton_outbox") { row in
                (position: try row.decode(0, "position", as: Int64.self), pruned: try row.decode(1, "through", as: Int64.self), at: try row.timestamp(2, "now"))
            }
            guard let head = head.first else { throw StoreError(code: .unknownPartition, partition: partition, message: "no position for partition \(partition)") }
            guard let after else { return (EventPage(events: [], position: head.position, more: false, missed: false), head.at) }
            // The window: the next `window` changes of the partition after `after`, whatever their buffer.
            let windowEnd = try session.query(SQL.eventsWindow, [String(partition), String(after), String(window)]).decode(from: "baton_outbox") { row in
                (end: try row.decode(0, "end", as: Int64.self), count: try row.decode(1, "count", as: Int.self))
            }.first ?? (after, 0)
            let rows = try session.query(SQL.eventsAfter, [String(partition), String(after), buffer, String(limit + 1), String(windowEnd.end)]).decode(from: "baton_outbox") { row in
                PositionedChange(seq: try row.decode(0, "id"), partition: partition, change: try OwnershipChange(row: row, from: 1, principal: false))
            }
            let missed = after < head.pruned
            if rows.count > limit {
                let kept = Array(rows.prefix(limit))
                return (EventPage(events: kept, position: kept.last!.seq, more: true, missed: missed), head.at)
            }
            if windowEnd.count == window, windowEnd.end < head.position {
                // The window ended before the partition's position: read on from its end.
                return (EventPage(events: rows, position: windowEnd.end, more: true, missed: missed), head.at)
            }
            // The partition's position; below `after` when `after` came from another history (docs/protocol.md, section 18).
            return (EventPage(events: rows, position: head.position, more: false, missed: missed), head.at)
        }
    }

    /// Every ownership change in the audit trail (oldest first) and the token each buffer shows now:
    /// the input of the lab's `HistoryChecker` and `ChaosChecker`. Reads the whole table: for tests, benchmarks
    /// and audits, not for the hot path.
    public func auditTrail() async throws -> (changes: [OwnershipChange], finalTokens: [ExactString: Int64]) {
        try await connection.withSession { session in
            let changes = try session.query("""
                SELECT kind, buffer, holder_user, holder_connection, token,
                       (extract(epoch FROM at) * 1000)::int8, (extract(epoch FROM expires_at) * 1000)::int8, forced, replica_id, principal, request_id
                FROM baton_outbox ORDER BY id
                """).decode(from: "baton_outbox") { row in
                var change = try OwnershipChange(row: row, from: 0, principal: true)
                change.requestID = try row.optional(10, "request_id")
                return change
            }
            var tokens: [ExactString: Int64] = [:]
            for (buffer, token) in try session.query("SELECT buffer, token FROM baton_buffers").decode(from: "baton_buffers", { row in
                (try row.decode(0, "buffer", as: String.self), try row.decode(1, "token", as: Int64.self))
            }) {
                tokens[ExactString(buffer)] = token
            }
            return (changes, tokens)
        }
    }

    /// How many claims wait in the lines of `partition` now.
    /// The claims waiting in `partition`'s lines, and how many wait in its longest line.
    public func lineSizes(partition: Int) async throws -> (waiters: Int, longest: Int) {
        try await connection.withSession { session in
            try session.query(SQL.lineSizes, [String(partition)]).decode(from: "the lines of partition \(partition)") {
                (try $0.decode(0, "waiters", as: Int.self), try $0.decode(1, "longest", as: Int.self))
            }.first ?? (0, 0)
        }
    }

    /// Records that every change of `partition` up to position `through` was published (the position
    /// never moves back).
    public func markDelivered(partition: Int, through: Int64) async throws {
        _ = try await connection.withSession { session in
            try session.query(SQL.markDelivered, [String(partition), String(through)])
        }
    }

    /// Deletes idempotency records older than `retention` and published outbox rows decided longer than `retention` ago.
    ///
    /// - Returns: how many requests and outbox rows were deleted.
    @discardableResult
    /// ``prune(retention:chunk:)``, unless another session is pruning the same database now: returns nil
    /// then. A session advisory lock (``pruneLockKey``) is held for the run, so that workers pruning on a
    /// schedule never prune at once (a `baton prune` from cron does not take it).
    public func pruneAlone(retention: Duration, chunk: Int = 10_000) async throws -> (requests: Int, outbox: Int)? {
        let key = [String(Self.pruneLockKey)]
        let locked = try await connection.withSession { session in
            try session.query("SELECT pg_try_advisory_lock($1::int8)::int", key).decode(from: "the prune lock") { try $0.decode(0, "locked", as: Int.self) }.first == 1
        }
        guard locked else { return nil }
        let result: Result<(requests: Int, outbox: Int), any Error>
        do {
            result = .success(try await prune(retention: retention, chunk: chunk))
        } catch {
            result = .failure(error)
        }
        _ = try? await connection.withSession { session in try session.query("SELECT pg_advisory_unlock($1::int8)", key) }
        return try result.get()
    }

    /// The advisory lock key of ``pruneAlone(retention:chunk:)`` ("batonpru").
    public static let pruneLockKey: Int64 = 0x6261_746F_6E70_7275

    public func prune(retention: Duration, chunk: Int = 10_000) async throws -> (requests: Int, outbox: Int) {
        guard retention >= Self.minimumRetention else {
            throw StoreError(code: .invalidArgument, partition: -1, message: "retention \(retention) is too short: it must be at least \(Self.minimumRetention) so that retries see their original reply")
        }
        let milliseconds = String(retention.wholeMilliseconds)
        return try await connection.withSession { session in
            var requests = 0
            var outbox = 0
            while true {
                let deleted = try session.query(SQL.pruneRequests, [milliseconds, String(chunk)]).affectedRows
                requests += deleted
                if deleted < chunk { break }
            }
            while true {
                let deleted = try session.query(SQL.pruneOutbox, [milliseconds, String(chunk)]).decode(from: "baton_outbox") { try $0.decode(0, "count", as: Int.self) }.first ?? 0
                outbox += deleted
                if deleted == 0 { break }
            }
            return (requests, outbox)
        }
    }

    // MARK: - Shared steps

    static func checkEpoch(_ current: Int64?, partition: Int, epoch: Int64) throws {
        guard let current else {
            throw StoreError(code: .unknownPartition, partition: partition, message: "partition \(partition) does not exist in this deployment")
        }
        guard current == epoch else {
            throw StoreError(code: .partitionOwnershipLost, partition: partition, message: "this worker holds epoch \(epoch) but the partition is at epoch \(current): another worker took it; nothing was written")
        }
    }
}

/// Another writer changed a buffer (or recorded a request id) after this batch read it; the transaction rolls back and retries.
struct CompareAndSetMiss: Error {
    let missed: Int
}

/// The store's SQL, prepared once per connection.
enum SQL {
    static let takePartition = PreparedStatement(name: "baton_take_partition", sql: """
        UPDATE baton_partitions SET epoch = epoch + 1, owner = $2, taken_at = clock_timestamp()
        WHERE partition = $1 RETURNING epoch
        """)

    // A partition's memory when it is loaded (after taking the partition, or after a failed write): every
    // line of the partition, the rows of their buffers, and the epoch and clock, in the rows of the batch
    // read (`f`, `b`, `w`). Uses the primary keys of baton_waiters and baton_buffers.
    static let loadLines = PreparedStatement(name: "baton_load_lines", sql: """
        SELECT 'f', (SELECT epoch FROM baton_partitions WHERE partition = $1)::text,
               floor(extract(epoch FROM clock_timestamp()) * 1000)::int8::text, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
        UNION ALL
        SELECT 'b', b.buffer, b.holder_user, b.holder_connection, b.token::text,
               ((extract(epoch FROM b.expires_at) * 1000)::int8)::text, b.version::text, b.holder_principal, greatest(b.issued, b.token)::text, b.roster::text, NULL, NULL
        FROM (SELECT DISTINCT buffer FROM baton_waiters WHERE partition = $1) lined
        CROSS JOIN LATERAL (SELECT * FROM baton_buffers WHERE partition = $1 AND buffer = lined.buffer OFFSET 0) b
        UNION ALL
        SELECT 'w', buffer, request_id, holder_user, holder_connection, principal, lease_ms::text,
               ((extract(epoch FROM wait_until) * 1000)::int8)::text, reply_to, correlation_id, fingerprint, position::text
        FROM baton_waiters WHERE partition = $1
        """)

    // Every buffer name of a partition (an index-only scan of the primary key), for its filter; $2 caps it.
    static let loadNames = PreparedStatement(name: "baton_load_names", sql: """
        SELECT buffer FROM baton_buffers WHERE partition = $1 LIMIT $2
        """)

    // The database clock, in milliseconds since the epoch.
    static let clock = PreparedStatement(name: "baton_clock", sql: "SELECT floor(extract(epoch FROM clock_timestamp()) * 1000)::int8")

    // The partition's leases, for the sweep's schedule (an epoch's first sweep). Uses baton_buffers_connection.
    static let leases = PreparedStatement(name: "baton_leases", sql: """
        SELECT buffer, (extract(epoch FROM expires_at) * 1000)::int8
        FROM baton_buffers WHERE partition = $1 AND holder_connection IS NOT NULL
        UNION ALL
        -- The earliest end of each roster's memberships (through baton_buffers_rostered).
        SELECT buffer, (SELECT min((m ->> 'e')::int8) FROM jsonb_array_elements(roster -> 'm') m)
        FROM baton_buffers WHERE partition = $1 AND roster IS NOT NULL AND jsonb_array_length(roster -> 'm') > 0
        """)

    // The rows of the buffers the sweep's schedule says are due ($2), with the clock and the epoch: one
    // primary-key probe per name (never `= ANY`, which may scan the whole partition).
    static let dueBuffers = PreparedStatement(name: "baton_due_buffers", sql: """
        WITH clock AS (
            SELECT floor(extract(epoch FROM clock_timestamp()) * 1000)::int8 AS now_ms,
                   (SELECT epoch FROM baton_partitions WHERE partition = $1) AS epoch
        )
        SELECT c.now_ms, b.buffer, b.holder_user, b.holder_connection, b.token,
               (extract(epoch FROM b.expires_at) * 1000)::int8, b.version, b.holder_principal, greatest(b.issued, b.token), b.roster::text, c.epoch
        FROM clock c
        LEFT JOIN LATERAL (
            SELECT r.* FROM unnest($2::text[]) AS due(buffer)
            CROSS JOIN LATERAL (SELECT * FROM baton_buffers WHERE partition = $1 AND buffer = due.buffer OFFSET 0) r
        ) b ON true
        """)

    // Uses baton_waiters_until, then the primary key of baton_buffers.
    static let lineSizes = PreparedStatement(name: "baton_line_sizes", sql: """
        SELECT coalesce(sum(n), 0)::int8, coalesce(max(n), 0)::int8
        FROM (SELECT count(*) AS n FROM baton_waiters WHERE partition = $1 GROUP BY buffer) lines
        """)

    static let waitingBuffers = PreparedStatement(name: "baton_waiting_buffers", sql: """
        SELECT b.buffer, b.holder_user, b.holder_connection, b.token,
               (extract(epoch FROM b.expires_at) * 1000)::int8, b.version, b.holder_principal, greatest(b.issued, b.token), b.roster::text
        FROM (
            SELECT buffer FROM (
                SELECT buffer, wait_until FROM baton_waiters
                WHERE partition = $1 AND wait_until <= timestamptz 'epoch' + $2::int8 * interval '1 millisecond'
                ORDER BY wait_until LIMIT $3::int8 * 16
            ) due
            GROUP BY buffer ORDER BY min(wait_until) LIMIT $3
        ) lined
        CROSS JOIN LATERAL (SELECT * FROM baton_buffers WHERE partition = $1 AND buffer = lined.buffer OFFSET 0) b
        """)

    // Uses the primary key of baton_waiters.
    static let lines = PreparedStatement(name: "baton_lines", sql: """
        SELECT w.buffer, w.request_id, w.holder_user, w.holder_connection, w.principal, w.lease_ms,
               (extract(epoch FROM w.wait_until) * 1000)::int8, w.reply_to, w.correlation_id, w.fingerprint, w.position
        FROM unnest($2::text[]) AS wanted(buffer)
        CROSS JOIN LATERAL (SELECT * FROM baton_waiters WHERE partition = $1 AND buffer = wanted.buffer OFFSET 0) w
        """)

    // Uses baton_outbox_position.
    static let outboxAfter = PreparedStatement(name: "baton_outbox_after", sql: """
        SELECT id, kind, buffer, holder_user, holder_connection, token,
               (extract(epoch FROM at) * 1000)::int8, (extract(epoch FROM expires_at) * 1000)::int8, forced, replica_id
        FROM baton_outbox
        WHERE partition = $1 AND id > $2::int8
        ORDER BY id LIMIT $3
        """)

    static let deliveredThrough = PreparedStatement(name: "baton_delivered_through", sql: """
        SELECT through FROM baton_outbox_delivery WHERE partition = $1
        """)

    // A lost mark only republishes events (events are at least once), so this commit does not wait
    // for its WAL flush: set_config(..., true) lasts until the end of the statement's own transaction,
    // and a commit reads synchronous_commit before the setting reverts. It saves an fsync per mark
    // on a connection the partitions' batches share.
    static let markDelivered = PreparedStatement(name: "baton_mark_delivered", sql: """
        WITH relaxed AS (SELECT set_config('synchronous_commit', 'off', true))
        INSERT INTO baton_outbox_delivery (partition, through) SELECT $1, $2::int8 FROM relaxed
        ON CONFLICT (partition) DO UPDATE SET through = GREATEST(baton_outbox_delivery.through, EXCLUDED.through)
        """)

    // Uses baton_requests_created.
    static let pruneRequests = PreparedStatement(name: "baton_prune_requests", sql: """
        DELETE FROM baton_requests WHERE ctid = ANY(ARRAY(
            SELECT ctid FROM baton_requests
            WHERE created_at < clock_timestamp() - $1::int8 * interval '1 millisecond' LIMIT $2))
        """)

    // Per partition, the $2 rows after its pruned position (baton_outbox_position): of those, the ones
    // published (up to the delivered position) and decided before the retention, up to the first that is
    // not (rows are decided in position order, so the scan starts where the last prune ended and stops at
    // the first row to keep). Records, per partition, the highest position deleted (events reads from an
    // older position report missed changes).
    static let pruneOutbox = PreparedStatement(name: "baton_prune_outbox", sql: """
        WITH doomed AS (
            SELECT o.ctid
            FROM baton_outbox_delivery d
            CROSS JOIN LATERAL (
                SELECT w.ctid, w.id, min(w.id) FILTER (WHERE w.keep) OVER () AS stop
                FROM (SELECT ctid, id, id > d.through OR at >= clock_timestamp() - $1::int8 * interval '1 millisecond' AS keep
                      FROM baton_outbox
                      WHERE partition = d.partition
                        AND id > coalesce((SELECT through FROM baton_outbox_pruned p WHERE p.partition = d.partition), 0)
                      ORDER BY id LIMIT $2) w
            ) o
            WHERE o.stop IS NULL OR o.id < o.stop
            -- At most $2 rows per statement in all, each partition's still a prefix of its history.
            ORDER BY d.partition, o.id LIMIT $2
        ),
        deleted AS (
            DELETE FROM baton_outbox WHERE ctid = ANY(ARRAY(SELECT ctid FROM doomed))
            RETURNING partition, id
        ),
        marked AS (
            INSERT INTO baton_outbox_pruned (partition, through)
            SELECT partition, max(id) FROM deleted GROUP BY partition
            ON CONFLICT (partition) DO UPDATE SET through = GREATEST(baton_outbox_pruned.through, EXCLUDED.through)
        )
        SELECT count(*) FROM deleted
        """)

    // Uses baton_outbox_position (max per partition) and the primary key of baton_outbox_pruned.
    static let eventsHead = PreparedStatement(name: "baton_events_head", sql: """
        SELECT coalesce((SELECT max(id) FROM baton_outbox WHERE partition = $1), 0) AS position,
               coalesce((SELECT through FROM baton_outbox_pruned WHERE partition = $1), 0) AS through,
               (extract(epoch FROM clock_timestamp()) * 1000)::int8 AS now
        """)

    // Uses baton_outbox_position (an index-only scan of at most $3 entries).
    static let eventsWindow = PreparedStatement(name: "baton_events_window", sql: """
        SELECT coalesce(max(id), $2::int8) AS end, count(*) AS count
        FROM (SELECT id FROM baton_outbox WHERE partition = $1 AND id > $2::int8 ORDER BY id LIMIT $3::int8) w
        """)

    // Uses baton_outbox_position, within the window.
    static let eventsAfter = PreparedStatement(name: "baton_events_after", sql: """
        SELECT id, kind, buffer, holder_user, holder_connection, token,
               (extract(epoch FROM at) * 1000)::int8, (extract(epoch FROM expires_at) * 1000)::int8, forced, replica_id
        FROM baton_outbox
        WHERE partition = $1 AND id > $2::int8 AND id <= $5::int8 AND ($3::text IS NULL OR buffer = $3::text)
        ORDER BY id LIMIT $4::int8
        """)
}
