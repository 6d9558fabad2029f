import BatonCore

/// Checks guarantees 1-3 of docs/protocol.md (section 11) over a history of ownership changes (the audit rows).
///
/// It is deliberately independent of how the history was produced, so that the
/// same checker judges Baton's store and a naive check-then-act implementation.
public enum HistoryChecker {
    /// One broken invariant.
    public struct Violation: Sendable, Hashable, CustomStringConvertible {
        /// Which invariant.
        public enum Kind: String, Sendable, Hashable {
            /// Invariant 1: a grant was decided while the previous grant was still held.
            case overlappingGrant = "overlapping_grant"
            /// Invariant 2: a grant's token is not above every earlier grant's token.
            case tokenReused = "token_reused"
            /// Invariant 3: the database shows a token lower than one already granted.
            case tokenRegressed = "token_regressed"
            /// A release or expiry that closes no grant, or closes it before it began.
            case unmatchedClose = "unmatched_close"
            /// Fair waiting (protocol section 19): a buffer was granted to someone other than the head of
            /// its line while an earlier waiter still waited.
            case lineJumped = "line_jumped"
            /// Replica memberships (protocol section 20): a replica id joined while a live member of the
            /// buffer held it.
            case duplicateReplicaID = "duplicate_replica_id"
            /// A replica id handed to another user during its grace, or reclaimed by another user than the
            /// one it was reserved for.
            case reservedIDTaken = "reserved_id_taken"
            /// A membership that ended (left, expired, released) that was not live.
            case unmatchedMemberEnd = "unmatched_member_end"
        }

        /// Which invariant.
        public var kind: Kind
        /// The buffer.
        public var buffer: String
        /// What was seen.
        public var detail: String

        public var description: String { "\(kind.rawValue) on '\(buffer)': \(detail)" }
    }

    /// The verdict over a history.
    public struct Report: Sendable, Hashable {
        /// Grants seen.
        public var grants = 0
        /// Releases and expiries seen.
        public var closes = 0
        /// Grants decided while another grant of the same buffer was still held (invariant 1 or 2 broken).
        public var doubleGrants = 0
        /// Every violation, in buffer order.
        public var violations: [Violation] = []

        /// True when no invariant is broken.
        public var passed: Bool { violations.isEmpty }
    }

    /// Checks `changes` (in any order) and, when given, the final token the database shows per buffer.
    public static func check(_ changes: [OwnershipChange], finalTokens: [ExactString: Int64]? = nil) -> Report {
        var report = Report()
        // Invariants 1-3 are about leases; a buffer's members (the `member_` kinds) are checkMemberships'.
        let byBuffer = Dictionary(grouping: changes.filter(\.kind.isOwnership)) { ExactString($0.buffer) }
        for key in byBuffer.keys.sorted() {
            let buffer = key.string
            let history = byBuffer[key]!.sorted { lhs, rhs in
                // Grants of a token come before the release or expiry of that token.
                (lhs.token, lhs.kind == .granted ? 0 : 1, lhs.at) < (rhs.token, rhs.kind == .granted ? 0 : 1, rhs.at)
            }
            var open: OwnershipChange?  // the grant still held
            var lastGrant: OwnershipChange?
            var lastClose: OwnershipChange?
            for change in history {
                switch change.kind {
                case .granted:
                    report.grants += 1
                    var doubled = false
                    if let previous = lastGrant, change.token <= previous.token {
                        doubled = true
                        report.violations.append(Violation(
                            kind: .tokenReused, buffer: buffer,
                            detail: "token \(change.token) granted to \(change.holder) at \(change.at) after token \(previous.token) was granted to \(previous.holder) at \(previous.at)"
                        ))
                    }
                    if let closed = lastClose, change.at < closed.at {
                        doubled = true
                        report.violations.append(Violation(
                            kind: .overlappingGrant, buffer: buffer,
                            detail: "token \(change.token) granted to \(change.holder) at \(change.at), before token \(closed.token) of \(closed.holder) was \(closed.kind) at \(closed.at)"
                        ))
                    }
                    if let held = open {
                        doubled = true
                        report.violations.append(Violation(
                            kind: .overlappingGrant, buffer: buffer,
                            detail: "token \(change.token) granted to \(change.holder) at \(change.at) while token \(held.token) of \(held.holder) (granted at \(held.at)) was neither released nor expired"
                        ))
                    }
                    if doubled { report.doubleGrants += 1 }
                    open = change
                    lastGrant = change
                case .released, .expired:
                    report.closes += 1
                    guard let held = open, held.token == change.token, held.holder == change.holder, held.at <= change.at else {
                        report.violations.append(Violation(
                            kind: .unmatchedClose, buffer: buffer,
                            detail: "\(change.kind) of token \(change.token) by \(change.holder) at \(change.at) closes no open grant"
                        ))
                        continue
                    }
                    if change.kind == .expired, change.expiresAt > change.at {
                        report.violations.append(Violation(
                            kind: .unmatchedClose, buffer: buffer,
                            detail: "token \(change.token) expired at \(change.at) before its lease ended at \(change.expiresAt)"
                        ))
                    }
                    open = nil
                    lastClose = change
                case .memberJoined, .memberReclaimed, .memberLeft, .memberExpired, .memberReleased:
                    continue  // filtered out above
                }
            }
            if let finalTokens, let lastGrant, let final = finalTokens[key], final < lastGrant.token {
                report.violations.append(Violation(
                    kind: .tokenRegressed, buffer: buffer,
                    detail: "the database shows token \(final) after token \(lastGrant.token) was granted"
                ))
            }
        }
        return report
    }

