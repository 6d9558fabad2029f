/// The outcome of one decision on one buffer.
public struct Decision: Sendable, Hashable {
    /// The buffer's state after the decision (equal to the old one when nothing changed).
    public var state: BufferState
    /// The reply to send.
    public var reply: Reply
    /// The ownership changes, in order: an `expired` for a lease that a new grant replaces, a `granted`, a `released`.
    public var changes: [OwnershipChange]
    /// The roster's changes (`join`, `leave`), in order.
    public var memberships: [MembershipChange] = []
}

/// The ownership decision: a pure function of (buffer state, command, database time).
///
/// The rules are docs/protocol.md's section 4, "Semantics"; a lease whose `expires_at` equals `now`
/// has expired; a re-claim by the current holder keeps the token; tokens only grow.
public enum OwnershipRules {
    /// Decides a buffer-scoped command (everything but `release_connection`) against `state` at `now`;
    /// memberships that end without a leave keep their id reserved for `graceMilliseconds`.
    ///
    /// - Precondition: `request.command` is not `.releaseConnection`.
    public static func decide(
        _ request: Request, state: BufferState, now: Timestamp, partition: Int, graceMilliseconds: Int64 = Roster.defaultGraceMilliseconds
    ) -> Decision {
        let live = state.liveHolder(at: now)
        var next = state
        var changes: [OwnershipChange] = []
        let status: ReplyStatus
        let buffer = request.buffer ?? ""

        switch request.command {
        case .claim(_, let holder, let lease):
            if live == holder, samePrincipal(state.principal, request.principal) {
                next.expiresAt = now.adding(milliseconds: lease)
                status = .granted
            } else if live == nil {
                if let previous = state.holder, let expiresAt = state.expiresAt {
                    // The previous lease ran out but was never swept: close it before the new grant.
                    changes.append(OwnershipChange(kind: .expired, buffer: buffer, holder: previous, token: state.token, at: now, expiresAt: expiresAt))
                }
                next = state.granted(to: holder, until: now.adding(milliseconds: lease), principal: request.principal)
                changes.append(OwnershipChange(
                    kind: .granted, buffer: buffer, holder: holder, token: next.token, at: now, expiresAt: next.expiresAt!, principal: request.principal
                ))
                status = .granted
            } else {
                status = .denied
            }

        case .renew(_, let connection, let token, let lease):
            if let live, live.connection.exactlyEquals(connection), token == state.token, samePrincipal(state.principal, request.principal) {
                next.expiresAt = now.adding(milliseconds: lease)
                status = .renewed
            } else if let member = next.roster.renew(connection: connection, token: token, principal: request.principal, leaseMilliseconds: lease, now: now) {
                // One sequence issues both kinds of token, so a token names a lease or a membership, never both.
                let reply = Reply(
                    requestID: request.requestID, status: .renewed, buffer: buffer, token: member.token, expiresAt: member.expiresAt, at: now,
                    partition: partition, membership: MembershipReply(replicaID: member.replicaID, members: next.roster.live(at: now).count)
                )
                return Decision(state: next, reply: reply, changes: [])
            } else {
                status = .notOwner
            }

        case .join(_, let user, let connection, let lease):
            var issued = state.issued
            let (result, memberships) = next.roster.join(
                user: user, connection: connection, principal: request.principal, leaseMilliseconds: lease, now: now, graceMilliseconds: graceMilliseconds,
                nextToken: {
                    issued += 1
                    return issued
                }
            )
            switch result {
            case .joined(let member, _, let reclaimed):
                next.issued = issued
                let reply = Reply(
                    requestID: request.requestID, status: .joined, buffer: buffer, token: member.token, expiresAt: member.expiresAt, at: now,
                    partition: partition, membership: MembershipReply(replicaID: member.replicaID, members: next.roster.live(at: now).count, reclaimed: reclaimed)
                )
                return Decision(state: next, reply: reply, changes: [], memberships: memberships.map { $0.on(buffer) })
            case .connectionInUse(let member):
                // Refused, and nothing changes (the expiries met on the way wait for the next decision).
                let error = ProtocolError(
                    code: .invalidRequest,
                    message: "connection '\(LogValue.escape(connection))' is a live member of buffer '\(LogValue.escape(buffer))' as user '\(LogValue.escape(member.user))' (replica \(member.replicaID)): one connection joins as one user, so leave first or join from another connection",
                    requestID: request.requestID, buffer: buffer
                )
                return Decision(state: state, reply: Reply.rejection(error, partition: partition, at: now), changes: [])
            case .full:
                let error = ProtocolError(
                    code: .membersFull,
                    message: "buffer '\(LogValue.escape(buffer))' has \(Roster.maxMembers) live members, the most one buffer takes; nothing changed",
                    requestID: request.requestID, buffer: buffer
                )
                return Decision(state: state, reply: Reply.rejection(error, partition: partition, at: now), changes: [])
            case .fullForPrincipal:
                let error = ProtocolError(
                    code: .membersFull,
                    message: "principal '\(LogValue.escape(request.principal ?? "-"))' has joined \(Roster.maxMembersPerPrincipal) live members of buffer '\(LogValue.escape(buffer))', the most one principal holds of one buffer (half of its \(Roster.maxMembers), so that other frontends' users always find places); nothing changed",
                    requestID: request.requestID, buffer: buffer
                )
                return Decision(state: state, reply: Reply.rejection(error, partition: partition, at: now), changes: [])
            }

        case .leave(_, let connection, let token):
            guard let left = next.roster.leave(connection: connection, token: token, principal: request.principal, now: now) else {
                let reply = Reply(requestID: request.requestID, status: .notMember, buffer: buffer, at: now, partition: partition)
                return Decision(state: state, reply: reply, changes: [])
            }
            let reply = Reply(
                requestID: request.requestID, status: .left, buffer: buffer, token: token, at: now, partition: partition,
                membership: MembershipReply(replicaID: left.member.replicaID, members: next.roster.live(at: now).count)
            )
            return Decision(state: next, reply: reply, changes: [], memberships: [left.on(buffer)])

        case .release(_, let connection, let token):
            if let holder = state.holder, let expiresAt = state.expiresAt, holder.connection.exactlyEquals(connection), token == state.token,
               samePrincipal(state.principal, request.principal) {
                next = state.vacated
                changes.append(OwnershipChange(
                    kind: .released, buffer: buffer, holder: holder, token: token, at: now, expiresAt: expiresAt, principal: request.principal
                ))
                let reply = Reply(requestID: request.requestID, status: .released, buffer: buffer, holder: nil, token: token, expiresAt: nil, at: now, partition: partition)
                return Decision(state: next, reply: reply, changes: changes)
            }
            status = .notOwner

        case .inspect:
            status = .state

        case .forceRelease:
            if let holder = state.holder, let expiresAt = state.expiresAt {
                next = state.vacated
                changes.append(OwnershipChange(
                    kind: .released, buffer: buffer, holder: holder, token: state.token, at: now, expiresAt: expiresAt, forced: true,
                    principal: request.principal
                ))
                let reply = Reply(requestID: request.requestID, status: .released, buffer: buffer, holder: nil, token: state.token, expiresAt: nil, at: now, partition: partition)
                return Decision(state: next, reply: reply, changes: changes)
            }
            status = .notOwner

        case .releaseConnection:
            preconditionFailure("release_connection is decided by PartitionState, not per buffer")

        case .describe, .events:
            // Reads are answered by the worker without a decision; one that got here changes nothing.
            let error = ProtocolError(code: .internalError, message: "op '\(request.operation)' is not a decision", requestID: request.requestID, buffer: request.buffer)
            return Decision(state: state, reply: Reply.rejection(error, partition: partition, at: now), changes: [])
        }

        let holder = next.liveHolder(at: now)
        let reply = Reply(
            requestID: request.requestID, status: status, buffer: buffer, holder: holder,
            token: next.token, expiresAt: holder == nil ? nil : next.expiresAt, at: now, partition: partition,
            roster: status == .state ? RosterView(next.roster, at: now) : nil
        )
        return Decision(state: next, reply: reply, changes: changes)
    }

