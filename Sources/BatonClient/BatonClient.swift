import BatonAMQP
import BatonCore
import Foundation
import Logging
import Synchronization

/// How a client talks to Baton.
public struct BatonClientConfiguration: Sendable {
    /// The broker.
    public var amqpURL: AMQPURL
    /// Further nodes of the same broker cluster, tried in order when ``amqpURL``'s node does not answer
    /// (and, after a node died, from the one that worked last).
    public var amqpAlternates: [AMQPURL] = []
    /// The deployment's partitioner (N): requests are routed with it, and release_connection goes to all N.
    public var partitioner: Partitioner
    /// How long one call may take in all, retries included (default 5 s).
    public var timeout: Duration = .seconds(5)
    /// How long to wait for a reply before publishing the request again with the same `request_id` (default 1.5 s).
    public var resendAfter: Duration = .milliseconds(1500)
    /// When a request published on the client's channel has had no broker confirm for this long, the
    /// client opens a new channel on its connection and sends every waiting call again on it (default
    /// 1 s; `.zero` never, and the channel is not in confirm mode). The broker confirms a request once its partition's queue holds it, however
    /// slow the workers are: a missing confirm means the broker cannot reach the queue. On a RabbitMQ
    /// 3.10 cluster a channel keeps sending a quorum queue's messages to the leader it first knew, even
    /// after the queue elected another because that leader's node froze; a new channel finds the new
    /// leader (docs/operations.md, "A frozen broker node"). The old channel stays open 30 s for late replies.
    /// A request the broker nacks gets the same treatment at once (at most every
    /// ``nackedChannelSpacing``): RabbitMQ 3.10 nacks everything a channel publishes to a quorum queue
    /// whose new leader it could not register with (a channel that first published to the queue just after
    /// the node of its old leader died), until that node returns, while a new channel reaches the new leader.
    public var staleChannelAfter: Duration = .seconds(1)
    /// The least time between two new channels opened because the broker nacked requests (default 250 ms):
    /// a channel opened before the queue's record names its new leader is nacked too, and is replaced
    /// after this long. Within ``staleChannelAfter`` of a channel opened over nacks, a request unconfirmed
    /// for this long also has its channel replaced (such a channel may be stuck without nacks).
    public var nackedChannelSpacing: Duration = .milliseconds(250)
    /// A name for the connection in the broker's list.
    public var name: String = "baton client"
    /// Carry calls to one partition together (docs/protocol.md, "Coalesced requests"): a lone call is
    /// sent at once; while a message for its partition is unanswered, further calls for that partition
    /// wait and then go as one message of up to ``maxCoalesced`` requests (and 60 KiB). Default on.
    public var coalesce = true
    /// The most requests one coalesced message carries (1-256).
    public var maxCoalesced = ProtocolV1.maxBatchCount
    /// While the client is busy (``busyCalls`` calls or more wait for replies), a call that finds its
    /// partition's lane idle waits up to this long for others to go with it (until ``lingerTarget``
    /// have queued), instead of going alone: under load, calls answered together come back together, and
    /// the first of them would otherwise take a message of its own. A lone call always goes at once.
    /// Zero turns it off.
    public var linger: Duration = .microseconds(500)
    /// How many calls waiting for replies make the client busy (see ``linger``).
    public var busyCalls = 16
    /// How many queued calls end a linger at once.
    public var lingerTarget = 8

    /// Creates a configuration.
    public init(amqpURL: AMQPURL, partitioner: Partitioner) {
        self.amqpURL = amqpURL
        self.partitioner = partitioner
    }
}

/// A failed call.
public struct BatonClientError: Error, Sendable, CustomStringConvertible {
    /// What kind of failure; extensible.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private let name: String
        private init(_ name: String) { self.name = name }
        /// No reply within the timeout (the worker side may be down); retrying with the same request id is safe.
        public static let timeout = Code("timeout")
        /// The broker could not route the request: the partition's queue does not exist (run `baton topology` or start a worker).
        public static let unroutable = Code("unroutable")
        /// The worker rejected the request (see ``BatonClientError/errorCode``).
        public static let rejected = Code("rejected")
        /// The reply could not be read.
        public static let badReply = Code("bad reply")
        /// The client was closed.
        public static let closed = Code("closed")
        /// The broker refused the publish for lack of permission (403 ACCESS_REFUSED), e.g. `force_release`
        /// with a user that may not write to `baton.admin`.
        public static let forbidden = Code("forbidden")
        /// The broker blocked publishing on this client's connection (a memory or disk alarm) for the whole
        /// timeout, so the request was never sent; retrying later with the same request id is safe.
        public static let blocked = Code("blocked")
        /// The client routes with another partition count than the deployment's (`describe`): nothing was
        /// sent, since a request routed with the wrong N lands on the wrong partition.
        public static let misconfigured = Code("misconfigured")
        public var description: String { name }
    }

    /// What kind of failure.
    public var code: Code
    /// A message for a person.
    public var message: String
    /// The request id, to retry with.
    public var requestID: String?
    /// For ``Code/rejected``: the protocol error code.
    public var errorCode: ErrorCode?

    public var description: String { "\(code): \(message)" }
}

/// A lease you hold.
public struct Lease: Sendable, Hashable {
    /// The buffer.
    public var buffer: String
    /// The fencing token: store it with the buffer and reject writes carrying an older one.
    public var token: Int64
    /// When the lease ends unless renewed (database time).
    public var expiresAt: Timestamp
    /// When it was decided (database time).
    public var at: Timestamp
    /// The partition that decided.
    public var partition: Int

    /// Creates a lease.
    public init(buffer: String, token: Int64, expiresAt: Timestamp, at: Timestamp, partition: Int) {
        self.buffer = buffer
        self.token = token
        self.expiresAt = expiresAt
        self.at = at
        self.partition = partition
    }
}

/// Someone else's live lease, as a denial reports it.
public struct Holding: Sendable, Hashable {
    /// Who holds it.
    public var holder: Holder
    /// Their token.
    public var token: Int64
    /// When their lease ends.
    public var expiresAt: Timestamp?

    /// Creates a holding.
    public init(holder: Holder, token: Int64, expiresAt: Timestamp?) {
        self.holder = holder
        self.token = token
        self.expiresAt = expiresAt
    }
}

/// The answer to a claim.
public enum ClaimResult: Sendable, Hashable {
    /// You hold the buffer (newly, or your existing lease was extended with the same token).
    case granted(Lease)
    /// Someone else holds it.
    case denied(Holding)
}

/// The answer to a renew.
public enum RenewResult: Sendable, Hashable {
    /// Your lease was extended.
    case renewed(Lease)
    /// Your lease is gone (expired, released, or the token is not the current one); `current` is the live holder if any.
    case notOwner(current: Holding?)
}

