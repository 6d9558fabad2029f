import Foundation
import BatonCore
import BatonLab
import Testing

private let ann = Holder(user: "ann", connection: "c-ann")
private let bob = Holder(user: "bob", connection: "c-bob")
private let t0 = Timestamp(milliseconds: 1_000_000)

private func request(_ command: Command, id: String = "r") -> Request { Request(requestID: id, command: command) }

@Suite struct RulesTests {
    let partitioner = try! Partitioner(count: 1)

    @Test func claimOnAFreshBufferGrantsTokenOne() {
        var state = PartitionState(partition: 0, partitioner: partitioner)
        let (reply, changes) = state.apply(request(.claim(buffer: "b", holder: ann, leaseMilliseconds: 5000)), at: t0)
        #expect(reply.status == .granted)
        #expect(reply.token == 1)
        #expect(reply.holder == ann)
        #expect(reply.expiresAt == t0.adding(milliseconds: 5000))
        #expect(reply.at == t0)
        #expect(changes.map(\.kind) == [.granted])
        #expect(state.state(of: "b") == BufferState(holder: ann, token: 1, expiresAt: t0.adding(milliseconds: 5000)))
    }

    @Test func secondClaimIsDeniedWithTheHolder() {
        var state = PartitionState(partition: 0, partitioner: partitioner)
        _ = state.apply(request(.claim(buffer: "b", holder: ann, leaseMilliseconds: 5000)), at: t0)
        let (reply, changes) = state.apply(request(.claim(buffer: "b", holder: bob, leaseMilliseconds: 5000)), at: t0.adding(milliseconds: 10))
        #expect(reply.status == .denied)
        #expect(reply.holder == ann)
        #expect(reply.token == 1)
        #expect(reply.expiresAt == t0.adding(milliseconds: 5000))
        #expect(changes.isEmpty)
    }

    @Test func sameUserOnAnotherConnectionIsDenied() {
        var state = PartitionState(partition: 0, partitioner: partitioner)
        _ = state.apply(request(.claim(buffer: "b", holder: ann, leaseMilliseconds: 5000)), at: t0)
        let other = Holder(user: "ann", connection: "c-ann-2")
        #expect(state.apply(request(.claim(buffer: "b", holder: other, leaseMilliseconds: 5000)), at: t0).reply.status == .denied)
    }

    @Test func reclaimByTheHolderKeepsTheTokenAndExtends() {
        var state = PartitionState(partition: 0, partitioner: partitioner)
        _ = state.apply(request(.claim(buffer: "b", holder: ann, leaseMilliseconds: 5000)), at: t0)
        let (reply, changes) = state.apply(request(.claim(buffer: "b", holder: ann, leaseMilliseconds: 8000)), at: t0.adding(milliseconds: 4000))
        #expect(reply.status == .granted)
        #expect(reply.token == 1)
        #expect(reply.expiresAt == t0.adding(milliseconds: 12_000))
        #expect(changes.isEmpty, "extending a lease is not an ownership change")
    }

    @Test func expiresAtEqualToNowCountsAsExpired() {
        var state = PartitionState(partition: 0, partitioner: partitioner)
        _ = state.apply(request(.claim(buffer: "b", holder: ann, leaseMilliseconds: 5000)), at: t0)
        let end = t0.adding(milliseconds: 5000)
        #expect(state.apply(request(.claim(buffer: "b", holder: bob, leaseMilliseconds: 5000)), at: end.adding(milliseconds: -1)).reply.status == .denied)
        #expect(state.apply(request(.renew(buffer: "b", connection: ann.connection, token: 1, leaseMilliseconds: 5000)), at: end).reply.status == .notOwner)
        #expect(state.apply(request(.inspect(buffer: "b")), at: end).reply.holder == nil)
        let (reply, changes) = state.apply(request(.claim(buffer: "b", holder: bob, leaseMilliseconds: 5000)), at: end)
        #expect(reply.status == .granted)
        #expect(reply.token == 2)
        #expect(changes.map(\.kind) == [.expired, .granted], "the expired lease is closed before the new grant")
        #expect(changes[0].holder == ann && changes[0].token == 1 && changes[0].expiresAt == end)
    }

    @Test func expiredHolderReclaimingGetsANewToken() {
        var state = PartitionState(partition: 0, partitioner: partitioner)
        _ = state.apply(request(.claim(buffer: "b", holder: ann, leaseMilliseconds: 1000)), at: t0)
        let reply = state.apply(request(.claim(buffer: "b", holder: ann, leaseMilliseconds: 1000)), at: t0.adding(milliseconds: 1000)).reply
        #expect(reply.status == .granted)
        #expect(reply.token == 2)
    }

