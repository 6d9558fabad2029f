import BatonCore
import PropertyBased
import Testing

/// Issue 23: replica ids decided by the serializer, with a reconnect grace (``Roster``).
@Suite struct RosterTests {
    static let t0 = Timestamp(milliseconds: 1_700_000_000_000)
    static let grace: Int64 = 30_000

    /// A token sequence as a buffer keeps one.
    final class Tokens {
        var last: Int64 = 0
        func next() -> Int64 {
            last += 1
            return last
        }
    }

    static func join(_ roster: inout Roster, _ user: String, _ connection: String, at now: Timestamp, lease: Int64 = 10_000, tokens: Tokens) -> Roster.JoinOutcome {
        roster.join(user: user, connection: connection, principal: "p", leaseMilliseconds: lease, now: now, graceMilliseconds: grace, nextToken: tokens.next).outcome
    }

    static func member(_ outcome: Roster.JoinOutcome) -> Roster.Member? {
        if case .joined(let member, _, _) = outcome { return member }
        return nil
    }

    @Test func joinsGetTheSmallestFreeIDsAndAFreshToken() {
        var roster = Roster()
        let tokens = Tokens()
        let a = Self.member(Self.join(&roster, "ann", "a", at: Self.t0, tokens: tokens))
        let b = Self.member(Self.join(&roster, "bob", "b", at: Self.t0, tokens: tokens))
        let c = Self.member(Self.join(&roster, "cat", "c", at: Self.t0, tokens: tokens))
        #expect([a?.replicaID, b?.replicaID, c?.replicaID] == [1, 2, 3])
        #expect([a?.token, b?.token, c?.token] == [1, 2, 3])
        // A leave frees its id at once: the next join takes it.
        #expect(roster.leave(connection: "b", token: 2, principal: "p", now: Self.t0)?.kind == .left)
        let d = Self.member(Self.join(&roster, "dan", "d", at: Self.t0, tokens: tokens))
        #expect(d?.replicaID == 2 && d?.token == 4)
    }

    @Test func aRepeatedJoinExtendsAndKeepsIDAndToken() {
        var roster = Roster()
        let tokens = Tokens()
        let first = Self.member(Self.join(&roster, "ann", "a", at: Self.t0, tokens: tokens))
        let again = Self.join(&roster, "ann", "a", at: Self.t0.adding(milliseconds: 5_000), tokens: tokens)
        guard case .joined(let member, let extended, _) = again else {
            Issue.record("the repeat was not joined: \(again)")
            return
        }
        #expect(extended && member.replicaID == first?.replicaID && member.token == first?.token)
        #expect(member.expiresAt == Self.t0.adding(milliseconds: 15_000))
        #expect(tokens.last == 1, "no token issued for an extension")
        // The same connection under another user is refused, not given a second id.
        guard case .connectionInUse = Self.join(&roster, "bob", "a", at: Self.t0, tokens: tokens) else {
            Issue.record("a live member's connection joined as another user")
            return
        }
    }

    @Test func anExpiredMembersIDWaitsForItsUserThroughTheGrace() {
        var roster = Roster()
        let tokens = Tokens()
        _ = Self.join(&roster, "ann", "a1", at: Self.t0, lease: 1_000, tokens: tokens)
        _ = Self.join(&roster, "bob", "b", at: Self.t0, tokens: tokens)
        let later = Self.t0.adding(milliseconds: 5_000)
        // Someone else does not get ann's id while it is reserved.
        let cat = Self.member(Self.join(&roster, "cat", "c", at: later, tokens: tokens))
        #expect(cat?.replicaID == 3)
        // Ann, back within the grace on a new connection, gets hers.
        let back = Self.join(&roster, "ann", "a2", at: later, tokens: tokens)
        guard case .joined(let ann, false, true) = back else {
            Issue.record("ann did not reclaim her id: \(back)")
            return
        }
        #expect(ann.replicaID == 1 && ann.token == 4)
    }

