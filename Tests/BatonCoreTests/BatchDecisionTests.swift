import BatonCore
import Testing

/// The batch decision (``PartitionState/decideBatch(_:at:recorded:waiting:)``): what a worker decides for
/// one batch, and which requests it answers without a record of their own.
@Suite struct BatchDecisionTests {
    let t0 = Timestamp(milliseconds: 5_000_000)
    let partitioner = try! Partitioner(count: 1)

    func claim(_ id: String, _ user: String, _ connection: String, buffer: String = "b", wait: Int64? = nil) -> Request {
        var request = Request(requestID: id, command: .claim(buffer: buffer, holder: Holder(user: user, connection: connection), leaseMilliseconds: 10_000), principal: "p")
        if let wait { request.waiting = Waiting(milliseconds: wait, replyTo: "amq.gen-\(id)", correlationID: "c-\(id)") }
        return request
    }

    func release(_ id: String, _ connection: String, token: Int64) -> Request {
        Request(requestID: id, command: .release(buffer: "b", connection: connection, token: token), principal: "p")
    }

    @Test func everyDecidedRequestIsRecordedOnceAndTheChangesAreAttributed() {
        var state = PartitionState(partition: 0, partitioner: partitioner)
        let decision = state.decideBatch([claim("1", "ann", "c1"), claim("2", "bob", "c2"), release("3", "c1", token: 1), claim("4", "bob", "c2")], at: t0)
        #expect(decision.replies.map { $0?.status } == [.granted, .denied, .released, .granted])
        #expect(decision.records.map(\.id) == ["1", "2", "3", "4"])
        #expect(decision.records.map(\.reply) == decision.replies.compactMap { $0 })
        #expect(decision.changes.map(\.change.kind) == [.granted, .released, .granted])
        #expect(decision.changes.map(\.requestID) == ["1", "3", "4"])
        #expect(decision.unrecorded == 0 && decision.replayed == 0)
        #expect(state.state(of: "b").token == 2)
    }

    @Test func aRepeatIsAnsweredFromItsRecordAndCountsAsUnrecorded() {
        var state = PartitionState(partition: 0, partitioner: partitioner)
        let first = claim("1", "ann", "c1")
        // Inside one batch: the second copy gets the first's reply, without a second record.
        let decision = state.decideBatch([first, first], at: t0)
        #expect(decision.replies[0] == decision.replies[1])
        #expect(decision.records.count == 1 && decision.replayed == 1 && decision.unrecorded == 1)

        // From a record read before the batch: its reply, whatever the state says now.
        let recorded = [ExactString("1"): RecordedReply(reply: decision.replies[0]!, fingerprint: ProtocolCodec.fingerprint(first))]
        let later = state.decideBatch([first], at: t0.adding(milliseconds: 5), recorded: recorded)
        #expect(later.replies == [decision.replies[0]] && later.records.isEmpty && later.unrecorded == 1)
        #expect(state.state(of: "b").expiresAt == t0.adding(milliseconds: 10_000), "the repeat did not extend the lease")

        // Another request under a recorded id: refused, never recorded.
        let other = state.decideBatch([claim("1", "bob", "c2")], at: t0, recorded: recorded)
        #expect(other.replies[0]?.error?.code == .requestIDReused && other.records.isEmpty && other.unrecorded == 1)
    }

    @Test func requestsThatAreNeverRecordedAreCounted() {
        var state = PartitionState(partition: 0, partitioner: partitioner)
        _ = state.decideBatch([claim("a", "ann", "c1")], at: t0)
        var late = claim("late", "bob", "c2")
        late.deadline = t0
        let decision = state.decideBatch([
            late,  // its deadline passed: refused, not recorded
            claim("w", "bob", "c2", wait: 60_000),  // joins the line: answered later
            claim("x", "cid", "c3", buffer: "other"),  // decided and recorded
        ], at: t0.adding(milliseconds: 1), waiting: [:])
        #expect(decision.replies[0]?.error?.code == .deadlineExceeded)
        #expect(decision.replies[1] == nil)
        #expect(decision.replies[2]?.status == .granted)
        #expect(decision.records.map(\.id) == ["x"] && decision.unrecorded == 2)

        // A waiter's request id on another buffer (known from the partition's lines): refused, not recorded.
        let reuse = state.decideBatch([claim("w", "dan", "c4", buffer: "other")], at: t0.adding(milliseconds: 2), waiting: [ExactString("w"): ExactString("b")])
        #expect(reuse.replies[0]?.error?.code == .requestIDReused && reuse.records.isEmpty && reuse.unrecorded == 1)
    }

    @Test func aDeadlineTheEstimatedTimeMayHavePassedIsRefused() {
        // Decided from memory, the time is an estimate that trails the database's by a margin: a request
        // whose deadline lies between the estimate and the latest the time may be is refused, not decided
        // after its deadline.
        var state = PartitionState(partition: 0, partitioner: partitioner)
        var close = claim("close", "ann", "c1")
        close.deadline = t0.adding(milliseconds: 2)
        let estimated = state.decideBatch([close], at: t0, latest: t0.adding(milliseconds: 3))
        #expect(estimated.replies[0]?.error?.code == .deadlineExceeded && estimated.changes.isEmpty && estimated.records.isEmpty)
        // The same request at a time read from the database is decided: its deadline has not passed.
        let read = state.decideBatch([close], at: t0)
        #expect(read.replies[0]?.status == .granted)
    }

    @Test func aWaitersAnswerIsRecordedUnderItsOwnRequestID() {
        var state = PartitionState(partition: 0, partitioner: partitioner)
        _ = state.decideBatch([claim("a", "ann", "c1"), claim("w", "bob", "c2", wait: 60_000)], at: t0)
        let decision = state.decideBatch([release("r", "c1", token: 1)], at: t0.adding(milliseconds: 3))
        #expect(decision.replies.map { $0?.status } == [.released])
        #expect(decision.answers.map(\.waiter.requestID) == ["w"])
        #expect(decision.records.map(\.id).sorted() == ["r", "w"])
        #expect(decision.changes.map(\.requestID) == ["r", "w"], "the grant is audited under the waiting claim's id")
        #expect(decision.unrecorded == 0)
    }
}
