import BatonPostgres
import Foundation
import Synchronization
import Testing

@Suite struct PostgresConnectionTests {
    @Test func aMultiHostURLSkipsAServerThatDoesNotAnswer() async throws {
        var url = try await TestDatabase.create()
        // A first host where nothing listens (port 1), then the real server; read-write keeps the primary.
        url.alternates = [.init(host: url.host, port: url.port)]
        url.port = 1
        url.parameters["target_session_attrs"] = "read-write"
        url.parameters["connect_timeout"] = "2"
        let server = try await PostgresConnection.withConnection(to: url, logger: TestDatabase.logger) { connection in
            try await connection.withSession { session in try session.query("SELECT current_setting('port')").first() }
        }
        #expect(server == String(url.alternates[0].port))
    }

    @Test func parametersPreparedStatementsAndArrays() async throws {
        let url = try await TestDatabase.create()
        let connection = try await PostgresConnection.connect(to: url, logger: TestDatabase.logger)
        let tricky = ["plain", "quote\"d", "back\\slash", "ü/буфер", "{brace},comma", "", "'single'"]
        let statement = PreparedStatement(name: "t_echo", sql: "SELECT x, $2::int8 * 2 FROM unnest($1::text[]) WITH ORDINALITY AS t(x, n) ORDER BY n")
        let (first, second) = try await connection.withSession { session in
            let first = try session.query(statement, [PostgresArray.text(tricky + [nil]), "21"])
            let second = try session.query(statement, [PostgresArray.text(["again"]), "1"])  // reuses the prepared statement
            return (first, second)
        }
        #expect(first.rows.map { $0[0] } == tricky.map(Optional.some) + [nil])
        #expect(first.rows.first?[1] == "42")
        #expect(second.rows == [["again", "2"]])
        await connection.close()
    }

    @Test func serverErrorsCarrySQLStateMessageAndDetail() async throws {
        let url = try await TestDatabase.create()
        let connection = try await PostgresConnection.connect(to: url, logger: TestDatabase.logger)
        let error = try await #require(throws: PostgresError.self) {
            try await connection.withSession { session in
                try session.query("CREATE TABLE t (id int PRIMARY KEY)")
                try session.query("INSERT INTO t VALUES (1)")
                try session.query("INSERT INTO t VALUES ($1)", ["1"])
            }
        }
        #expect(error.code == .server)
        #expect(error.sqlState == "23505")
        #expect(error.message.contains("duplicate key"))
        #expect(error.detail?.contains("(id)=(1)") == true)