/// The answer to a release.
public enum ReleaseResult: Sendable, Hashable {
    /// The buffer is free; `token` was the released lease's.
    case released(token: Int64)
    /// Connection and token did not match the holder's.
    case notOwner(current: Holding?)
}

/// What `release_connection` released.
public struct ReleasedBuffers: Sendable, Hashable {
    /// How many buffers were released in all.
    public var count: Int
    /// Their names, sorted; each partition lists at most 16 KiB of names, so for a connection holding very
    /// many buffers this is a prefix (``isComplete`` is false).
    public var buffers: [String]
    /// How many replica memberships of the connection ended (their ids reserved for their users for the
    /// deployment's grace); 0 from workers before revision 6.
    public var endedMemberships: Int

    /// Creates a result.
    public init(count: Int, buffers: [String], endedMemberships: Int = 0) {
        self.count = count
        self.buffers = buffers
        self.endedMemberships = endedMemberships
    }

    /// True when ``buffers`` names every released buffer.
    public var isComplete: Bool { buffers.count == count }
}

/// The state of a buffer.
public struct BufferStatus: Sendable, Hashable {
    /// The live holder, or nil.
    public var holder: Holding?
    /// The last token issued (0 if never claimed).
    public var lastToken: Int64
    /// The database time of the answer.
    public var at: Timestamp
    /// The buffer's live collaborators (``BatonClient/join(_:user:connection:lease:requestID:)``): the first 64
    /// by replica id and the full count; nil from a worker before revision 6.
    public var members: RosterView? = nil
}

/// What a collab frontend links: typed calls over RabbitMQ RPC (direct reply-to).
///
/// Many calls may be in flight on one connection. Each call has a timeout
/// (``BatonClientConfiguration/timeout``); while it waits, the request is published
/// again with the same `request_id` (the worker answers a repeat from its idempotency
/// record), and a lost connection is re-established with backoff.
public final class BatonClient: Sendable {
    /// The configuration.
    public let configuration: BatonClientConfiguration
    let logger: Logger
    private let state = Mutex(ClientState())
    /// The start of this client's message ids: random, drawn once.
    private let messagePrefix = UUID().uuidString

    private struct ClientState {
        var link: Link?
        var connecting: Task<Link, any Error>?
        /// A new channel is being opened for ``link`` (``BatonClientConfiguration/staleChannelAfter``).
        var refreshing = false
        /// When the last new channel for nacked requests was opened (``BatonClientConfiguration/nackedChannelSpacing``).
        var nackRefreshAt: ContinuousClock.Instant?
        /// The index, in the configured broker URLs, of the node to try first: the one reached last, or the
        /// next one once its connection has died (a frozen node still accepts TCP connections and would
        /// hold each attempt for the whole connect timeout).
        var brokerNode = 0
        /// Calls waiting for a reply, by `<partition>|<request_id>` (a reply names its request). Calls that
        /// share a key share the wait.
        var pending: [String: (call: PendingCall, users: Int)] = [:]
        /// Per partition: messages in flight and requests waiting to go with the next one.
        var lanes: [Int: Lane<Queued>] = [:]
        /// Messages sent and not yet answered, by correlation (and message) id.
        var sent: [String: SentMessage] = [:]
        var statistics = Statistics()
        var closed = false
        /// The number of the last message sent (see ``messagePrefix``).
        var nextMessage: UInt64 = 0
        /// Whether the deployment's N (`describe`) was found equal to the configured one; or why not.
        var partitionCount: PartitionCountCheck = .unknown
        /// `describe` calls in flight to check N, by the partition they went to.
        var partitionChecks: [Int: Task<Void, any Error>] = [:]
    }

    private enum PartitionCountCheck {
        case unknown
        case verified
        case mismatch(BatonClientError)
    }

    /// One connection with its RPC channel.
    private struct Link: Sendable {
        let connection: AMQPConnection
        let channel: AMQPChannel
        /// The index of its node among the configured URLs.
        let node: Int
    }

    /// One call waiting for the reply to any of its attempts, or for its next resend time (the reaper
    /// wakes it then).
    private typealias PendingCall = Waiter<Result<Reply, BatonClientError>>

    /// A request ready to go, as part of the next message for its partition (``Lane``).
    struct Queued: LaneItem {
        let key: String
        let body: [UInt8]
        let deadline: ContinuousClock.Instant
        /// A claim that waits in line: sent alone (the worker refuses it in a coalesced message), and not
        /// counted as in flight for its partition (its answer may take until its wait ends).
        var alone = false
        var bodyBytes: Int { body.count }
    }

    /// A channel as the call schedule compares it: by identity, held strongly so that a new channel can
    /// never reuse the address of the one the last attempt went on.
    private struct SameChannel: Equatable, Sendable {
        let channel: AMQPChannel
        init(_ channel: AMQPChannel) { self.channel = channel }
        static func == (a: SameChannel, b: SameChannel) -> Bool { a.channel === b.channel }
    }

    /// How the partitions' lanes coalesce (from ``configuration``).
    private let laneSettings: Lane<Queued>.Settings

    /// A message in flight: which calls it carries (in the order of its batch), and how many of their
    /// replies came (a batch reply may come in several parts).
    private struct SentMessage {
        let partition: Int
        let keys: [String]
        let expires: ContinuousClock.Instant
        var answered = 0
    }

    /// Wakes waits whose time passed and sends what waited behind messages now counted as lost;
    /// returns false once the client is closed.
    private func reapOverdue() -> Bool {
        let now = ContinuousClock.now
        let (closed, pending, stalled, stale) = state.withLock { state in
            state.sent = state.sent.filter { $0.value.expires > now }
            let stalled = state.lanes.compactMap { partition, lane in lane.stalled(at: now) ? partition : nil }
            return (state.closed, state.pending.values.map(\.call), stalled, staleLink(&state, now: now))
        }
        if let (link, reason) = stale { Task { await self.refreshChannel(of: link, reason: reason) } }
        for call in pending { call.wakeIfDue(now) }
        for partition in stalled { flush(partition) }
        return !closed
    }

    /// Why a channel is replaced.
    private enum StaleReason {
        /// A publish had no confirm for this long.
        case unconfirmed(Duration)
        case nacked(Int)
    }