    /// Whether a request's principal is the one a lease was claimed by (exact bytes). A lease recorded
    /// without a principal matches only requests without one (the store's own tests); the worker gives
    /// every ownership request a principal, so such a lease can only expire or be force-released.
    public static func samePrincipal(_ recorded: String?, _ requester: String?) -> Bool {
        switch (recorded, requester) {
        case (nil, nil): true
        case (let recorded?, let requester?): recorded.exactlyEquals(requester)
        default: false
        }
    }

    /// Expires `state` if its lease has run out at `now`; nil when there is nothing to expire.
    public static func expire(buffer: String, state: BufferState, now: Timestamp) -> (state: BufferState, change: OwnershipChange)? {
        guard let holder = state.holder, let expiresAt = state.expiresAt, expiresAt <= now else { return nil }
        let change = OwnershipChange(kind: .expired, buffer: buffer, holder: holder, token: state.token, at: now, expiresAt: expiresAt)
        return (state.vacated, change)
    }
}

/// The buffers of one partition and the decisions on them, in queue order.
///
/// The store seeds it with the rows a batch touches, applies the batch, and
/// writes back what changed; tests use it as the reference model.
public struct PartitionState: Sendable {
    /// The partition this state belongs to.
    public let partition: Int
    /// The partitioner of the deployment, used to detect misrouted requests.
    public let partitioner: Partitioner
    /// The buffers known to this state, by exact name; a buffer not present has never been claimed.
    public private(set) var buffers: [ExactString: BufferState]
    /// How long a replica id stays reserved for a member that expired or whose connection was released.
    public let graceMilliseconds: Int64