    /// A claim seen waiting in a buffer's line (a row of `baton_waiters`), at database time `seenAt`.
    public struct LineSighting: Sendable, Hashable {
        public var buffer: String
        /// Its place: positions grow in the order claims joined.
        public var position: Int64
        /// Its claim's request id: the audit trail names it on the waiter's grant.
        public var requestID: String
        public var holder: Holder
        /// When its wait runs out (database time).
        public var waitUntil: Timestamp
        /// When it was seen in line (database time): it joined before then.
        public var seenAt: Timestamp

        public init(buffer: String, position: Int64, requestID: String, holder: Holder, waitUntil: Timestamp, seenAt: Timestamp) {
            self.buffer = buffer
            self.position = position
            self.requestID = requestID
            self.holder = holder
            self.waitUntil = waitUntil
            self.seenAt = seenAt
        }
    }

    /// Checks the FIFO property of lines (protocol section 19) over the audit trail and waiters seen in
    /// line: whenever a buffer is granted, no waiter that joined earlier and whose wait had not run out is
    /// still in line. A grant to a waiter is matched by its request id (``OwnershipChange/requestID``).
    ///
    /// `waitingHolders` are the holders that only make waiting claims: a grant to any other holder is a
    /// direct grant, which must find the line empty of waiters seen before it; a grant to a waiting holder
    /// never seen in line has no known position and is not judged (it waited too briefly to be seen).
    public static func checkLines(_ changes: [OwnershipChange], sightings: [LineSighting], waitingHolders: Set<Holder>) -> [Violation] {
        struct Waiter {
            var position: Int64
            var holder: Holder
            var waitUntil: Int64
            var firstSeen: Int64
            var grantedAt: Int64?
        }
        var violations: [Violation] = []
        let grantsByBuffer = Dictionary(grouping: changes.filter { $0.kind == .granted }) { ExactString($0.buffer) }
        let sightingsByBuffer = Dictionary(grouping: sightings) { ExactString($0.buffer) }
        for (key, seen) in sightingsByBuffer {
            let grants = (grantsByBuffer[key] ?? []).sorted { $0.token < $1.token }
            // One waiter per position, first seen at its earliest sighting.
            var waiters: [Int64: Waiter] = [:]
            for sighting in seen {
                let firstSeen = min(waiters[sighting.position]?.firstSeen ?? .max, sighting.seenAt.milliseconds)
                waiters[sighting.position] = Waiter(
                    position: sighting.position, holder: sighting.holder, waitUntil: sighting.waitUntil.milliseconds, firstSeen: firstSeen
                )
            }
            // Match each waiter to its grant.
            var positionOfGrant: [Int64: Int64] = [:]  // token -> position
            let positionOfRequest = Dictionary(seen.map { ($0.requestID, $0.position) }, uniquingKeysWith: { first, _ in first })
            for grant in grants {
                guard let requestID = grant.requestID, let position = positionOfRequest[requestID], waiters[position]?.grantedAt == nil else { continue }
                waiters[position]!.grantedAt = grant.at.milliseconds
                positionOfGrant[grant.token] = position
            }
            for grant in grants {
                let at = grant.at.milliseconds
                let own = positionOfGrant[grant.token]
                if own == nil, waitingHolders.contains(grant.holder) { continue }  // a waiter never seen: position unknown
                // Waiters certainly in line at `at`: joined before it (an earlier position than this grant's
                // waiter, or seen before it), not yet granted, and waiting past it (1 ms for the rounding of
                // both times to milliseconds).
                let ahead = waiters.values.filter { waiter in
                    let joinedBefore = own.map { waiter.position < $0 } ?? (waiter.firstSeen + 1 < at)
                    return joinedBefore && waiter.waitUntil > at + 1 && (waiter.grantedAt.map { $0 > at } ?? true)
                }
                guard let first = ahead.min(by: { $0.position < $1.position }) else { continue }
                violations.append(Violation(
                    kind: .lineJumped, buffer: key.string,
                    detail: "token \(grant.token) granted to \(grant.holder) at \(grant.at)\(own.map { " (line position \($0))" } ?? " (a claim without wait)") while \(first.holder) (line position \(first.position), waiting until \(Timestamp(milliseconds: first.waitUntil))) was ahead of it"
                ))
            }
        }
        return violations.sorted { ($0.buffer, $0.detail) < ($1.buffer, $1.detail) }
    }