    @Test func theGraceEndsAndTheIDIsFreeAgain() {
        var roster = Roster()
        let tokens = Tokens()
        _ = Self.join(&roster, "ann", "a", at: Self.t0, lease: 1_000, tokens: tokens)
        let changes = roster.expire(now: Self.t0.adding(milliseconds: 1_000), graceMilliseconds: Self.grace)
        #expect(changes.map(\.kind) == [.expired] && changes.first?.reservedUntil == Self.t0.adding(milliseconds: 31_000))
        let justBefore = Self.member(Self.join(&roster, "bob", "b", at: Self.t0.adding(milliseconds: 30_999), tokens: tokens))
        #expect(justBefore?.replicaID == 2)
        let after = Self.member(Self.join(&roster, "cat", "c", at: Self.t0.adding(milliseconds: 31_000), tokens: tokens))
        #expect(after?.replicaID == 1)
    }

    @Test func aReleasedConnectionReservesEveryMembershipOfIt() {
        var roster = Roster()
        let tokens = Tokens()
        _ = Self.join(&roster, "ann", "shared", at: Self.t0, tokens: tokens)
        _ = Self.join(&roster, "bob", "b", at: Self.t0, tokens: tokens)
        let released = roster.releaseConnection("shared", principal: "p", now: Self.t0.adding(milliseconds: 100), graceMilliseconds: Self.grace)
        #expect(released.map(\.kind) == [.released] && released.first?.member.replicaID == 1)
        #expect(roster.live(at: Self.t0.adding(milliseconds: 100)).map(\.replicaID) == [2])
        #expect(Self.member(Self.join(&roster, "cat", "c", at: Self.t0.adding(milliseconds: 200), tokens: tokens))?.replicaID == 3)
        #expect(Self.member(Self.join(&roster, "ann", "new", at: Self.t0.adding(milliseconds: 300), tokens: tokens))?.replicaID == 1)
    }

    @Test func leaveAndRenewNeedTheMembershipsToken() {
        var roster = Roster()
        let tokens = Tokens()
        _ = Self.join(&roster, "ann", "a", at: Self.t0, tokens: tokens)
        #expect(roster.renew(connection: "a", token: 2, principal: "p", leaseMilliseconds: 10_000, now: Self.t0) == nil)
        #expect(roster.leave(connection: "a", token: 2, principal: "p", now: Self.t0) == nil)
        #expect(roster.leave(connection: "a", token: 1, principal: "someone else", now: Self.t0) == nil)
        #expect(roster.renew(connection: "a", token: 1, principal: "p", leaseMilliseconds: 20_000, now: Self.t0)?.expiresAt == Self.t0.adding(milliseconds: 20_000))
        #expect(roster.leave(connection: "a", token: 1, principal: "p", now: Self.t0) != nil)
        #expect(roster.isEmpty(at: Self.t0), "a leave keeps no reservation")
    }

    static func join(_ roster: inout Roster, _ user: String, _ connection: String, as principal: String, at now: Timestamp, tokens: Tokens) -> Roster.JoinOutcome {
        roster.join(user: user, connection: connection, principal: principal, leaseMilliseconds: 10_000, now: now, graceMilliseconds: grace, nextToken: tokens.next).outcome
    }

    @Test func atMostMaxMembersAreLive() {
        var roster = Roster()
        let tokens = Tokens()
        // Two frontends (principals) fill the roster between them.
        for index in 0..<Roster.maxMembers {
            _ = Self.join(&roster, "u\(index)", "c\(index)", as: "p\(index % 2)", at: Self.t0, tokens: tokens)
        }
        #expect(roster.live(at: Self.t0).count == Roster.maxMembers)
        #expect(Self.join(&roster, "late", "late", as: "p2", at: Self.t0, tokens: tokens) == .full)
        // One leaves: the next join is taken again, with the freed id.
        _ = roster.leave(connection: "c7", token: 8, principal: "p1", now: Self.t0)
        #expect(Self.member(Self.join(&roster, "late", "late", as: "p2", at: Self.t0, tokens: tokens))?.replicaID == 8)
    }

