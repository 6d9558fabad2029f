import BatonCore
import BatonLab
import Testing

@Suite struct ChaosCheckerTests {
    let ann = Holder(user: "ann", connection: "c1")
    let bob = Holder(user: "bob", connection: "c2")

    func change(_ kind: ChangeKind, _ holder: Holder, _ token: Int64, at: Int64) -> OwnershipChange {
        OwnershipChange(kind: kind, buffer: "b", holder: holder, token: token, at: Timestamp(milliseconds: at), expiresAt: Timestamp(milliseconds: at + 1000))
    }

    @Test func aCleanHistoryPasses() {
        let verdict = ChaosChecker.judge(.init(
            changes: [change(.granted, ann, 1, at: 0), change(.released, ann, 1, at: 10), change(.granted, bob, 2, at: 20)],
            finalTokens: ["b": 2],
            observedGrants: [.init(buffer: "b", holder: ann, token: 1), .init(buffer: "b", holder: bob, token: 2)],
            operations: 3, unanswered: 0, faults: 5
        ))
        #expect(verdict.passed)
        #expect(verdict.description == "verdict=PASS operations=3 faults=5 double_grants=0 lost_grants=0 unanswered=0 line_jumps=0 duplicate_replica_ids=0")
    }

    func member(_ kind: ChangeKind, _ holder: Holder, _ token: Int64, id: Int, at: Int64, ends: Int64? = nil) -> OwnershipChange {
        OwnershipChange(
            kind: kind, buffer: "room", holder: holder, token: token, at: Timestamp(milliseconds: at),
            expiresAt: Timestamp(milliseconds: ends ?? at + 30_000), replicaID: id
        )
    }

    /// Replica memberships (protocol section 20): an id joined while held, an id reserved for a user given to
    /// another within the grace, and a told membership missing from the history all fail the run.
    @Test func membershipViolationsFailTheRun() {
        let clean: [OwnershipChange] = [
            member(.memberJoined, ann, 1, id: 1, at: 0), member(.memberJoined, bob, 2, id: 2, at: 1),
            member(.memberReleased, ann, 1, id: 1, at: 10), member(.memberReclaimed, Holder(user: "ann", connection: "c9"), 3, id: 1, at: 20),
            member(.memberLeft, bob, 2, id: 2, at: 30), member(.memberJoined, Holder(user: "cat", connection: "c3"), 4, id: 2, at: 40),
        ]
        let passed = ChaosChecker.judge(.init(
            changes: clean, finalTokens: [:], observedGrants: [], operations: 6, unanswered: 0, faults: 1,
            observedMemberships: [.init(buffer: "room", holder: ann, token: 1)], memberGraceMilliseconds: 30_000
        ))
        #expect(passed.passed && passed.duplicateReplicaIDs == 0, "\(passed.violations)")

        let doubled = clean + [member(.memberJoined, Holder(user: "dan", connection: "c4"), 5, id: 2, at: 50)]
        let duplicate = ChaosChecker.judge(.init(changes: doubled, finalTokens: [:], observedGrants: [], operations: 7, unanswered: 0, faults: 1))
        #expect(!duplicate.passed && duplicate.duplicateReplicaIDs == 1 && duplicate.description.hasSuffix("duplicate_replica_ids=1"))

        let taken: [OwnershipChange] = [
            member(.memberJoined, ann, 1, id: 1, at: 0), member(.memberExpired, ann, 1, id: 1, at: 40_000, ends: 30_000),
            member(.memberJoined, bob, 2, id: 1, at: 50_000),
        ]
        let reserved = ChaosChecker.judge(.init(
            changes: taken, finalTokens: [:], observedGrants: [], operations: 2, unanswered: 0, faults: 1, memberGraceMilliseconds: 30_000
        ))
        #expect(!reserved.passed && reserved.violations.contains { $0.kind == .reservedIDTaken }, "reserved for ann until 60 s")

        let lost = ChaosChecker.judge(.init(
            changes: clean, finalTokens: [:], observedGrants: [], operations: 6, unanswered: 0, faults: 1,
            observedMemberships: [.init(buffer: "room", holder: Holder(user: "eve", connection: "c5"), token: 9)]
        ))
        #expect(!lost.passed && lost.lostGrants == 1, "a membership told but not in the history is lost")
    }

    @Test func aDoubleGrantFails() {
        let verdict = ChaosChecker.judge(.init(
            changes: [change(.granted, ann, 1, at: 0), change(.granted, bob, 2, at: 5)],
            finalTokens: ["b": 2],
            observedGrants: [.init(buffer: "b", holder: ann, token: 1), .init(buffer: "b", holder: bob, token: 2)],
            operations: 2, unanswered: 0, faults: 1
        ))
        #expect(!verdict.passed)
        #expect(verdict.doubleGrants == 1)
        #expect(verdict.description.hasPrefix("verdict=FAIL"))
    }

    @Test func twoHoldersToldTheSameTokenFail() {
        let verdict = ChaosChecker.judge(.init(
            changes: [change(.granted, ann, 1, at: 0)], finalTokens: ["b": 1],
            observedGrants: [.init(buffer: "b", holder: ann, token: 1), .init(buffer: "b", holder: bob, token: 1)],
            operations: 2, unanswered: 0, faults: 1
        ))
        #expect(!verdict.passed)
        #expect(verdict.doubleGrants >= 1)
        #expect(verdict.lostGrants == 1)
    }

    @Test func aLostGrantAnUnansweredCallOrACrashFails() {
        let lost = ChaosChecker.judge(.init(
            changes: [], finalTokens: [:], observedGrants: [.init(buffer: "b", holder: ann, token: 1)], operations: 1, unanswered: 0, faults: 1
        ))
        #expect(!lost.passed && lost.lostGrants == 1)
        #expect(!ChaosChecker.judge(.init(changes: [], finalTokens: [:], observedGrants: [], operations: 1, unanswered: 1, faults: 1)).passed)
        #expect(!ChaosChecker.judge(.init(changes: [], finalTokens: [:], observedGrants: [], operations: 1, unanswered: 0, faults: 1, crashes: 1)).passed)
    }
}
