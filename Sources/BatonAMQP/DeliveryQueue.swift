import Synchronization

/// Deliveries of one consumer, pushed by the connection's I/O thread and taken in batches.
public final class DeliveryQueue: Sendable {
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

    /// Messages buffered now, at most `max`, without waiting.
    public func takeAvailable(max: Int) -> [AMQPMessage] {
        state.withLock { state in
            let count = min(max, state.buffer.count)
            defer { state.buffer.removeFirst(count) }
            return Array(state.buffer.prefix(count))
        }
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
            let timer = Task { [weak self] in
                try? await Task.sleep(for: timeout)
                self?.wake(id)
            }
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
            timer.cancel()
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
