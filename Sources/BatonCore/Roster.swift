/// Collaborators of one buffer: replica ids decided by the partition's serializer, with a reconnect
/// grace (issue 23).
///
/// A collab server gives every live collaborator of a shared buffer a small replica id, unique among the
/// live collaborators, and lets one who lost its connection come back within a grace period under the
/// same id: two live participants acting under one id is what made edits vanish and cursors jump in the
/// incident. Here the rules are a pure value, decided in queue order like ownership, so allocation never
/// conflicts and needs no retries.
///
/// The rules:
/// - **join** by a connection that is not a live member gives the smallest replica id ≥ 1 held by no live
///   member and reserved for nobody else, or the user's own reservation (the smallest, when several);
///   a fresh token from the buffer's sequence; at most ``maxMembers`` live members.
/// - **join** by a connection that is a live member (same user) extends it and keeps its id and token.
/// - **leave** (connection and token) frees the id at once, without grace.
/// - **renew** (connection and token) extends a live membership.
/// - A membership that **expires**, or whose connection is **released**, keeps its id reserved for its
///   user for the grace period; a join by that user within it, from any connection, gets it back
///   (``MembershipChange/Kind/reclaimed``); nobody else gets it until the grace ends.
///
/// A membership whose `expiresAt` equals `now` has expired, as a lease does.
public struct Roster: Sendable, Hashable {
    /// One live (or not yet swept) member.
    public struct Member: Sendable, Hashable {
        public var replicaID: Int
        public var user: String
        public var connection: String
        /// Fencing token of the membership, from the buffer's token sequence.
        public var token: Int64
        public var expiresAt: Timestamp
        /// Who joined (the AMQP user of the request), checked on renew and leave like a lease's.
        public var principal: String?

        public init(replicaID: Int, user: String, connection: String, token: Int64, expiresAt: Timestamp, principal: String? = nil) {
            self.replicaID = replicaID
            self.user = user
            self.connection = connection
            self.token = token
            self.expiresAt = expiresAt
            self.principal = principal
        }
    }

    /// A replica id kept for a user whose membership ended without a leave.
    public struct Reservation: Sendable, Hashable {
        public var replicaID: Int
        public var user: String
        /// The end of the grace: from then on the id is free.
        public var until: Timestamp

        public init(replicaID: Int, user: String, until: Timestamp) {
            self.replicaID = replicaID
            self.user = user
            self.until = until
        }
    }

    /// The most live members of one buffer.
    public static let maxMembers = 1024
    /// The most live members of one buffer that one principal (the broker user of the frontend that joined
    /// them) may hold: half of ``maxMembers``, so that no single frontend can fill a buffer's roster and
    /// refuse every other frontend's users (as a line keeps places for other principals).
    public static let maxMembersPerPrincipal = maxMembers / 2
    /// How long an id stays reserved for a member that expired or whose connection was released, unless
    /// the deployment sets another grace.
    public static let defaultGraceMilliseconds: Int64 = 30_000

    /// Members, by replica id (live ones and expired ones not yet swept).
    public private(set) var members: [Member]
    /// Reservations, by replica id (ended ones are dropped as they are met).
    public private(set) var reservations: [Reservation]

    /// An empty roster.
    public init() {
        members = []
        reservations = []
    }

    /// A roster as stored (any order; kept sorted by replica id).
    public init(members: [Member], reservations: [Reservation]) {
        self.members = members.sorted { $0.replicaID < $1.replicaID }
        self.reservations = reservations.sorted { $0.replicaID < $1.replicaID }
    }

    /// The members live at `now`.
    public func live(at now: Timestamp) -> [Member] {
        members.filter { now < $0.expiresAt }
    }

    /// Whether nothing is held or reserved at `now` (the roster can be forgotten).
    public func isEmpty(at now: Timestamp) -> Bool {
        !members.contains { now < $0.expiresAt } && !reservations.contains { now < $0.until }
    }

    // MARK: - Decisions

    /// What a join decided.
    public enum JoinOutcome: Sendable, Hashable {
        /// The connection is a member now: `extended` when it already was (same id and token),
        /// `reclaimed` when it got back its user's reserved id.
        case joined(Member, extended: Bool, reclaimed: Bool)
        /// The connection is a live member under another user.
        case connectionInUse(Member)
        /// ``maxMembers`` members are live.
        case full
        /// ``maxMembersPerPrincipal`` live members were joined by the same principal.
        case fullForPrincipal
    }