    @Test func renew() {
        var state = PartitionState(partition: 0, partitioner: partitioner)
        _ = state.apply(request(.claim(buffer: "b", holder: ann, leaseMilliseconds: 5000)), at: t0)
        let later = t0.adding(milliseconds: 3000)
        #expect(state.apply(request(.renew(buffer: "b", connection: bob.connection, token: 1, leaseMilliseconds: 5000)), at: later).reply.status == .notOwner)
        #expect(state.apply(request(.renew(buffer: "b", connection: ann.connection, token: 2, leaseMilliseconds: 5000)), at: later).reply.status == .notOwner)
        #expect(state.apply(request(.renew(buffer: "nobody", connection: ann.connection, token: 1, leaseMilliseconds: 5000)), at: later).reply.status == .notOwner)
        let (reply, changes) = state.apply(request(.renew(buffer: "b", connection: ann.connection, token: 1, leaseMilliseconds: 1000)), at: later)
        #expect(reply.status == .renewed)
        #expect(reply.expiresAt == later.adding(milliseconds: 1000))
        #expect(reply.token == 1)
        #expect(changes.isEmpty)
    }

    @Test func releaseWorksExpiredOrNotAndKeepsTheToken() {
        var state = PartitionState(partition: 0, partitioner: partitioner)
        _ = state.apply(request(.claim(buffer: "b", holder: ann, leaseMilliseconds: 1000)), at: t0)
        #expect(state.apply(request(.release(buffer: "b", connection: ann.connection, token: 7)), at: t0).reply.status == .notOwner)
        #expect(state.apply(request(.release(buffer: "b", connection: bob.connection, token: 1)), at: t0).reply.status == .notOwner)
        let (reply, changes) = state.apply(request(.release(buffer: "b", connection: ann.connection, token: 1)), at: t0.adding(milliseconds: 5000))
        #expect(reply.status == .released)
        #expect(reply.token == 1 && reply.holder == nil && reply.expiresAt == nil)
        #expect(changes.map(\.kind) == [.released])
        #expect(state.state(of: "b") == BufferState(holder: nil, token: 1, expiresAt: nil))
        #expect(state.apply(request(.release(buffer: "b", connection: ann.connection, token: 1)), at: t0).reply.status == .notOwner, "a second release is not_owner")
        #expect(state.apply(request(.claim(buffer: "b", holder: bob, leaseMilliseconds: 1000)), at: t0.adding(milliseconds: 6000)).reply.token == 2)
    }

    @Test func inspect() {
        var state = PartitionState(partition: 0, partitioner: partitioner)
        let never = state.apply(request(.inspect(buffer: "b")), at: t0).reply
        #expect(never.status == .state && never.token == 0 && never.holder == nil && never.expiresAt == nil)
        _ = state.apply(request(.claim(buffer: "b", holder: ann, leaseMilliseconds: 1000)), at: t0)
        let held = state.apply(request(.inspect(buffer: "b")), at: t0).reply
        #expect(held.holder == ann && held.token == 1 && held.expiresAt == t0.adding(milliseconds: 1000))
    }

    @Test func releaseConnectionReleasesOnlyThatConnection() {
        var state = PartitionState(partition: 0, partitioner: partitioner)
        _ = state.apply(request(.claim(buffer: "b1", holder: ann, leaseMilliseconds: 1000)), at: t0)
        _ = state.apply(request(.claim(buffer: "b2", holder: ann, leaseMilliseconds: 1000)), at: t0)
        _ = state.apply(request(.claim(buffer: "b3", holder: bob, leaseMilliseconds: 1000)), at: t0)
        let (reply, changes) = state.apply(request(.releaseConnection(connection: ann.connection)), at: t0)
        #expect(reply.status == .releasedConnection)
        #expect(reply.buffers == ["b1", "b2"])
        #expect(changes.map(\.kind) == [.released, .released])
        #expect(state.state(of: "b3").holder == bob)
        #expect(state.apply(request(.releaseConnection(connection: ann.connection)), at: t0).reply.buffers == [])
    }

