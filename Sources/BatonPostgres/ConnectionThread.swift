import BatonCore
import Foundation

/// A dedicated thread that runs the blocking calls of one C connection, one job at a time.
///
/// libpq calls block; running them on Swift's cooperative pool would starve it.
/// Each ``PostgresConnection`` owns one of these threads and nothing else ever
/// touches its `PGconn`.
final class ConnectionThread: @unchecked Sendable {
    // @unchecked: `jobs` and `stopping` are only touched with `condition` locked.
    private let condition = NSCondition()
    private var jobs: [() -> Void] = []
    private var stopping = false

    init(name: String) {
        let thread = Thread { [self] in
            // The name `top -H` and /proc show (Foundation's `Thread.name` does not set it on Linux).
            nameThisThread("libpq")
            loop()
        }
        thread.name = name
        thread.start()
    }

    /// Runs `body` on the thread and returns its result.
    func run<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { continuation in
            let accepted = enqueue {
                continuation.resume(with: Result { try body() })
            }
            if !accepted {
                continuation.resume(throwing: PostgresError(code: .closed, message: "the connection was closed"))
            }
        }
    }

    /// Queues `job` for the thread; `refused` runs at once, instead, when the thread is stopping.
    func submit(_ job: @escaping @Sendable () -> Void, refused: () -> Void) {
        if !enqueue(job) { refused() }
    }

    /// Runs `last` on the thread after every queued job, then ends the thread.
    ///
    /// - Returns: false, without running `last`, when the thread was already stopping.
    @discardableResult
    func stop(after last: @escaping @Sendable () -> Void) -> Bool {
        condition.lock()
        defer { condition.unlock() }
        guard !stopping else { return false }
        jobs.append(last)
        stopping = true
        condition.signal()
        return true
    }

    private func enqueue(_ job: @escaping () -> Void) -> Bool {
        condition.lock()
        defer { condition.unlock() }
        guard !stopping else { return false }
        jobs.append(job)
        condition.signal()
        return true
    }

    private func loop() {
        while true {
            condition.lock()
            while jobs.isEmpty && !stopping { condition.wait() }
            let batch = jobs
            jobs.removeAll()
            let done = stopping
            condition.unlock()
            for job in batch { job() }
            if done {
                // A job enqueued before `stopping` was set but after we took the batch cannot exist:
                // `stop` appends its last job in the same critical section that sets `stopping`.
                return
            }
        }
    }
}
