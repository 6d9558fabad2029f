import BatonCore
import Testing

/// A buffer's token sequence apart from its holder's token (docs/design/replica-slots.md, step 1): once
/// something other than ownership has taken tokens from the sequence (replica memberships will), grants
/// continue after the last issued token, while renewals and releases still name the holder's.
@Suite struct TokenSequenceTests {
    let t0 = Timestamp(milliseconds: 1_000_000)
    let partitioner = try! Partitioner(count: 1)
    let ann = Holder(user: "ann", connection: "c-ann")
    let bob = Holder(user: "bob", connection: "c-bob")

    func request(_ id: String, _ command: Command) -> Request { Request(requestID: id, command: command, principal: "p") }

    /// Ann holds token 3 while the sequence is at 7 (four tokens issued to others since her grant).
    func ahead() -> PartitionState {
        PartitionState(partition: 0, partitioner: partitioner, buffers: [
            "b": BufferState(holder: ann, token: 3, expiresAt: t0.adding(milliseconds: 5_000), principal: "p", issued: 7),
        ])
    }

    @Test func theHolderRenewsAndReleasesWithItsOwnTokenAndTheSequenceIsKept() {
        var state = ahead()
        #expect(state.apply(request("r1", .renew(buffer: "b", connection: "c-ann", token: 7, leaseMilliseconds: 5_000)), at: t0).reply.status == .notOwner,
                "the sequence's last token is not the holder's")
        let renewed = state.apply(request("r2", .renew(buffer: "b", connection: "c-ann", token: 3, leaseMilliseconds: 9_000)), at: t0)
        #expect(renewed.reply.status == .renewed && renewed.reply.token == 3)
        #expect(state.apply(request("i", .inspect(buffer: "b")), at: t0).reply.token == 3, "inspect shows the holder's token")
        let released = state.apply(request("r3", .release(buffer: "b", connection: "c-ann", token: 3)), at: t0)
        #expect(released.reply.status == .released && released.changes.map(\.token) == [3])
        #expect(state.state(of: "b").issued == 7 && state.state(of: "b").token == 3)
    }

    @Test func aGrantTakesTheNextTokenOfTheSequence() {
        var state = ahead()
        #expect(state.apply(request("c1", .claim(buffer: "b", holder: bob, leaseMilliseconds: 5_000)), at: t0).reply.status == .denied)
        // Ann's lease runs out; Bob's claim closes it and is granted after the sequence, not after Ann's token.
        let granted = state.apply(request("c2", .claim(buffer: "b", holder: bob, leaseMilliseconds: 5_000)), at: t0.adding(milliseconds: 5_000))
        #expect(granted.reply.status == .granted && granted.reply.token == 8)
        #expect(granted.changes.map(\.kind) == [.expired, .granted] && granted.changes.map(\.token) == [3, 8])
        #expect(state.state(of: "b").issued == 8)
    }

    @Test func aForcedReleaseAndAnExpiryKeepTheSequenceAndAWaiterIsGrantedAfterIt() {
        var forced = ahead()
        _ = forced.apply(request("f", .forceRelease(buffer: "b", reason: nil)), at: t0)
        #expect(forced.state(of: "b").issued == 7 && forced.state(of: "b").holder == nil)
        #expect(forced.apply(request("c", .claim(buffer: "b", holder: bob, leaseMilliseconds: 5_000)), at: t0).reply.token == 8)

        let expired = OwnershipRules.expire(buffer: "b", state: ahead().state(of: "b"), now: t0.adding(milliseconds: 5_000))
        #expect(expired?.state.issued == 7 && expired?.change.token == 3)

        var line = ahead()
        var waiting = request("w", .claim(buffer: "b", holder: bob, leaseMilliseconds: 5_000))
        waiting.waiting = Waiting(milliseconds: 60_000, replyTo: "amq.gen-w", correlationID: "c-w")
        #expect(line.decide(waiting, at: t0).reply == nil, "in line")
        let handoff = line.decide(request("r", .release(buffer: "b", connection: "c-ann", token: 3)), at: t0)
        #expect(handoff.answers.first?.reply.token == 8, "the waiter's grant continues the sequence")
    }

    @Test func aStateNeverIssuesBelowItsHoldersToken() {
        #expect(BufferState(holder: ann, token: 5, expiresAt: t0, issued: 2).issued == 5)
        #expect(BufferState(holder: nil, token: 4, expiresAt: nil).issued == 4)
    }
}
