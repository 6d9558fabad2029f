import BatonCore
import BatonAMQP
@testable import BatonWorker
import Testing

/// The worker's deferred closing ack: pure, no broker.
@Suite struct DeferredAckTests {
    let t0 = ContinuousClock.now
    func tag(_ action: ChannelAction?) -> UInt64? {
        if case .ack(let tag, true)? = action { return tag }
        return nil
    }

    @Test func acksAtOnceWhenNothingWaits() {
        var acks = DeferredAck(limit: 64)
        #expect(tag(acks.settle(3, count: 3, moreWaiting: false, now: t0)) == 3)
        #expect(tag(acks.flush()) == nil, "nothing left to ack")
    }

    @Test func whileMoreWaitsTheNextBatchAcksForBoth() {
        var acks = DeferredAck(limit: 64)
        #expect(tag(acks.settle(3, count: 3, moreWaiting: true, now: t0)) == nil)
        #expect(tag(acks.settle(5, count: 2, moreWaiting: true, now: t0)) == nil)
        #expect(tag(acks.settle(9, count: 4, moreWaiting: false, now: t0)) == 9, "one cumulative ack covers the three batches")
    }

    @Test func neverHoldsMoreThanTheLimit() {
        var acks = DeferredAck(limit: 4)
        #expect(tag(acks.settle(2, count: 2, moreWaiting: true, now: t0)) == nil)
        #expect(tag(acks.settle(4, count: 2, moreWaiting: true, now: t0)) == 4, "the limit forces the ack even while more waits")
    }

    @Test func aBatchWithNothingToAckKeepsTheEarlierTag() {
        var acks = DeferredAck(limit: 64)
        #expect(tag(acks.settle(7, count: 1, moreWaiting: true, now: t0)) == nil)
        // A batch whose only delivery was rejected (dead-lettered) has no ack of its own.
        #expect(tag(acks.settle(nil, count: 1, moreWaiting: false, now: t0)) == 7)
        #expect(tag(acks.flush()) == nil)
    }

    @Test func flushOnStopReturnsWhatWasDeferred() {
        var acks = DeferredAck(limit: 64)
        _ = acks.settle(11, count: 1, moreWaiting: true, now: t0)
        #expect(tag(acks.flush()) == 11)
        #expect(tag(acks.flush()) == nil)
    }

    @Test func withADelayTheAckWaitsForLaterBatchesAndGoesWhenDue() {
        var acks = DeferredAck(limit: 64, delay: .milliseconds(20))
        #expect(tag(acks.settle(3, count: 1, moreWaiting: false, now: t0)) == nil, "nothing waits, but the delay has not passed")
        #expect(tag(acks.due(now: t0 + .milliseconds(10))) == nil)
        #expect(tag(acks.settle(5, count: 1, moreWaiting: false, now: t0 + .milliseconds(15))) == nil)
        // The delay counts from the oldest deferred batch, not the latest.
        #expect(tag(acks.due(now: t0 + .milliseconds(20))) == 5, "one cumulative ack for both, 20 ms after the first")
        #expect(tag(acks.due(now: t0 + .milliseconds(500))) == nil, "nothing left")
        #expect(tag(acks.settle(8, count: 1, moreWaiting: false, now: t0 + .milliseconds(600))) == nil)
        #expect(tag(acks.settle(9, count: 1, moreWaiting: false, now: t0 + .milliseconds(621))) == 9, "a batch settled after the delay acks at once")
    }

    @Test func withADelayTheLimitStillForcesTheAck() {
        var acks = DeferredAck(limit: 3, delay: .seconds(10))
        #expect(tag(acks.settle(1, count: 2, moreWaiting: false, now: t0)) == nil)
        #expect(tag(acks.settle(2, count: 1, moreWaiting: false, now: t0)) == 2)
    }
}
