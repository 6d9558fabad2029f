import BatonAMQP
import BatonCore
import Foundation
import Logging
import Synchronization

/// Where a worker publishes its replies: a connection of its own, with one channel shared by the
/// partitions (each partition hands its batches over in order, and the connection's I/O thread writes
/// them in that order).
///
/// A reply is published to the address the request named, and the broker may be unable to deliver it:
/// RabbitMQ 3.10.8 crashes the publishing channel for an `amq.rabbitmq.reply-to.*` address it cannot
/// resolve (a garbage one, or one whose node is not running) and closes the connection with 541
/// INTERNAL_ERROR, losing every reply written after it, to every frontend. So one frontend's addresses
/// must never reach the connection that carries the others' replies:
/// - replies go on the **main** connection only to senders the broker has already taken a reply for
///   (``ReplySender``: per broker node for the addresses RabbitMQ 3.10 issues, per address otherwise);
/// - a reply to any other sender goes first through a **probe** connection in confirm mode, one sender
///   at a time; the broker's confirm makes the sender trusted, and a probe the broker answers by
///   closing the connection makes the sender refused for ``refusalPeriod`` (its replies are dropped,
///   counted in `baton_replies_dropped_total`; its requests are still decided and recorded, so a resend
///   once the address resolves gets the answer).
/// When the main connection dies anyway (a trusted node stopped), it is replaced and every sender is
/// probed again.
final class ReplyLink: Sendable {
    private struct Link: Sendable {
        let connection: AMQPConnection
        let channel: AMQPChannel
    }

    private struct Senders {
        /// Senders the broker took a reply for since the main connection was opened.
        var trusted: Set<ReplySender> = []
        /// Senders whose probe closed the probe connection, and until when their replies are dropped.
        var refused: [ReplySender: ContinuousClock.Instant] = [:]
        /// Replies waiting for their sender's probe, in arrival order.
        var waiting: [(sender: ReplySender, message: OutgoingMessage)] = []
        /// The sender of each reply address seen lately (parsing one decodes base64): nil for an address
        /// that is no sender (a server-named queue). Emptied when it grows past ``knownLimit``.
        var known: [String: ReplySender?] = [:]

        static let knownLimit = 65_536

        mutating func sender(of address: String) -> ReplySender? {
            if let sender = known[address] { return sender }
            if known.count >= Self.knownLimit { known.removeAll(keepingCapacity: true) }
            let sender = ReplySender(address: address)
            known[address] = sender
            return sender
        }
    }

    /// How long a sender whose reply closed the probe connection gets no replies.
    static let refusalPeriod = Duration.seconds(10)
    /// Replies that may wait for probes; beyond, they are dropped (their senders resend).
    static let waitingLimit = 4096

    private let link: Mutex<Link?>
    private let probe = Mutex<Link?>(nil)
    /// Set by ``closeSoon()`` and ``close()``: a connection that ``maintain(url:name:logger:while:refused:)``
    /// opens afterwards (its attempt may outlast the worker's connections: a frozen node holds it for the
    /// connect timeout) is closed at once instead of kept.
    private let ended = Atomic(false)
    private let senders = Mutex(Senders())
    private let wake: AsyncStream<Void>.Continuation
    private let signals: AsyncStream<Void>

    private init(_ link: Link) {
        self.link = Mutex(link)
        (signals, wake) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
    }

    /// Connects to `url` (a node the worker's other connections reached).
    static func open(url: AMQPURL, name: String, logger: Logger) async throws -> ReplyLink {
        ReplyLink(try await connect(url: url, name: name, confirms: false, logger: logger))
    }

    private static func connect(url: AMQPURL, name: String, confirms: Bool, logger: Logger) async throws -> Link {
        let connection = try await AMQPConnection.connect(to: url, name: name, logger: logger)
        do {
            let channel = try await connection.openChannel()
            if confirms { try await channel.enableConfirms() }
            return Link(connection: connection, channel: channel)
        } catch {
            await connection.close()
            throw error
        }
    }

    /// Publishes `publishes` after everything handed over before, without waiting; they are lost when
    /// the connection is down or dies first. Replies to senders not yet trusted wait for their probe.
    func enqueue(_ publishes: [ChannelAction]) {
        var trusted: [ChannelAction] = []
        trusted.reserveCapacity(publishes.count)
        var dropped = 0
        var probing = false
        senders.withLock { senders in
            var now: ContinuousClock.Instant?
            for action in publishes {
                guard case .publish(let message) = action, let sender = senders.sender(of: message.routingKey), !senders.trusted.contains(sender) else {
                    trusted.append(action)
                    continue
                }
                if let until = senders.refused[sender] {
                    now = now ?? .now
                    if now! < until {
                        dropped += 1
                        continue
                    }
                    senders.refused[sender] = nil
                }
                if senders.waiting.count < Self.waitingLimit {
                    senders.waiting.append((sender, message))
                    probing = true
                } else {
                    dropped += 1
                }
            }
        }
        if !trusted.isEmpty { link.withLock { $0 }?.channel.enqueue(trusted) }
        if dropped > 0 { WorkerMetrics.repliesDropped.increment(by: dropped) }
        if probing { wake.yield() }
    }