    /// The link whose channel has a publish unconfirmed for ``BatonClientConfiguration/staleChannelAfter``
    /// (not while the broker blocks the connection: an alarm holds confirms back too), or had publishes
    /// nacked (at most every ``BatonClientConfiguration/nackedChannelSpacing``); marks it as being
    /// refreshed.
    private func staleLink(_ state: inout ClientState, now: ContinuousClock.Instant) -> (Link, StaleReason)? {
        var after = configuration.staleChannelAfter
        // Right after the broker nacked requests, the queue's record may still name the old leader: a
        // channel opened then is stuck like the one before it, without nacks. It gets the nack spacing
        // to prove itself instead of the whole threshold.
        if configuration.nackedChannelSpacing > .zero, let nacked = state.nackRefreshAt, now - nacked < after {
            after = min(after, configuration.nackedChannelSpacing)
        }
        guard after > .zero, !state.refreshing, !state.closed, let link = state.link, link.connection.blockedReason == nil else { return nil }
        if let oldest = link.channel.oldestUnconfirmedPublish, now - oldest >= after {
            state.refreshing = true
            return (link, .unconfirmed(after))
        }
        // Nacks wait (counted) until the spacing allows the next channel.
        if state.nackRefreshAt.map({ now - $0 >= configuration.nackedChannelSpacing }) ?? true {
            let nacks = link.channel.takeNacks()
            if nacks > 0 {
                state.refreshing = true
                state.nackRefreshAt = now
                return (link, .nacked(nacks))
            }
        }
        return nil
    }

    /// Opens a new channel on `link`'s connection and sends every waiting call again on it; the old
    /// channel stays open a while for late replies. When no channel opens within
    /// ``BatonClientConfiguration/staleChannelAfter`` (the connection's node itself froze: its heartbeats
    /// would tell only later), the connection goes and the next call connects to the next node.
    private func refreshChannel(of link: Link, reason: StaleReason) async {
        let why = switch reason {
        case .unconfirmed(let after): "a request had no broker confirm for \(after)"
        case .nacked(let count): "the broker nacked \(count) request message\(count == 1 ? "" : "s") (it did not store them)"
        }
        logger.warning("\(why): sending the waiting calls again on a new channel", metadata: [
            "baton.amqp": "\(([configuration.amqpURL] + configuration.amqpAlternates)[link.node])",
        ])
        do {
            let channel = try await Self.before(.now + configuration.staleChannelAfter) {
                try await self.openRPCChannel(on: link.connection, node: link.node)
            }
            let calls = state.withLock { state -> [PendingCall]? in
                state.refreshing = false
                guard state.link?.channel === link.channel else { return nil }
                state.link = Link(connection: link.connection, channel: channel, node: link.node)
                state.statistics.freshChannels += 1
                // What was in flight on the old channel is resent: its lanes are free again.
                for partition in state.lanes.keys { state.lanes[partition]?.lostAll() }
                return state.pending.values.map(\.call)
            }
            guard let calls else {
                await channel.close()
                return
            }
            for call in calls { call.wake() }
            Task {
                try? await Task.sleep(for: .seconds(30))
                await link.channel.close()
            }
        } catch {
            let urls = [configuration.amqpURL] + configuration.amqpAlternates
            state.withLock { state in
                state.refreshing = false
                state.statistics.droppedConnections += 1
                if state.link?.connection === link.connection { state.brokerNode = (link.node + 1) % urls.count }
            }
            logger.warning("cannot open a new channel; reconnecting", metadata: ["baton.error": "\(error is DeadlinePassed ? "no answer within \(configuration.staleChannelAfter)" : "\(error)")"])
            dropLink()
            // Closing a frozen node's connection ends only when its heartbeats run out: the waiting calls
            // connect to the next node now.
            for call in state.withLock({ $0.pending.values.map(\.call) }) { call.wake() }
        }
    }

    /// Creates a client; it connects on first use.
    public init(configuration: BatonClientConfiguration, logger: Logger = Logger(label: "baton.client")) {
        self.configuration = configuration
        self.logger = logger
        laneSettings = Lane<Queued>.Settings(
            coalesce: configuration.coalesce, maxCoalesced: configuration.maxCoalesced, linger: configuration.linger,
            lingerTarget: configuration.lingerTarget, resendAfter: configuration.resendAfter
        )
        // One reaper per client instead of a timer per call; it ends with the client.
        Task { [weak self] in
            while true {
                try? await Task.sleep(for: .milliseconds(20))
                guard let self, self.reapOverdue() else { return }
            }
        }
    }

    /// A client dropped without ``close()`` closes its connection (its I/O thread ends) and its reaper
    /// and reply dispatcher end with it.
    deinit {
        let link = state.withLock { state -> Link? in
            state.closed = true
            return state.link
        }
        link?.connection.closeSoon()
    }

    /// What this client has sent so far.
    public struct Statistics: Sendable, Hashable {
        /// Request messages published (a coalesced batch is one).
        public var messages = 0
        /// Requests published in them (resends count again).
        public var requests = 0
        /// Event messages received by this client's watches (``watch(_:from:)``).
        public var eventMessages = 0
        /// New channels opened because a request had no broker confirm or was nacked
        /// (``BatonClientConfiguration/staleChannelAfter``).
        public var freshChannels = 0
        /// Connections dropped because even a new channel did not open in time (their node froze).
        public var droppedConnections = 0
    }

    /// What this client has sent so far.
    public var statistics: Statistics { state.withLock { $0.statistics } }

    /// Counts event messages a watch received.
    func recordEventMessages(_ count: Int) {
        state.withLock { $0.statistics.eventMessages += count }
    }

    /// The connection in use, if any (for tests).
    var currentConnection: AMQPConnection? { state.withLock { $0.link?.connection } }

    // MARK: - Typed calls

    /// A new random request id (a version 4 UUID), drawn from the system's random source without
    /// opening a file per call, as `UUID()` does on Linux.
    public static func newRequestID() -> String {
        var generator = SystemRandomNumberGenerator()
        var high = generator.next() as UInt64
        var low = generator.next() as UInt64
        high = (high & ~0xF000) | 0x4000  // version 4
        low = (low & ~(0xC000_0000_0000_0000 as UInt64)) | 0x8000_0000_0000_0000  // RFC 4122 variant
        func hex(_ value: UInt64, _ digits: Int) -> String {
            let text = String(value, radix: 16, uppercase: true)
            return String(repeating: "0", count: digits - text.count) + text
        }
        return "\(hex(high >> 32, 8))-\(hex((high >> 16) & 0xFFFF, 4))-\(hex(high & 0xFFFF, 4))-\(hex(low >> 48, 4))-\(hex(low & 0xFFFF_FFFF_FFFF, 12))"
    }

