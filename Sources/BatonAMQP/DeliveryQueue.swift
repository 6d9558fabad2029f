import BatonCore
import Synchronization

/// Where a consumer's deliveries go: pushed by the connection's I/O thread, in order.
protocol DeliverySink: AnyObject, Sendable {
    func push(_ messages: [AMQPMessage])
    /// The consumer ended: closed by the application (nil), or the error that ended it.
    func finish(_ error: AMQPError?)
}

/// A consumer whose deliveries are handed to a function on the connection's I/O thread.
final class DeliveryHandler: DeliverySink {
    private let onDeliveries: @Sendable ([AMQPMessage]) -> Void
    private let onEnd: @Sendable (AMQPError?) -> Void
    private let ended = Atomic<Bool>(false)

    init(onDeliveries: @escaping @Sendable ([AMQPMessage]) -> Void, onEnd: @escaping @Sendable (AMQPError?) -> Void) {
        self.onDeliveries = onDeliveries
        self.onEnd = onEnd
    }

    func push(_ messages: [AMQPMessage]) {
        if !messages.isEmpty, !ended.load(ordering: .relaxed) { onDeliveries(messages) }
    }

    func finish(_ error: AMQPError?) {
        if !ended.exchange(true, ordering: .relaxed) { onEnd(error) }
    }
}

/// Deliveries of one consumer, pushed by the connection's I/O thread and taken in batches.
public final class DeliveryQueue: DeliverySink {
    private struct State {
        var buffer: [AMQPMessage] = []
        var finished: AMQPError?
        var isFinished = false
        var waiter: (id: UInt64, continuation: CheckedContinuation<Void, Never>)?
        var nextWaiterID: UInt64 = 0
    }

    private let state = Mutex(State())

    init() {}

    func push(_ messages: [AMQPMessage]) {
        guard !messages.isEmpty else { return }
        let waiter = state.withLock { state -> CheckedContinuation<Void, Never>? in
            guard !state.isFinished else { return nil }
            state.buffer += messages
            defer { state.waiter = nil }
            return state.waiter?.continuation
        }
        waiter?.resume()
    }

    /// Ends the queue: takers get what is buffered, then `error` (or an empty batch when nil).
    func finish(_ error: AMQPError?) {
        let waiter = state.withLock { state -> CheckedContinuation<Void, Never>? in
            guard !state.isFinished else { return nil }
            state.isFinished = true
            state.finished = error
            defer { state.waiter = nil }
            return state.waiter?.continuation
        }
        waiter?.resume()
    }

    /// Waits up to `timeout` for at least one message and returns up to `max` of them.
    ///
    /// Returns an empty array on timeout or when the task is cancelled; throws the
    /// consumer's end (channel or connection closed, consumer cancelled) once the buffer is empty.
    public func next(max: Int, timeout: Duration) async throws(AMQPError) -> [AMQPMessage] {
        while true {
            let result: Result<[AMQPMessage], AMQPError>? = state.withLock { state in
                if !state.buffer.isEmpty {
                    let count = min(max, state.buffer.count)
                    defer { state.buffer.removeFirst(count) }
                    return .success(Array(state.buffer.prefix(count)))
                }
                if state.isFinished {
                    return state.finished.map { .failure($0) } ?? .success([])
                }
                return nil
            }
            if let result { return try result.get() }
            if Task.isCancelled { return [] }

            let id = state.withLock { state -> UInt64 in
                state.nextWaiterID += 1
                return state.nextWaiterID
            }
            let timer = WaitTimer.shared.schedule(after: timeout) { [weak self] in self?.wake(id) }
            await withTaskCancellationHandler {
                await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                    let resumeNow = state.withLock { state -> Bool in
                        if !state.buffer.isEmpty || state.isFinished || Task.isCancelled { return true }
                        state.waiter = (id, continuation)
                        return false
                    }
                    if resumeNow { continuation.resume() }
                }
            } onCancel: {
                self.wake(id)
            }
            WaitTimer.shared.cancel(timer)
            let empty = state.withLock { $0.buffer.isEmpty && !$0.isFinished }
            if empty { return [] }  // timed out or cancelled
        }
    }

    private func wake(_ id: UInt64) {
        let waiter = state.withLock { state -> CheckedContinuation<Void, Never>? in
            guard let waiter = state.waiter, waiter.id == id else { return nil }
            state.waiter = nil
            return waiter.continuation
        }
        waiter?.resume()
    }
}

/// One task that ends every timed wait of the process when its time comes, instead of a timer task
/// per wait (each of which costs a dispatch timer and a thread wake-up). Resolution: a few milliseconds.
final class WaitTimer: Sendable {
    static let shared = WaitTimer()

    private struct State {
        var entries: [UInt64: (deadline: ContinuousClock.Instant, fire: @Sendable () -> Void)] = [:]
        var nextID: UInt64 = 0
        var running = false
    }

    private let state = Mutex(State())
    private let resolution = Duration.milliseconds(5)

    /// Calls `fire` (once, from the timer's task) after `delay`, unless cancelled first.
    func schedule(after delay: Duration, _ fire: @escaping @Sendable () -> Void) -> UInt64 {
        let deadline = ContinuousClock.now + delay
        let (id, start) = state.withLock { state -> (UInt64, Bool) in
            state.nextID += 1
            state.entries[state.nextID] = (deadline, fire)
            defer { state.running = true }
            return (state.nextID, !state.running)
        }
        if start { Task.detached { await self.run() } }
        return id
    }

    func cancel(_ id: UInt64) {
        _ = state.withLock { $0.entries.removeValue(forKey: id) }
    }

    private func run() async {
        while true {
            try? await Task.sleep(for: resolution)
            let now = ContinuousClock.now
            let due = state.withLock { state -> [@Sendable () -> Void]? in
                if state.entries.isEmpty {
                    state.running = false
                    return nil
                }
                var due: [@Sendable () -> Void] = []
                for (id, entry) in state.entries where entry.deadline <= now {
                    due.append(entry.fire)
                    state.entries.removeValue(forKey: id)
                }
                return due
            }
            guard let due else { return }
            for fire in due { fire() }
        }
    }
}
