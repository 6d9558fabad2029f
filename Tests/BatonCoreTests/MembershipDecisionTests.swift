import BatonCore
import Testing

/// `join` and `leave` decided by the partition (docs/design/replica-slots.md): the roster's rules inside the
/// buffer's decision, with tokens from the buffer's one sequence, leases and memberships independent, and
/// `release_connection` and the sweep ending memberships into their grace.
@Suite struct MembershipDecisionTests {
    let t0 = Timestamp(milliseconds: 1_000_000)
    let partitioner = try! Partitioner(count: 1)
    let ann = Holder(user: "ann", connection: "c-ann")

    func request(_ id: String, _ command: Command, principal: String = "p") -> Request { Request(requestID: id, command: command, principal: principal) }
    func join(_ user: String, _ connection: String, lease: Int64 = 10_000) -> Command {
        .join(buffer: "b", user: user, connection: connection, leaseMilliseconds: lease)
    }

    @Test func joinsTakeTheSmallestFreeIdAndTokensFromTheBuffersSequence() {
        var state = PartitionState(partition: 0, partitioner: partitioner)
        let claimed = state.decide(request("c1", .claim(buffer: "b", holder: ann, leaseMilliseconds: 10_000)), at: t0)
        #expect(claimed.reply?.token == 1)
        let first = state.decide(request("j1", join("ann", "c-ann")), at: t0)
        #expect(first.reply?.status == .joined && first.reply?.token == 2 && first.reply?.membership == MembershipReply(replicaID: 1, members: 1))
        #expect(first.reply?.expiresAt == t0.adding(milliseconds: 10_000))
        #expect(first.memberships.map(\.kind) == [.joined] && first.memberships.first?.buffer == "b")
        let second = state.decide(request("j2", join("bob", "c-bob")), at: t0)
        #expect(second.reply?.token == 3 && second.reply?.membership?.replicaID == 2 && second.reply?.membership?.members == 2)
        // The lease is untouched by memberships, and its renewal still names its own token.
        #expect(state.state(of: "b").holder == ann && state.state(of: "b").token == 1 && state.state(of: "b").issued == 3)
        #expect(state.decide(request("r1", .renew(buffer: "b", connection: "c-ann", token: 1, leaseMilliseconds: 5_000)), at: t0).reply?.status == .renewed)
        // A release of the lease leaves the roster; the next grant continues the sequence after the memberships.
        #expect(state.decide(request("x1", .release(buffer: "b", connection: "c-ann", token: 1)), at: t0).reply?.status == .released)
        #expect(state.state(of: "b").roster.live(at: t0).count == 2)
        let regranted = state.decide(request("c2", .claim(buffer: "b", holder: ann, leaseMilliseconds: 10_000)), at: t0)
        #expect(regranted.reply?.token == 4)
    }

    @Test func aRepeatedJoinExtendsAndALeaveFreesTheIdAtOnce() {
        var state = PartitionState(partition: 0, partitioner: partitioner)
        let joined = state.decide(request("j1", join("ann", "c-ann", lease: 1_000)), at: t0)
        let again = state.decide(request("j2", join("ann", "c-ann", lease: 5_000)), at: t0.adding(milliseconds: 500))
        #expect(again.reply?.token == joined.reply?.token && again.reply?.membership?.replicaID == 1 && again.memberships.isEmpty)
        #expect(again.reply?.expiresAt == t0.adding(milliseconds: 5_500))
        // Another user on a connection that is a live member: refused, nothing changes.
        let before = state.state(of: "b")
        let other = state.decide(request("j3", join("bob", "c-ann")), at: t0.adding(milliseconds: 600))
        #expect(other.reply?.error?.code == .invalidRequest && state.state(of: "b") == before)
        #expect(other.reply?.error?.message.contains("one connection joins as one user") == true)
        // A leave needs the membership's token and principal.
        #expect(state.decide(request("l0", .leave(buffer: "b", connection: "c-ann", token: 99)), at: t0.adding(milliseconds: 700)).reply?.status == .notMember)
        #expect(state.decide(request("l1", .leave(buffer: "b", connection: "c-ann", token: joined.reply!.token!), principal: "q"), at: t0.adding(milliseconds: 700)).reply?.status == .notMember)
        let left = state.decide(request("l2", .leave(buffer: "b", connection: "c-ann", token: joined.reply!.token!)), at: t0.adding(milliseconds: 700))
        #expect(left.reply?.status == .left && left.reply?.membership == MembershipReply(replicaID: 1, members: 0) && left.memberships.map(\.kind) == [.left])
        // No grace after a leave: the id goes to the next one.
        #expect(state.decide(request("j4", join("bob", "c-bob")), at: t0.adding(milliseconds: 800)).reply?.membership?.replicaID == 1)
    }