    /// Creates a partition state seeded with known buffers.
    public init(
        partition: Int, partitioner: Partitioner, buffers: [ExactString: BufferState] = [:], graceMilliseconds: Int64 = Roster.defaultGraceMilliseconds
    ) {
        self.partition = partition
        self.partitioner = partitioner
        self.buffers = buffers
        self.graceMilliseconds = graceMilliseconds
    }

    /// The state of `buffer` (fresh when never seen).
    public func state(of buffer: String) -> BufferState {
        buffers[ExactString(buffer)] ?? .fresh
    }

    /// The answer to a request whose `deadline` refuses it at database time `now` (docs/protocol.md, section
    /// 3.3, step 11): passed (`deadline_exceeded`) or more than a request's lifetime ahead (`invalid_request`).
    /// Such a request decides nothing and is not recorded, so a retry with another deadline is decided.
    public func deadlineRefusal(_ request: Request, at now: Timestamp) -> Reply? {
        guard let deadline = request.deadline else { return nil }
        if deadline <= now {
            let error = ProtocolError(
                code: .deadlineExceeded,
                message: "the request's deadline \(deadline.rfc3339) passed before it was decided (database time \(now.rfc3339)); nothing changed",
                requestID: request.requestID, buffer: request.buffer
            )
            return Reply.rejection(error, partition: partition, at: now)
        }
        let limit = ProtocolV1.maxRequestLifetimeMilliseconds
        if deadline > now.adding(milliseconds: limit) {
            let error = ProtocolError(
                code: .invalidRequest,
                message: "field 'deadline' \(deadline.rfc3339) is more than \(limit / 1000) s after the database time \(now.rfc3339): a request may live at most \(limit / 1000) s (check the sender's clock)",
                requestID: request.requestID, buffer: request.buffer
            )
            return Reply.rejection(error, partition: partition, at: now)
        }
        return nil
    }

    /// Applies one request at database time `now`, returning the reply and the ownership changes.
    ///
    /// For requests that do not wait on buffers without a line (what workers serve today); ``decide(_:at:)``
    /// is the whole decision, with waiting claims and the answers to waiters.
    public mutating func apply(_ request: Request, at now: Timestamp) -> (reply: Reply, changes: [OwnershipChange]) {
        let outcome = decide(request, at: now)
        let reply = outcome.reply ?? Reply(
            requestID: request.requestID, status: .error, buffer: request.buffer, at: now, partition: partition,
            error: ReplyError(code: .internalError, message: "the claim waits in line; its answer comes when it leaves the line")
        )
        return (reply, outcome.changes)
    }

