/// Wire protocol version 1 (docs/protocol.md).
public enum ProtocolV1 {
    /// The only version this implementation speaks.
    public static let version = 1
    /// The revision of version 1 this implementation speaks (docs/protocol.md, "Revisions"): 3 added
    /// `describe`, `events` and the `seq` and `partition` of events; 4 claims that wait in line; 5 refuses
    /// names that are not in Unicode NFC; 6 replica memberships (`join`, `leave`).
    public static let revision = 6
    /// The most members a `state` reply lists (revision 6); its `members` gives the full count.
    public static let maxListedMembers = 64
    /// The most events one `events` reply lists (and the default `limit`).
    public static let maxEventsPerRead = 256
    /// Allowed `wait_ms` of a claim that waits in line (revision 4): at most a request's lifetime.
    public static let waitRange: ClosedRange<Int64> = 1...300_000
    /// The most claims one buffer's line holds (revision 4): a waiting claim that finds it full is denied
    /// at once, as a claim without `wait_ms` would be. It bounds what a frontend can pile onto one buffer,
    /// and what every decision about that buffer reads.
    public static let maxLineLength = 256
    /// The most places one principal (`user_id`) holds in one buffer's line, and it holds one per
    /// connection: a frontend that queues more is denied at once, so one frontend cannot fill a line.
    public static let maxLinePlacesPerPrincipal = 64
    /// The most reply bytes a worker publishes for one request message (`events` reads are cut to fit,
    /// with `more`): a frontend cannot make the broker hold megabytes for the few kilobytes it sent.
    public static let maxReplyBytesPerMessage = 1024 * 1024
    /// The largest request body, in bytes; a larger one is answered `payload_too_large` before parsing.
    public static let maxBodyBytes = 64 * 1024
    /// Allowed `lease_ms`.
    public static let leaseRange: ClosedRange<Int64> = 1000...3_600_000
    /// `lease_ms` when a request does not give one.
    public static let defaultLeaseMilliseconds: Int64 = 30_000
    /// Allowed length of `request_id`, in Unicode scalars.
    public static let requestIDLength: ClosedRange<Int> = 1...128
    /// Allowed length of `buffer`, in UTF-8 bytes.
    public static let bufferBytes: ClosedRange<Int> = 1...1024
    /// Allowed length of `user` and `connection`, in Unicode scalars.
    public static let nameLength: ClosedRange<Int> = 1...256
    /// How far ahead of the database clock a request's `deadline` may lie. Requests live at most this
    /// long (the request queues' message TTL is the same), and the store keeps idempotency records for
    /// at least twice as long, so a request can never outlive the record that answers its repeats.
    public static let maxRequestLifetimeMilliseconds: Int64 = 300_000
    /// The largest total of buffer-name bytes a `released_connection` reply lists; `released_count` always
    /// gives the full number. Even with every byte JSON-escaped (6 bytes each) a reply stays under 100 KiB,
    /// below the broker's message size limit.
    public static let maxReleasedListBytes = 16 * 1024
    /// Reply destinations a worker answers: RabbitMQ's direct reply-to pseudo-queues and server-named
    /// queues, which only the connection that asked for them can consume. Anything else is refused.
    public static let replyToPrefixes = ["amq.rabbitmq.reply-to.", "amq.gen-"]

    /// Whether a worker may publish a reply to `replyTo` (see ``replyToPrefixes``).
    public static func isAcceptedReplyTo(_ replyTo: String) -> Bool {
        replyToPrefixes.contains { replyTo.hasPrefix($0) && replyTo.utf8.count > $0.utf8.count } && replyTo.utf8.count <= 255
    }