    /// Whether the main reply connection is open now.
    var isOpen: Bool { link.withLock { $0?.connection.isOpen ?? false } }

    /// Returns once everything handed over before the call is written (or has failed); replies waiting
    /// for a probe are not waited for.
    func barrier() async {
        await link.withLock { $0 }?.channel.barrier()
    }

    /// Replaces the main connection whenever it has died, with backoff, as long as `alive()` holds and the
    /// link is not closed; and probes the senders of the replies that wait, calling `refused` for each
    /// sender refused. Whatever makes `alive()` false must close the link (``close()``, ``closeSoon()``):
    /// both loops wait for something to happen, not for a time.
    func maintain(
        url: AMQPURL, name: String, logger: Logger, while alive: @escaping @Sendable () -> Bool, refused: @escaping @Sendable () -> Void = {}
    ) async {
        await withTaskGroup(of: Void.self) { group in
            group.addTask { await self.replaceWhenDead(url: url, name: name, logger: logger, while: alive) }
            group.addTask { await self.probe(url: url, name: "\(name) probe", logger: logger, while: alive, refused: refused) }
            await group.waitForAll()
        }
    }

    private func replaceWhenDead(url: AMQPURL, name: String, logger: Logger, while alive: @escaping @Sendable () -> Bool) async {
        var backoff = Backoff(initial: .milliseconds(20), maximum: .seconds(2))
        while alive(), !ended.load(ordering: .relaxed) {
            if let current = link.withLock({ $0 }), current.connection.isOpen {
                _ = await current.connection.closed()
                continue
            }
            do {
                let fresh = try await Self.connect(url: url, name: name, confirms: false, logger: logger)
                let kept = link.withLock { link -> (kept: Bool, old: Link?) in
                    guard !ended.load(ordering: .relaxed) else { return (false, nil) }
                    defer { link = fresh }
                    return (true, link)
                }
                guard kept.kept else {
                    fresh.connection.closeSoon()
                    return
                }
                let old = kept.old
                // Which sender's reply killed it is unknown: every sender is probed again.
                senders.withLock { $0.trusted.removeAll() }
                if let old { await old.connection.close() }
                backoff.reset()
                WorkerMetrics.replyReconnects.increment()
                logger.info("reply connection replaced", metadata: ["baton.amqp": "\(url)"])
            } catch {
                try? await Task.sleep(for: backoff.next())
            }
        }
    }

    /// Publishes waiting replies one sender at a time with confirms on the probe connection.
    private func probe(url: AMQPURL, name: String, logger: Logger, while alive: @escaping @Sendable () -> Bool, refused: @Sendable () -> Void) async {
        var backoff = Backoff(initial: .milliseconds(20), maximum: .seconds(2))
        var iterator = signals.makeAsyncIterator()
        while alive(), !ended.load(ordering: .relaxed) {
            guard let (sender, messages) = nextProbe() else {
                _ = await iterator.next()
                continue
            }
            let channel: AMQPChannel
            if let open = probe.withLock({ $0 }), open.connection.isOpen {
                channel = open.channel
            } else {
                do {
                    let fresh = try await Self.connect(url: url, name: name, confirms: true, logger: logger)
                    let kept = probe.withLock { probe -> (kept: Bool, old: Link?) in
                        guard !ended.load(ordering: .relaxed) else { return (false, nil) }
                        defer { probe = fresh }
                        return (true, probe)
                    }
                    guard kept.kept else {
                        fresh.connection.closeSoon()
                        break
                    }
                    let old = kept.old
                    if let old { await old.connection.close() }
                    channel = fresh.channel
                    backoff.reset()
                } catch {
                    senders.withLock { $0.waiting.insert(contentsOf: messages.map { (sender, $0) }, at: 0) }
                    try? await Task.sleep(for: backoff.next())
                    continue
                }
            }
            do {
                let outcomes = try await channel.publishConfirmed(messages, timeout: .seconds(5))
                if outcomes.allSatisfy({ $0 != .nacked }) {
                    senders.withLock { _ = $0.trusted.insert(sender) }
                }
            } catch {
                // The broker closed the probe connection over this sender's address (or did not confirm
                // in time): its replies are dropped for a while, and nobody else's were on that connection.
                senders.withLock { $0.refused[sender] = .now + Self.refusalPeriod }
                WorkerMetrics.repliesDropped.increment(by: messages.count)
                WorkerMetrics.replySendersRefused.increment()
                refused()
                logger.warning("a reply address the broker cannot resolve: replies to it are dropped for \(Self.refusalPeriod)", metadata: [
                    "baton.reply_to": "\(LogValue.escape(messages[0].routingKey))", "baton.error": "\(error)",
                ])
                await probe.withLock { $0 }?.connection.close()
            }
        }
        let last = probe.withLock { probe in
            defer { probe = nil }
            return probe
        }
        if let last { await last.connection.close() }
    }

