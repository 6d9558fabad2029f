/// When one call publishes its request: the first attempt as soon as a channel is ready and the broker
/// does not block it, each resend after an interval that doubles (with jitter, up to a cap) and never
/// goes past the call's deadline, an attempt at once on a new channel (the last ones may have been lost
/// with the old one), and the end of the call at its deadline. No I/O and no clock of its own: the
/// client's I/O layer asks ``step(at:channel:blocked:)`` what to do now and reports each publish with
/// ``sent(at:jitter:)``.
///
/// The Swift client (`BatonClient.call`) and the Python client (`baton_client._schedule`) both follow
/// it, and both replay the cases of `docs/conformance/call-schedule.json` (docs/protocol.md section
/// 15.3 says what a client owes the workers when it resends).
///
/// `Channel` names the channel an attempt went on (any value that changes when the channel does: an
/// object identity, a generation number).
public struct CallSchedule<Channel: Equatable>: Sendable where Channel: Sendable {
    /// What the I/O layer does now.
    public enum Step: Equatable, Sendable {
        /// Publish the request (then report it with ``CallSchedule/sent(at:jitter:)``).
        case send
        /// Wait for a reply until this time (or until woken: a reply, a new channel), then ask again.
        case wait(until: Instant)
        /// No channel is ready, or the broker blocks publishing: wait for one until at most this time.
        case waitForChannel(until: Instant)
        /// The deadline passed: the call ends without a reply.
        case timedOut
    }

    /// Times as the I/O layer measures them (any monotonic clock), in milliseconds.
    public typealias Instant = Int64

    /// The interval before the first resend; nil: never resend on the same channel.
    public let resendAfter: Int64?
    /// When the call ends without a reply.
    public let deadline: Instant
    /// Whether the call is a claim that waits in line (its answer may take minutes: resends back off to
    /// ``waitingResendCap`` instead of twice `resendAfter`).
    public let waiting: Bool
    /// The longest interval between resends when the caller sets one (a lease keeper's renewal resends at
    /// least every quarter of the lease): replaces ``cap``'s default.
    public let maxInterval: Int64?
    /// How many times the request was published.
    public private(set) var attempts = 0
    /// Whether an attempt was refused for want of a channel or because the broker blocked publishing,
    /// and none went since.
    public private(set) var lastBlocked = false

    private var interval: Int64?
    private var channel: Channel?
    private var nextSend: Instant?

    /// The longest interval between resends of a waiting claim.
    public static var waitingResendCap: Int64 { 15_000 }
    /// The jitter a resend interval is multiplied by is drawn from this range.
    public static var jitter: ClosedRange<Double> { 0.8...1.2 }

    public init(resendAfter: Int64?, deadline: Instant, waiting: Bool = false, maxInterval: Int64? = nil) {
        self.resendAfter = resendAfter
        self.deadline = deadline
        self.waiting = waiting
        self.maxInterval = maxInterval
        interval = Self.firstInterval(resendAfter, maxInterval)
    }

    /// The interval before the first resend (and the first after a new channel).
    private static func firstInterval(_ resendAfter: Int64?, _ maxInterval: Int64?) -> Int64? {
        guard let resendAfter else { return nil }
        return maxInterval.map { min(resendAfter, $0) } ?? resendAfter
    }

    /// The longest interval between resends: twice `resendAfter`, so that a request lost in a failover is
    /// asked for again soon after the fault clears while an overloaded worker gets each call half as
    /// often; for a waiting claim ``waitingResendCap`` (or `resendAfter` if longer).
    public var cap: Int64? {
        if let maxInterval, resendAfter != nil { return maxInterval }
        return resendAfter.map { waiting ? max($0, Self.waitingResendCap) : $0 * 2 }
    }

    /// What to do at `now`, with `channel` ready (nil: none) and the broker blocking publishing or not.
    public mutating func step(at now: Instant, channel current: Channel?, blocked: Bool) -> Step {
        guard now < deadline else { return .timedOut }
        guard let current, !blocked else {
            lastBlocked = blocked
            return .waitForChannel(until: deadline)
        }
        if attempts > 0, channel != current {
            // A new channel: what went on the old one may be lost with it. Send at once and start the
            // intervals over.
            interval = Self.firstInterval(resendAfter, maxInterval)
            return .send
        }
        if let nextSend, now < nextSend { return .wait(until: nextSend) }
        return .send
    }

    /// The request was published at `now` on `channel`; `jitter` (drawn from ``jitter``) spreads the next
    /// interval so that calls that went together do not resend together.
    public mutating func sent(at now: Instant, on channel: Channel, jitter: Double) {
        attempts += 1
        lastBlocked = false
        self.channel = channel
        guard let current = interval, let cap else {
            nextSend = deadline
            return
        }
        nextSend = min(deadline, now + current)
        interval = Int64((Double(min(current * 2, cap)) * jitter).rounded())
        if let maxInterval, let next = interval { interval = min(next, maxInterval) }
    }
}