    /// Claims `buffer` for `user` on `connection` for `lease` (1 s to 1 h).
    ///
    /// With `wait` (1 ms to 300 s), a claim that finds the buffer held waits in the buffer's line and is
    /// answered when it leaves it: granted in arrival order when the buffer is released or expires, or
    /// denied when the wait runs out (docs/design/fair-waiting.md). The call's timeout is then `wait` plus
    /// ``BatonClientConfiguration/timeout``. Cancelling the calling task ends the wait at once with
    /// `CancellationError`; the claim stays in line until its turn or the end of its wait, and what it is
    /// granted then is released in the background.
    public func claim(
        _ buffer: String, user: String, connection: String, lease: Duration = .seconds(30), wait: Duration? = nil,
        requestID: String = BatonClient.newRequestID()
    ) async throws -> ClaimResult {
        var request = Request(requestID: requestID, command: .claim(buffer: buffer, holder: Holder(user: user, connection: connection), leaseMilliseconds: lease.wholeMilliseconds))
        let timeout = wait.map { waitInLine(&request, for: $0) }
        let reply: Reply
        do {
            reply = try await call(request, timeout: timeout)
        } catch let error as CancellationError {
            settle(request)  // it may still be granted when its turn comes: released then
            throw error
        } catch let error as BatonClientError where error.code == .timeout && request.waiting != nil {
            settle(request)  // a grant that comes as the wait ends is released, not left held
            throw error
        }
        switch reply.status {
        case .granted: return .granted(try makeLease(from: reply))
        case .denied: return .denied(try holding(from: reply) ?? { throw bad(reply) }())
        default: throw bad(reply)
        }
    }

    /// Makes `request`, a claim, wait in line for up to `wait` (protocol section 19): sets its `wait_ms`
    /// and a deadline that covers the wait and this client's timeout (at most a request's lifetime), and
    /// returns that as the timeout to ``call(_:partition:timeout:resendAfter:)`` it with.
    public func waitInLine(_ request: inout Request, for wait: Duration) -> Duration {
        request.waiting = Waiting(milliseconds: max(1, wait.wholeMilliseconds))
        let lifetime = min(wait + configuration.timeout, .milliseconds(ProtocolV1.maxRequestLifetimeMilliseconds))
        request.deadline = Timestamp.wallClock().adding(milliseconds: lifetime.wholeMilliseconds)
        return lifetime
    }

    /// Sends one request as it is and returns its reply, whatever its status: the command line's call.
    /// `release_connection` goes to every partition and comes back as one `released_connection` reply;
    /// with `waiting`, a claim waits in line up to that long and the call's timeout is the wait plus the
    /// configured timeout. The request's strings are put in NFC first.
    public func reply(to request: Request, partition: Int? = nil, waiting: Duration? = nil) async throws -> Reply {
        var request = request.inNFC()
        let timeout = waiting.map { waitInLine(&request, for: $0) }
        if case .releaseConnection(let connection) = request.command {
            let released = try await releaseConnection(connection, requestID: request.requestID)
            return Reply(requestID: request.requestID, status: .releasedConnection, buffers: released.buffers, releasedCount: released.count)
        }
        return try await call(request, partition: partition, timeout: timeout)
    }

    /// Extends your lease on `buffer` (connection and token must match the live holder's).
    public func renew(_ buffer: String, connection: String, token: Int64, lease: Duration = .seconds(30), requestID: String = BatonClient.newRequestID()) async throws -> RenewResult {
        let reply = try await call(Request(requestID: requestID, command: .renew(buffer: buffer, connection: connection, token: token, leaseMilliseconds: lease.wholeMilliseconds)))
        switch reply.status {
        case .renewed: return .renewed(try makeLease(from: reply))
        case .notOwner: return .notOwner(current: try holding(from: reply))
        default: throw bad(reply)
        }
    }

    /// Releases your lease on `buffer` (expired or not).
    public func release(_ buffer: String, connection: String, token: Int64, requestID: String = BatonClient.newRequestID()) async throws -> ReleaseResult {
        let reply = try await call(Request(requestID: requestID, command: .release(buffer: buffer, connection: connection, token: token)))
        switch reply.status {
        case .released: return .released(token: reply.token ?? token)
        case .notOwner: return .notOwner(current: try holding(from: reply))
        default: throw bad(reply)
        }
    }

    /// Reads the state of `buffer`.
    public func inspect(_ buffer: String, requestID: String = BatonClient.newRequestID()) async throws -> BufferStatus {
        let reply = try await call(Request(requestID: requestID, command: .inspect(buffer: buffer)))
        guard reply.status == .state, let at = reply.at else { throw bad(reply) }
        return BufferStatus(holder: try holding(from: reply), lastToken: reply.token ?? 0, at: at, members: reply.roster)
    }

    /// Releases every buffer held by `connection` (and claimed by this client's broker user): broadcast to
    /// all N partitions with one request id, answers merged.
    public func releaseConnection(_ connection: String, requestID: String = BatonClient.newRequestID()) async throws -> ReleasedBuffers {
        let request = Request(requestID: requestID, command: .releaseConnection(connection: connection))
        // Every partition must answer, and "every" must be the deployment's N.
        try await checkPartitionCount(via: 0, timeout: configuration.timeout)
        return try await withThrowingTaskGroup(of: ReleasedBuffers.self) { group in
            for partition in 0..<configuration.partitioner.count {
                group.addTask {
                    let reply = try await self.call(request, partition: partition)
                    guard reply.status == .releasedConnection else { throw self.bad(reply) }
                    let listed = reply.buffers ?? []
                    return ReleasedBuffers(count: reply.releasedCount ?? listed.count, buffers: listed, endedMemberships: reply.endedMemberships ?? 0)
                }
            }
            let merged = try await group.reduce(into: ReleasedBuffers(count: 0, buffers: [])) {
                $0.count += $1.count
                $0.buffers += $1.buffers
                $0.endedMemberships += $1.endedMemberships
            }
            return ReleasedBuffers(
                count: merged.count, buffers: merged.buffers.sorted { ExactString($0) < ExactString($1) }, endedMemberships: merged.endedMemberships
            )
        }
    }

    /// Releases `buffer` whoever holds it: an operator's action, published to `baton.admin` (the broker
    /// refuses it unless this client's user may write to that exchange).
    ///
    /// - Returns: the released token, or nil when nobody held the buffer.
    public func forceRelease(_ buffer: String, reason: String? = nil, requestID: String = BatonClient.newRequestID()) async throws -> Int64? {
        let reply = try await call(Request(requestID: requestID, command: .forceRelease(buffer: buffer, reason: reason)))
        switch reply.status {
        case .released: return reply.token
        case .notOwner: return nil
        default: throw bad(reply)
        }
    }