    /// The direct exchange requests are published to, with routing key `<p>`.
    public static let requestsExchange = "baton.requests"
    /// The fanout exchange every rejected request is dead-lettered to.
    public static let deadLetterExchange = "baton.dead-letter"
    /// The quorum queue bound to ``deadLetterExchange``.
    public static let deadLetterQueue = "baton.dead-letter"
    /// The direct exchange administrative requests (`force_release`) must be published to, with routing
    /// key `<p>`; broker permissions decide who may write to it.
    public static let adminExchange = "baton.admin"
    /// The topic exchange events are published to, with routing key `<p>.changes` (a commit's events in
    /// one message) or `<p>.<kind>` (one event per message).
    public static let eventsExchange = "baton.events"
    /// The queue name used by RabbitMQ's direct reply-to.
    public static let directReplyTo = "amq.rabbitmq.reply-to"
    /// The content type of requests, replies and events.
    public static let contentType = "application/json"

    /// The request queue of partition `p`: `baton.requests.<p>`.
    public static func requestQueue(_ partition: Int) -> String { "baton.requests.\(partition)" }

    /// The routing key of an event published alone (`--events per-change`): `<p>.<kind>`.
    public static func eventRoutingKey(partition: Int, kind: ChangeKind) -> String { "\(partition).\(kind.rawValue)" }
    /// The routing key of a message carrying a commit's events (`--events per-commit`, the default): `<p>.changes`.
    public static func eventsRoutingKey(partition: Int) -> String { "\(partition).changes" }
}

/// The operation a request asks for.
public enum Operation: String, Sendable, Hashable, CaseIterable, CustomStringConvertible {
    case claim
    case renew
    case release
    case inspect
    case releaseConnection = "release_connection"
    /// An operator's release of whoever holds a buffer; accepted only through ``ProtocolV1/adminExchange``.
    case forceRelease = "force_release"
    /// What the deployment is: its partition count and protocol revision (revision 3). Answered at once.
    case describe
    /// A partition's history of ownership changes from a position (revision 3). Read-only, never recorded.
    case events
    /// Become a live collaborator of a buffer with a replica id (revision 5, docs/design/replica-slots.md).
    case join
    /// End a live membership at once, freeing its replica id (revision 5).
    case leave

    /// Whether a worker answers it without deciding anything (and without an idempotency record).
    public var isRead: Bool { self == .describe || self == .events }

    public var description: String { rawValue }
}

/// Who holds a buffer: a user on one live editor connection.
public struct Holder: Sendable, Hashable, CustomStringConvertible {
    /// The user, as the frontend names it.
    public var user: String
    /// The editor connection, unique per live connection.
    public var connection: String

    /// Creates a holder.
    public init(user: String, connection: String) {
        self.user = user
        self.connection = connection
    }

    public var description: String { "\(user)@\(connection)" }

    /// Holders are the same only when user and connection have the same bytes.
    public static func == (lhs: Holder, rhs: Holder) -> Bool {
        lhs.user.exactlyEquals(rhs.user) && lhs.connection.exactlyEquals(rhs.connection)
    }

    public func hash(into hasher: inout Hasher) {
        hasher.combine(ExactString(user))
        hasher.combine(ExactString(connection))
    }
}

/// A validated request, as decoded from the wire.
public struct Request: Sendable, Hashable {
    /// The idempotency key; a retry reuses it.
    public var requestID: String
    /// What to do.
    public var command: Command
    /// Who sent it: the broker user that published it, from the AMQP `user_id` property, which
    /// RabbitMQ checks against the publishing connection's login. Not part of the JSON body. A lease
    /// records the principal that claimed it, and only that principal may extend, renew or release it.
    public var principal: String?
    /// The request's `deadline` (optional body field): past it, the worker refuses to decide the
    /// request (`deadline_exceeded`), because its caller has given up.
    public var deadline: Timestamp?
    /// For a claim that may wait in line (docs/design/fair-waiting.md): how long, and where to answer.
    /// Not served by workers yet: the codec does not accept `wait_ms`.
    public var waiting: Waiting?

