import Synchronization

/// The publishes of a confirm-mode channel that no caller awaits one by one (``AMQPChannel/publish(_:completion:)``
/// and ``AMQPChannel/enqueue(_:queued:completion:)``), tracked so that another thread can ask how long the
/// oldest has waited for its confirm (``AMQPChannel/oldestUnconfirmedPublish``).
///
/// A broker confirms a publish once the queues it was routed to hold it, whoever consumes them: a slow
/// consumer never delays a confirm, a broker that cannot reach the queue's leader does. Nacks count as
/// answers too, and are counted apart (``takeNacks()``): RabbitMQ 3.10 nacks at once what a channel
/// publishes to a quorum queue whose leader it cannot register with (a channel that first published to
/// the queue while the queue's record still named a leader on a node just killed), and keeps nacking on
/// that channel until the node returns. The I/O thread records publishes and confirms; readers take the
/// same lock.
final class UnconfirmedPublishes: Sendable {
    private struct Pending {
        /// Delivery tags and send times, in publish order; entries before `head` are confirmed.
        var tags: [UInt64] = []
        var times: [ContinuousClock.Instant] = []
        var head = 0
        /// Publishes the broker nacked since ``UnconfirmedPublishes/takeNacks()`` last asked.
        var nacks = 0

        var isEmpty: Bool { head == tags.count }

        mutating func compact() {
            guard head > 1024, head * 2 > tags.count else { return }
            tags.removeFirst(head)
            times.removeFirst(head)
            head = 0
        }
    }

    private let pending = Mutex(Pending())

    /// The publish with delivery tag `tag` left at `time`.
    func sent(_ tag: UInt64, at time: ContinuousClock.Instant) {
        pending.withLock { pending in
            pending.tags.append(tag)
            pending.times.append(time)
        }
    }

    /// The broker answered `tag` (and, when `multiple`, every tag before it), with a nack when `nacked`.
    func answered(_ tag: UInt64, multiple: Bool, nacked: Bool = false) {
        pending.withLock { pending in
            let before = pending.tags.count - pending.head
            if multiple {
                while !pending.isEmpty, pending.tags[pending.head] <= tag { pending.head += 1 }
            } else if !pending.isEmpty, pending.tags[pending.head] == tag {
                pending.head += 1
            } else if let index = pending.tags[pending.head...].firstIndex(of: tag) {
                // Out of order (a broker may confirm single tags in any order): drop it where it is.
                pending.tags.remove(at: index)
                pending.times.remove(at: index)
            }
            if nacked { pending.nacks += max(1, before - (pending.tags.count - pending.head)) }
            pending.compact()
        }
    }

    /// How many publishes the broker nacked since the last call, and starts counting again.
    func takeNacks() -> Int {
        pending.withLock { pending in
            defer { pending.nacks = 0 }
            return pending.nacks
        }
    }

    /// Forgets every publish (the channel closed: none will be confirmed); nacks already counted stay.
    func clear() {
        pending.withLock { pending in
            let nacks = pending.nacks
            pending = Pending()
            pending.nacks = nacks
        }
    }

    /// When the oldest publish still waiting for its confirm left, if any does.
    var oldest: ContinuousClock.Instant? {
        pending.withLock { $0.isEmpty ? nil : $0.times[$0.head] }
    }
}
