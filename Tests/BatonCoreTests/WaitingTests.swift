import BatonCore
import Testing

/// Fair waiting in the decision rules (docs/design/fair-waiting.md): lines per buffer, handoff in
/// arrival order with a new token, expired waits, repeats, and leaving the line.
@Suite struct WaitingTests {
    let t0 = Timestamp(milliseconds: 1_000_000)
    let partitioner = try! Partitioner(count: 1)

    func claim(_ id: String, _ user: String, _ connection: String, lease: Int64 = 10_000, wait: Int64? = nil, replyTo: String? = nil, principal: String = "p") -> Request {
        var request = Request(requestID: id, command: .claim(buffer: "b", holder: Holder(user: user, connection: connection), leaseMilliseconds: lease), principal: principal)
        if let wait { request.waiting = Waiting(milliseconds: wait, replyTo: replyTo ?? "amq.gen-\(id)", correlationID: "c-\(id)") }
        return request
    }

    func release(_ id: String, _ connection: String, token: Int64, principal: String = "p") -> Request {
        Request(requestID: id, command: .release(buffer: "b", connection: connection, token: token), principal: principal)
    }

    @Test func tenWaitersAreGrantedInArrivalOrderWithStrictlyIncreasingTokens() {
        var state = PartitionState(partition: 0, partitioner: partitioner)
        #expect(state.decide(claim("a", "ann", "ca"), at: t0).reply?.status == .granted)
        for index in 0..<10 {
            let outcome = state.decide(claim("w\(index)", "u\(index)", "c\(index)", wait: 60_000), at: t0.adding(milliseconds: Int64(index)))
            #expect(outcome.reply == nil && outcome.answers.isEmpty, "joined the line, no answer yet")
        }
        #expect(state.state(of: "b").line.map(\.requestID) == (0..<10).map { "w\($0)" })
        var granted: [(String, Int64)] = []
        var holder = ("ca", Int64(1))
        for step in 0..<10 {
            let outcome = state.decide(release("r\(step)", holder.0, token: holder.1), at: t0.adding(milliseconds: 100 + Int64(step)))
            #expect(outcome.reply?.status == .released)
            #expect(outcome.changes.map(\.kind) == [.released, .granted], "the release hands over in the same decision")
            let answer = try! #require(outcome.answers.first)
            #expect(outcome.answers.count == 1 && answer.reply.status == .granted && answer.waiter.replyTo == "amq.gen-w\(step)")
            granted.append((answer.reply.requestID!, answer.reply.token!))
            holder = (answer.waiter.holder.connection, answer.reply.token!)
        }
        #expect(granted.map(\.0) == (0..<10).map { "w\($0)" }, "arrival order")
        #expect(granted.map(\.1) == Array(2...11), "strictly increasing tokens, one per grant")
        #expect(state.state(of: "b").line.isEmpty)
    }

    /// Issue 22, finding 10: one principal cannot fill a line and take the buffer from everyone else.
    @Test func onePrincipalHasOnePlacePerConnectionAndAShareOfALine() {
        var state = PartitionState(partition: 0, partitioner: partitioner)
        _ = state.decide(claim("a", "ann", "ca"), at: t0)
        // A second waiting claim from the same principal and connection is denied at once.
        #expect(state.decide(claim("m0", "mal", "cm", wait: 60_000, principal: "mallory"), at: t0).reply == nil)
        #expect(state.decide(claim("m0b", "mal", "cm", wait: 60_000, principal: "mallory"), at: t0).reply?.status == .denied)
        // Many connections of one principal: at most its share of the line.
        var joined = 1
        for index in 1..<ProtocolV1.maxLineLength {
            if state.decide(claim("m\(index)", "mal", "cm\(index)", wait: 60_000, principal: "mallory"), at: t0).reply == nil { joined += 1 }
        }
        #expect(joined == ProtocolV1.maxLinePlacesPerPrincipal, "\(joined)")
        // Others still get in line.
        #expect(state.decide(claim("b", "bob", "cb", wait: 60_000, principal: "bob"), at: t0).reply == nil, "another principal joins")
        #expect(state.state(of: "b").line.count == ProtocolV1.maxLinePlacesPerPrincipal + 1)
        // The same connection id under another principal is another place.
        #expect(state.decide(claim("c", "cid", "cm", wait: 60_000, principal: "cid"), at: t0).reply == nil)
    }

