import BatonCore
@testable import BatonPostgres
import Testing

/// The store's typed rows: a missing, NULL or malformed column throws an error that names it, instead of
/// decoding as a default.
@Suite struct StoreRowsTests {
    @Test func anAuditRowWithAnUnknownKindIsRefusedNotReadAsGranted() {
        let row = PostgresRow(["stolen", "a.txt", "u", "c", "3", "1000", "2000", "f", nil], source: "baton_outbox")
        #expect(throws: PostgresError.self) { try OwnershipChange(row: row, from: 0, principal: false) }
        do {
            _ = try OwnershipChange(row: row, from: 0, principal: false)
        } catch {
            #expect("\(error)".contains("unknown kind 'stolen'"))
        }
        let good = PostgresRow(["released", "a.txt", "u", "c", "3", "1000", "2000", "t", nil, "alice"], source: "baton_outbox")
        let change = try? OwnershipChange(row: good, from: 0, principal: true)
        #expect(change?.kind == .released && change?.token == 3 && change?.forced == true && change?.principal == "alice" && change?.replicaID == nil)
        let member = PostgresRow(["member_joined", "a.txt", "u", "c", "4", "1000", "31000", "f", "2"], source: "baton_outbox")
        let joined = try? OwnershipChange(row: member, from: 0, principal: false)
        #expect(joined?.kind == .memberJoined && joined?.replicaID == 2 && !(joined?.kind.isOwnership ?? true))
    }

    @Test func malformedAndMissingColumnsAreNamed() throws {
        let noToken = PostgresRow(["granted", "a.txt", "u", "c", nil, "1000", "2000", "f", nil], source: "baton_outbox")
        #expect(throws: PostgresError.self) { try OwnershipChange(row: noToken, from: 0, principal: false) }
        do {
            _ = try BatchReadRow(PostgresRow(["b", "a.txt", "u", "c", "x7", "1000", "1", nil], source: "the batch read"))
            Issue.record("a token of 'x7' decoded")
        } catch {
            #expect("\(error)".contains("unreadable token ('x7', column 5)"))
        }
        #expect(throws: PostgresError.self) { try BatchReadRow(PostgresRow(["q"], source: "the batch read")) }
        #expect(throws: PostgresError.self) { try BatchReadRow(PostgresRow(["f"], source: "the batch read")) }
    }

    @Test func readRowsDecodeToTheirKinds() throws {
        guard case .fence(let epoch, let clock) = try BatchReadRow(PostgresRow(["f", "4", "1700", nil, nil, nil, nil, nil], source: "read")) else {
            Issue.record("not a fence row")
            return
        }
        #expect(epoch == 4 && clock.milliseconds == 1700)
        guard case .fence(nil, _) = try BatchReadRow(PostgresRow(["f", nil, "1700", nil, nil, nil, nil, nil], source: "read")) else {
            Issue.record("a missing partition is a fence row without an epoch")
            return
        }
        guard case .buffer(let buffer) = try BatchReadRow(PostgresRow(["b", "a.txt", nil, nil, "9", nil, "2", nil, "12", nil], source: "read")) else {
            Issue.record("not a buffer row")
            return
        }
        #expect(buffer.state.holder == nil && buffer.state.token == 9 && buffer.version == 2 && buffer.state.expiresAt == nil)
        #expect(buffer.state.issued == 12, "the sequence, read apart from the holder's token")
        #expect(throws: PostgresError.self, "a buffer row without its sequence is refused, not read as its token") {
            try BatchReadRow(PostgresRow(["b", "a.txt", nil, nil, "9", nil, "2", nil, nil, nil], source: "read"))
        }
        // A roster as jsonb prints it (keys reordered, spaces), read into members and reservations.
        let stored = #"{"m": [{"c": "c1", "e": 1700000005000, "i": 2, "p": "fe", "t": 12, "u": "ann"}], "r": [{"i": 1, "u": "bob", "x": 1700000009000}]}"#
        guard case .buffer(let rostered) = try BatchReadRow(PostgresRow(["b", "a.txt", nil, nil, "9", nil, "2", nil, "12", stored], source: "read")) else {
            Issue.record("not a buffer row")
            return
        }
        #expect(rostered.state.roster == Roster(
            members: [Roster.Member(replicaID: 2, user: "ann", connection: "c1", token: 12, expiresAt: Timestamp(milliseconds: 1_700_000_005_000), principal: "fe")],
            reservations: [Roster.Reservation(replicaID: 1, user: "bob", until: Timestamp(milliseconds: 1_700_000_009_000))]
        ))
        #expect(try Roster(storedText: rostered.state.roster.storedText) == rostered.state.roster, "what is written reads back")
        #expect(Roster().storedText == nil, "an empty roster is stored as NULL")
        #expect(throws: PostgresError.self, "a roster that cannot be read is refused, not read as empty") {
            try BatchReadRow(PostgresRow(["b", "a.txt", nil, nil, "9", nil, "2", nil, "12", #"{"m": [{"c": "c1"}], "r": []}"#], source: "read"))
        }
    }

    @Test func theWriteNumbersItsParametersAsTheStatementDoes() {
        let write = BatchWrite(partition: 3, epoch: 7, now: Timestamp(milliseconds: 1000))
        #expect(write.isEmpty)
        #expect(write.parameters.count == 29, "BatchWrite.statement takes $1 to $29")
        // The statements' own numbering: the highest parameter each names is the count the write sends.
        func highest(_ sql: String) -> Int {
            sql.matches(of: /\$(\d+)/).compactMap { Int($0.output.1) }.max() ?? 0
        }
        #expect(highest(BatchWrite.statement.sql) == 29 && highest(BatchWrite.statementWithLines.sql) == 43)
        var lined = BatchWrite(partition: 3, epoch: 7, now: Timestamp(milliseconds: 1000))
        lined.waitersRemoved = ["w"]
        #expect(lined.statement == BatchWrite.statementWithLines && lined.parameters.count == 43)
        #expect(write.parameters[0] == "3" && write.parameters[19] == "7" && write.parameters[20] == "0" && write.parameters[21] == "0")
        // The read likewise: $1 to $5.
        let (read, parameters) = BatchRead.statement(for: [Request(requestID: "r", command: .inspect(buffer: "b"))], partition: 3)
        #expect(highest(read.sql) == 5 && parameters.count == 5 && parameters[0] == "3")
    }
}