    /// Decides one request at database time `now` (docs/protocol.md, section 4, and
    /// docs/design/fair-waiting.md): the buffer is settled first (expired waits denied, a free buffer
    /// handed to the head of its line), then the request is decided, then the buffer is settled again (a
    /// release hands it to the next in line in the same decision). A claim with ``Request/waiting`` that
    /// finds the buffer held joins the line and gets no reply now; a repeat of a waiting claim takes the
    /// repeat's reply address and does not join twice.
    public mutating func decide(_ request: Request, at now: Timestamp) -> Outcome {
        if let refusal = deadlineRefusal(request, at: now) { return Outcome(reply: refusal) }
        if case .releaseConnection(let connection) = request.command {
            return releaseConnection(connection, request: request, at: now)
        }
        let buffer = request.buffer ?? ""
        let home = partitioner.partition(of: buffer)
        guard home == partition else {
            let error = ProtocolError(
                code: .misrouted,
                message: "buffer '\(buffer)' belongs to partition \(home) of \(partitioner.count), not \(partition): publish it with routing key '\(home)'",
                requestID: request.requestID, buffer: buffer
            )
            return Outcome(reply: Reply.rejection(error, partition: partition, at: now))
        }
        let before = state(of: buffer)
        if let waiter = before.line.first(where: { $0.requestID.exactlyEquals(request.requestID) }),
           !waiter.fingerprint.exactlyEquals(ProtocolCodec.fingerprint(request)) {
            // Another request under the request id of a claim in this buffer's line (even one whose wait
            // has just run out, or that the settling below would hand the buffer to): refused before
            // anything is decided, so that id keeps naming only the waiter and its answer.
            return Outcome(reply: Reply.rejection(
                .requestIDOfAWaiter(request.requestID, waitingFor: buffer, requestBuffer: buffer), partition: partition, at: now
            ))
        }
        var (current, outcome) = OwnershipRules.settle(buffer: buffer, state: before, now: now, partition: partition)

        if let index = outcome.answers.firstIndex(where: { $0.waiter.requestID.exactlyEquals(request.requestID) }),
           outcome.answers[index].waiter.fingerprint.exactlyEquals(ProtocolCodec.fingerprint(request)) {
            // A repeat of a claim that has just left the line (granted, or its wait ran out): the repeat
            // gets that answer, once, and is not decided again.
            outcome.reply = outcome.answers.remove(at: index).reply
            store(current, for: buffer, was: before)
            return outcome
        }
        if let index = current.line.firstIndex(where: { $0.requestID.exactlyEquals(request.requestID) }) {
            // A repeat of a claim that waits in line (anything else under its id was refused above): it
            // moves the answer to the new address.
            current.line[index].replyTo = request.waiting?.replyTo
            current.line[index].correlationID = request.waiting?.correlationID
            store(current, for: buffer, was: before)
            return outcome
        }

        let line = current.line
        current.line = []
        let decision = OwnershipRules.decide(request, state: current, now: now, partition: partition, graceMilliseconds: graceMilliseconds)
        var next = decision.state
        next.line = line
        outcome.changes += decision.changes
        outcome.memberships += decision.memberships
        if decision.reply.status == .denied, case .claim(_, let holder, let lease) = request.command, let waiting = request.waiting,
           line.count < ProtocolV1.maxLineLength, Self.mayJoin(line, holder: holder, principal: request.principal) {
            // Held by someone else: join the end of the line, answered when leaving it (a full line denies
            // at once, below).
            let until = now.adding(milliseconds: waiting.milliseconds)
            next.line.append(Waiter(
                requestID: request.requestID, holder: holder, principal: request.principal, leaseMilliseconds: lease,
                waitUntil: request.deadline.map { min($0, until) } ?? until, replyTo: waiting.replyTo, correlationID: waiting.correlationID,
                fingerprint: ProtocolCodec.fingerprint(request)
            ))
        } else {
            outcome.reply = decision.reply
        }
        let (settled, handoff) = OwnershipRules.settle(buffer: buffer, state: next, now: now, partition: partition)
        outcome.changes += handoff.changes
        outcome.answers += handoff.answers
        store(settled, for: buffer, was: before)
        return outcome
    }

    /// Whether a claim of `holder` by `principal` may take a place in `line`: one place per principal and
    /// connection, and at most ``ProtocolV1/maxLinePlacesPerPrincipal`` per principal, so that one frontend
    /// cannot fill a line (everyone else denied) and take the buffer at its release.
    static func mayJoin(_ line: [Waiter], holder: Holder, principal: String?) -> Bool {
        var places = 0
        for waiter in line where OwnershipRules.samePrincipal(waiter.principal, principal) {
            if waiter.holder.connection.exactlyEquals(holder.connection) { return false }
            places += 1
        }
        return places < ProtocolV1.maxLinePlacesPerPrincipal
    }