    @Test func forceReleaseReleasesWhoeverHoldsAndIsMarkedForced() {
        var state = PartitionState(partition: 0, partitioner: partitioner)
        #expect(state.apply(request(.forceRelease(buffer: "b", reason: nil)), at: t0).reply.status == .notOwner, "nothing to release")
        _ = state.apply(request(.claim(buffer: "b", holder: ann, leaseMilliseconds: 1000)), at: t0)
        let (reply, changes) = state.apply(request(.forceRelease(buffer: "b", reason: "stuck editor")), at: t0.adding(milliseconds: 10))
        #expect(reply.status == .released && reply.token == 1)
        #expect(changes.count == 1 && changes[0].kind == .released && changes[0].forced && changes[0].holder == ann)
        #expect(state.apply(request(.claim(buffer: "b", holder: bob, leaseMilliseconds: 1000)), at: t0.adding(milliseconds: 20)).reply.token == 2)
        let event = String(decoding: ProtocolCodec.encodeEvent(PositionedChange(seq: 1, partition: 0, change: changes[0])), as: UTF8.self)
        #expect(event.contains(#""forced":true"#))
    }

    @Test func sweepExpiresOnceAtOrAfterTheEnd() {
        var state = PartitionState(partition: 0, partitioner: partitioner)
        _ = state.apply(request(.claim(buffer: "b", holder: ann, leaseMilliseconds: 1000)), at: t0)
        #expect(state.sweep(at: t0.adding(milliseconds: 999)).isEmpty)
        let changes = state.sweep(at: t0.adding(milliseconds: 1000))
        #expect(changes.map(\.kind) == [.expired])
        #expect(state.sweep(at: t0.adding(milliseconds: 5000)).isEmpty)
        #expect(state.state(of: "b").token == 1)
    }

    @Test func canonicallyEquivalentNamesAreDifferentBuffersAndConnections() {
        // "é" (U+00E9) and "e" + U+0301 are equal as Swift Strings but are different bytes on the wire.
        var state = PartitionState(partition: 0, partitioner: partitioner)
        let composed = "caf\u{E9}.rs", decomposed = "cafe\u{301}.rs"
        #expect(composed == decomposed && !composed.exactlyEquals(decomposed))
        #expect(state.apply(request(.claim(buffer: composed, holder: ann, leaseMilliseconds: 5000)), at: t0).reply.status == .granted)
        let second = state.apply(request(.claim(buffer: decomposed, holder: bob, leaseMilliseconds: 5000)), at: t0).reply
        #expect(second.status == .granted, "a different buffer")
        #expect(state.buffers.count == 2)

        #expect(Holder(user: "ann", connection: "c-\u{E1}nn") != Holder(user: "ann", connection: "c-\u{E1}nn".decomposedTwin))
        #expect(state.apply(request(.release(buffer: composed, connection: "c-\u{E1}nn", token: 1)), at: t0).reply.status == .notOwner)
    }

    @Test func misroutedRequestsChangeNothing() throws {
        let sixteen = try Partitioner(count: 16)
        var state = PartitionState(partition: 0, partitioner: sixteen)
        let (reply, changes) = state.apply(request(.claim(buffer: "a", holder: ann, leaseMilliseconds: 1000)), at: t0)
        #expect(reply.status == .error)
        #expect(reply.error?.code == .misrouted)
        #expect(reply.error?.message.contains("partition 12") == true)
        #expect(changes.isEmpty)
        #expect(state.buffers.isEmpty)
    }
}

@Suite struct HistoryCheckerTests {
    private func change(_ kind: ChangeKind, _ holder: Holder, token: Int64, at: Int64, expires: Int64 = 10_000) -> OwnershipChange {
        OwnershipChange(kind: kind, buffer: "b", holder: holder, token: token, at: Timestamp(milliseconds: at), expiresAt: Timestamp(milliseconds: expires))
    }

    @Test func cleanHistoryPasses() {
        let report = HistoryChecker.check([
            change(.granted, ann, token: 1, at: 0), change(.released, ann, token: 1, at: 5),
            change(.granted, bob, token: 2, at: 5, expires: 100), change(.expired, bob, token: 2, at: 100, expires: 100),
            change(.granted, ann, token: 3, at: 100),
        ], finalTokens: ["b": 3])
        #expect(report.passed, "\(report.violations)")
        #expect(report.grants == 3 && report.closes == 2 && report.doubleGrants == 0)
    }

    private func seen(_ holder: Holder, position: Int64, at: Int64, until: Int64 = 9_000) -> HistoryChecker.LineSighting {
        HistoryChecker.LineSighting(
            buffer: "b", position: position, requestID: "r-\(holder.user)", holder: holder, waitUntil: Timestamp(milliseconds: until), seenAt: Timestamp(milliseconds: at)
        )
    }

