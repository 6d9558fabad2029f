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
        #expect(verdict.description == "verdict=PASS operations=3 faults=5 double_grants=0 lost_grants=0 unanswered=0 line_jumps=0")
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
