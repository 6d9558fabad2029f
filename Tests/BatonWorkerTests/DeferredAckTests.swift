import BatonAMQP
@testable import BatonWorker
import Testing

/// The worker's deferred closing ack: pure, no broker.
@Suite struct DeferredAckTests {
    func tag(_ action: ChannelAction?) -> UInt64? {
        if case .ack(let tag, true)? = action { return tag }
        return nil
    }

    @Test func acksAtOnceWhenNothingWaits() {
        var acks = DeferredAck(limit: 64)
        #expect(tag(acks.settle(3, count: 3, moreWaiting: false)) == 3)
        #expect(tag(acks.flush()) == nil, "nothing left to ack")
    }

    @Test func whileMoreWaitsTheNextBatchAcksForBoth() {
        var acks = DeferredAck(limit: 64)
        #expect(tag(acks.settle(3, count: 3, moreWaiting: true)) == nil)
        #expect(tag(acks.settle(5, count: 2, moreWaiting: true)) == nil)
        #expect(tag(acks.settle(9, count: 4, moreWaiting: false)) == 9, "one cumulative ack covers the three batches")
    }

    @Test func neverHoldsMoreThanTheLimit() {
        var acks = DeferredAck(limit: 4)
        #expect(tag(acks.settle(2, count: 2, moreWaiting: true)) == nil)
        #expect(tag(acks.settle(4, count: 2, moreWaiting: true)) == 4, "the limit forces the ack even while more waits")
    }

    @Test func aBatchWithNothingToAckKeepsTheEarlierTag() {
        var acks = DeferredAck(limit: 64)
        #expect(tag(acks.settle(7, count: 1, moreWaiting: true)) == nil)
        // A batch whose only delivery was rejected (dead-lettered) has no ack of its own.
        #expect(tag(acks.settle(nil, count: 1, moreWaiting: false)) == 7)
        #expect(tag(acks.flush()) == nil)
    }

    @Test func flushOnStopReturnsWhatWasDeferred() {
        var acks = DeferredAck(limit: 64)
        _ = acks.settle(11, count: 1, moreWaiting: true)
        #expect(tag(acks.flush()) == 11)
        #expect(tag(acks.flush()) == nil)
    }
}