    @Test func aMembershipRenewsWithItsToken() {
        var state = PartitionState(partition: 0, partitioner: partitioner)
        let token = state.decide(request("j1", join("ann", "c-ann", lease: 1_000)), at: t0).reply!.token!
        let renewed = state.decide(request("r1", .renew(buffer: "b", connection: "c-ann", token: token, leaseMilliseconds: 9_000)), at: t0.adding(milliseconds: 900))
        #expect(renewed.reply?.status == .renewed && renewed.reply?.token == token && renewed.reply?.membership?.replicaID == 1)
        #expect(renewed.reply?.expiresAt == t0.adding(milliseconds: 9_900) && renewed.reply?.holder == nil)
        let late = state.decide(request("r2", .renew(buffer: "b", connection: "c-ann", token: token, leaseMilliseconds: 9_000)), at: t0.adding(milliseconds: 9_900))
        #expect(late.reply?.status == .notOwner, "an expired membership is not renewed")
    }

    @Test func expiredAndReleasedMembersKeepTheirIdsForTheGrace() {
        var state = PartitionState(partition: 0, partitioner: partitioner, graceMilliseconds: 5_000)
        _ = state.decide(request("j1", join("ann", "c-ann", lease: 1_000)), at: t0)
        _ = state.decide(request("j2", join("bob", "c-bob", lease: 60_000)), at: t0)
        let swept = state.sweepWithLines(at: t0.adding(milliseconds: 1_000))
        #expect(swept.memberships.map(\.kind) == [.expired] && swept.memberships.first?.reservedUntil == t0.adding(milliseconds: 6_000))
        #expect(swept.memberships.first?.buffer == "b")
        // Ann's id 1 is kept for her: a new user gets 3, Ann (from another connection) gets 1 back.
        #expect(state.decide(request("j3", join("cat", "c-cat")), at: t0.adding(milliseconds: 2_000)).reply?.membership?.replicaID == 3)
        let back = state.decide(request("j4", join("ann", "c-ann-2")), at: t0.adding(milliseconds: 3_000))
        #expect(back.reply?.membership == MembershipReply(replicaID: 1, members: 3, reclaimed: true) && back.memberships.map(\.kind) == [.reclaimed])
        // release_connection ends the requester's own memberships only, into the grace.
        let foreign = state.decide(request("rc0", .releaseConnection(connection: "c-bob"), principal: "q"), at: t0.adding(milliseconds: 3_000))
        #expect(foreign.memberships.isEmpty && state.state(of: "b").roster.live(at: t0.adding(milliseconds: 3_000)).count == 3)
        let released = state.decide(request("rc1", .releaseConnection(connection: "c-bob")), at: t0.adding(milliseconds: 3_000))
        #expect(released.memberships.map(\.kind) == [.released] && released.memberships.first?.member.replicaID == 2)
        #expect(released.reply?.releasedCount == 0, "no lease was released")
        #expect(state.decide(request("j5", join("dan", "c-dan")), at: t0.adding(milliseconds: 4_000)).reply?.membership?.replicaID == 4)
        // Past the grace, Bob's id is free again.
        #expect(state.decide(request("j6", join("eve", "c-eve")), at: t0.adding(milliseconds: 8_000)).reply?.membership?.replicaID == 2)
    }

    @Test func aFullRosterRefusesTheNextJoinAndChangesNothing() {
        var roster = Roster()
        var token: Int64 = 0
        for index in 0..<Roster.maxMembers {
            _ = roster.join(user: "u\(index)", connection: "c\(index)", principal: "p\(index % 2)", leaseMilliseconds: 60_000, now: t0, graceMilliseconds: 0, nextToken: {
                token += 1
                return token
            })
        }
        var full = BufferState.fresh
        full.roster = roster
        full.issued = token
        var state = PartitionState(partition: 0, partitioner: partitioner, buffers: ["b": full])
        let refused = state.decide(request("j", join("late", "c-late")), at: t0)
        #expect(refused.reply?.error?.code == .membersFull && state.state(of: "b") == full)
        #expect(refused.reply?.error?.message.contains("1024 live members") == true)
    }