    /// Checks the membership invariants (protocol section 20) over the `member_` changes of a history, in
    /// history order (by position): no replica id joined while a live member of the buffer holds it; an id
    /// reserved for a user (a membership that expired, until its end plus `graceMilliseconds`, or whose
    /// connection was released, until then plus the grace) goes to nobody else before the grace ends and
    /// is reclaimed only by that user; every end closes a live membership. Tokens are the leases' concern
    /// (``check(_:finalTokens:)``), which they share a sequence with.
    public static func checkMemberships(_ changes: [OwnershipChange], graceMilliseconds: Int64) -> [Violation] {
        struct Live {
            var holder: Holder
            var token: Int64
        }
        var violations: [Violation] = []
        var live: [ExactString: [Int: Live]] = [:]
        var reserved: [ExactString: [Int: (user: String, until: Int64)]] = [:]
        for change in changes where !change.kind.isOwnership {
            let key = ExactString(change.buffer)
            guard let id = change.replicaID else {
                violations.append(Violation(kind: .unmatchedMemberEnd, buffer: change.buffer, detail: "\(change.kind) of \(change.holder) at \(change.at) has no replica id"))
                continue
            }
            let at = change.at.milliseconds
            switch change.kind {
            case .memberJoined, .memberReclaimed:
                if let holder = live[key]?[id] {
                    violations.append(Violation(
                        kind: .duplicateReplicaID, buffer: change.buffer,
                        detail: "replica \(id) joined by \(change.holder) (token \(change.token)) at \(change.at) while \(holder.holder) (token \(holder.token)) held it"
                    ))
                }
                if let reservation = reserved[key]?[id], at < reservation.until, !reservation.user.exactlyEquals(change.holder.user) {
                    violations.append(Violation(
                        kind: .reservedIDTaken, buffer: change.buffer,
                        detail: "replica \(id) went to \(change.holder) at \(change.at) while reserved for user '\(reservation.user)' until \(Timestamp(milliseconds: reservation.until))"
                    ))
                }
                if change.kind == .memberReclaimed, reserved[key]?[id].map({ !$0.user.exactlyEquals(change.holder.user) }) ?? true {
                    violations.append(Violation(
                        kind: .reservedIDTaken, buffer: change.buffer,
                        detail: "replica \(id) reclaimed by \(change.holder) at \(change.at) without a reservation of that user"
                    ))
                }
                reserved[key]?[id] = nil
                live[key, default: [:]][id] = Live(holder: change.holder, token: change.token)
            case .memberLeft, .memberExpired, .memberReleased:
                guard let holder = live[key]?[id], holder.holder == change.holder, holder.token == change.token else {
                    violations.append(Violation(
                        kind: .unmatchedMemberEnd, buffer: change.buffer,
                        detail: "\(change.kind) of replica \(id) by \(change.holder) (token \(change.token)) at \(change.at) ends no live membership"
                    ))
                    continue
                }
                live[key]?[id] = nil
                switch change.kind {
                case .memberExpired:
                    reserved[key, default: [:]][id] = (change.holder.user, change.expiresAt.milliseconds + graceMilliseconds)
                case .memberReleased:
                    reserved[key, default: [:]][id] = (change.holder.user, at + graceMilliseconds)
                default:
                    break
                }
            case .granted, .released, .expired:
                break
            }
        }
        return violations
    }
}