    /// Creates a request.
    public init(requestID: String, command: Command, principal: String? = nil, deadline: Timestamp? = nil) {
        self.requestID = requestID
        self.command = command
        self.principal = principal
        self.deadline = deadline
    }

    /// The operation of ``command``.
    public var operation: Operation { command.operation }
    /// The buffer the request is about, or nil for `release_connection`.
    public var buffer: String? { command.buffer }
}

/// One of the five operations with its arguments.
public enum Command: Sendable, Hashable {
    /// Take a buffer, or extend one already held by the same user and connection.
    case claim(buffer: String, holder: Holder, leaseMilliseconds: Int64)
    /// Extend a live lease held by `connection` with `token`.
    case renew(buffer: String, connection: String, token: Int64, leaseMilliseconds: Int64)
    /// Give up a lease held by `connection` with `token`, expired or not.
    case release(buffer: String, connection: String, token: Int64)
    /// Read the state of a buffer.
    case inspect(buffer: String)
    /// Release every buffer of one partition held by `connection`.
    case releaseConnection(connection: String)
    /// Release `buffer` whoever holds it (an operator's action; `reason` goes to the log).
    case forceRelease(buffer: String, reason: String?)
    /// Describe the deployment.
    case describe
    /// Read the partition's changes after position `after` (nil: none, just the current position), of
    /// `buffer` only when given, at most `limit`.
    case events(buffer: String?, after: Int64?, limit: Int)
    /// Join `buffer`'s collaborators as `user` on `connection` until `leaseMilliseconds` from now (or extend
    /// the membership the connection has).
    case join(buffer: String, user: String, connection: String, leaseMilliseconds: Int64)
    /// End the live membership of `connection` holding `token`, freeing its replica id at once.
    case leave(buffer: String, connection: String, token: Int64)

    /// The operation.
    public var operation: Operation {
        switch self {
        case .claim: .claim
        case .renew: .renew
        case .release: .release
        case .inspect: .inspect
        case .releaseConnection: .releaseConnection
        case .forceRelease: .forceRelease
        case .describe: .describe
        case .events: .events
        case .join: .join
        case .leave: .leave
        }
    }

    /// The buffer, or nil for `release_connection`.
    public var buffer: String? {
        switch self {
        case .claim(let buffer, _, _), .renew(let buffer, _, _, _), .release(let buffer, _, _), .inspect(let buffer),
             .forceRelease(let buffer, _), .join(let buffer, _, _, _), .leave(let buffer, _, _):
            buffer
        case .events(let buffer, _, _):
            buffer
        case .releaseConnection, .describe:
            nil
        }
    }
}

/// The `status` of a reply.
public enum ReplyStatus: String, Sendable, Hashable, CaseIterable, Codable, CustomStringConvertible {
    case granted
    case denied
    case renewed
    case released
    case notOwner = "not_owner"
    case state
    case releasedConnection = "released_connection"
    /// The answer to `describe`.
    case description
    /// The answer to `events`.
    case events
    /// The answer to `join`: the connection is a live member (``Reply/membership``).
    case joined
    /// The answer to `leave`: the membership ended and its replica id is free.
    case left
    /// The answer to `leave` (or a membership's `renew`) when the connection holds no live membership
    /// with that token.
    case notMember = "not_member"
    case error

    public var description: String { rawValue }
}

/// The `error.code` of an `error` reply.
public enum ErrorCode: String, Sendable, Hashable, CaseIterable, Codable, CustomStringConvertible {
    case invalidRequest = "invalid_request"
    case unsupportedVersion = "unsupported_version"
    case unknownOp = "unknown_op"
    case payloadTooLarge = "payload_too_large"
    case misrouted
    /// The `request_id` was used before for a different request (another op, buffer, argument or
    /// principal); the stored answer belongs to that one and is not shown.
    case requestIDReused = "request_id_reused"
    /// The request's `deadline` passed before a worker could decide it; nothing changed.
    case deadlineExceeded = "deadline_exceeded"
    /// The database refused to record this request's decision (for example a constraint an operator
    /// added); nothing changed, and the request was dead-lettered so its partition goes on.
    case internalError = "internal_error"
    /// The message is missing a property the worker needs (`user_id`), or carries one it must refuse.
    case unauthenticated
    /// A `join` found ``Roster/maxMembers`` live members; nothing changed.
    case membersFull = "members_full"