        let syntax = try await #require(throws: PostgresError.self) {
            try await connection.withSession { session in try session.query("SELEC 1") }
        }
        #expect(syntax.sqlState == "42601")
        // The connection is still usable after errors.
        #expect(try await connection.withSession { session in try session.query("SELECT 7").first() } == "7")
        await connection.close()
    }

    @Test func transactionsRollBackOnError() async throws {
        let url = try await TestDatabase.create()
        let connection = try await PostgresConnection.connect(to: url, logger: TestDatabase.logger)
        struct Boom: Error {}
        await #expect(throws: Boom.self) {
            try await connection.withSession { session in
                try session.query("CREATE TABLE t (id int)")
                try session.transaction {
                    try session.query("INSERT INTO t VALUES (1)")
                    throw Boom()
                }
            }
        }
        #expect(try await connection.withSession { session in try session.query("SELECT count(*) FROM t").first() } == "0")
        await connection.close()
    }

    @Test func statementTimeout() async throws {
        let url = try await TestDatabase.create()
        let connection = try await PostgresConnection.connect(
            to: url, options: PostgresConnectionOptions(statementTimeout: .milliseconds(200)), logger: TestDatabase.logger
        )
        let start = ContinuousClock.now
        let error = try await #require(throws: PostgresError.self) {
            try await connection.withSession { session in try session.query("SELECT pg_sleep(5)") }
        }
        #expect(error.sqlState == "57014")
        #expect(ContinuousClock.now - start < .seconds(3))
        await connection.close()
    }

    @Test func reconnectsAfterTheServerDropsTheConnection() async throws {
        let url = try await TestDatabase.create()
        let connection = try await PostgresConnection.connect(to: url, logger: TestDatabase.logger)
        let admin = try await PostgresConnection.connect(to: url, logger: TestDatabase.logger)
        let pid = try await connection.withSession { session in try session.query("SELECT pg_backend_pid()").first()! }
        _ = try await admin.withSession { session in try session.query("SELECT pg_terminate_backend($1::int)", [pid]) }
        let lost = try await #require(throws: PostgresError.self) {
            try await connection.withSession { session in try session.query("SELECT 1") }
        }
        #expect(lost.code == .connectionLost || lost.code == .server, "\(lost)")
        let newPID = try await connection.withSession { session in try session.query("SELECT pg_backend_pid()").first()! }
        #expect(newPID != pid)
        await connection.close()
        await admin.close()
    }

    @Test func connectFailureNamesTheServerButNotThePassword() async throws {
        let url = try PostgresURL("postgres://baton:topsecret-pw@127.0.0.1:1/baton?connect_timeout=2")
        let error = try await #require(throws: PostgresError.self) {
            try await PostgresConnection.connect(to: url, logger: TestDatabase.logger)
        }
        #expect(error.code == .connectionFailed)
        #expect(error.description.contains("127.0.0.1"))
        #expect(!error.description.contains("topsecret"))
        #expect(error.description.contains("********"))
    }

    @Test func wrongPasswordErrorDoesNotEchoIt() async throws {
        var url = try PostgresURL(TestDatabase.serverURL)
        url.password = "wrong-password-value"
        url.user = "baton_no_such_user"
        do {
            let connection = try await PostgresConnection.connect(to: url, logger: TestDatabase.logger)
            await connection.close()
            Issue.record("connected as a user that does not exist")
        } catch {
            #expect(!"\(error)".contains("wrong-password-value"), "\(error)")
        }
    }

    @Test func closedConnectionsRefuseWork() async throws {
        let url = try await TestDatabase.create()
        let connection = try await PostgresConnection.connect(to: url, logger: TestDatabase.logger)
        await connection.close()
        let error = try await #require(throws: PostgresError.self) {
            try await connection.withSession { session in try session.query("SELECT 1") }
        }
        #expect(error.code == .closed)
    }
}

@Suite struct PostgresConnectionLifecycleTests {
    @Test func closingTwiceReturns() async throws {
        let url = try await TestDatabase.create()
        let connection = try await PostgresConnection.connect(to: url, logger: TestDatabase.logger)
        await connection.close()
        await connection.close()
    }

    @Test func blockingWorkDoesNotBlockOtherConnections() async throws {
        // Each connection has its own thread: a slow statement on one leaves the others free.
        let url = try await TestDatabase.create()
        let slow = try await PostgresConnection.connect(to: url, logger: TestDatabase.logger)
        let fast = try await PostgresConnection.connect(to: url, logger: TestDatabase.logger)
        let slowDone = Atomic<Bool>(false)
        async let sleeping: Void = {
            _ = try await slow.withSession { s in try s.query("SELECT pg_sleep(4)") }
            slowDone.store(true, ordering: .sequentiallyConsistent)
        }()
        try await Task.sleep(for: .milliseconds(100))
        for _ in 0..<20 { _ = try await fast.withSession { s in try s.query("SELECT 1") } }
        // Not a timing bound: the 20 statements finished while the slow one still ran (with 4 s of room, so a
        // loaded machine cannot make it flaky; it took 2 s once with the whole suite running).
        let finishedFirst = !slowDone.load(ordering: .sequentiallyConsistent)
        #expect(finishedFirst, "the fast connection waited for the slow one")
        try await sleeping
        await slow.close()
        await fast.close()
    }
}
