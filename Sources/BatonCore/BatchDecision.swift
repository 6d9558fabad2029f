/// A reply recorded under a request id, with the fingerprint of the request it answered (nil for records
/// written before fingerprints existed).
public struct RecordedReply: Sendable, Hashable {
    /// The reply given.
    public var reply: Reply
    /// ``ProtocolCodec/fingerprint(_:)`` of the request it answered.
    public var fingerprint: String?

    /// Creates a record.
    public init(reply: Reply, fingerprint: String?) {
        self.reply = reply
        self.fingerprint = fingerprint
    }
}

/// A record to write: the reply to a request (or a waiter's answer) under its request id.
public struct RequestRecord: Sendable, Hashable {
    /// The request id.
    public var id: String
    /// The reply.
    public var reply: Reply
    /// ``ProtocolCodec/fingerprint(_:)`` of the request.
    public var fingerprint: String

    /// Creates a record.
    public init(id: String, reply: Reply, fingerprint: String) {
        self.id = id
        self.reply = reply
        self.fingerprint = fingerprint
    }
}

/// An ownership change with the request it is audited under (nil for expiries found by a sweep).
public struct AttributedChange: Sendable, Hashable {
    /// The change.
    public var change: OwnershipChange
    /// The request that made it: for a grant to a waiter, the waiting claim's.
    public var requestID: String?

    /// Creates an attributed change.
    public init(change: OwnershipChange, requestID: String?) {
        self.change = change
        self.requestID = requestID
    }
}

/// What deciding one batch produced: the replies in the batch's order and everything to write.
public struct BatchDecision: Sendable {
    /// One per request, in order; nil for a claim that joined a line (answered when it leaves it).
    public var replies: [Reply?] = []
    /// Answers to waiters that left their lines, each recorded in ``records`` under its own request id.
    public var answers: [WaiterAnswer] = []
    /// Replies to record under their request ids (each id at most once).
    public var records: [RequestRecord] = []
    /// The ownership changes in decision order.
    public var changes: [AttributedChange] = []
    /// Requests answered from a record (theirs, read before the batch, or one made earlier in the batch).
    public var replayed = 0
    /// Requests answered without writing a record of their own: replays, refusals that are never recorded
    /// (a passed deadline, a request id in use), claims that joined a line. A batch decided without reading
    /// its request ids first may only be written when this is 0: then every request's record is in the
    /// write, and the record's uniqueness turns any repeat into a conflict instead of a second decision.
    public var unrecorded = 0

    /// Creates an empty decision.
    public init() {}
}

extension PartitionState {
    /// Decides `requests` in order at database time `now`: the pure batch decision of a worker
    /// (docs/store.md, "A batch").
    ///
    /// - Parameters:
    ///   - recorded: replies already recorded under the batch's request ids (a repeat whose fingerprint
    ///     matches gets its reply again; another request under that id is `request_id_reused`).
    ///   - waiting: the request ids of claims waiting in any line of the partition, with their buffers (a
    ///     request under such an id on another buffer, or without one, is `request_id_reused` and never
    ///     recorded, so that the waiter's answer still can be).
    ///   - latest: the latest the database time may be, when `now` is an estimate (a decision from the
    ///     partition's memory knows the time within a margin): a deadline at or before it counts as passed,
    ///     so that no request is decided after its deadline, whatever the estimate's error.
    public mutating func decideBatch(
        _ requests: [Request], at now: Timestamp, recorded: [ExactString: RecordedReply] = [:], waiting: [ExactString: ExactString] = [:],
        latest: Timestamp? = nil
    ) -> BatchDecision {
        var decision = BatchDecision()
        var recorded = recorded
        var waiting = waiting
        decision.replies.reserveCapacity(requests.count)
        for request in requests {
            let fingerprint = ProtocolCodec.fingerprint(request)
            let id = ExactString(request.requestID)
            if let record = recorded[id] {
                decision.unrecorded += 1
                // A repeat is answered from its record only when it asks the same thing (records written
                // before fingerprints existed have none and are answered as before).
                if let known = record.fingerprint, !known.exactlyEquals(fingerprint) {
                    decision.replies.append(Reply.rejection(ProtocolError(
                        code: .requestIDReused,
                        message: "request_id '\(LogValue.escape(request.requestID))' was already used for a different request (another op, buffer, argument or sender): use a new request_id for a new request; a retry must repeat the original exactly",
                        requestID: request.requestID, buffer: request.buffer
                    ), partition: partition, at: now))
                } else {
                    decision.replies.append(record.reply)
                    decision.replayed += 1
                }
                continue
            }
            if let buffer = waiting[id], request.buffer.map({ ExactString($0) != buffer }) ?? true {
                // The request id of a claim waiting in another buffer's line (or a request without a buffer):
                // refused, and not recorded, so the waiter's answer can still be recorded under it.
                decision.unrecorded += 1
                decision.replies.append(Reply.rejection(
                    .requestIDOfAWaiter(request.requestID, waitingFor: buffer.string, requestBuffer: request.buffer), partition: partition, at: now
                ))
                continue
            }
            if let refusal = deadlineRefusal(request, at: max(now, latest ?? now)) {
                // Not recorded: nothing was decided, and a retry with another deadline may still be decided.
                decision.unrecorded += 1
                decision.replies.append(refusal)
                continue
            }
            let outcome = decide(request, at: now)
            decision.changes += outcome.attributedChanges(to: request.requestID).map { AttributedChange(change: $0.change, requestID: $0.requestID) }
            for answer in outcome.answers {
                // A waiter's answer is recorded under its own request id, as if it were a reply.
                recorded[ExactString(answer.waiter.requestID)] = RecordedReply(reply: answer.reply, fingerprint: answer.waiter.fingerprint)
                waiting[ExactString(answer.waiter.requestID)] = nil
                decision.records.append(RequestRecord(id: answer.waiter.requestID, reply: answer.reply, fingerprint: answer.waiter.fingerprint))
            }
            decision.answers += outcome.answers
            guard let reply = outcome.reply else {
                // Waits in line: answered when it leaves it (nothing recorded now).
                decision.unrecorded += 1
                if let buffer = request.buffer { waiting[id] = ExactString(buffer) }
                decision.replies.append(nil)
                continue
            }
            if reply.error?.code == .requestIDReused {
                // Never recorded: the request id belongs to another request (here, one waiting in line).
                decision.unrecorded += 1
                decision.replies.append(reply)
                continue
            }
            recorded[id] = RecordedReply(reply: reply, fingerprint: fingerprint)
            decision.records.append(RequestRecord(id: request.requestID, reply: reply, fingerprint: fingerprint))
            decision.replies.append(reply)
        }
        return decision
    }
}