    @Test func anotherRequestUnderAWaitersIdIsRefusedEvenAsTheWaiterLeavesTheLine() {
        // The id must keep naming only the waiter: were the other request decided and recorded under it,
        // the waiter's answer could never be recorded, and every later write of the partition would fail.
        for leaving in ["the wait ran out", "the lease ran out"] {
            var state = PartitionState(partition: 0, partitioner: partitioner)
            _ = state.decide(claim("a", "ann", "ca", lease: 1000), at: t0)
            _ = state.decide(claim("x", "xia", "cx", wait: leaving == "the wait ran out" ? 100 : 60_000), at: t0.adding(milliseconds: 1))
            let later = t0.adding(milliseconds: 5000)  // past the wait or the lease, before any sweep
            let before = state.state(of: "b")
            let inspect = state.decide(Request(requestID: "x", command: .inspect(buffer: "b"), principal: "p"), at: later)
            #expect(inspect.reply?.error?.code == .requestIDReused && inspect.answers.isEmpty && inspect.changes.isEmpty, "\(leaving): \(inspect)")
            let other = state.decide(claim("x", "xia", "cx", lease: 2000, wait: 60_000), at: later)
            #expect(other.reply?.error?.code == .requestIDReused && other.answers.isEmpty, "\(leaving): a waiting claim with another body")
            #expect(state.state(of: "b") == before, "\(leaving): nothing decided")
            // The waiter's own repeat still gets its answer, once.
            let repeatOutcome = state.decide(claim("x", "xia", "cx", wait: leaving == "the wait ran out" ? 100 : 60_000), at: later)
            #expect(repeatOutcome.reply?.status == (leaving == "the wait ran out" ? .denied : .granted) && repeatOutcome.answers.isEmpty, "\(leaving): \(repeatOutcome)")
        }
    }

    @Test func aFullLineDeniesAWaitingClaimAtOnce() {
        var state = PartitionState(partition: 0, partitioner: partitioner)
        _ = state.decide(claim("a", "ann", "ca"), at: t0)
        // Filled by four principals, each to its share.
        let principals = ProtocolV1.maxLineLength / ProtocolV1.maxLinePlacesPerPrincipal
        for index in 0..<ProtocolV1.maxLineLength {
            #expect(state.decide(claim("w\(index)", "u\(index)", "c\(index)", wait: 60_000, principal: "p\(index % principals)"), at: t0).reply == nil)
        }
        let full = state.decide(claim("late", "lee", "cl", wait: 60_000, principal: "other"), at: t0.adding(milliseconds: 1))
        #expect(full.reply?.status == .denied && full.reply?.holder?.user == "ann", "denied at once, with the holder")
        #expect(state.state(of: "b").line.count == ProtocolV1.maxLineLength && state.state(of: "b").line.last?.requestID == "w\(ProtocolV1.maxLineLength - 1)")
        // A repeat of a waiter already in line is still a repeat, not a new claim refused by the full line.
        #expect(state.decide(claim("w3", "u3", "c3", wait: 60_000, replyTo: "amq.gen-new", principal: "p\(3 % principals)"), at: t0.adding(milliseconds: 2)).reply == nil)
        #expect(state.decide(release("r", "ca", token: 1), at: t0.adding(milliseconds: 3)).answers.first?.waiter.requestID == "w0")
    }

