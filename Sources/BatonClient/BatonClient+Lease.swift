import BatonCore
import Logging
import Synchronization

/// Why a kept lease ended.
public enum LeaseLoss: Sendable, Hashable {
    /// A renewal was answered `not_owner`: the lease was released (also by an operator's `force_release`),
    /// expired or taken; `current` is the live holder the worker reported, if any.
    case notOwner(current: Holding?)
    /// No renewal was confirmed before the lease's safe end on this machine's clock (the worker side or
    /// the broker did not answer): the buffer may already belong to someone else.
    case unconfirmed
    /// The worker refused a renewal (an error reply or a client error other than a timeout), and the
    /// safe end passed before another one succeeded.
    case failed(String)
    /// You released it (``KeptLease/release()``, or the end of ``BatonClient/withLease(_:user:connection:lease:wait:body:)``).
    case released
}

/// The state of a kept lease, as the code that writes under it needs it.
public enum LeaseState: Sendable, Hashable {
    /// Held: the last confirmed claim or renewal leaves more than half the lease.
    case held(token: Int64, safeUntil: ContinuousClock.Instant)
    /// A renewal is overdue (less than half the lease is left since the last confirmed one): writes are
    /// still fenced by the token, but the lease may be lost at `safeUntil`.
    case renewingLate(token: Int64, safeUntil: ContinuousClock.Instant)
    /// Lost: stop writing at once.
    case lost(LeaseLoss)

    /// True while writes may go on (held or renewing late).
    public var isHeld: Bool {
        if case .lost = self { false } else { true }
    }
}

/// Settings of a lease keeper.
public struct LeaseKeeping: Sendable, Hashable {
    /// How long each claim and renewal asks for (1 s to 1 h).
    public var lease: Duration
    /// How much of the lease is given up for the clocks of this machine and the database drifting
    /// apart and for the reply's way back: the lease counts as safe until `sent + lease - margin`,
    /// measured from the first send of the claim or renewal that confirmed it.
    public var margin: Duration
    /// When to renew, as a fraction of the lease after the last confirmed send (default 1/3).
    public var renewFraction: Double

    /// Settings for `lease`: margin a tenth of it (at least 100 ms), renewals at a third.
    public init(lease: Duration = .seconds(30), margin: Duration? = nil, renewFraction: Double = 1.0 / 3.0) {
        self.lease = lease
        self.margin = margin ?? max(.milliseconds(100), lease / 10)
        self.renewFraction = min(max(renewFraction, 0.05), 0.5)
    }
}

/// A lease that a ``BatonClient`` keeps alive until it is released or lost: it renews on this machine's
/// clock, from the first send of each call, and reports every change of ``state`` through ``states()``.
/// In the spirit of etcd's `KeepAlive` and Curator's connection-state listener.
///
/// Call ``release()`` when done (``BatonClient/withLease(_:user:connection:lease:wait:body:)`` does): a kept
/// lease renews until it is released or lost, or its client is closed (then it is lost within a lease).
public final class KeptLease: Sendable {
    /// The buffer.
    public let buffer: String
    /// The holder.
    public let holder: Holder
    /// The fencing token of the grant: send it with every write.
    public let token: Int64
    /// The partition that decides the buffer.
    public let partition: Int

    private struct Shared {
        var state: LeaseState
        var watchers: [Int: AsyncStream<LeaseState>.Continuation] = [:]
        var nextWatcher = 0
        var keeper: Task<Void, Never>?
    }

    private let shared: Mutex<Shared>
    private let client: BatonClient
    private let settings: LeaseKeeping
    /// True when what is kept is a replica membership (``KeptMembership``): ended by `leave`, not `release`.
    private let membership: Bool

    /// A lease confirmed by a call first sent at `sent`, kept from then on; or, with `lost`, a grant that
    /// was already lost when it was learnt (nothing is renewed). A `membership` is kept the same way (its
    /// token renews it) and ended by a leave.
    init(
        client: BatonClient, grant: Lease, holder: Holder, sent: ContinuousClock.Instant, settings: LeaseKeeping, lost: LeaseLoss? = nil,
        membership: Bool = false
    ) {
        self.client = client
        self.membership = membership
        buffer = grant.buffer
        self.holder = holder
        token = grant.token
        partition = grant.partition
        self.settings = settings
        shared = Mutex(Shared(state: lost.map(LeaseState.lost) ?? .held(token: grant.token, safeUntil: sent + settings.lease - settings.margin)))
        guard lost == nil else { return }
        let keeper = Task { [weak self] in _ = await self?.keep(confirmed: sent) }
        shared.withLock { $0.keeper = keeper }
    }