    public var description: String { rawValue }
}

/// A rejected request: the protocol error code and a message naming the field, the value and what is allowed.
public struct ProtocolError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The protocol error code.
    public var code: ErrorCode
    /// A message for a person.
    public var message: String
    /// The `request_id`, when one could be read before the error was found.
    public var requestID: String?
    /// The `buffer`, when one could be read before the error was found.
    public var buffer: String?

    /// Creates a protocol error.
    public init(code: ErrorCode, message: String, requestID: String? = nil, buffer: String? = nil) {
        self.code = code
        self.message = message
        self.requestID = requestID
        self.buffer = buffer
    }

    public var description: String { "\(code): \(message)" }
}

/// The `error` object of an error reply.
public struct ReplyError: Sendable, Hashable, Codable {
    /// The protocol error code.
    public var code: ErrorCode
    /// A message for a person.
    public var message: String

    /// Creates an error object.
    public init(code: ErrorCode, message: String) {
        self.code = code
        self.message = message
    }
}

/// A reply, as sent to `reply_to`.
public struct Reply: Sendable, Hashable {
    /// The request's `request_id`, or nil if it could not be read.
    public var requestID: String?
    /// The outcome.
    public var status: ReplyStatus
    /// The buffer, or nil (for `release_connection` and unreadable requests).
    public var buffer: String?
    /// The live holder after the decision (for `denied`: the one holding it).
    public var holder: Holder?
    /// The fencing token: granted, renewed, released, or the buffer's current one.
    public var token: Int64?
    /// When the live lease ends, or nil when nobody holds the buffer.
    public var expiresAt: Timestamp?
    /// The database time of the decision.
    public var at: Timestamp?
    /// The partition that decided.
    public var partition: Int?
    /// For `released_connection`: the buffers released, sorted; at most
    /// ``ProtocolV1/maxReleasedListBytes`` of names (``releasedCount`` gives the full number).
    public var buffers: [String]?
    /// For `released_connection`: how many buffers were released in all.
    public var releasedCount: Int?
    /// For `error`: the code and message.
    public var error: ReplyError?
    /// For `description`: what the deployment is.
    public var deployment: DeploymentDescription?
    /// For `events`: the changes read and where to read on.
    public var events: EventPage?
    /// For `joined`, `left` and a membership's `renewed`: the membership (``token`` and ``expiresAt`` are
    /// the membership's then).
    public var membership: MembershipReply?
    /// For `state` (revision 6): the buffer's live members, at most ``ProtocolV1/maxListedMembers`` of them
    /// by replica id, and their full count.
    public var roster: RosterView?
    /// For `released_connection` (revision 6): how many memberships of the connection ended.
    public var endedMemberships: Int?

    /// Creates a reply.
    public init(
        requestID: String?, status: ReplyStatus, buffer: String? = nil, holder: Holder? = nil,
        token: Int64? = nil, expiresAt: Timestamp? = nil, at: Timestamp? = nil, partition: Int? = nil,
        buffers: [String]? = nil, releasedCount: Int? = nil, error: ReplyError? = nil,
        deployment: DeploymentDescription? = nil, events: EventPage? = nil, membership: MembershipReply? = nil, roster: RosterView? = nil,
        endedMemberships: Int? = nil
    ) {
        self.requestID = requestID
        self.status = status
        self.buffer = buffer
        self.holder = holder
        self.token = token
        self.expiresAt = expiresAt
        self.at = at
        self.partition = partition
        self.buffers = buffers
        self.releasedCount = releasedCount ?? buffers?.count
        self.error = error
        self.deployment = deployment
        self.events = events
        self.membership = membership
        self.roster = roster
        self.endedMemberships = endedMemberships
    }