    private mutating func store(_ state: BufferState, for buffer: String, was before: BufferState) {
        if state != before { buffers[ExactString(buffer)] = state }
    }

    /// Expires every lease that has run out at `now`, in buffer order.
    public mutating func sweep(at now: Timestamp) -> [OwnershipChange] {
        sweepWithLines(at: now).changes
    }

    /// The sweep with lines: every lease that has run out is expired and its buffer handed to the head of
    /// its line; every wait that has run out is denied. In buffer order.
    public mutating func sweepWithLines(at now: Timestamp) -> Outcome {
        var outcome = Outcome(reply: nil)
        for buffer in buffers.keys.sorted() {
            let before = buffers[buffer]!
            var state = before
            if let (next, change) = OwnershipRules.expire(buffer: buffer.string, state: state, now: now) {
                state = next
                state.line = before.line
                outcome.changes.append(change)
            }
            if !state.line.isEmpty {
                let (settled, handoff) = OwnershipRules.settle(buffer: buffer.string, state: state, now: now, partition: partition)
                state = settled
                outcome.changes += handoff.changes
                outcome.answers += handoff.answers
            }
            // Memberships that ran out: their ids reserved for the grace; reservations whose grace ended: gone.
            outcome.memberships += state.roster.expire(now: now, graceMilliseconds: graceMilliseconds).map { $0.on(buffer.string) }
            if state != before { buffers[buffer] = state }
        }
        return outcome
    }

    private mutating func releaseConnection(_ connection: String, request: Request, at now: Timestamp) -> Outcome {
        var changes: [OwnershipChange] = []
        var answers: [WaiterAnswer] = []
        var memberships: [MembershipChange] = []
        for buffer in buffers.keys.sorted() {
            var state = buffers[buffer]!
            // The connection's memberships end, each id reserved for its user for the grace.
            memberships += state.roster.releaseConnection(connection, principal: request.principal, now: now, graceMilliseconds: graceMilliseconds)
                .map { $0.on(buffer.string) }
            // The connection's own waiters leave the line, denied (docs/design/fair-waiting.md, rule 5).
            for waiter in state.line where waiter.holder.connection.exactlyEquals(connection) && OwnershipRules.samePrincipal(waiter.principal, request.principal) {
                let live = state.liveHolder(at: now)
                answers.append(WaiterAnswer(waiter: waiter, reply: Reply(
                    requestID: waiter.requestID, status: .denied, buffer: buffer.string, holder: live, token: state.token,
                    expiresAt: live == nil ? nil : state.expiresAt, at: now, partition: partition
                )))
            }
            state.line.removeAll { $0.holder.connection.exactlyEquals(connection) && OwnershipRules.samePrincipal($0.principal, request.principal) }
            if let holder = state.holder, let expiresAt = state.expiresAt, holder.connection.exactlyEquals(connection),
               OwnershipRules.samePrincipal(state.principal, request.principal) {
                let line = state.line
                state = state.vacated
                state.line = line
                changes.append(OwnershipChange(
                    kind: .released, buffer: buffer.string, holder: holder, token: state.token, at: now, expiresAt: expiresAt, principal: request.principal
                ))
                let (settled, handoff) = OwnershipRules.settle(buffer: buffer.string, state: state, now: now, partition: partition)
                state = settled
                changes += handoff.changes
                answers += handoff.answers
            }
            if state != buffers[buffer]! { buffers[buffer] = state }
        }
        // List names up to a byte budget (the count is always complete), so the reply stays far below
        // the broker's message size limit however many buffers the connection held.
        let released = changes.filter { $0.kind == .released }
        var listed: [String] = []
        var bytes = 0
        for change in released {
            bytes += change.buffer.utf8.count + 8
            if bytes > ProtocolV1.maxReleasedListBytes { break }
            listed.append(change.buffer)
        }
        let reply = Reply(
            requestID: request.requestID, status: .releasedConnection, at: now, partition: partition,
            buffers: listed, releasedCount: released.count, endedMemberships: memberships.filter { $0.kind == .released }.count
        )
        return Outcome(reply: reply, changes: changes, answers: answers, memberships: memberships)
    }
}
