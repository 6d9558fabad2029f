import BatonCore
import Foundation

/// One thread that calls each of a worker's partitions when the partition's next deadline comes (a
/// standby's tick, the sweep, a deferred ack, a batch's linger: ``PartitionStateMachine/nextDeadline(now:)``),
/// instead of a task per partition that wakes 20 times a second to ask. An idle worker's partitions wake
/// only for what they have to do; a busy partition's deadlines mostly move before they come (its batches
/// settle its acks), and moving one costs a lock, not a wake-up.
///
/// Each client has one deadline (or none) at a time; ``set(_:to:)`` replaces it. The thread sleeps until
/// the earliest and is signalled only when a deadline moves before the one it sleeps until. A client is
/// called on the timer's thread, without the timer's lock held, and its deadline is cleared first: it sets
/// the next one from there (``PartitionDriver`` does so after every event). A call may come early (a
/// deadline that moved later is found when the thread wakes for the earlier one) or a moment late (the
/// thread's scheduling); callers tolerate both.
final class DeadlineTimer: @unchecked Sendable {
    // @unchecked: every stored property below is only touched with `condition` locked.
    private let condition = NSCondition()
    private var clients: [Int: (at: ContinuousClock.Instant?, fire: @Sendable () -> Void)] = [:]
    private var nextID = 0
    /// What the thread sleeps until: nil while it runs clients or scans (it scans again before it sleeps).
    private var sleepingUntil: ContinuousClock.Instant?
    /// Whether it sleeps with no deadline set (until signalled).
    private var sleepsForever = false
    private var stopping = false

    init(name: String = "baton timer") {
        let thread = Thread { [self] in
            nameThisThread("timer")
            loop()
        }
        thread.name = name
        thread.start()
    }

    /// Adds a client, called with `fire` when its deadline comes; it has none until ``set(_:to:)``.
    func add(_ fire: @escaping @Sendable () -> Void) -> Int {
        condition.lock()
        defer { condition.unlock() }
        nextID += 1
        clients[nextID] = (nil, fire)
        return nextID
    }

    /// Removes a client: it is not called again once this returns (unless it is being called now).
    func remove(_ id: Int) {
        condition.lock()
        defer { condition.unlock() }
        clients[id] = nil
    }

    /// Sets (or, nil, clears) the client's deadline.
    func set(_ id: Int, to deadline: ContinuousClock.Instant?) {
        condition.lock()
        defer { condition.unlock() }
        guard clients[id] != nil else { return }
        clients[id]?.at = deadline
        guard let deadline else { return }
        if sleepsForever || sleepingUntil.map({ deadline < $0 }) == true {
            condition.signal()
        }
    }

    /// Ends the thread (clients are not called again).
    func stop() {
        condition.lock()
        defer { condition.unlock() }
        stopping = true
        clients.removeAll()
        condition.signal()
    }

    private func loop() {
        condition.lock()
        while !stopping {
            let now = ContinuousClock.now
            var due: [@Sendable () -> Void] = []
            var next: ContinuousClock.Instant?
            for (id, client) in clients {
                guard let at = client.at else { continue }
                if at <= now {
                    due.append(client.fire)
                    clients[id]?.at = nil
                } else if next.map({ at < $0 }) ?? true {
                    next = at
                }
            }
            if !due.isEmpty {
                condition.unlock()
                for fire in due { fire() }
                condition.lock()
                continue
            }
            if let next {
                sleepingUntil = next
                // The wait is on the wall clock: at most a second at a time, so that a clock step cannot
                // hold a deadline up for long.
                _ = condition.wait(until: Date(timeIntervalSinceNow: Self.seconds(min(next - now, .seconds(1)))))
            } else {
                sleepsForever = true
                condition.wait()
            }
            sleepingUntil = nil
            sleepsForever = false
        }
        condition.unlock()
    }

    private static func seconds(_ duration: Duration) -> TimeInterval {
        let (seconds, attoseconds) = duration.components
        return TimeInterval(seconds) + TimeInterval(attoseconds) / 1e18
    }
}
