/// How a claim waits in line when the buffer is held (docs/design/fair-waiting.md).
public struct Waiting: Sendable, Hashable {
    /// How long it is willing to wait, in milliseconds.
    public var milliseconds: Int64
    /// Where its answer goes: the reply address and correlation id of the delivery that asked last.
    public var replyTo: String?
    public var correlationID: String?

    /// Creates a waiting request's terms.
    public init(milliseconds: Int64, replyTo: String? = nil, correlationID: String? = nil) {
        self.milliseconds = milliseconds
        self.replyTo = replyTo
        self.correlationID = correlationID
    }
}

/// A claim in a buffer's line.
public struct Waiter: Sendable, Hashable {
    /// The claim's request id: its answer is recorded under it.
    public var requestID: String
    /// Who would hold the buffer.
    public var holder: Holder
    /// The broker user that sent the claim.
    public var principal: String?
    /// The lease it asked for.
    public var leaseMilliseconds: Int64
    /// When it stops waiting (database time).
    public var waitUntil: Timestamp
    /// Where its answer goes.
    public var replyTo: String?
    public var correlationID: String?
    /// What it asked (``ProtocolCodec/fingerprint(_:)``, `wait_ms` included): a repeat must ask the same.
    public var fingerprint: String

    /// Creates a waiter.
    public init(
        requestID: String, holder: Holder, principal: String?, leaseMilliseconds: Int64, waitUntil: Timestamp,
        replyTo: String?, correlationID: String?, fingerprint: String
    ) {
        self.requestID = requestID
        self.holder = holder
        self.principal = principal
        self.leaseMilliseconds = leaseMilliseconds
        self.waitUntil = waitUntil
        self.replyTo = replyTo
        self.correlationID = correlationID
        self.fingerprint = fingerprint
    }
}

/// The answer to a waiter, given when it leaves the line: `granted` or `denied`.
public struct WaiterAnswer: Sendable, Hashable {
    /// The waiter (with the reply address to answer).
    public var waiter: Waiter
    /// Its reply.
    public var reply: Reply

    /// Creates an answer.
    public init(waiter: Waiter, reply: Reply) {
        self.waiter = waiter
        self.reply = reply
    }
}

/// What one request did on a partition: its reply (nil for a claim that joined a line or is still
/// in one), the ownership changes in order, and the answers to waiters it settled.
public struct Outcome: Sendable, Hashable {
    public var reply: Reply?
    public var changes: [OwnershipChange]
    public var answers: [WaiterAnswer]
    /// Changes of the buffers' rosters, in decision order.
    public var memberships: [MembershipChange]

    /// Creates an outcome.
    public init(reply: Reply?, changes: [OwnershipChange] = [], answers: [WaiterAnswer] = [], memberships: [MembershipChange] = []) {
        self.reply = reply
        self.changes = changes
        self.answers = answers
        self.memberships = memberships
    }
}

extension ProtocolError {
    /// A request under the request id of a claim that waits in `buffer`'s line: refused and never
    /// recorded, so that the id keeps naming only the waiter and its answer.
    public static func requestIDOfAWaiter(_ requestID: String, waitingFor buffer: String, requestBuffer: String?) -> ProtocolError {
        ProtocolError(
            code: .requestIDReused,
            message: "request_id '\(requestID)' belongs to a claim that waits in line for buffer '\(buffer)': use a new request_id for a new request",
            requestID: requestID, buffer: requestBuffer
        )
    }
}

extension Outcome {
    /// The changes with the request each is recorded under: a grant to a waiter under its waiting claim's
    /// request id, everything else under `requestID` (the request decided; nil for a sweep).
    public func attributedChanges(to requestID: String?) -> [(change: OwnershipChange, requestID: String?)] {
        changes.map { change in
            guard change.kind == .granted, let answer = answers.first(where: {
                $0.reply.status == .granted && $0.reply.token == change.token && $0.waiter.holder == change.holder && ($0.reply.buffer.map { $0.exactlyEquals(change.buffer) } ?? false)
            }) else { return (change, requestID) }
            return (change, answer.waiter.requestID)
        } + memberships.map { ($0.event, requestID) }
    }
}

extension OwnershipRules {
    /// Settles `buffer` at `now` (docs/design/fair-waiting.md, rule 1): waiters whose wait ran out leave the
    /// line, denied; then, if no live lease holds it, the head of the line is granted with the next token
    /// (an expired lease is closed first). Everything else is left as it is.
    public static func settle(buffer: String, state: BufferState, now: Timestamp, partition: Int) -> (state: BufferState, outcome: Outcome) {
        var state = state
        var outcome = Outcome(reply: nil)
        guard !state.line.isEmpty else { return (state, outcome) }
        let live = state.liveHolder(at: now)
        for waiter in state.line where waiter.waitUntil <= now {
            outcome.answers.append(WaiterAnswer(waiter: waiter, reply: Reply(
                requestID: waiter.requestID, status: .denied, buffer: buffer, holder: live, token: state.token,
                expiresAt: live == nil ? nil : state.expiresAt, at: now, partition: partition
            )))
        }
        state.line.removeAll { $0.waitUntil <= now }
        guard live == nil, !state.line.isEmpty else { return (state, outcome) }
        if let previous = state.holder, let expiresAt = state.expiresAt {
            outcome.changes.append(OwnershipChange(kind: .expired, buffer: buffer, holder: previous, token: state.token, at: now, expiresAt: expiresAt))
        }
        let head = state.line.removeFirst()
        var granted = state.granted(to: head.holder, until: now.adding(milliseconds: head.leaseMilliseconds), principal: head.principal)
        granted.line = state.line
        outcome.changes.append(OwnershipChange(
            kind: .granted, buffer: buffer, holder: head.holder, token: granted.token, at: now, expiresAt: granted.expiresAt!, principal: head.principal
        ))
        outcome.answers.append(WaiterAnswer(waiter: head, reply: Reply(
            requestID: head.requestID, status: .granted, buffer: buffer, holder: head.holder, token: granted.token,
            expiresAt: granted.expiresAt, at: now, partition: partition
        )))
        return (granted, outcome)
    }
}
