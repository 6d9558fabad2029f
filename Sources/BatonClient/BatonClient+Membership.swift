import BatonCore

/// A live membership of a buffer's collaborators (protocol revision 6, `join`): the replica id is unique
/// among the buffer's live members, and stays reserved for the same user for the deployment's grace when
/// the membership expires or its connection is released (not after a ``BatonClient/leave(_:connection:token:requestID:)``).
public struct Membership: Sendable, Hashable {
    /// The buffer.
    public var buffer: String
    /// The replica id, 1 or more: the smallest free when the membership began, or the user's own from
    /// within its grace (``reclaimed``).
    public var replicaID: Int
    /// The membership's token, from the buffer's one token sequence (leases take theirs from it too): name
    /// it to renew or leave.
    public var token: Int64
    /// When the membership ends unless renewed or joined again (database time).
    public var expiresAt: Timestamp
    /// How many members were live after the decision.
    public var members: Int
    /// Whether this join got back the id its user held before (within the grace).
    public var reclaimed: Bool
    /// When it was decided (database time).
    public var at: Timestamp
    /// The partition that decided.
    public var partition: Int

    public init(buffer: String, replicaID: Int, token: Int64, expiresAt: Timestamp, members: Int, reclaimed: Bool, at: Timestamp, partition: Int) {
        self.buffer = buffer
        self.replicaID = replicaID
        self.token = token
        self.expiresAt = expiresAt
        self.members = members
        self.reclaimed = reclaimed
        self.at = at
        self.partition = partition
    }
}

/// The answer to a membership's renewal.
public enum MembershipRenewal: Sendable, Hashable {
    /// The membership was extended.
    case renewed(Membership)
    /// No live membership of this connection holds the token (it expired, left, or its connection was
    /// released): join again, within the grace to get the same id back.
    case notMember
}

/// The answer to a leave.
public enum LeaveResult: Sendable, Hashable {
    /// The membership ended and its id is free at once.
    case left(replicaID: Int)
    /// No live membership of this connection holds the token.
    case notMember
}

/// A membership that a ``BatonClient`` keeps alive until it leaves or is lost, renewed exactly as a
/// ``KeptLease`` is (with its token, on this machine's clock from the first send of each call): its
/// ``state`` turns `renewingLate` at half the lease and `lost` at the safe end or when a renewal is
/// answered that the connection is no member any more (`lost(.notOwner(current: nil))`: it expired, or
/// `release_connection` ended it). The replica id is the membership's for as long as it is held.
public final class KeptMembership: Sendable {
    /// The membership as joined.
    public let membership: Membership
    private let kept: KeptLease

    init(membership: Membership, kept: KeptLease) {
        self.membership = membership
        self.kept = kept
    }

    /// The replica id.
    public var replicaID: Int { membership.replicaID }
    /// The state now (a `held` state whose `safeUntil` has passed reads as lost).
    public var state: LeaseState { kept.state }
    /// The state now, then every change of it; ends after `lost`.
    public func states() -> AsyncStream<LeaseState> { kept.states() }
    /// Stops renewing and leaves (the id is free at once). Safe to call more than once.
    public func leave() async throws { try await kept.release() }
}

extension BatonClient {
    /// Joins `buffer`'s collaborators and keeps the membership alive (``KeptMembership``) until
    /// ``KeptMembership/leave()`` or its loss.
    public func keepMembership(
        _ buffer: String, user: String, connection: String, keeping: LeaseKeeping = LeaseKeeping(), requestID: String = BatonClient.newRequestID()
    ) async throws -> KeptMembership {
        let sent = ContinuousClock.now
        let joined = try await join(buffer, user: user, connection: connection, lease: keeping.lease, requestID: requestID)
        let grant = Lease(buffer: joined.buffer, token: joined.token, expiresAt: joined.expiresAt, at: joined.at, partition: joined.partition)
        let kept = KeptLease(client: self, grant: grant, holder: Holder(user: user, connection: connection), sent: sent, settings: keeping, membership: true)
        return KeptMembership(membership: joined, kept: kept)
    }

    /// Joins `buffer`'s collaborators as `user` on `connection` (or extends the membership `connection`
    /// already has: same id and token) until `lease` from now.
    ///
    /// - Throws: ``BatonClientError`` with code `rejected` for `members_full` (1,024 live members) or a
    ///   connection that is a live member under another user (`invalid_request`), or a transport error.
    public func join(_ buffer: String, user: String, connection: String, lease: Duration = .seconds(30), requestID: String = BatonClient.newRequestID()) async throws -> Membership {
        let reply = try await call(Request(requestID: requestID, command: .join(buffer: buffer, user: user, connection: connection, leaseMilliseconds: lease.wholeMilliseconds)))
        guard reply.status == .joined else { throw unexpected(reply) }
        return try membership(from: reply)
    }

    /// Extends the membership of `connection` holding `token` to `lease` from now.
    public func renewMembership(_ buffer: String, connection: String, token: Int64, lease: Duration = .seconds(30), requestID: String = BatonClient.newRequestID()) async throws -> MembershipRenewal {
        let reply = try await call(Request(requestID: requestID, command: .renew(buffer: buffer, connection: connection, token: token, leaseMilliseconds: lease.wholeMilliseconds)))
        switch reply.status {
        case .renewed where reply.membership != nil: return .renewed(try membership(from: reply))
        case .notOwner, .notMember: return .notMember
        default: throw unexpected(reply)
        }
    }

    /// Ends the membership of `connection` holding `token` at once; its id is free for the next join.
    public func leave(_ buffer: String, connection: String, token: Int64, requestID: String = BatonClient.newRequestID()) async throws -> LeaveResult {
        let reply = try await call(Request(requestID: requestID, command: .leave(buffer: buffer, connection: connection, token: token)))
        switch reply.status {
        case .left:
            guard let replicaID = reply.membership?.replicaID else { throw unexpected(reply) }
            return .left(replicaID: replicaID)
        case .notMember: return .notMember
        default: throw unexpected(reply)
        }
    }

    private func membership(from reply: Reply) throws -> Membership {
        guard let buffer = reply.buffer, let token = reply.token, let expiresAt = reply.expiresAt, let at = reply.at, let partition = reply.partition,
              let membership = reply.membership else {
            throw unexpected(reply)
        }
        return Membership(
            buffer: buffer, replicaID: membership.replicaID, token: token, expiresAt: expiresAt, members: membership.members,
            reclaimed: membership.reclaimed, at: at, partition: partition
        )
    }
}