    @Test func anExpiredLeaseGoesToTheHeadOfTheLineNotToAClaimThatArrivesLater() {
        var state = PartitionState(partition: 0, partitioner: partitioner)
        _ = state.decide(claim("a", "ann", "ca", lease: 1000), at: t0)
        _ = state.decide(claim("w", "wes", "cw", wait: 60_000), at: t0.adding(milliseconds: 10))
        // After the lease ran out and before any sweep, someone else claims without waiting.
        let late = state.decide(claim("x", "xia", "cx"), at: t0.adding(milliseconds: 1500))
        #expect(late.answers.map(\.reply.status) == [.granted] && late.answers.first?.waiter.requestID == "w")
        #expect(late.changes.map(\.kind) == [.expired, .granted])
        #expect(late.reply?.status == .denied && late.reply?.holder?.user == "wes", "no barging past the line")

        // The sweep hands over too.
        var swept = PartitionState(partition: 0, partitioner: partitioner)
        _ = swept.decide(claim("a", "ann", "ca", lease: 1000), at: t0)
        _ = swept.decide(claim("w", "wes", "cw", wait: 60_000), at: t0.adding(milliseconds: 10))
        let sweep = swept.sweepWithLines(at: t0.adding(milliseconds: 1000))
        #expect(sweep.changes.map(\.kind) == [.expired, .granted] && sweep.answers.map(\.reply.token) == [2])
    }

    @Test func aWaitThatRunsOutIsDeniedAndAClaimWithoutWaitNeverJoins() {
        var state = PartitionState(partition: 0, partitioner: partitioner)
        _ = state.decide(claim("a", "ann", "ca"), at: t0)
        #expect(state.decide(claim("n", "nia", "cn"), at: t0).reply?.status == .denied, "no wait: denied at once")
        _ = state.decide(claim("w", "wes", "cw", wait: 500), at: t0.adding(milliseconds: 1))
        #expect(state.state(of: "b").line.count == 1)
        let sweep = state.sweepWithLines(at: t0.adding(milliseconds: 501))
        #expect(sweep.answers.map(\.reply.status) == [.denied] && sweep.answers.first?.reply.holder?.user == "ann")
        #expect(sweep.changes.isEmpty && state.state(of: "b").line.isEmpty)
        // A wait capped by the claim's deadline.
        var capped = claim("d", "dee", "cd", wait: 60_000)
        capped.deadline = t0.adding(milliseconds: 2000)
        _ = state.decide(capped, at: t0.adding(milliseconds: 600))
        #expect(state.state(of: "b").line.first?.waitUntil == t0.adding(milliseconds: 2000))
    }

    @Test func aRepeatOfAWaitingClaimDoesNotJoinTwiceAndTakesTheNewReplyAddress() {
        var state = PartitionState(partition: 0, partitioner: partitioner)
        _ = state.decide(claim("a", "ann", "ca"), at: t0)
        _ = state.decide(claim("w", "wes", "cw", wait: 60_000, replyTo: "amq.gen-old"), at: t0)
        let repeated = state.decide(claim("w", "wes", "cw", wait: 60_000, replyTo: "amq.gen-new"), at: t0.adding(milliseconds: 5))
        #expect(repeated.reply == nil && state.state(of: "b").line.count == 1)
        #expect(state.state(of: "b").line.first?.replyTo == "amq.gen-new")
        // Another request under the same id is refused and changes nothing.
        let reused = state.decide(claim("w", "wes", "other", wait: 60_000), at: t0.adding(milliseconds: 6))
        #expect(reused.reply?.error?.code == .requestIDReused && state.state(of: "b").line.count == 1)
        let handoff = state.decide(release("r", "ca", token: 1), at: t0.adding(milliseconds: 10))
        #expect(handoff.answers.first?.waiter.replyTo == "amq.gen-new", "answered on the new channel")
    }

    @Test func releaseConnectionTakesTheConnectionsWaitersOutOfLineAndHandsItsBuffersOver() {
        var state = PartitionState(partition: 0, partitioner: partitioner)
        _ = state.decide(claim("a", "ann", "ca"), at: t0)
        _ = state.decide(claim("w1", "wes", "gone", wait: 60_000), at: t0)
        _ = state.decide(claim("w2", "zed", "cz", wait: 60_000), at: t0)
        // Another principal cannot take wes's waiter out of line.
        let foreign = state.decide(Request(requestID: "x", command: .releaseConnection(connection: "gone"), principal: "intruder"), at: t0)
        #expect(foreign.answers.isEmpty && state.state(of: "b").line.count == 2)
        let left = state.decide(Request(requestID: "l", command: .releaseConnection(connection: "gone"), principal: "p"), at: t0.adding(milliseconds: 1))
        #expect(left.answers.map(\.reply.status) == [.denied] && left.reply?.releasedCount == 0)
        let released = state.decide(Request(requestID: "r", command: .releaseConnection(connection: "ca"), principal: "p"), at: t0.adding(milliseconds: 2))
        #expect(released.reply?.buffers == ["b"] && released.reply?.releasedCount == 1)
        #expect(released.answers.map(\.waiter.requestID) == ["w2"] && released.changes.map(\.kind) == [.released, .granted])
    }

