@testable import BatonWorker
import Synchronization
import Testing

/// The worker's one timer thread for every partition's next deadline.
@Suite struct DeadlineTimerTests {
    /// What fired, in order, and when.
    final class Fired: Sendable {
        let names = Mutex<[String]>([])
        func append(_ name: String) { names.withLock { $0.append(name) } }
        var all: [String] { names.withLock { $0 } }

        func wait(for count: Int, within limit: Duration = .seconds(5)) async {
            let end = ContinuousClock.now + limit
            while all.count < count, ContinuousClock.now < end { try? await Task.sleep(for: .milliseconds(5)) }
        }
    }

    @Test func clientsAreCalledOnceEachInTheOrderOfTheirDeadlines() async {
        let timer = DeadlineTimer()
        defer { timer.stop() }
        let fired = Fired()
        let late = timer.add { fired.append("late") }
        let early = timer.add { fired.append("early") }
        let now = ContinuousClock.now
        timer.set(late, to: now + .milliseconds(80))
        timer.set(early, to: now + .milliseconds(20))
        await fired.wait(for: 2)
        #expect(fired.all == ["early", "late"])
        try? await Task.sleep(for: .milliseconds(100))
        #expect(fired.all == ["early", "late"], "a deadline fires once; the client sets the next")
    }

    /// The thread sleeping until a far deadline (or none) is woken for a nearer one.
    @Test func aDeadlineMovedEarlierWakesTheThread() async {
        let timer = DeadlineTimer()
        defer { timer.stop() }
        let fired = Fired()
        let client = timer.add { fired.append("moved") }
        let idle = timer.add { fired.append("idle") }
        timer.set(idle, to: ContinuousClock.now + .seconds(60))
        try? await Task.sleep(for: .milliseconds(20))
        let started = ContinuousClock.now
        timer.set(client, to: started + .seconds(60))
        timer.set(client, to: started + .milliseconds(30))
        await fired.wait(for: 1)
        #expect(fired.all == ["moved"])
        #expect(ContinuousClock.now - started < .milliseconds(500), "without a signal the thread would sleep on (up to a second)")
    }

    @Test func aClearedDeadlineOrARemovedClientIsNotCalled() async {
        let timer = DeadlineTimer()
        defer { timer.stop() }
        let fired = Fired()
        let cleared = timer.add { fired.append("cleared") }
        let removed = timer.add { fired.append("removed") }
        let kept = timer.add { fired.append("kept") }
        let now = ContinuousClock.now
        timer.set(cleared, to: now + .milliseconds(30))
        timer.set(removed, to: now + .milliseconds(30))
        timer.set(kept, to: now + .milliseconds(60))
        timer.set(cleared, to: nil)
        timer.remove(removed)
        await fired.wait(for: 1)
        try? await Task.sleep(for: .milliseconds(50))
        #expect(fired.all == ["kept"])
    }
}
