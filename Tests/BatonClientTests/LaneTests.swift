import BatonCore
@testable import BatonClient
import Testing

/// A partition's lane in the client (``Lane``): what goes in one message and when. Pure: no broker, no
/// clock (times are given).
@Suite struct LaneTests {
    struct Item: LaneItem, Equatable {
        var name: String
        var alone = false
        var bodyBytes = 100
    }

    let t0 = ContinuousClock.now
    let settings = Lane<Item>.Settings(coalesce: true, maxCoalesced: 256, linger: .microseconds(500), lingerTarget: 8, resendAfter: .milliseconds(1500))

    func names(_ next: Lane<Item>.Next) -> [String]? {
        if case .send(let items, _) = next { return items.map(\.name) }
        return nil
    }

    /// A lane whose message "m1" (request "a") went at `t0` and is in flight, with "b" queued behind it.
    func laneWithAMessageInFlight() -> Lane<Item> {
        var lane = Lane<Item>()
        lane.enqueue(Item(name: "a"), now: t0)
        _ = lane.next(now: t0, busy: false, settings: settings)
        lane.sent("m1", at: t0, settings: settings)
        lane.enqueue(Item(name: "b"), now: t0)
        return lane
    }

    @Test func aLoneCallGoesAtOnceAndWhatComesMeanwhileWaitsForItsAnswer() {
        var lane = Lane<Item>()
        lane.enqueue(Item(name: "a"), now: t0)
        #expect(names(lane.next(now: t0, busy: false, settings: settings)) == ["a"])
        lane.sent("m1", at: t0, settings: settings)
        lane.enqueue(Item(name: "b"), now: t0)
        lane.enqueue(Item(name: "c"), now: t0)
        guard case .nothing = lane.next(now: t0, busy: false, settings: settings) else { Issue.record("sent while a message was in flight"); return }
        // The answer frees the lane: what waited goes as one message.
        let freed = lane.answered("m1", at: t0 + .milliseconds(3))
        #expect(freed)
        #expect(names(lane.next(now: t0 + .milliseconds(3), busy: false, settings: settings)) == ["b", "c"])
        let again = lane.answered("m1", at: t0 + .milliseconds(4))
        #expect(!again, "answered once")
    }

    @Test func aMessageUnansweredForTheResendIntervalNoLongerHoldsTheLane() {
        var lane = laneWithAMessageInFlight()
        #expect(!lane.stalled(at: t0 + .milliseconds(1499)))
        #expect(lane.stalled(at: t0 + .milliseconds(1500)), "the reaper sends what waits")
        #expect(names(lane.next(now: t0 + .milliseconds(1500), busy: false, settings: settings)) == ["b"])
    }

    @Test func aWaitingClaimGoesAloneAndAtOnceAndHoldsNothing() {
        var lane = laneWithAMessageInFlight()
        lane.enqueue(Item(name: "w", alone: true), now: t0)
        guard case .send(let items, alone: true) = lane.next(now: t0, busy: false, settings: settings) else {
            Issue.record("the waiting claim did not go at once")
            return
        }
        #expect(items.map(\.name) == ["w"])
        guard case .nothing = lane.next(now: t0, busy: false, settings: settings) else { Issue.record("b went past m1"); return }
    }

    @Test func whileBusyAFreedLaneLingersOnceForTheCallsItAnswered() {
        var lane = Lane<Item>()
        lane.enqueue(Item(name: "a"), now: t0)
        // Busy, a lone call lingers too (for others to go with it), then goes.
        guard case .linger(let first) = lane.next(now: t0, busy: true, settings: settings) else { Issue.record("did not linger"); return }
        lane.lingerEnded()
        #expect(names(lane.next(now: first, busy: true, settings: settings)) == ["a"])
        lane.sent("m1", at: first, settings: settings)
        let answered = t0 + .milliseconds(2)
        lane.answered("m1", at: answered)
        lane.enqueue(Item(name: "b"), now: answered)
        guard case .linger(let until) = lane.next(now: answered, busy: true, settings: settings) else { Issue.record("did not linger"); return }
        #expect(until == answered + .microseconds(500))
        guard case .nothing = lane.next(now: answered, busy: true, settings: settings) else { Issue.record("a second wake-up"); return }
        lane.lingerEnded()
        #expect(names(lane.next(now: until, busy: true, settings: settings)) == ["b"])
        // Not busy: no linger at all.
        var idle = Lane<Item>()
        idle.enqueue(Item(name: "x"), now: t0)
        #expect(names(idle.next(now: t0, busy: false, settings: settings)) == ["x"])
    }

    @Test func enoughQueuedCallsEndALingerAtOnce() {
        var lane = Lane<Item>()
        for index in 0..<8 { lane.enqueue(Item(name: "c\(index)"), now: t0) }
        #expect(names(lane.next(now: t0, busy: true, settings: settings))?.count == 8)
    }

    @Test func aMessageTakesAtMostMaxCoalescedRequestsAndSixtyKiB() {
        var lane = Lane<Item>()
        for index in 0..<300 { lane.enqueue(Item(name: "c\(index)"), now: t0) }
        #expect(names(lane.next(now: t0, busy: false, settings: settings))?.count == 256)
        var big = Lane<Item>()
        for index in 0..<10 { big.enqueue(Item(name: "b\(index)", bodyBytes: 16 * 1024), now: t0) }
        #expect(names(big.next(now: t0, busy: false, settings: settings))?.count == 3, "3 × 16 KiB fit in 60 KiB, 4 do not")
        var huge = Lane<Item>()
        huge.enqueue(Item(name: "h", bodyBytes: 100 * 1024), now: t0)
        #expect(names(huge.next(now: t0, busy: false, settings: settings)) == ["h"], "one request always goes")
    }

    @Test func withoutCoalescingEachRequestIsAMessageOfItsOwn() {
        var off = settings
        off.coalesce = false
        var lane = Lane<Item>()
        lane.enqueue(Item(name: "a"), now: t0)
        lane.enqueue(Item(name: "b"), now: t0)
        #expect(names(lane.next(now: t0, busy: true, settings: off)) == ["a"])
        lane.sent("m1", at: t0, settings: off)
        #expect(names(lane.next(now: t0, busy: true, settings: off)) == ["b"], "in flight does not hold the lane")
    }

    @Test func aLostConnectionFreesTheLaneForTheResends() {
        var lane = laneWithAMessageInFlight()
        lane.lostAll()
        #expect(names(lane.next(now: t0, busy: false, settings: settings)) == ["b"])
    }
}
