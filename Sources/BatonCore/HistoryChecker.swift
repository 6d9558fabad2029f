/// Checks guarantees 1-3 of docs/protocol.md (section 11) over a history of ownership changes (the audit rows).
///
/// It is deliberately independent of how the history was produced, so that the
/// same checker judges Baton's store and a naive check-then-act implementation.
public enum HistoryChecker {
    /// One broken invariant.
    public struct Violation: Sendable, Hashable, CustomStringConvertible {
        /// Which invariant.
        public enum Kind: String, Sendable, Hashable {
            /// Invariant 1: a grant was decided while the previous grant was still held.
            case overlappingGrant = "overlapping_grant"
            /// Invariant 2: a grant's token is not above every earlier grant's token.
            case tokenReused = "token_reused"
            /// Invariant 3: the database shows a token lower than one already granted.
            case tokenRegressed = "token_regressed"
            /// A release or expiry that closes no grant, or closes it before it began.
            case unmatchedClose = "unmatched_close"
        }

        /// Which invariant.
        public var kind: Kind
        /// The buffer.
        public var buffer: String
        /// What was seen.
        public var detail: String

        public var description: String { "\(kind.rawValue) on '\(buffer)': \(detail)" }
    }

    /// The verdict over a history.
    public struct Report: Sendable, Hashable {
        /// Grants seen.
        public var grants = 0
        /// Releases and expiries seen.
        public var closes = 0
        /// Grants decided while another grant of the same buffer was still held (invariant 1 or 2 broken).
        public var doubleGrants = 0
        /// Every violation, in buffer order.
        public var violations: [Violation] = []

        /// True when no invariant is broken.
        public var passed: Bool { violations.isEmpty }
    }

    /// Checks `changes` (in any order) and, when given, the final token the database shows per buffer.
    public static func check(_ changes: [OwnershipChange], finalTokens: [ExactString: Int64]? = nil) -> Report {
        var report = Report()
        let byBuffer = Dictionary(grouping: changes) { ExactString($0.buffer) }
        for key in byBuffer.keys.sorted() {
            let buffer = key.string
            let history = byBuffer[key]!.sorted { lhs, rhs in
                // Grants of a token come before the release or expiry of that token.
                (lhs.token, lhs.kind == .granted ? 0 : 1, lhs.at) < (rhs.token, rhs.kind == .granted ? 0 : 1, rhs.at)
            }
            var open: OwnershipChange?  // the grant still held
            var lastGrant: OwnershipChange?
            var lastClose: OwnershipChange?
            for change in history {
                switch change.kind {
                case .granted:
                    report.grants += 1
                    var doubled = false
                    if let previous = lastGrant, change.token <= previous.token {
                        doubled = true
                        report.violations.append(Violation(
                            kind: .tokenReused, buffer: buffer,
                            detail: "token \(change.token) granted to \(change.holder) at \(change.at) after token \(previous.token) was granted to \(previous.holder) at \(previous.at)"
                        ))
                    }
                    if let closed = lastClose, change.at < closed.at {
                        doubled = true
                        report.violations.append(Violation(
                            kind: .overlappingGrant, buffer: buffer,
                            detail: "token \(change.token) granted to \(change.holder) at \(change.at), before token \(closed.token) of \(closed.holder) was \(closed.kind) at \(closed.at)"
                        ))
                    }
                    if let held = open {
                        doubled = true
                        report.violations.append(Violation(
                            kind: .overlappingGrant, buffer: buffer,
                            detail: "token \(change.token) granted to \(change.holder) at \(change.at) while token \(held.token) of \(held.holder) (granted at \(held.at)) was neither released nor expired"
                        ))
                    }
                    if doubled { report.doubleGrants += 1 }
                    open = change
                    lastGrant = change
                case .released, .expired:
                    report.closes += 1
                    guard let held = open, held.token == change.token, held.holder == change.holder, held.at <= change.at else {
                        report.violations.append(Violation(
                            kind: .unmatchedClose, buffer: buffer,
                            detail: "\(change.kind) of token \(change.token) by \(change.holder) at \(change.at) closes no open grant"
                        ))
                        continue
                    }
                    if change.kind == .expired, change.expiresAt > change.at {
                        report.violations.append(Violation(
                            kind: .unmatchedClose, buffer: buffer,
                            detail: "token \(change.token) expired at \(change.at) before its lease ended at \(change.expiresAt)"
                        ))
                    }
                    open = nil
                    lastClose = change
                }
            }
            if let finalTokens, let lastGrant, let final = finalTokens[key], final < lastGrant.token {
                report.violations.append(Violation(
                    kind: .tokenRegressed, buffer: buffer,
                    detail: "the database shows token \(final) after token \(lastGrant.token) was granted"
                ))
            }
        }
        return report
    }
}