    /// Makes sure the deployment has the configured N, asking `describe` of `partition` once: before
    /// anything goes to every partition (`release_connection`, a watch of all partitions), where a wrong
    /// N would silently leave partitions out, and when a request routed by its buffer comes back
    /// `misrouted`. After a mismatch every call fails at once with ``BatonClientError/Code/misconfigured``.
    /// A worker below revision 3 does not know `describe`: N cannot be checked, and is trusted.
    func checkPartitionCount(via partition: Int, timeout: Duration) async throws {
        let check = state.withLock { state -> Result<Task<Void, any Error>?, BatonClientError> in
            switch state.partitionCount {
            case .verified: return .success(nil)
            case .mismatch(let error): return .failure(error)
            case .unknown: break
            }
            if let running = state.partitionChecks[partition] { return .success(running) }
            let task = Task { try await self.describePartitionCount(via: partition, timeout: timeout) }
            state.partitionChecks[partition] = task
            return .success(task)
        }
        guard let task = try check.get() else { return }
        do {
            try await task.value
            state.withLock { state in
                state.partitionCount = .verified
                state.partitionChecks[partition] = nil
            }
        } catch let error as BatonClientError where error.code == .misconfigured {
            state.withLock { state in
                state.partitionCount = .mismatch(error)
                state.partitionChecks[partition] = nil
            }
            throw error
        } catch {
            // No answer (the partition's worker is down, a timeout): the call could not have been answered
            // either; the next call asks again.
            state.withLock { $0.partitionChecks[partition] = nil }
            throw error
        }
    }

    private func describePartitionCount(via partition: Int, timeout: Duration) async throws {
        let reply: Reply
        do {
            reply = try await call(Request(requestID: Self.newRequestID(), command: .describe), partition: partition, timeout: timeout)
        } catch let error as BatonClientError where error.errorCode == .unknownOp {
            return
        }
        guard reply.status == .description, let deployment = reply.deployment else { throw bad(reply) }
        let configured = configuration.partitioner.count
        guard deployment.partitions == configured else {
            throw BatonClientError(
                code: .misconfigured,
                message: "this client routes with \(configured) partitions, but the deployment has \(deployment.partitions) (describe): "
                    + "configure \(deployment.partitions) (BatonClientConfiguration.partitioner, --partition-count, BATON_PARTITION_COUNT); nothing was sent"
            )
        }
    }

    /// Sends a request and returns the raw reply (status `error` becomes ``BatonClientError/Code/rejected``).
    ///
    /// The request carries a `deadline` (now + the timeout, at most the protocol's request lifetime) in its
    /// body and as the message's `expiration`, so a worker never decides it after this call gave up. While
    /// no reply has come, it is published again after ``BatonClientConfiguration/resendAfter``, then after
    /// twice that (with ±20 % jitter, never past the deadline; a waiting claim's interval doubles up to
    /// 15 s), with the same
    /// `request_id` and correlation id, and the reply to any attempt answers the call.
    ///
    /// - Parameters:
    ///   - partition: where to send it; by default the partition of its buffer (partition 0 without one).
    ///   - timeout: how long the call may take; by default ``BatonClientConfiguration/timeout``.
    ///   - resendAfter: how long to wait for a reply before publishing again; by default
    ///     ``BatonClientConfiguration/resendAfter``.
    public func call(_ request: Request, partition explicit: Int? = nil, timeout: Duration? = nil, resendAfter: Duration? = nil) async throws -> Reply {
        let resendAfter = resendAfter ?? configuration.resendAfter
        // Names go out in NFC, the one form the worker accepts, and are routed by it: two spellings of a
        // name are one buffer (docs/protocol.md 3.2).
        var request = request.inNFC()
        let partition = explicit ?? request.buffer.map(configuration.partitioner.partition(of:)) ?? 0
        let timeout = timeout ?? configuration.timeout
        let deadline = ContinuousClock.now + timeout
        if case .mismatch(let error) = state.withLock({ $0.partitionCount }) {
            throw error  // a request routed with the wrong N would land on the wrong partition
        }
        if request.deadline == nil {
            let lifetime = min(max(1, timeout.wholeMilliseconds), ProtocolV1.maxRequestLifetimeMilliseconds)
            request.deadline = Timestamp.wallClock().adding(milliseconds: lifetime)
        }
        let body = ProtocolCodec.encode(request)
        if request.operation == .forceRelease {
            return try await adminCall(request, body: body, partition: partition, deadline: deadline)
        }
        let key = "\(partition)|\(request.requestID)"
        let pending = state.withLock { state -> PendingCall? in
            guard !state.closed else { return nil }
            let entry = state.pending[key] ?? (PendingCall(), 0)
            state.pending[key] = (entry.call, entry.users + 1)
            return entry.call
        }
        guard let pending else { throw BatonClientError(code: .closed, message: "the client is closed", requestID: request.requestID) }
        defer {
            state.withLock { state in
                guard let entry = state.pending[key] else { return }
                state.pending[key] = entry.users > 1 ? (entry.call, entry.users - 1) : nil
            }
        }

        var backoff = Backoff(initial: .milliseconds(50), maximum: .seconds(1))
        // When to publish (BatonCore's CallSchedule, which the Python client follows too): at once, then
        // after `resendAfter`, doubling with jitter up to twice that (15 s for a waiting claim, whose
        // answer comes when it leaves the line), never past the deadline, and at once on a new channel (a
        // reconnect, or a channel that had stopped reaching its queue), since the last attempts may have
        // been lost with the old one. Times are milliseconds since the call began.
        let began = deadline - timeout
        func elapsed(_ instant: ContinuousClock.Instant) -> Int64 { (instant - began).wholeMilliseconds }
        var schedule = CallSchedule<SameChannel>(
            resendAfter: max(1, resendAfter.wholeMilliseconds), deadline: max(1, timeout.wholeMilliseconds), waiting: request.waiting != nil
        )
        var blocked: String?
        var connectFailure: (any Error)?
        calling: while true {
            let link: Link
            do {
                let existing = state.withLock { $0.link }
                link = if let existing { existing } else { try await Self.before(deadline) { try await self.currentLink() } }
            } catch is DeadlinePassed {
                break
            } catch let error as BatonClientError {
                throw error
            } catch {
                logger.debug("connecting failed; retrying", metadata: ["baton.error": "\(error)"])
                connectFailure = error
                dropLink()
                _ = await pending.wait(until: min(deadline, .now + backoff.next()))
                continue
            }
            let now = ContinuousClock.now
            let reason = link.connection.blockedReason
            if let reason { blocked = reason }
            let waitUntil: ContinuousClock.Instant
            switch schedule.step(at: elapsed(now), channel: SameChannel(link.channel), blocked: reason != nil) {
            case .timedOut:
                break calling
            case .send:
                send(Queued(key: key, body: body, deadline: deadline, alone: request.waiting != nil), partition: partition, on: link)
                schedule.sent(at: elapsed(now), on: SameChannel(link.channel), jitter: Double.random(in: CallSchedule<SameChannel>.jitter))
                continue
            case .waitForChannel:
                // Publishing now would only queue the request in a socket the broker does not read; a reply
                // to an earlier attempt still answers the call.
                waitUntil = min(deadline, now + .milliseconds(50))
            case .wait(let until):
                waitUntil = min(deadline, began + .milliseconds(until))
            }
            let answer: Result<Reply, BatonClientError>?
            if request.waiting != nil {
                // A waiting claim may wait minutes: a cancelled caller stops waiting at once.
                if Task.isCancelled { throw CancellationError() }
                answer = await withTaskCancellationHandler { await pending.wait(until: waitUntil) } onCancel: { pending.wake() }
                if answer == nil, Task.isCancelled { throw CancellationError() }
            } else {
                answer = await pending.wait(until: waitUntil)
            }
            switch answer {
            case .success(let reply)?:
                if reply.status == .error {
                    if reply.error?.code == .misrouted, explicit == nil {
                        // Routed by its buffer and refused as misrouted: the deployment's N is not this client's.
                        try await checkPartitionCount(via: partition, timeout: max(.seconds(1), deadline - .now))
                    }
                    throw BatonClientError(code: .rejected, message: reply.error?.message ?? "rejected", requestID: request.requestID, errorCode: reply.error?.code)
                }
                return reply
            case .failure(let error)?:
                throw BatonClientError(code: error.code, message: error.message, requestID: request.requestID, errorCode: error.errorCode)
            case nil:
                continue  // no reply yet: ask the schedule again (a resend with the same request id when due)
            }
        }
        let attempts = schedule.attempts
        // The broker's reason only when it blocked publishing since the last attempt (or the whole call).
        if !schedule.lastBlocked { blocked = nil }
        if let blocked, attempts == 0 {
            throw BatonClientError(
                code: .blocked,
                message: "the broker blocked publishing for the whole \(timeout) (\(blocked)): \(request.operation) '\(request.buffer ?? "")' (request_id \(request.requestID)) was not sent; retry later with the same request_id",
                requestID: request.requestID
            )
        }
        if attempts == 0, let connectFailure {
            throw BatonClientError(
                code: .timeout,
                message: "\(request.operation) '\(request.buffer ?? "")' (request_id \(request.requestID)) was not sent within \(timeout): the broker could not be reached (\(connectFailure)); retrying later with the same request_id is safe",
                requestID: request.requestID
            )
        }
        throw BatonClientError(
            code: .timeout,
            message: "no reply to \(request.operation) '\(request.buffer ?? "")' (request_id \(request.requestID)) within \(timeout) after \(attempts) attempts\(blocked.map { " (the broker then blocked publishing: \($0))" } ?? ""): is a worker serving partition \(partition)? Retrying with the same request_id is safe",
            requestID: request.requestID
        )
    }