    /// The error reply for a rejected request.
    public static func rejection(_ error: ProtocolError, partition: Int?, at: Timestamp?) -> Reply {
        Reply(
            requestID: error.requestID, status: .error, buffer: error.buffer, at: at, partition: partition,
            error: ReplyError(code: error.code, message: error.message)
        )
    }
}

/// The state of one buffer, as stored.
public struct BufferState: Sendable, Hashable {
    /// The holder, or nil when released (a holder whose lease has expired stays until swept or replaced).
    public var holder: Holder?
    /// The principal (broker user) that claimed the holder's lease; nil when nobody holds the buffer,
    /// or for a lease recorded before principals were (such a lease can only expire or be force-released).
    public var principal: String?
    /// The holder's token (the last holder's once released), 0 if never claimed.
    public var token: Int64
    /// The last token issued from the buffer's sequence, at least `token`: a grant takes `issued + 1`.
    /// Equal to `token` while ownership is all that issues tokens; replica memberships will take theirs
    /// from the same sequence (docs/design/replica-slots.md).
    public var issued: Int64
    /// When the holder's lease ends; nil when there is no holder.
    public var expiresAt: Timestamp?
    /// Claims waiting for the buffer, in the order they joined (docs/design/fair-waiting.md).
    public var line: [Waiter] = []
    /// The buffer's collaborators and the replica ids reserved for returning ones (docs/design/replica-slots.md);
    /// independent of the holder: a release or expiry of the lease leaves it as it is.
    public var roster = Roster()

    /// A buffer nobody ever claimed.
    public static let fresh = BufferState(holder: nil, token: 0, expiresAt: nil)

    /// Creates a state; `issued` is at least `token` (by default, `token`).
    public init(holder: Holder?, token: Int64, expiresAt: Timestamp?, principal: String? = nil, issued: Int64? = nil) {
        self.holder = holder
        self.token = token
        self.issued = max(token, issued ?? token)
        self.expiresAt = expiresAt
        self.principal = holder == nil ? nil : principal
    }

    /// The state once the holder's lease ends (released, expired): no holder, the same tokens and roster.
    public var vacated: BufferState {
        var state = BufferState(holder: nil, token: token, expiresAt: nil, issued: issued)
        state.roster = roster
        return state
    }

    /// The state once `holder` is granted the buffer until `expiresAt`: the next token of the sequence; the
    /// roster as it was; no line (the caller puts back what remains of it).
    public func granted(to holder: Holder, until expiresAt: Timestamp, principal: String?) -> BufferState {
        var state = BufferState(holder: holder, token: issued + 1, expiresAt: expiresAt, principal: principal)
        state.roster = roster
        return state
    }

    /// The holder if their lease has not expired at `now` (`expires_at == now` counts as expired).
    public func liveHolder(at now: Timestamp) -> Holder? {
        guard let holder, let expiresAt, expiresAt > now else { return nil }
        return holder
    }
}

/// The kind of an ownership change, as in an event's routing key `<p>.<kind>`.
public enum ChangeKind: String, Sendable, Hashable, CaseIterable, Codable, CustomStringConvertible {
    case granted
    case released
    case expired
    /// A new member of the buffer's collaborators, with a free replica id (revision 6, section 20).
    case memberJoined = "member_joined"
    /// A new member with the replica id its user had reserved (within the grace).
    case memberReclaimed = "member_reclaimed"
    /// A member left; its id is free at once.
    case memberLeft = "member_left"
    /// A membership ran out; its id is reserved for its user for the grace.
    case memberExpired = "member_expired"
    /// A member's connection was released; its id is reserved for its user for the grace.
    case memberReleased = "member_released"

