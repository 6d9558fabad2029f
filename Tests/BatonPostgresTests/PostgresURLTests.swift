import BatonPostgres
import Testing

@Suite struct PostgresURLTests {
    @Test func parsesEveryPart() throws {
        let url = try PostgresURL("postgres://baton:s3cr%40t@db.example:6543/ownership?sslmode=require&application_name=w1")
        #expect(url.host == "db.example")
        #expect(url.port == 6543)
        #expect(url.user == "baton")
        #expect(url.password == "s3cr@t")
        #expect(url.database == "ownership")
        #expect(url.parameters == ["sslmode": "require", "application_name": "w1"])
    }

    @Test func defaultsAndIPv6() throws {
        let url = try PostgresURL("postgresql://u@[::1]/d")
        #expect(url.host == "::1")
        #expect(url.port == 5432)
        #expect(url.password == nil)
    }

    @Test func descriptionRedactsThePassword() throws {
        let url = try PostgresURL("postgres://baton:hunter2-very-secret@127.0.0.1:55432/baton?sslmode=disable")
        #expect(url.description == "postgres://baton:********@127.0.0.1:55432/baton?sslmode=disable")
        #expect(!"\(url)".contains("hunter2"))
        #expect(!String(reflecting: url.description).contains("hunter2"))
    }

    @Test(arguments: [
        ("mysql://u:hunter2-secret@h/d", "scheme"),
        ("postgres://u:hunter2-secret@h/", "database name"),
        ("postgres://:hunter2-secret@h/d", "user"),
        ("postgres://u:hunter2-secret@h/d?sslmode=maybe", "sslmode 'maybe'"),
        ("postgres://u:hunter2-secret@h/d?pool=5", "parameter 'pool'"),
        ("postgres://u:hunter2-secret@h/d?connect_timeout=soon", "connect_timeout 'soon'"),
        ("postgres://u:hunter2-secret@h:99999999/d", "port 99999999"),
    ])
    func invalidURLsSayWhyWithoutThePassword(text: String, fragment: String) {
        do {
            _ = try PostgresURL(text)
            Issue.record("accepted \(text)")
        } catch {
            #expect(error.code == .invalidURL)
            #expect(error.description.contains(fragment), "\(error)")
            #expect(!error.description.contains("hunter2"), "\(error)")
        }
    }

    @Test func redactWorksOnUnparseableText() {
        #expect(PostgresURL.redact("postgres://u:p@ss:w0rd@h:1/d") == "postgres://u:********@h:1/d")
        #expect(PostgresURL.redact("amqp://guest:guest@localhost:5672/%2F") == "amqp://guest:********@localhost:5672/%2F")
        #expect(PostgresURL.redact("postgres://u@h/d") == "postgres://u@h/d")
        #expect(PostgresURL.redact("not a url") == "not a url")
    }
}

@Suite struct PostgresArrayTests {
    @Test func textLiteralsEscapeQuotesAndBackslashes() {
        #expect(PostgresArray.text(["a", "b\"c", "d\\e", nil, "", "ü,{x}"]) == #"{"a","b\"c","d\\e",NULL,"","ü,{x}"}"#)
        #expect(PostgresArray.text([String]()) == "{}")
    }

    @Test func integerLiterals() {
        #expect(PostgresArray.integers([Int64(1), nil, -3]) == "{1,NULL,-3}")
        #expect(PostgresArray.parseIntegers("{1,2,30}") == [1, 2, 30])
        #expect(PostgresArray.parseIntegers(nil) == [])
        #expect(PostgresArray.parseIntegers("{}") == [])
    }
}

@Suite struct ConnectionStringTests {
    @Test func roundTripsWithThePassword() throws {
        let url = try PostgresURL("postgres://baton:p%40ss@127.0.0.1:55432/baton?sslmode=disable")
        #expect(try PostgresURL(url.connectionString) == url)
        #expect(url.connectionString.contains("p%40ss"))
    }
}

/// libpq's multi-host form, for a primary and its standbys.
@Suite struct MultiHostPostgresURLTests {
    @Test func hostsAfterTheFirstAreAlternatesInOrder() throws {
        let url = try PostgresURL("postgres://baton:s3cret@db1:5432,db2:5433,[::1]/baton?target_session_attrs=read-write&sslmode=disable")
        #expect(url.host == "db1" && url.port == 5432)
        #expect(url.alternates == [.init(host: "db2", port: 5433), .init(host: "::1", port: 5432)])
        #expect(url.endpoints.map(\.host) == ["db1", "db2", "::1"])
        #expect(url.parameters["target_session_attrs"] == "read-write")
        #expect(url.description == "postgres://baton:********@db1:5432,db2:5433,[::1]:5432/baton?sslmode=disable&target_session_attrs=read-write")
        #expect(try PostgresURL(url.connectionString) == url, "the rendered URL parses back to the same value")
    }

    @Test(arguments: [
        ("postgres://u:hunter2-secret@h1,/d", "'' is not a host"),
        ("postgres://u:hunter2-secret@h1,h2:0/d", "port 0"),
        ("postgres://u:hunter2-secret@h1,h 2/d", "is not a host"),
        ("postgres://u:hunter2-secret@h1,h2/d?target_session_attrs=primaryish", "target_session_attrs 'primaryish'"),
    ])
    func badHostListsSayWhyWithoutThePassword(text: String, fragment: String) {
        do {
            _ = try PostgresURL(text)
            Issue.record("accepted \(text)")
        } catch {
            #expect("\(error)".contains(fragment), "\(error)")
            #expect(!"\(error)".contains("hunter2"))
        }
    }
}