    /// An operator's request, on a channel of its own: the broker refuses a publish to `baton.admin` without
    /// permission by closing the channel it came on (403), which must not disturb other calls.
    private func adminCall(_ request: Request, body: [UInt8], partition: Int, deadline: ContinuousClock.Instant) async throws -> Reply {
        let link = try await currentLink()
        let channel = try await link.connection.openChannel()
        let returned = Mutex<String?>(nil)
        do {
            let (_, replies) = try await channel.consume(queue: ProtocolV1.directReplyTo, noAck: true)
            try await channel.onReturn { _, code, text in returned.withLock { $0 = "\(code) \(text)" } }
            let correlationID = UUID().uuidString
            try await channel.publish(OutgoingMessage(
                exchange: ProtocolV1.adminExchange, routingKey: String(partition), body: body,
                properties: AMQPProperties(
                    contentType: ProtocolV1.contentType, correlationID: correlationID, replyTo: ProtocolV1.directReplyTo,
                    messageID: correlationID, expiration: String(max(1, (deadline - .now).wholeMilliseconds)), deliveryMode: 2,
                    userID: configuration.amqpURL.user
                ),
                mandatory: true
            ))
            while ContinuousClock.now < deadline {
                let batch = try await replies.next(max: 16, timeout: min(.milliseconds(100), deadline - .now))
                if let text = returned.withLock({ $0 }) {
                    throw BatonClientError(code: .unroutable, message: "the broker could not route the request (\(text)): run 'baton topology' or start a worker", requestID: request.requestID)
                }
                for message in batch where message.properties.correlationID == correlationID {
                    await channel.close()
                    let reply: Reply
                    do {
                        reply = try ProtocolCodec.decodeReply(message.body)
                    } catch {
                        throw BatonClientError(code: .badReply, message: "the reply could not be decoded: \(error)", requestID: request.requestID)
                    }
                    if reply.status == .error {
                        throw BatonClientError(code: .rejected, message: reply.error?.message ?? "rejected", requestID: request.requestID, errorCode: reply.error?.code)
                    }
                    return reply
                }
            }
        } catch let error as AMQPError where error.replyCode == 403 {
            throw BatonClientError(
                code: .forbidden,
                message: "the broker refused \(request.operation) for user '\(configuration.amqpURL.user)': \(error.message); operators publish it with a user allowed to write to \(ProtocolV1.adminExchange)",
                requestID: request.requestID
            )
        } catch {
            await channel.close()
            throw error
        }
        await channel.close()
        throw BatonClientError(
            code: .timeout,
            message: "no reply to \(request.operation) '\(request.buffer ?? "")' (request_id \(request.requestID)) within \(configuration.timeout): is a worker serving partition \(partition)? Retrying with the same request_id is safe",
            requestID: request.requestID
        )
    }

    /// Sends `request` now if nothing for its partition is in flight (with whatever waited), or leaves it
    /// to go with the next message for the partition. Never suspends: a broker that stops reading cannot
    /// hold the caller, whose wait ends at its deadline.
    private func send(_ request: Queued, partition: Int, on link: Link) {
        let message = state.withLock { state -> (String, [Queued])? in
            var lane = state.lanes[partition] ?? Lane()
            lane.enqueue(request, now: .now)
            defer { state.lanes[partition] = lane }
            return nextMessage(&lane, partition: partition, state: &state)
        }
        if let (id, items) = message {
            publish(id, items, partition: partition, on: link)
            // A waiting claim went alone: what waited with it may go now too.
            if items.first?.alone == true { flush(partition) }
        }
    }

    /// A linger ended: sends what waited.
    private func endLinger(_ partition: Int) {
        state.withLock { $0.lanes[partition]?.lingerEnded() }
        flush(partition)
    }

    /// Sends what waits for `partition` if its messages in flight were answered or count as lost.
    private func flush(_ partition: Int) {
        let (link, message) = state.withLock { state -> (Link?, (String, [Queued])?) in
            // Called on the connection's I/O thread when a reply frees a lane: a write into a connection
            // the broker blocked (a resource alarm) could block that thread, and no reply would be read
            // any more. What waits goes once the broker unblocks (the reaper flushes idle lanes).
            guard let link = state.link, link.connection.blockedReason == nil, var lane = state.lanes[partition] else { return (nil, nil) }
            defer { state.lanes[partition] = lane }
            return (link, nextMessage(&lane, partition: partition, state: &state))
        }
        if let link, let (id, items) = message {
            publish(id, items, partition: partition, on: link)
            if items.first?.alone == true { flush(partition) }
        }
    }

