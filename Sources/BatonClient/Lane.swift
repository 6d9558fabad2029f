import BatonCore

/// What a ``Lane`` queues.
protocol LaneItem {
    /// A claim that waits in line: it goes alone (the worker refuses it in a coalesced message) and at
    /// once, and does not hold the lane (its answer may take until its wait ends).
    var alone: Bool { get }
    /// The request's body size, for the message's byte limit.
    var bodyBytes: Int { get }
}

/// One partition's traffic in a ``BatonClient``, as a value with no I/O and no clock of its own: the
/// messages in flight (each until it is answered, or until it counts as lost at the resend interval)
/// and the requests queued behind them, which go together as one coalesced message once the lane is
/// free (docs/protocol.md section 15). The client holds one per partition under its lock, asks
/// ``next(now:busy:settings:)`` what may go, and reports what it sent, what was answered and what was
/// lost. Tested without a broker in `LaneTests`.
struct Lane<Item: LaneItem> {
    /// The settings of ``BatonClientConfiguration`` a lane follows.
    struct Settings {
        var coalesce = true
        var maxCoalesced = ProtocolV1.maxBatchCount
        var linger: Duration = .zero
        var lingerTarget = 8
        /// How long a message in flight holds the lane without an answer (then it counts as lost).
        var resendAfter: Duration = .milliseconds(1500)
        /// The most bytes of request bodies one coalesced message carries.
        var maxBytes = 60 * 1024
    }

    /// What may go now.
    enum Next {
        /// Nothing: the lane is empty, or a message in flight holds it.
        case nothing
        /// Wait for more calls until this time (the client is busy and the lane was just freed), then
        /// ask again; ``lingering`` is set so that only the first ask schedules the wake-up.
        case linger(until: ContinuousClock.Instant)
        /// Send these (one message; a waiting claim alone), then report it with ``sent(_:at:settings:)``
        /// unless it is `alone`.
        case send([Item], alone: Bool)
    }

    private(set) var inFlight: [String: ContinuousClock.Instant] = [:]
    private(set) var queued: [Item] = []
    /// When the oldest of ``queued`` was queued.
    private(set) var queuedSince: ContinuousClock.Instant?
    /// When the last answer freed the lane.
    private(set) var freedAt: ContinuousClock.Instant?
    /// A wake-up is scheduled for the end of a linger.
    private(set) var lingering = false

    /// Queues a request for the next message.
    mutating func enqueue(_ item: Item, now: ContinuousClock.Instant) {
        if queued.isEmpty { queuedSince = now }
        queued.append(item)
    }

    /// What may go at `now`; `busy` when the client has many calls waiting for replies (then a lane just
    /// freed lingers for the calls it answered, which come back soon with their next requests).
    mutating func next(now: ContinuousClock.Instant, busy: Bool, settings: Settings) -> Next {
        inFlight = inFlight.filter { $0.value > now }
        guard !queued.isEmpty else { return .nothing }
        if let index = queued.firstIndex(where: \.alone) {
            return .send([queued.remove(at: index)], alone: true)
        }
        guard inFlight.isEmpty || !settings.coalesce else { return .nothing }
        if settings.coalesce, settings.linger > .zero, queued.count < settings.lingerTarget, busy,
           let since = [freedAt, queuedSince].compactMap({ $0 }).max(), now < since + settings.linger {
            if lingering { return .nothing }
            lingering = true
            return .linger(until: since + settings.linger)
        }
        var count = 0
        var bytes = 32
        let limit = settings.coalesce ? max(1, min(settings.maxCoalesced, ProtocolV1.maxBatchCount)) : 1
        while count < queued.count, count < limit, count == 0 || bytes + queued[count].bodyBytes + 1 <= settings.maxBytes {
            bytes += queued[count].bodyBytes + 1
            count += 1
        }
        let items = Array(queued.prefix(count))
        queued.removeFirst(count)
        queuedSince = queued.isEmpty ? nil : now
        return .send(items, alone: false)
    }

    /// The message `id` went at `now`: it holds the lane until answered or until the resend interval.
    mutating func sent(_ id: String, at now: ContinuousClock.Instant, settings: Settings) {
        inFlight[id] = now + settings.resendAfter
    }

    /// The linger's wake-up came.
    mutating func lingerEnded() {
        lingering = false
    }

    /// The message `id` was answered at `now` (its first reply): the lane is free for what waits. False
    /// when it no longer held the lane.
    @discardableResult
    mutating func answered(_ id: String, at now: ContinuousClock.Instant) -> Bool {
        guard inFlight.removeValue(forKey: id) != nil else { return false }
        freedAt = now
        return true
    }

    /// The message `id` will not be answered (its publish failed, the broker returned it).
    mutating func lost(_ id: String) {
        inFlight.removeValue(forKey: id)
    }

    /// Every message in flight went with its channel or connection: the resends go on the new one.
    mutating func lostAll() {
        inFlight.removeAll()
    }

    /// Whether requests wait while nothing holds the lane any more (a message in flight counted as lost):
    /// the client's reaper sends them.
    func stalled(at now: ContinuousClock.Instant) -> Bool {
        !queued.isEmpty && (inFlight.isEmpty || inFlight.values.contains { $0 <= now })
    }
}
