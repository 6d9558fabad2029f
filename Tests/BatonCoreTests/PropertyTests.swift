import BatonCore
import BatonLab
import PropertyBased
import Testing

/// One random step: an operation by one of a few connections on one of a few buffers, after the clock moves.
struct Step: Sendable, CustomStringConvertible {
    var op: Int          // 0 claim, 1 renew, 2 release, 3 inspect, 4 release_connection, 5 sweep
    var buffer: Int      // 0..<3
    var connection: Int  // 0..<3
    var staleToken: Bool // renew/release with a wrong token
    var lease: Int64     // 1000...3000
    var advance: Int64   // 0...1500 ms before the step

    init(_ code: Int) {
        var rest = code
        func take(_ n: Int) -> Int { defer { rest /= n }; return rest % n }
        op = take(6)
        buffer = take(3)
        connection = take(3)
        staleToken = take(4) == 0
        lease = 1000 + Int64(take(3)) * 1000
        advance = Int64(take(4)) * 500
    }

    var description: String { "op\(op) b\(buffer) c\(connection) stale=\(staleToken) lease=\(lease) +\(advance)" }
}

@Suite struct PropertyTests {
    static let steps = Gen.int(in: 0...999_999).map(Step.init).array(of: 1...300)

    /// Random sequences of all five operations and sweeps over three buffers and three
    /// connections with a moving clock: invariants 1-3 hold on the changes and on every reply.
    @Test func invariantsHoldOverRandomSequences() async {
        await propertyCheck(count: 300, input: Self.steps) { steps in
            let partitioner = try! Partitioner(count: 1)
            var state = PartitionState(partition: 0, partitioner: partitioner)
            var now = Timestamp(milliseconds: 1_700_000_000_000)
            var history: [OwnershipChange] = []
            var highestGranted: [String: Int64] = [:]
            var lastToken: [String: [Int: Int64]] = [:]  // what each connection last got granted, per buffer

            for (index, step) in steps.enumerated() {
                now = now.adding(milliseconds: step.advance)
                let buffer = "buffer-\(step.buffer)"
                let holder = Holder(user: "user-\(step.connection % 2)", connection: "conn-\(step.connection)")
                let known = lastToken[buffer]?[step.connection] ?? 1
                let token = step.staleToken ? known + 1 : known
                let command: Command
                switch step.op {
                case 0: command = .claim(buffer: buffer, holder: holder, leaseMilliseconds: step.lease)
                case 1: command = .renew(buffer: buffer, connection: holder.connection, token: token, leaseMilliseconds: step.lease)
                case 2: command = .release(buffer: buffer, connection: holder.connection, token: token)
                case 3: command = .inspect(buffer: buffer)
                case 4: command = .releaseConnection(connection: holder.connection)
                default:
                    history += state.sweep(at: now)
                    continue
                }
                let before = state.state(of: buffer)
                let (reply, changes) = state.apply(Request(requestID: "r\(index)", command: command), at: now)
                history += changes
                let after = state.state(of: buffer)

                // Invariant 2 on state: tokens never go down.
                #expect(after.token >= before.token)
                #expect(reply.at == now)
                switch reply.status {
                case .granted:
                    let granted = reply.token!
                    // Invariant 3 on replies: a grant is never below one already granted.
                    #expect(granted >= highestGranted[buffer, default: 0])
                    highestGranted[buffer] = granted
                    lastToken[buffer, default: [:]][step.connection] = granted
                    #expect(reply.holder == holder)
                    #expect(reply.expiresAt == now.adding(milliseconds: step.lease))
                case .denied:
                    #expect(reply.holder != nil && reply.holder != holder)
                    #expect(reply.expiresAt! > now)
                case .renewed:
                    #expect(after.expiresAt == now.adding(milliseconds: step.lease))
                case .released:
                    #expect(after.holder == nil)
                case .notOwner:
                    #expect(after == before)
                case .state:
                    #expect(after == before)
                    #expect(reply.holder == before.liveHolder(at: now))
                case .releasedConnection:
                    #expect(reply.buffers?.allSatisfy { state.state(of: $0).holder == nil } == true)
                case .error, .description, .events, .joined, .left, .notMember:
                    Issue.record("unexpected reply \(reply.status) \(String(describing: reply.error))")
                }
            }
            // Invariants 1-3 over the whole history, against the final state.
            let finalTokens = state.buffers.mapValues(\.token)
            let report = HistoryChecker.check(history, finalTokens: finalTokens)
            #expect(report.passed, "\(report.violations)")
        }
    }

    /// The checker is not vacuous: dropping one release or expiry from a real history makes it fail.
    @Test func checkerCatchesADroppedClose() async {
        await propertyCheck(count: 100, input: Self.steps) { steps in
            var state = PartitionState(partition: 0, partitioner: try! Partitioner(count: 1))
            var now = Timestamp(milliseconds: 0)
            var history: [OwnershipChange] = []
            for (index, step) in steps.enumerated() {
                now = now.adding(milliseconds: step.advance)
                let holder = Holder(user: "u\(step.connection)", connection: "c\(step.connection)")
                history += state.apply(Request(requestID: "\(index)", command: .claim(buffer: "b", holder: holder, leaseMilliseconds: step.lease)), at: now).changes
            }
            guard let dropped = history.firstIndex(where: { $0.kind != .granted }) else { return }
            history.remove(at: dropped)
            #expect(HistoryChecker.check(history).doubleGrants >= 1)
        }
    }
}