    /// One principal (one frontend's broker user) holds at most half of a buffer's places: the other half
    /// stays open to other frontends' users however many this one joins; its own next join is refused
    /// until one of its members leaves or expires.
    @Test func onePrincipalHoldsAtMostHalfOfTheRoster() {
        var roster = Roster()
        let tokens = Tokens()
        for index in 0..<Roster.maxMembersPerPrincipal {
            #expect(Self.member(Self.join(&roster, "u\(index)", "c\(index)", as: "hog", at: Self.t0, tokens: tokens)) != nil)
        }
        #expect(Self.join(&roster, "one-more", "c-more", as: "hog", at: Self.t0, tokens: tokens) == .fullForPrincipal)
        #expect(roster.live(at: Self.t0).count == Roster.maxMembersPerPrincipal, "nothing changed")
        // A repeat by a member's connection extends: not a new place.
        if case .joined(_, let extended, _) = Self.join(&roster, "u0", "c0", as: "hog", at: Self.t0, tokens: tokens) {
            #expect(extended)
        } else {
            Issue.record("a member's repeat was refused")
        }
        // Another frontend still gets every remaining place.
        for index in 0..<(Roster.maxMembers - Roster.maxMembersPerPrincipal) {
            #expect(Self.member(Self.join(&roster, "v\(index)", "d\(index)", as: "honest", at: Self.t0, tokens: tokens)) != nil)
        }
        #expect(Self.join(&roster, "w", "e", as: "honest", at: Self.t0, tokens: tokens) == .full)
        // The hog's member leaves: the hog may join one again.
        #expect(roster.leave(connection: "c3", token: 4, principal: "hog", now: Self.t0) != nil)
        #expect(Self.member(Self.join(&roster, "one-more", "c-more", as: "hog", at: Self.t0, tokens: tokens))?.replicaID == 4)
    }

    /// Random joins, leaves, renewals, released connections and sweeps by a few users on a few
    /// connections with a moving clock: no two live members share an id, no id reserved for a user is
    /// held by anyone else, a fresh join takes the smallest free id, a user back within the grace gets
    /// its id, and tokens only grow.
    @Test func invariantsHoldOverRandomHistories() async {
        let steps = Gen.int(in: 0...999_999).array(of: 1...200)
        await propertyCheck(count: 300, input: steps) { codes in
            var roster = Roster()
            let tokens = Tokens()
            var now = Self.t0
            var lastToken: [String: Int64] = [:]
            for code in codes {
                var rest = code
                func take(_ n: Int) -> Int { defer { rest /= n }; return rest % n }
                let op = take(5)
                let connection = "c\(take(5))"
                let user = "u\(take(3))"
                let lease = Int64(1 + take(3)) * 1_000
                now = now.adding(milliseconds: Int64(take(4)) * 700)
                // What a join finds: the memberships expired by now already turned into reservations.
                var swept = roster
                _ = swept.expire(now: now, graceMilliseconds: 3_000)
                let reservedBefore = swept.reservations.filter { now < $0.until }
                let liveBefore = swept.live(at: now)
                switch op {
                case 0:
                    let (outcome, _) = roster.join(
                        user: user, connection: connection, principal: nil, leaseMilliseconds: lease, now: now, graceMilliseconds: 3_000, nextToken: tokens.next
                    )
                    if case .joined(let member, let extended, let reclaimed) = outcome, !extended {
                        if let mine = reservedBefore.filter({ $0.user == user }).map(\.replicaID).min() {
                            #expect(reclaimed && member.replicaID == mine, "a user within its grace gets its reserved id")
                        } else {
                            let taken = Set(liveBefore.map(\.replicaID) + reservedBefore.map(\.replicaID))
                            #expect(member.replicaID == (1...).first { !taken.contains($0) }!, "a fresh join takes the smallest free id")
                        }
                        #expect(member.token > (lastToken.values.max() ?? 0), "tokens only grow")
                        lastToken[connection] = member.token
                    }
                case 1:
                    _ = roster.leave(connection: connection, token: lastToken[connection] ?? 0, principal: nil, now: now)
                case 2:
                    _ = roster.renew(connection: connection, token: lastToken[connection] ?? 0, principal: nil, leaseMilliseconds: lease, now: now)
                case 3:
                    _ = roster.releaseConnection(connection, principal: nil, now: now, graceMilliseconds: 3_000)
                default:
                    _ = roster.expire(now: now, graceMilliseconds: 3_000)
                }
                let live = roster.live(at: now)
                #expect(Set(live.map(\.replicaID)).count == live.count, "no two live members share an id")
                #expect(live.allSatisfy { $0.replicaID >= 1 })
                for reservation in roster.reservations where now < reservation.until {
                    #expect(!live.contains { $0.replicaID == reservation.replicaID }, "a reserved id is held by nobody")
                }
                #expect(Set(roster.reservations.map(\.replicaID)).count == roster.reservations.count, "one reservation per id")
                #expect(live.count <= Roster.maxMembers)
            }
        }
    }
}