    /// Joins `connection` for `user` until `now + leaseMilliseconds`; `nextToken` issues a token from the
    /// buffer's sequence (called only when a new membership begins). Expired members met on the way become
    /// reservations (their changes first in the returned list).
    public mutating func join(
        user: String, connection: String, principal: String?, leaseMilliseconds: Int64, now: Timestamp, graceMilliseconds: Int64,
        nextToken: () -> Int64
    ) -> (outcome: JoinOutcome, changes: [MembershipChange]) {
        var changes = expire(now: now, graceMilliseconds: graceMilliseconds)
        let until = now.adding(milliseconds: leaseMilliseconds)
        if let index = members.firstIndex(where: { $0.connection.exactlyEquals(connection) }) {
            let member = members[index]
            guard member.user.exactlyEquals(user), OwnershipRules.samePrincipal(member.principal, principal) else {
                return (.connectionInUse(member), changes)
            }
            members[index].expiresAt = max(member.expiresAt, until)
            return (.joined(members[index], extended: true, reclaimed: false), changes)
        }
        guard members.count < Self.maxMembers else { return (.full, changes) }
        guard members.count < Self.maxMembersPerPrincipal
            || members.lazy.filter({ OwnershipRules.samePrincipal($0.principal, principal) }).count < Self.maxMembersPerPrincipal
        else { return (.fullForPrincipal, changes) }
        let replicaID: Int
        let reclaimed: Bool
        if let index = reservations.firstIndex(where: { $0.user.exactlyEquals(user) }) {
            replicaID = reservations[index].replicaID
            reservations.remove(at: index)
            reclaimed = true
        } else {
            replicaID = smallestFreeID()
            reclaimed = false
        }
        let member = Member(replicaID: replicaID, user: user, connection: connection, token: nextToken(), expiresAt: until, principal: principal)
        members.insert(member, at: members.firstIndex { $0.replicaID > replicaID } ?? members.endIndex)
        changes.append(MembershipChange(kind: reclaimed ? .reclaimed : .joined, member: member, at: now))
        return (.joined(member, extended: false, reclaimed: reclaimed), changes)
    }

    /// Ends the live membership of `connection` holding `token` at once, freeing its id; nil (nothing
    /// changed) when there is none.
    public mutating func leave(connection: String, token: Int64, principal: String?, now: Timestamp) -> MembershipChange? {
        guard let index = liveIndex(connection: connection, token: token, principal: principal, now: now) else { return nil }
        let member = members.remove(at: index)
        return MembershipChange(kind: .left, member: member, at: now)
    }

    /// Extends the live membership of `connection` holding `token` to `now + leaseMilliseconds`; nil
    /// when there is none.
    public mutating func renew(connection: String, token: Int64, principal: String?, leaseMilliseconds: Int64, now: Timestamp) -> Member? {
        guard let index = liveIndex(connection: connection, token: token, principal: principal, now: now) else { return nil }
        members[index].expiresAt = max(members[index].expiresAt, now.adding(milliseconds: leaseMilliseconds))
        return members[index]
    }

    /// Turns every membership expired at `now` into a reservation until its expiry plus the grace, and
    /// drops reservations whose grace has ended.
    public mutating func expire(now: Timestamp, graceMilliseconds: Int64) -> [MembershipChange] {
        reservations.removeAll { $0.until <= now }
        let expired = members.filter { $0.expiresAt <= now }
        guard !expired.isEmpty else { return [] }
        members.removeAll { $0.expiresAt <= now }
        return expired.map { member in
            let until = member.expiresAt.adding(milliseconds: graceMilliseconds)
            if now < until { reserve(Reservation(replicaID: member.replicaID, user: member.user, until: until)) }
            return MembershipChange(kind: .expired, member: member, at: now, reservedUntil: now < until ? until : nil)
        }
    }

    /// Ends every membership of `connection` joined by `principal` (its connection is gone:
    /// `release_connection`, which concerns only the requester's own), each id reserved for its user until
    /// `now` plus the grace.
    public mutating func releaseConnection(_ connection: String, principal: String?, now: Timestamp, graceMilliseconds: Int64) -> [MembershipChange] {
        var changes = expire(now: now, graceMilliseconds: graceMilliseconds)
        let until = now.adding(milliseconds: graceMilliseconds)
        let ends = { (member: Member) in member.connection.exactlyEquals(connection) && OwnershipRules.samePrincipal(member.principal, principal) }
        let released = members.filter(ends)
        members.removeAll(where: ends)
        for member in released {
            if now < until { reserve(Reservation(replicaID: member.replicaID, user: member.user, until: until)) }
            changes.append(MembershipChange(kind: .released, member: member, at: now, reservedUntil: now < until ? until : nil))
        }
        return changes
    }