    deinit {
        shared.withLock { $0.keeper?.cancel() }
    }

    /// The state now. A `held` or `renewingLate` state whose `safeUntil` has passed reads as lost.
    public var state: LeaseState {
        let state = shared.withLock { $0.state }
        switch state {
        case .held(_, let safeUntil), .renewingLate(_, let safeUntil):
            return ContinuousClock.now < safeUntil ? state : .lost(.unconfirmed)
        case .lost:
            return state
        }
    }

    /// The state now, then every change of it; ends after `lost`.
    public func states() -> AsyncStream<LeaseState> {
        let (stream, continuation) = AsyncStream.makeStream(of: LeaseState.self)
        let id = shared.withLock { shared -> Int? in
            continuation.yield(shared.state)
            if case .lost = shared.state { return nil }
            defer { shared.nextWatcher += 1 }
            shared.watchers[shared.nextWatcher] = continuation
            return shared.nextWatcher
        }
        guard let id else {
            continuation.finish()
            return stream
        }
        continuation.onTermination = { [weak self] _ in _ = self?.shared.withLock { $0.watchers.removeValue(forKey: id) } }
        return stream
    }

    /// Stops renewing and releases the lease (expired or not). Safe to call more than once; the state
    /// becomes `lost(.released)` unless it was already lost.
    public func release() async throws {
        let keeper = shared.withLock { $0.keeper }
        keeper?.cancel()
        await keeper?.value
        switch shared.withLock({ $0.state }) {
        case .lost(.notOwner), .lost(.released): return  // nothing left to release
        default: break  // held, late, or unconfirmed: it may still be ours
        }
        set(.lost(.released))
        if membership {
            _ = try await client.leave(buffer, connection: holder.connection, token: token)
        } else {
            _ = try await client.release(buffer, connection: holder.connection, token: token)
        }
    }

    private func set(_ new: LeaseState) {
        let watchers = shared.withLock { shared -> [AsyncStream<LeaseState>.Continuation] in
            if case .lost = shared.state { return [] }
            guard shared.state != new else { return [] }
            shared.state = new
            let watchers = Array(shared.watchers.values)
            if case .lost = new { shared.watchers.removeAll() }
            return watchers
        }
        for watcher in watchers {
            watcher.yield(new)
            if case .lost = new { watcher.finish() }
        }
    }

    /// Renews at the configured fraction of the lease after the last confirmed send, until lost,
    /// released or cancelled. Each renewal is a call that resends with its request id until the lease's
    /// safe end; the state turns `renewingLate` at half the lease and `lost` at the safe end.
    private func keep(confirmed initial: ContinuousClock.Instant) async {
        var confirmed = initial
        let lease = settings.lease
        while !Task.isCancelled {
            let safeUntil = confirmed + lease - settings.margin
            let late = confirmed + lease / 2
            do {
                try await Task.sleep(until: confirmed + lease * settings.renewFraction)
            } catch {
                return
            }
            // Turn late at half the lease, lost at the safe end, whatever the calls do meanwhile.
            let watchdog = Task { [weak self] in
                guard (try? await Task.sleep(until: late)) != nil else { return }
                self?.set(.renewingLate(token: self?.token ?? 0, safeUntil: safeUntil))
                guard (try? await Task.sleep(until: safeUntil)) != nil else { return }
                self?.set(.lost(.unconfirmed))
            }
            defer { watchdog.cancel() }
            var lastProblem: String?
            var renewed = false
            renewing: while ContinuousClock.now < safeUntil {
                if Task.isCancelled { return }
                let sent = ContinuousClock.now
                do {
                    switch try await client.renew(buffer, connection: holder.connection, token: token, lease: lease, timeout: safeUntil - sent) {
                    case .renewed:
                        confirmed = sent
                        renewed = true
                        set(.held(token: token, safeUntil: sent + lease - settings.margin))
                    case .notOwner(let current):
                        set(.lost(.notOwner(current: current)))
                        return
                    }
                    break renewing
                } catch let error as BatonClientError where error.code == .timeout {
                    lastProblem = nil
                    continue
                } catch {
                    lastProblem = "\(error)"
                    client.logger.debug("renewing a kept lease failed; retrying", metadata: ["baton.buffer": "\(buffer)", "baton.error": "\(error)"])
                    try? await Task.sleep(for: .milliseconds(200))
                }
            }
            if !renewed {
                if Task.isCancelled { return }
                set(.lost(lastProblem.map(LeaseLoss.failed) ?? .unconfirmed))
                return
            }
        }
    }
}

