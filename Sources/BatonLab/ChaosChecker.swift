import BatonCore

/// Judges a chaos run: guarantees 1-5 of docs/protocol.md (section 11) over everything that happened.
///
/// The history is what the clients saw (every reply, every call that never got one), the
/// audit rows and final tokens in the database, and what became of the workers. It is
/// independent of how the run was driven, so a test can feed it a broken history and
/// expect `FAIL`.
public enum ChaosChecker {
    /// A grant a client was told about.
    public struct ObservedGrant: Sendable, Hashable {
        public var buffer: String
        public var holder: Holder
        public var token: Int64

        public init(buffer: String, holder: Holder, token: Int64) {
            self.buffer = buffer
            self.holder = holder
            self.token = token
        }
    }

    /// Everything the checker looks at.
    public struct History: Sendable {
        /// Ownership changes from the audit trail (invariants 1-3).
        public var changes: [OwnershipChange]
        /// The token the database shows per buffer at the end (invariant 3).
        public var finalTokens: [ExactString: Int64]
        /// Every `granted` reply clients received (a grant missing from the audit trail was lost).
        public var observedGrants: [ObservedGrant]
        /// Calls made.
        public var operations: Int
        /// Calls that never got an answer, retries included (invariant 4).
        public var unanswered: Int
        /// Faults injected.
        public var faults: Int
        /// Worker processes that died without being killed on purpose (invariant 5).
        public var crashes: Int
        /// Malformed messages sent with a `reply_to` that got no error reply (invariant 5).
        public var unansweredMalformed: Int
        /// Claims seen waiting in line during the run, and the holders that only wait (fair waiting's FIFO
        /// property, ``HistoryChecker/checkLines(_:sightings:waitingHolders:)``).
        public var sightings: [HistoryChecker.LineSighting]
        public var waitingHolders: Set<Holder>
        /// Memberships clients were told they have (`joined`; holder and token), each of which the audit
        /// trail must show as joined or reclaimed (a lost join counts as a lost grant).
        public var observedMemberships: [ObservedGrant]
        /// The deployment's grace of replica ids (``HistoryChecker/checkMemberships(_:graceMilliseconds:)``).
        public var memberGraceMilliseconds: Int64

        public init(
            changes: [OwnershipChange], finalTokens: [ExactString: Int64], observedGrants: [ObservedGrant], operations: Int,
            unanswered: Int, faults: Int, crashes: Int = 0, unansweredMalformed: Int = 0,
            sightings: [HistoryChecker.LineSighting] = [], waitingHolders: Set<Holder> = [],
            observedMemberships: [ObservedGrant] = [], memberGraceMilliseconds: Int64 = Roster.defaultGraceMilliseconds
        ) {
            self.observedMemberships = observedMemberships
            self.memberGraceMilliseconds = memberGraceMilliseconds
            self.sightings = sightings
            self.waitingHolders = waitingHolders
            self.changes = changes
            self.finalTokens = finalTokens
            self.observedGrants = observedGrants
            self.operations = operations
            self.unanswered = unanswered
            self.faults = faults
            self.crashes = crashes
            self.unansweredMalformed = unansweredMalformed
        }
    }

    /// The outcome.
    public struct Verdict: Sendable, CustomStringConvertible {
        public var passed: Bool
        public var operations: Int
        public var faults: Int
        public var doubleGrants: Int
        public var lostGrants: Int
        public var unanswered: Int
        /// Grants that skipped a waiter ahead in the buffer's line.
        public var lineJumps: Int = 0
        /// Replica ids joined while a live member of the buffer held them (protocol section 20).
        public var duplicateReplicaIDs: Int = 0
        /// Invariant violations found in the audit trail (and the lines), for the report.
        public var violations: [HistoryChecker.Violation]

        /// The machine-readable last line.
        public var description: String {
            "verdict=\(passed ? "PASS" : "FAIL") operations=\(operations) faults=\(faults) double_grants=\(doubleGrants) lost_grants=\(lostGrants) unanswered=\(unanswered) line_jumps=\(lineJumps) duplicate_replica_ids=\(duplicateReplicaIDs)"
        }
    }

    /// Judges `history`.
    public static func judge(_ history: History) -> Verdict {
        let report = HistoryChecker.check(history.changes, finalTokens: history.finalTokens)
        var audited = Set<ObservedGrant>()
        for change in history.changes where change.kind == .granted {
            audited.insert(ObservedGrant(buffer: change.buffer, holder: change.holder, token: change.token))
        }
        // A client may see the same grant twice (a re-claim extends with the same token): count distinct ones.
        var lost = Set(history.observedGrants).filter { !audited.contains($0) }.count
        // A membership a client was told it has must be in the history too.
        let joined = Set(history.changes.filter { $0.kind == .memberJoined || $0.kind == .memberReclaimed }.map {
            ObservedGrant(buffer: $0.buffer, holder: $0.holder, token: $0.token)
        })
        lost += Set(history.observedMemberships).filter { !joined.contains($0) }.count
        let members = HistoryChecker.checkMemberships(history.changes, graceMilliseconds: history.memberGraceMilliseconds)
        let duplicates = members.filter { $0.kind == .duplicateReplicaID }.count
        // Two different holders told they hold the same token of a buffer is a double grant too.
        var holdersByToken: [String: Set<Holder>] = [:]
        for grant in history.observedGrants {
            holdersByToken["\(grant.buffer)#\(grant.token)", default: []].insert(grant.holder)
        }
        let observedDoubles = holdersByToken.values.filter { $0.count > 1 }.count
        let doubleGrants = report.doubleGrants + observedDoubles
        let lineJumps = HistoryChecker.checkLines(history.changes, sightings: history.sightings, waitingHolders: history.waitingHolders)
        let passed = report.passed && doubleGrants == 0 && lost == 0 && history.unanswered == 0
            && history.crashes == 0 && history.unansweredMalformed == 0 && lineJumps.isEmpty && members.isEmpty
        return Verdict(
            passed: passed, operations: history.operations, faults: history.faults, doubleGrants: doubleGrants,
            lostGrants: lost, unanswered: history.unanswered, lineJumps: lineJumps.count, duplicateReplicaIDs: duplicates,
            violations: report.violations + lineJumps + members
        )
    }
}