    /// Takes the next message's requests off `lane` when it may send (``Lane/next(now:busy:settings:)``)
    /// and records the message as in flight; schedules the end of a linger.
    private func nextMessage(_ lane: inout Lane<Queued>, partition: Int, state: inout ClientState) -> (String, [Queued])? {
        let now = ContinuousClock.now
        switch lane.next(now: now, busy: state.pending.count >= configuration.busyCalls, settings: laneSettings) {
        case .nothing:
            return nil
        case .linger(let until):
            Task { [weak self] in
                try? await Task.sleep(until: until, tolerance: .microseconds(100))
                self?.endLinger(partition)
            }
            return nil
        case .send(let items, let alone):
            // Unique per client run without a random source per message: a prefix drawn once, and a counter.
            state.nextMessage += 1
            let id = "\(messagePrefix)-\(state.nextMessage)"
            if !alone { lane.sent(id, at: now, settings: laneSettings) }
            state.sent[id] = SentMessage(partition: partition, keys: items.map(\.key), expires: (items.map(\.deadline).max() ?? now) + .seconds(1))
            state.statistics.messages += 1
            state.statistics.requests += items.count
            return (id, items)
        }
    }

    /// Publishes one message (a single request, or a coalesced batch) without waiting.
    private func publish(_ id: String, _ items: [Queued], partition: Int, on link: Link) {
        let body = items.count == 1 ? items[0].body : ProtocolCodec.encodeBatch(bodies: items.map(\.body))
        let remaining = max(1, ((items.map(\.deadline).max() ?? .now) - .now).wholeMilliseconds)
        let message = OutgoingMessage(
            exchange: ProtocolV1.requestsExchange, routingKey: String(partition), body: body,
            properties: AMQPProperties(
                contentType: ProtocolV1.contentType, correlationID: id, replyTo: ProtocolV1.directReplyTo,
                messageID: id, expiration: String(remaining), deliveryMode: 2, userID: configuration.amqpURL.user
            ),
            mandatory: true
        )
        link.channel.publish(message) { [weak self] error in
            guard let self, let error else { return }
            // The connection failed: let the calls resend on a new one.
            self.logger.debug("publishing failed; reconnecting", metadata: ["baton.error": "\(error)"])
            self.state.withLock { state in
                state.lanes[partition]?.lost(id)
                state.sent.removeValue(forKey: id)
            }
            self.dropLink()
        }
    }

    /// Thrown by ``before(_:_:)`` when the deadline comes first.
    private struct DeadlinePassed: Error {}

    /// Runs `body`, but returns (throwing ``DeadlinePassed``) at `deadline` even if `body` is stuck in a
    /// call the broker does not answer (it finishes in the background).
    private static func before<T: Sendable>(_ deadline: ContinuousClock.Instant, _ body: @escaping @Sendable () async throws -> T) async throws -> T {
        let outcome = Waiter<Result<T, any Error>>()
        let work = Task { outcome.resolve(await Result(catching: body)) }
        let timer = Task {
            try? await Task.sleep(until: deadline)
            outcome.wakeIfDue(.now)
        }
        let result = await outcome.wait(until: deadline)
        work.cancel()
        timer.cancel()
        guard let result else { throw DeadlinePassed() }
        return try result.get()
    }

    /// Closes the connection; calls in flight fail with ``BatonClientError/Code/closed``.
    public func close() async {
        let (link, pending) = state.withLock { state -> (Link?, [PendingCall]) in
            state.closed = true
            defer { state.link = nil; state.pending.removeAll() }
            return (state.link, state.pending.values.map(\.call))
        }
        for call in pending { call.resolve(.failure(BatonClientError(code: .closed, message: "the client was closed"))) }
        await link?.connection.close()
    }

    // MARK: - Connection

    private func currentLink() async throws -> Link {
        let task = state.withLock { state -> Task<Link, any Error>? in
            if state.link != nil { return nil }
            if let connecting = state.connecting { return connecting }
            let task = Task { try await self.connect() }
            state.connecting = task
            return task
        }
        if let link = state.withLock({ $0.link }), task == nil { return link }
        guard let task else { return try await currentLink() }
        do {
            let link = try await task.value
            state.withLock { state in
                state.link = link
                state.connecting = nil
            }
            return link
        } catch {
            state.withLock { $0.connecting = nil }
            throw error
        }
    }

    private func dropLink() {
        let link = state.withLock { state -> Link? in
            defer { state.link = nil }
            return state.link
        }
        if let link { Task { await link.connection.close() } }
    }

    private func connect() async throws -> Link {
        let urls = [configuration.amqpURL] + configuration.amqpAlternates
        let (connection, node) = try await AMQPConnection.connect(toFirstOf: urls, from: state.withLock { $0.brokerNode }, name: configuration.name, logger: logger)
        state.withLock { $0.brokerNode = node }
        do {
            let channel = try await openRPCChannel(on: connection, node: node)
            logger.debug("client connected", metadata: ["baton.amqp": "\(urls[node])"])
            return Link(connection: connection, channel: channel, node: node)
        } catch {
            await connection.close()
            throw error
        }
    }

    /// Opens the channel calls are published on (in confirm mode, its publishes tracked until confirmed),
    /// consuming its direct reply-to address: replies come on the channel that published.
    private func openRPCChannel(on connection: AMQPConnection, node: Int) async throws -> AMQPChannel {
        let urls = [configuration.amqpURL] + configuration.amqpAlternates
        let channel = try await connection.openChannel()
        if configuration.staleChannelAfter > .zero { try await channel.enableConfirms(tracking: true) }
        // Replies are dispatched on the connection's I/O thread as they are read: the calls they answer
        // resume from there, and what waited for their partition is published from there at once.
        _ = try await channel.consume(
            queue: ProtocolV1.directReplyTo, noAck: true,
            onDeliveries: { [weak self] batch in self?.dispatch(batch) },
            onEnd: { [weak self] _ in
                // The connection ended: the next call reconnects, and every call waiting for a reply
                // publishes again now (a reply sent to this connection's reply address is lost). A channel
                // replaced by a new one (``BatonClientConfiguration/staleChannelAfter``) ends quietly.
                let calls = self?.state.withLock { state -> [PendingCall] in
                    guard state.link == nil || state.link?.channel === channel else { return [] }
                    if state.link?.connection === connection {
                        state.link = nil
                        state.brokerNode = (node + 1) % urls.count
                    }
                    // What was in flight went with the connection: its lanes are free for the resends.
                    for partition in state.lanes.keys { state.lanes[partition]?.lostAll() }
                    return state.pending.values.map(\.call)
                }
                for call in calls ?? [] { call.wake() }
            }
        )
        try await channel.onReturn { [weak self] messageID, code, text in
            guard let self, let messageID else { return }
            let calls = self.state.withLock { state -> [PendingCall] in
                guard let message = state.sent.removeValue(forKey: messageID) else { return [] }
                state.lanes[message.partition]?.lost(messageID)
                return message.keys.compactMap { state.pending[$0]?.call }
            }
            for call in calls {
                call.resolve(.failure(BatonClientError(
                    code: .unroutable,
                    message: "the broker could not route the request (\(code) \(text)): the partition's queue does not exist; run 'baton topology' or start a worker"
                )))
            }
        }
        return channel
    }