    /// A frontend that joins half of a buffer's places is refused its next join, naming its principal and
    /// the limit, while another frontend's user joins the same buffer.
    @Test func onePrincipalsHalfOfTheRosterRefusesItsNextJoinAndNotAnothers() {
        var state = PartitionState(partition: 0, partitioner: partitioner)
        for index in 0..<Roster.maxMembersPerPrincipal {
            _ = state.decide(request("h\(index)", join("u\(index)", "c\(index)"), principal: "hog"), at: t0)
        }
        let before = state.state(of: "b")
        let refused = state.decide(request("h-more", join("more", "c-more"), principal: "hog"), at: t0)
        #expect(refused.reply?.error?.code == .membersFull && state.state(of: "b") == before)
        #expect(refused.reply?.error?.message.contains("principal 'hog' has joined 512 live members") == true, "\(refused.reply?.error?.message ?? "")")
        let other = state.decide(request("o", join("olga", "c-olga"), principal: "honest"), at: t0)
        #expect(other.reply?.membership?.replicaID == Roster.maxMembersPerPrincipal + 1)
    }

    /// A `state` reply lists members only up to a byte budget, so that long names cannot make it larger
    /// than the broker takes (131,072 bytes): the count stays complete.
    @Test func inspectListsMembersWithinAByteBudget() {
        var state = PartitionState(partition: 0, partitioner: partitioner)
        let long = String(repeating: "\u{1F600}", count: 256)  // 1 KiB of UTF-8
        for index in 0..<64 {
            let reply = state.decide(request("j\(index)", join("\(long)-\(index)", "\(long)-c\(index)")), at: t0).reply
            #expect(reply?.status == .joined)
        }
        let inspected = state.decide(request("i", .inspect(buffer: "b")), at: t0).reply!
        #expect(inspected.roster?.count == 64 && (inspected.roster?.listed.count ?? 0) < 64 && (inspected.roster?.listed.count ?? 0) >= 1)
        #expect(inspected.roster?.listed.first?.replicaID == 1, "the first by id")
        #expect(ProtocolCodec.encode(inspected).count < 32 * 1024)
        var short = PartitionState(partition: 0, partitioner: partitioner)
        for index in 0..<70 { _ = short.decide(request("s\(index)", join("u\(index)", "c\(index)")), at: t0) }
        let listed = short.decide(request("i", .inspect(buffer: "b")), at: t0).reply?.roster
        #expect(listed?.count == 70 && listed?.listed.count == 64)
    }

    /// `join` and `leave` on the wire (revision 6): parsed with their fields, refused with anything else,
    /// listed by `describe`; a membership's reply written and read back.
    @Test func joinAndLeaveAreOnTheWire() throws {
        let join = #"{"v":1,"op":"join","request_id":"r","buffer":"b","user":"u","connection":"c","lease_ms":5000}"#
        #expect(try ProtocolCodec.decodeRequest(Array(join.utf8)).command == .join(buffer: "b", user: "u", connection: "c", leaseMilliseconds: 5000))
        let leave = #"{"v":1,"op":"leave","request_id":"r","buffer":"b","connection":"c","token":7}"#
        #expect(try ProtocolCodec.decodeRequest(Array(leave.utf8)).command == .leave(buffer: "b", connection: "c", token: 7))
        let withToken = #"{"v":1,"op":"join","request_id":"r","buffer":"b","user":"u","connection":"c","token":1}"#
        do {
            _ = try ProtocolCodec.decodeRequest(Array(withToken.utf8))
            Issue.record("a join with a token was accepted")
        } catch {
            #expect(error.code == .invalidRequest && error.message.contains("'token' is not allowed for op 'join'"), "\(error)")
        }
        let request = Request(requestID: "r", command: .join(buffer: "b", user: "u", connection: "c", leaseMilliseconds: 5000))
        #expect(try ProtocolCodec.decodeRequest(ProtocolCodec.encode(request)) == request)
        #expect(DeploymentDescription(partitions: 1).ops.suffix(2) == ["join", "leave"])
        let reply = Reply(
            requestID: "r", status: .joined, buffer: "b", token: 7, expiresAt: t0, at: t0, partition: 0,
            membership: MembershipReply(replicaID: 3, members: 5, reclaimed: true)
        )
        #expect(try ProtocolCodec.decodeReply(ProtocolCodec.encode(reply)) == reply)
    }
}