/// The answer to ``BatonClient/keep(_:user:connection:keeping:wait:requestID:)``.
public enum KeepResult: Sendable {
    /// You hold the buffer, and the client keeps the lease alive.
    case kept(KeptLease)
    /// Someone else holds it.
    case denied(Holding)
}

/// ``BatonClient/withLease(_:user:connection:lease:wait:body:)`` was granted the buffer after a wait,
/// but the lease was lost before it could be confirmed (its renewal was answered `not_owner`): the body
/// did not run.
public struct LeaseLost: Error, Sendable, CustomStringConvertible {
    /// The buffer.
    public var buffer: String
    /// Why it was lost.
    public var loss: LeaseLoss

    public var description: String { "the lease on '\(buffer)' was lost as soon as it was granted: \(loss)" }
}

/// ``BatonClient/withLease(_:user:connection:lease:wait:body:)`` could not get the buffer.
public struct LeaseDenied: Error, Sendable, CustomStringConvertible {
    /// The buffer.
    public var buffer: String
    /// Who holds it.
    public var holding: Holding

    public var description: String { "'\(buffer)' is held by \(holding.holder) with token \(holding.token)" }
}

extension BatonClient {
    /// Renews with a timeout of its own (the lease keeper's: until the lease's safe end).
    func renew(_ buffer: String, connection: String, token: Int64, lease: Duration, timeout: Duration) async throws -> RenewResult {
        let reply = try await call(
            Request(requestID: BatonClient.newRequestID(), command: .renew(buffer: buffer, connection: connection, token: token, leaseMilliseconds: lease.wholeMilliseconds)),
            timeout: timeout, resendAfter: min(configuration.resendAfter, lease / 4)
        )
        switch reply.status {
        case .renewed: return .renewed(Lease(buffer: buffer, token: reply.token ?? token, expiresAt: reply.expiresAt ?? .init(milliseconds: 0), at: reply.at ?? .init(milliseconds: 0), partition: reply.partition ?? 0))
        case .notOwner: return .notOwner(current: reply.holder.map { Holding(holder: $0, token: reply.token ?? 0, expiresAt: reply.expiresAt) })
        default: throw unexpected(reply)
        }
    }

    /// Claims `buffer` and keeps the lease alive until you release it or it is lost (see ``KeptLease``).
    ///
    /// The claim counts from the moment it is first sent. If the calling task is cancelled, or the claim
    /// times out, while its answer is unknown, the claim is settled in the background: it is asked again
    /// with the same `request_id` (the stored answer, or `deadline_exceeded` if it was never decided) and
    /// whatever it granted is released, so no grant is left behind that nobody knows about.
    ///
    /// With `wait` (1 ms to 300 s), a held buffer is waited for in its line (see
    /// ``claim(_:user:connection:lease:wait:requestID:)``). A grant to a waiter happened at some moment
    /// between the claim's first send and its answer, so the send is the only safe start of the lease on
    /// this machine's clock; when the answer comes after the first renewal would be due, the lease is
    /// renewed before it is returned, and kept from that renewal's send (one more call, only after a
    /// long wait). A renewal answered `not_owner` returns a lease already `lost(.notOwner)`.
    public func keep(
        _ buffer: String, user: String, connection: String, keeping: LeaseKeeping = LeaseKeeping(), wait: Duration? = nil,
        requestID: String = BatonClient.newRequestID()
    ) async throws -> KeepResult {
        let holder = Holder(user: user, connection: connection)
        let timeout = min(configuration.timeout + (wait ?? .zero), .milliseconds(ProtocolV1.maxRequestLifetimeMilliseconds))
        var request = Request(
            requestID: requestID, command: .claim(buffer: buffer, holder: holder, leaseMilliseconds: keeping.lease.wholeMilliseconds),
            deadline: Timestamp.wallClock().adding(milliseconds: timeout.wholeMilliseconds)
        )
        if let wait { request.waiting = Waiting(milliseconds: max(1, wait.wholeMilliseconds)) }
        var sent = ContinuousClock.now
        let reply: Reply
        do {
            reply = try await call(request, timeout: timeout)
        } catch let error as BatonClientError where error.code == .timeout {
            settle(request)
            throw error
        } catch let error as CancellationError {
            settle(request)  // a waiting claim stops waiting at once when cancelled
            throw error
        }
        if Task.isCancelled {
            // The caller gave up while the claim was out: undo what it granted.
            if reply.status == .granted, let token = reply.token { _ = try? await release(buffer, connection: connection, token: token) }
            throw CancellationError()
        }
        switch reply.status {
        case .granted:
            guard let token = reply.token, let expiresAt = reply.expiresAt, let at = reply.at, let partition = reply.partition else { throw unexpected(reply) }
            let grant = Lease(buffer: buffer, token: token, expiresAt: expiresAt, at: at, partition: partition)
            if ContinuousClock.now >= sent + keeping.lease * keeping.renewFraction {
                // Granted after a wait: the lease is as old as the claim's first send on this clock.
                let renewal = ContinuousClock.now
                do {
                    switch try await renew(buffer, connection: connection, token: token, lease: keeping.lease, timeout: configuration.timeout) {
                    case .renewed: sent = renewal
                    case .notOwner(let current):
                        return .kept(KeptLease(client: self, grant: grant, holder: holder, sent: sent, settings: keeping, lost: .notOwner(current: current)))
                    }
                } catch {
                    _ = try? await release(buffer, connection: connection, token: token)
                    throw error
                }
            }
            return .kept(KeptLease(client: self, grant: grant, holder: holder, sent: sent, settings: keeping))
        case .denied:
            guard let current = reply.holder, let token = reply.token else { throw unexpected(reply) }
            return .denied(Holding(holder: current, token: token, expiresAt: reply.expiresAt))
        default:
            throw unexpected(reply)
        }
    }