    /// Answers the calls a reply message carries replies for (by request id; a reply without one, to a
    /// message refused as a whole, answers every call of that message), and sends what waited for it.
    private func dispatch(_ batch: [AMQPMessage]) {
        var freed = Set<Int>()
        for message in batch {
            guard let correlationID = message.properties.correlationID else { continue }
            let decoded: (first: Int?, replies: [Reply])?
            let failure: ReplyDecodingError?
            do {
                decoded = try ProtocolCodec.decodeReplyMessage(message.body)
                failure = nil
            } catch {
                decoded = nil
                failure = error
            }
            // The record stays until every element of its batch is answered: a batch reply over 64 KiB
            // comes in parts, and an element refused without a request id is matched by its place.
            let record = state.withLock { state -> SentMessage? in
                guard var record = state.sent[correlationID] else { return nil }
                // The calls answered now come back soon with their next requests: under load, the lane
                // lingers for them (``BatonClientConfiguration/linger``).
                state.lanes[record.partition]?.answered(correlationID, at: .now)
                record.answered += decoded?.replies.count ?? record.keys.count
                if decoded?.first == nil || record.answered >= record.keys.count {
                    state.sent.removeValue(forKey: correlationID)
                } else {
                    state.sent[correlationID] = record
                }
                return record
            }
            if let record { freed.insert(record.partition) }
            guard let (first, replies) = decoded else {
                let calls = state.withLock { state in (record?.keys ?? []).compactMap { state.pending[$0]?.call } }
                for call in calls { call.resolve(.failure(BatonClientError(code: .badReply, message: "the reply could not be decoded: \(failure.map { "\($0)" } ?? "")"))) }
                continue
            }
            let resolved = state.withLock { state -> [(PendingCall, Reply)] in
                replies.enumerated().flatMap { offset, reply -> [(PendingCall, Reply)] in
                    let keys: [String]
                    if let id = reply.requestID, let partition = record?.partition ?? reply.partition {
                        keys = ["\(partition)|\(id)"]
                    } else if let first, let record, record.keys.indices.contains(first + offset) {
                        keys = [record.keys[first + offset]]  // a batch element refused without a request id
                    } else {
                        keys = record?.keys ?? []  // a message refused as a whole; a late answer has no record
                    }
                    return keys.compactMap { key in state.pending[key].map { ($0.call, reply) } }
                }
            }
            for (call, reply) in resolved { call.resolve(.success(reply)) }
        }
        for partition in freed { flush(partition) }
    }

    // MARK: - Helpers

    private func makeLease(from reply: Reply) throws -> Lease {
        guard let buffer = reply.buffer, let token = reply.token, let expiresAt = reply.expiresAt, let at = reply.at, let partition = reply.partition else {
            throw bad(reply)
        }
        return Lease(buffer: buffer, token: token, expiresAt: expiresAt, at: at, partition: partition)
    }

    private func holding(from reply: Reply) throws -> Holding? {
        guard let holder = reply.holder else { return nil }
        guard let token = reply.token else { throw bad(reply) }
        return Holding(holder: holder, token: token, expiresAt: reply.expiresAt)
    }

    private func bad(_ reply: Reply) -> BatonClientError {
        BatonClientError(code: .badReply, message: "unexpected reply status '\(reply.status)' for request \(reply.requestID ?? "-")", requestID: reply.requestID)
    }
}

/// A value that arrives once, awaited by one task at a time, which may also be woken without it at a
/// time it names (by the client's reaper, which calls ``wakeIfDue(_:)`` every 20 ms).
private final class Waiter<Value: Sendable>: Sendable {
    private struct State {
        var value: Value?
        var waiter: CheckedContinuation<Value?, Never>?
        var wakeAt: ContinuousClock.Instant?
        /// A ``wake()`` that found nobody waiting: the next wait returns at once.
        var wakePending = false
    }

    private let state = Mutex(State())

    /// Delivers the value (the first one wins).
    func resolve(_ value: Value) {
        let waiter = state.withLock { state -> CheckedContinuation<Value?, Never>? in
            guard state.value == nil else { return nil }
            state.value = value
            defer { state.waiter = nil }
            return state.waiter
        }
        waiter?.resume(returning: value)
    }

    /// Wakes a waiter whose time has come, without the value.
    func wakeIfDue(_ now: ContinuousClock.Instant) {
        let waiter = state.withLock { state -> CheckedContinuation<Value?, Never>? in
            guard let wakeAt = state.wakeAt, wakeAt <= now else { return nil }
            state.wakeAt = nil
            defer { state.waiter = nil }
            return state.waiter
        }
        waiter?.resume(returning: nil)
    }

    /// Wakes the waiter now, without the value.
    func wake() {
        let waiter = state.withLock { state -> CheckedContinuation<Value?, Never>? in
            state.wakeAt = nil
            if state.waiter == nil { state.wakePending = true }
            defer { state.waiter = nil }
            return state.waiter
        }
        waiter?.resume(returning: nil)
    }

    /// The value, or nil if it did not arrive by `time`.
    func wait(until time: ContinuousClock.Instant) async -> Value? {
        await withCheckedContinuation { continuation in
            let ready = state.withLock { state -> Value?? in
                if let value = state.value { return .some(value) }
                if state.wakePending {
                    state.wakePending = false
                    return .some(nil)
                }
                if time <= .now { return .some(nil) }
                state.waiter = continuation
                state.wakeAt = time
                return .none
            }
            if let ready { continuation.resume(returning: ready) }
        }
    }
}

extension Result where Failure == any Error {
    init(catching body: () async throws -> Success) async {
        do {
            self = .success(try await body())
        } catch {
            self = .failure(error)
        }
    }
}

extension Timestamp {
    /// This machine's wall clock (requests' deadlines are set on the caller's clock).
    static func wallClock() -> Timestamp {
        Timestamp(milliseconds: Int64((Date().timeIntervalSince1970 * 1000).rounded(.down)))
    }
}