    /// The replies of the first waiting sender (all of them, in order), or nil when none wait; replies to
    /// senders that became trusted meanwhile go to the main connection, to refused ones are dropped.
    private func nextProbe() -> (ReplySender, [OutgoingMessage])? {
        var trusted: [ChannelAction] = []
        var dropped = 0
        let next = senders.withLock { senders -> (ReplySender, [OutgoingMessage])? in
            var chosen: ReplySender?
            var messages: [OutgoingMessage] = []
            var rest: [(sender: ReplySender, message: OutgoingMessage)] = []
            let now = ContinuousClock.now
            for entry in senders.waiting {
                if senders.trusted.contains(entry.sender) {
                    trusted.append(.publish(entry.message))
                } else if let until = senders.refused[entry.sender], now < until {
                    dropped += 1
                } else if chosen == nil || chosen == entry.sender {
                    chosen = entry.sender
                    messages.append(entry.message)
                } else {
                    rest.append(entry)
                }
            }
            senders.waiting = rest
            return chosen.map { ($0, messages) }
        }
        if !trusted.isEmpty { link.withLock { $0 }?.channel.enqueue(trusted) }
        if dropped > 0 { WorkerMetrics.repliesDropped.increment(by: dropped) }
        return next
    }

    /// Ends both connections at once, without the closing handshake.
    func closeSoon() {
        link.withLock { link in
            ended.store(true, ordering: .relaxed)
            return link
        }?.connection.closeSoon()
        probe.withLock { $0 }?.connection.closeSoon()
        wake.yield()
    }

    func close() async {
        let old = link.withLock { link in
            ended.store(true, ordering: .relaxed)
            defer { link = nil }
            return link
        }
        wake.yield()
        if let old { await old.connection.close() }
        let probe = probe.withLock { probe in
            defer { probe = nil }
            return probe
        }
        if let probe { await probe.connection.close() }
    }
}

/// Who a reply goes to, as far as whether the broker can resolve its address: replies to one sender all
/// resolve or all fail.
///
/// RabbitMQ 3.10 issues direct reply-to addresses `amq.rabbitmq.reply-to.<channel>.<key>`, `<channel>`
/// the base64 of an Erlang pid whose node is written `reply@<hash of the node name>`, and resolves them
/// by looking that hash up among the running nodes: every address of one node resolves or none does,
/// so the sender is the node. Any other direct reply-to address is its own sender. Server-named queues
/// (`amq.gen-...`) are no sender: a reply to a queue that does not exist is dropped by the broker
/// without harm.
struct ReplySender: Hashable, Sendable {
    let name: String

    init?(address: String) {
        let prefix = "amq.rabbitmq.reply-to."
        guard address.hasPrefix(prefix) else { return nil }
        let suffix = address.utf8.dropFirst(prefix.utf8.count)
        let parts = suffix.split(separator: UInt8(ascii: "."), omittingEmptySubsequences: true)
        if parts.count == 2, let node = Self.node(encodedPid: parts[0]) {
            name = node
        } else {
            name = address
        }
    }

    /// The node of a pid in Erlang's external term format (`NEW_PID_EXT` with an `ATOM_UTF8_EXT` node,
    /// as RabbitMQ 3.10 writes it), when it is one of the shortened `reply@<hash>` names.
    private static func node(encodedPid: Substring.UTF8View.SubSequence) -> String? {
        guard let bytes = Data(base64Encoded: Data(encodedPid)), bytes.count > 5 else { return nil }
        let term = [UInt8](bytes)
        guard term[0] == 131, term[1] == 88, term[2] == 118 else { return nil }
        let length = Int(term[3]) << 8 | Int(term[4])
        guard term.count == 5 + length + 12 else { return nil }
        let node = String(decoding: term[5..<5 + length], as: UTF8.self)
        return node.hasPrefix("reply@") ? node : nil
    }
}