    /// Runs `body` while holding `buffer`, and releases it on the way out: on return, on error and on
    /// cancellation. `body` gets the ``KeptLease``: send its `token` with every write, and stop writing
    /// once its ``KeptLease/state`` is lost (``KeptLease/states()`` tells when).
    ///
    /// - Throws: ``LeaseDenied`` when someone else holds the buffer; whatever `body` throws.
    /// With `wait`, a held buffer is waited for in its line first (``keep(_:user:connection:keeping:wait:requestID:)``).
    public func withLease<T: Sendable>(
        _ buffer: String, user: String, connection: String, lease: Duration = .seconds(30), wait: Duration? = nil,
        body: (KeptLease) async throws -> T
    ) async throws -> T {
        switch try await keep(buffer, user: user, connection: connection, keeping: LeaseKeeping(lease: lease), wait: wait) {
        case .denied(let holding):
            throw LeaseDenied(buffer: buffer, holding: holding)
        case .kept(let kept):
            if case .lost(let loss) = kept.state {
                // Granted after a wait, and lost before it could be renewed: the body never runs.
                try? await kept.release()
                throw LeaseLost(buffer: buffer, loss: loss)
            }
            do {
                let result = try await body(kept)
                try await kept.release()
                return result
            } catch {
                // Released whatever happened in `body`, cancellation included (the release is its own call).
                try? await Task { try await kept.release() }.value
                throw error
            }
        }
    }

    /// Learns the outcome of a claim that timed out or was cancelled, and releases what it granted: the
    /// same request is asked again until it is answered (once its deadline has passed, a request never
    /// decided is answered `deadline_exceeded`, and one decided gets its stored reply; a claim still in
    /// line is answered when it leaves it).
    func settle(_ request: Request) {
        guard case .claim(let buffer, let holder, _) = request.command else { return }
        Task {
            var reply: Reply?
            let giveUp = ContinuousClock.now + .seconds(600)  // the idempotency window
            while reply == nil, ContinuousClock.now < giveUp {
                do {
                    reply = try await call(request)
                } catch let error as BatonClientError where error.code == .rejected {
                    return  // deadline_exceeded (never decided) or another refusal: nothing was granted
                } catch let error as BatonClientError where error.code == .closed {
                    return
                } catch {
                    try? await Task.sleep(for: .seconds(1))
                }
            }
            guard let reply, reply.status == .granted, let token = reply.token else { return }
            logger.debug("releasing a grant whose caller gave up", metadata: ["baton.buffer": "\(buffer)", "baton.token": "\(token)"])
            _ = try? await release(buffer, connection: holder.connection, token: token)
        }
    }
}