    /// Whether it is a change of the buffer's lease (not of its collaborators).
    public var isOwnership: Bool { self == .granted || self == .released || self == .expired }

    public var description: String { rawValue }
}

/// One change of ownership: written to the outbox/audit table and published as an event.
public struct OwnershipChange: Sendable, Hashable {
    /// What happened.
    public var kind: ChangeKind
    /// The buffer.
    public var buffer: String
    /// The holder granted, released or expired.
    public var holder: Holder
    /// That holder's token.
    public var token: Int64
    /// The database time of the decision.
    public var at: Timestamp
    /// The lease's end: for `granted` the new lease's, for `released` and `expired` the one that ended.
    public var expiresAt: Timestamp
    /// True for a `released` forced by an operator (`force_release`).
    public var forced: Bool
    /// The principal of the request that made the change (nil for expiries); kept in the audit trail, not
    /// published in events.
    public var principal: String?
    /// The request that made the change (for a grant to a waiter, its waiting claim; nil for expiries);
    /// read from the audit trail only, never published.
    public var requestID: String?
    /// For a membership's change (the `member_` kinds): the member's replica id.
    public var replicaID: Int?

    /// Creates a change.
    public init(
        kind: ChangeKind, buffer: String, holder: Holder, token: Int64, at: Timestamp, expiresAt: Timestamp, forced: Bool = false, principal: String? = nil,
        requestID: String? = nil, replicaID: Int? = nil
    ) {
        self.requestID = requestID
        self.replicaID = replicaID
        self.kind = kind
        self.buffer = buffer
        self.holder = holder
        self.token = token
        self.at = at
        self.expiresAt = expiresAt
        self.forced = forced
        self.principal = principal
    }
}

/// What a `describe` reply says about the deployment (docs/protocol.md, section 17).
public struct DeploymentDescription: Sendable, Hashable {
    /// The protocol version (`v`).
    public var protocolVersion: Int
    /// The revision of that version.
    public var revision: Int
    /// N.
    public var partitions: Int
    /// Every op the worker accepts.
    public var ops: [String]
    /// How long a replica id stays reserved for its user after its membership expired or its connection
    /// was released (revision 6; nil from workers of earlier revisions).
    public var memberGraceMilliseconds: Int64?

    /// Creates a description.
    public init(
        protocolVersion: Int = ProtocolV1.version, revision: Int = ProtocolV1.revision, partitions: Int, ops: [String] = Operation.allCases.map(\.rawValue),
        memberGraceMilliseconds: Int64? = Roster.defaultGraceMilliseconds
    ) {
        self.protocolVersion = protocolVersion
        self.revision = revision
        self.partitions = partitions
        self.ops = ops
        self.memberGraceMilliseconds = memberGraceMilliseconds
    }
}

/// One ownership change with its place in its partition's history: an event as published and read back.
public struct PositionedChange: Sendable, Hashable {
    /// The change's position in its partition (`seq`): grows in commit order, never reused, not consecutive.
    public var seq: Int64
    /// The partition that decided it.
    public var partition: Int
    /// The change.
    public var change: OwnershipChange

    /// Creates a positioned change.
    public init(seq: Int64, partition: Int, change: OwnershipChange) {
        self.seq = seq
        self.partition = partition
        self.change = change
    }
}

/// What an `events` reply carries (docs/protocol.md, section 18).
public struct EventPage: Sendable, Hashable {
    /// The changes after the position asked for, ascending.
    public var events: [PositionedChange]
    /// Where the reply ends: read on from here.
    public var position: Int64
    /// More changes wait after ``position``.
    public var more: Bool
    /// Changes after the position asked for were already pruned and are not listed.
    public var missed: Bool

    /// Creates a page.
    public init(events: [PositionedChange], position: Int64, more: Bool, missed: Bool) {
        self.events = events
        self.position = position
        self.more = more
        self.missed = missed
    }
}