    /// The live membership of `connection` holding `token`, joined by `principal`.
    private func liveIndex(connection: String, token: Int64, principal: String?, now: Timestamp) -> Int? {
        members.firstIndex {
            $0.connection.exactlyEquals(connection) && $0.token == token && now < $0.expiresAt && OwnershipRules.samePrincipal($0.principal, principal)
        }
    }

    // MARK: - Ids

    private mutating func reserve(_ reservation: Reservation) {
        reservations.insert(reservation, at: reservations.firstIndex { $0.replicaID > reservation.replicaID } ?? reservations.endIndex)
    }

    /// The smallest id ≥ 1 that no member holds and nobody has reserved (both lists are sorted).
    private func smallestFreeID() -> Int {
        var candidate = 1
        var m = 0
        var r = 0
        while true {
            while m < members.count, members[m].replicaID < candidate { m += 1 }
            while r < reservations.count, reservations[r].replicaID < candidate { r += 1 }
            let taken = (m < members.count && members[m].replicaID == candidate) || (r < reservations.count && reservations[r].replicaID == candidate)
            if !taken { return candidate }
            candidate += 1
        }
    }
}

/// A buffer's live members as `inspect` shows them (revision 6).
public struct RosterView: Sendable, Hashable {
    /// How many members are live.
    public var count: Int
    /// The first of them by replica id, at most ``ProtocolV1/maxListedMembers`` and at most
    /// ``ProtocolV1/maxReleasedListBytes`` of names, so that a reply stays far below the broker's message
    /// size limit however long the names (the principal is not shown).
    public var listed: [Roster.Member]

    public init(count: Int, listed: [Roster.Member]) {
        self.count = count
        self.listed = listed
    }

    /// The live members of `roster` at `now`.
    public init(_ roster: Roster, at now: Timestamp) {
        let live = roster.live(at: now)
        var listed: [Roster.Member] = []
        var bytes = 0
        for member in live.prefix(ProtocolV1.maxListedMembers) {
            // Names as JSON may grow (escapes): count each byte up to six times, as the encoder may write it.
            bytes += 6 * (member.user.utf8.count + member.connection.utf8.count) + 96
            if bytes > ProtocolV1.maxReleasedListBytes { break }
            var shown = member
            shown.principal = nil
            listed.append(shown)
        }
        self.init(count: live.count, listed: listed)
    }
}

/// What a reply says of a membership (`joined`, `left`, a membership's `renewed`).
public struct MembershipReply: Sendable, Hashable {
    /// The member's replica id, unique among the buffer's live members.
    public var replicaID: Int
    /// How many members are live after the decision.
    public var members: Int
    /// Whether a join got back the id its user's earlier membership had (within the grace).
    public var reclaimed: Bool

    public init(replicaID: Int, members: Int, reclaimed: Bool = false) {
        self.replicaID = replicaID
        self.members = members
        self.reclaimed = reclaimed
    }
}

/// A change of a buffer's roster, in decision order (for events).
public struct MembershipChange: Sendable, Hashable {
    public enum Kind: String, Sendable, Hashable {
        /// A new member with a free id.
        case joined
        /// A user back within its grace, with its reserved id.
        case reclaimed
        /// A member left (its id is free at once).
        case left
        /// A membership ran out (its id is reserved for the grace).
        case expired
        /// A member's connection was released (its id is reserved for the grace).
        case released
    }

    public var kind: Kind
    public var member: Roster.Member
    public var at: Timestamp
    /// Until when the member's id stays reserved for its user (expired and released only).
    public var reservedUntil: Timestamp?
    /// The buffer (set by the partition's decision; a roster does not know its name).
    public var buffer: String

    public init(kind: Kind, member: Roster.Member, at: Timestamp, reservedUntil: Timestamp? = nil, buffer: String = "") {
        self.kind = kind
        self.member = member
        self.at = at
        self.reservedUntil = reservedUntil
        self.buffer = buffer
    }

    /// The change as an event of the buffer's history (a `member_` kind): the member as holder, its token,
    /// and its membership's end (for `member_expired` the end that passed).
    public var event: OwnershipChange {
        let kind: ChangeKind = switch self.kind {
        case .joined: .memberJoined
        case .reclaimed: .memberReclaimed
        case .left: .memberLeft
        case .expired: .memberExpired
        case .released: .memberReleased
        }
        return OwnershipChange(
            kind: kind, buffer: buffer, holder: Holder(user: member.user, connection: member.connection), token: member.token, at: at,
            expiresAt: member.expiresAt, principal: member.principal, replicaID: member.replicaID
        )
    }

    /// The change, attributed to `buffer`.
    public func on(_ buffer: String) -> MembershipChange {
        var change = self
        change.buffer = buffer
        return change
    }
}