    /// Random histories: every grant to a waiter follows the order waiters joined each buffer's line,
    /// tokens strictly increase, and no request is answered twice.
    @Test func randomHistoriesKeepTheLineInOrder() {
        var generator = SplitMix(seed: 42)
        var handoffs = 0
        defer { #expect(handoffs > 200, "the histories hand buffers over from lines (\(handoffs) times)") }
        for _ in 0..<200 {
            var state = PartitionState(partition: 0, partitioner: partitioner)
            var now = t0
            var joined: [String] = []
            var grantedFromLine: [String] = []
            var answered = Set<String>()
            var lastToken: Int64 = 0
            var holders: [String: Int64] = [:]  // connection → token
            func record(_ outcome: Outcome) {
                for answer in outcome.answers {
                    #expect(answered.insert(answer.waiter.requestID).inserted, "answered once")
                    if answer.reply.status == .granted {
                        grantedFromLine.append(answer.waiter.requestID)
                        holders[answer.waiter.holder.connection] = answer.reply.token
                    }
                }
                for change in outcome.changes where change.kind == .granted {
                    #expect(change.token > lastToken)
                    lastToken = change.token
                }
                if let reply = outcome.reply, reply.status == .granted, let holder = reply.holder { holders[holder.connection] = reply.token }
            }
            for step in 0..<60 {
                now = now.adding(milliseconds: Int64(generator.next() % 400))
                let connection = "c\(generator.next() % 6)"
                switch generator.next() % 4 {
                case 0, 1:
                    let id = "q\(step)"
                    let waits = generator.next() % 2 == 0
                    let outcome = state.decide(claim(id, "u-\(connection)", connection, lease: 1000, wait: waits ? Int64(500 + generator.next() % 3000) : nil), at: now)
                    if waits, outcome.reply == nil { joined.append(id) }
                    record(outcome)
                case 2:
                    if let token = holders[connection] {
                        record(state.decide(release("r\(step)", connection, token: token), at: now))
                        holders[connection] = nil
                    }
                default:
                    record(state.sweepWithLines(at: now))
                }
            }
            // Grants from the line keep the order of joining (denied waiters drop out, nobody overtakes).
            handoffs += grantedFromLine.count
            let order = joined.filter(grantedFromLine.contains)
            #expect(order == grantedFromLine, "FIFO: \(grantedFromLine) joined as \(joined)")
        }
    }
}

/// A small deterministic generator for the random histories.
struct SplitMix: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

extension WaitingTests {
    @Test func aRepeatThatArrivesAsItsWaitEndsGetsThatAnswerAndDoesNotJoinAgain() {
        var state = PartitionState(partition: 0, partitioner: partitioner)
        _ = state.decide(claim("a", "ann", "ca", lease: 1000), at: t0)
        _ = state.decide(claim("w", "wes", "cw", wait: 500), at: t0)
        let late = state.decide(claim("w", "wes", "cw", wait: 500, replyTo: "amq.gen-again"), at: t0.adding(milliseconds: 600))
        #expect(late.reply?.status == .denied && late.answers.isEmpty, "answered once, to the repeat")
        #expect(state.state(of: "b").line.isEmpty, "not in line again")
        // The same when the buffer is handed to it at the moment its repeat arrives.
        _ = state.decide(claim("v", "vic", "cv", wait: 60_000), at: t0.adding(milliseconds: 700))
        let handed = state.decide(claim("v", "vic", "cv", wait: 60_000), at: t0.adding(milliseconds: 1000))
        #expect(handed.reply?.status == .granted && handed.reply?.token == 2 && handed.answers.isEmpty)
        #expect(handed.changes.map(\.kind) == [.expired, .granted])
    }
}