/// Ownership and replica memberships on the same buffers (docs/design/replica-slots.md): one token sequence,
/// rosters that leases never touch, replica ids unique among live members.
@Suite struct MembershipPropertyTests {
    static let codes = Gen.int(in: 0...9_999_999).array(of: 1...300)

    @Test func ownershipAndMembershipsShareOneTokenSequenceAndNeverShareAnID() async {
        await propertyCheck(count: 300, input: Self.codes) { codes in
            let partitioner = try! Partitioner(count: 1)
            var state = PartitionState(partition: 0, partitioner: partitioner, graceMilliseconds: 2_000)
            var now = Timestamp(milliseconds: 1_700_000_000_000)
            var history: [OwnershipChange] = []
            var issuedMax: [String: Int64] = [:]
            var leaseToken: [String: [Int: Int64]] = [:]
            var memberToken: [String: [Int: Int64]] = [:]
            var events: [OwnershipChange] = []  // the history, in decision order, memberships included
            for (index, code) in codes.enumerated() {
                var rest = code
                func take(_ n: Int) -> Int { defer { rest /= n }; return rest % n }
                let op = take(8)
                let buffer = "buffer-\(take(2))"
                let c = take(4)
                let connection = "conn-\(c)"
                let user = "user-\(c % 3)"
                let lease = Int64(1 + take(3)) * 1_000
                now = now.adding(milliseconds: Int64(take(4)) * 600)
                let command: Command
                switch op {
                case 0: command = .claim(buffer: buffer, holder: Holder(user: user, connection: connection), leaseMilliseconds: lease)
                case 1: command = .release(buffer: buffer, connection: connection, token: leaseToken[buffer]?[c] ?? 1)
                case 2, 3: command = .join(buffer: buffer, user: user, connection: connection, leaseMilliseconds: lease)
                case 4: command = .leave(buffer: buffer, connection: connection, token: memberToken[buffer]?[c] ?? 1)
                case 5:
                    let token = take(2) == 0 ? leaseToken[buffer]?[c] ?? 1 : memberToken[buffer]?[c] ?? 1
                    command = .renew(buffer: buffer, connection: connection, token: token, leaseMilliseconds: lease)
                case 6: command = .releaseConnection(connection: connection)
                default:
                    let swept = state.sweepWithLines(at: now)
                    history += swept.changes
                    events += swept.attributedChanges(to: nil).map(\.change)
                    continue
                }
                let before = state.state(of: buffer)
                let outcome = state.decide(Request(requestID: "r\(index)", command: command, principal: "p"), at: now)
                history += outcome.changes
                events += outcome.attributedChanges(to: "r\(index)").map(\.change)
                let after = state.state(of: buffer)
                guard let reply = outcome.reply else {
                    Issue.record("every step here is answered")
                    continue
                }
                #expect(after.issued >= after.token && after.issued >= before.issued, "the sequence never goes back")
                switch reply.status {
                case .granted:
                    let token = reply.token!
                    if token != before.token {
                        #expect(token > issuedMax[buffer, default: 0], "a new grant takes the next token of the sequence")
                    }
                    issuedMax[buffer] = max(issuedMax[buffer, default: 0], token)
                    leaseToken[buffer, default: [:]][c] = token
                    #expect(after.roster == before.roster, "a grant leaves the roster")
                case .joined:
                    let token = reply.token!
                    if memberToken[buffer]?[c] != token {
                        #expect(token > issuedMax[buffer, default: 0], "a new membership takes the next token of the sequence")
                    }
                    issuedMax[buffer] = max(issuedMax[buffer, default: 0], token)
                    memberToken[buffer, default: [:]][c] = token
                    #expect(after.holder == before.holder && after.expiresAt == before.expiresAt, "a join leaves the lease")
                    #expect(reply.membership.map { $0.replicaID >= 1 } == true)
                case .left:
                    #expect(after.holder == before.holder && after.expiresAt == before.expiresAt, "a leave leaves the lease")
                    #expect(!after.roster.live(at: now).contains { $0.connection == connection && $0.token == reply.token })
                case .released:
                    #expect(after.holder == nil)
                    #expect(after.roster == before.roster, "a release leaves the roster")
                case .renewed, .notOwner, .notMember, .releasedConnection, .denied:
                    break
                case .error:
                    #expect(reply.error?.code == .invalidRequest, "\(String(describing: reply.error))")
                case .state, .description, .events:
                    Issue.record("unexpected reply \(reply.status)")
                }
                for (_, buffered) in state.buffers {
                    let live = buffered.roster.live(at: now)
                    #expect(Set(live.map(\.replicaID)).count == live.count, "two live members share a replica id: \(live)")
                    for reservation in buffered.roster.reservations where now < reservation.until {
                        #expect(!live.contains { $0.replicaID == reservation.replicaID && $0.user != reservation.user }, "a reserved id went to another user")
                    }
                }
            }
            let report = HistoryChecker.check(history, finalTokens: state.buffers.mapValues(\.token))
            #expect(report.passed, "\(report.violations)")
            // The same invariants judged from the history alone, as the chaos run judges a live one.
            #expect(HistoryChecker.check(events, finalTokens: state.buffers.mapValues(\.token)).passed)
            let members = HistoryChecker.checkMemberships(events, graceMilliseconds: 2_000)
            #expect(members.isEmpty, "\(members)")
        }
    }
}