    /// A grant made by `holder`'s waiting claim (request `r-<user>`, as ``seen(_:position:at:until:)`` names it).
    private func waiterGrant(_ holder: Holder, token: Int64, at: Int64) -> OwnershipChange {
        var grant = change(.granted, holder, token: token, at: at)
        grant.requestID = "r-\(holder.user)"
        return grant
    }

    @Test func waitersGrantedInTheOrderTheyJoinedPassTheLineCheck() {
        let holder = Holder(user: "h", connection: "h")
        let changes = [
            change(.granted, holder, token: 1, at: 1_000), change(.released, holder, token: 1, at: 2_000),
            waiterGrant(ann, token: 2, at: 2_000), change(.released, ann, token: 2, at: 2_100),
            waiterGrant(bob, token: 3, at: 2_100),
        ]
        let sightings = [seen(ann, position: 7, at: 1_010), seen(bob, position: 9, at: 1_020), seen(ann, position: 7, at: 1_500)]
        #expect(HistoryChecker.checkLines(changes, sightings: sightings, waitingHolders: [ann, bob]).isEmpty)
    }

    @Test func theTailGrantedBeforeTheHeadIsALineJump() {
        let holder = Holder(user: "h", connection: "h")
        let changes = [
            change(.granted, holder, token: 1, at: 1_000), change(.released, holder, token: 1, at: 2_000),
            waiterGrant(bob, token: 2, at: 2_000), change(.released, bob, token: 2, at: 2_100),
            waiterGrant(ann, token: 3, at: 2_100),
        ]
        let violations = HistoryChecker.checkLines(changes, sightings: [seen(ann, position: 7, at: 1_010), seen(bob, position: 9, at: 1_020)], waitingHolders: [ann, bob])
        #expect(violations.map(\.kind) == [.lineJumped])
        #expect(violations.first?.detail.contains("token 2") == true, "\(violations)")
    }

    @Test func aClaimWithoutWaitGrantedPastALiveWaiterIsALineJumpButNotPastAnExpiredOne() {
        let direct = Holder(user: "d", connection: "d")
        let changes = [
            change(.granted, bob, token: 1, at: 1_000), change(.released, bob, token: 1, at: 2_000),
            change(.granted, direct, token: 2, at: 2_000),
        ]
        let live = HistoryChecker.checkLines(changes, sightings: [seen(ann, position: 3, at: 1_500)], waitingHolders: [ann])
        #expect(live.map(\.kind) == [.lineJumped])
        // Its wait had run out (and it was answered denied) before the buffer was free.
        #expect(HistoryChecker.checkLines(changes, sightings: [seen(ann, position: 3, at: 1_500, until: 1_800)], waitingHolders: [ann]).isEmpty)
        // Seen only after the grant: it may have joined after it.
        #expect(HistoryChecker.checkLines(changes, sightings: [seen(ann, position: 3, at: 2_500)], waitingHolders: [ann]).isEmpty)
    }

    @Test func grantWhileHeldIsADoubleGrant() {
        let report = HistoryChecker.check([change(.granted, ann, token: 1, at: 0), change(.granted, bob, token: 2, at: 5)])
        #expect(report.doubleGrants == 1)
        #expect(report.violations.map(\.kind) == [.overlappingGrant])
    }

    @Test func sameTokenTwiceIsADoubleGrant() {
        let report = HistoryChecker.check([change(.granted, ann, token: 1, at: 0), change(.granted, bob, token: 1, at: 0)])
        #expect(report.doubleGrants == 1)
        #expect(report.violations.contains { $0.kind == .tokenReused })
    }

    @Test func grantBeforeThePreviousReleaseIsADoubleGrant() {
        let report = HistoryChecker.check([
            change(.granted, ann, token: 1, at: 0), change(.released, ann, token: 1, at: 50), change(.granted, bob, token: 2, at: 40),
        ])
        #expect(report.doubleGrants == 1)
    }

    @Test func earlyExpiryIsAViolation() {
        let report = HistoryChecker.check([change(.granted, ann, token: 1, at: 0), change(.expired, ann, token: 1, at: 50, expires: 60)])
        #expect(!report.passed)
    }

    @Test func databaseTokenBelowAGrantIsAViolation() {
        let report = HistoryChecker.check([change(.granted, ann, token: 4, at: 0)], finalTokens: ["b": 3])
        #expect(report.violations.map(\.kind) == [.tokenRegressed])
    }
}

extension String {
    /// The same text with U+00E1 written as "a" + U+0301 (canonically equivalent, different bytes).
    var decomposedTwin: String { replacingOccurrences(of: "\u{E1}", with: "a\u{301}") }
}
