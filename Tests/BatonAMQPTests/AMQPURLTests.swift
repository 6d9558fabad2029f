import BatonAMQP
import Testing

@Suite struct AMQPURLTests {
    @Test func parsesAndDefaults() throws {
        let url = try AMQPURL("amqp://baton:p%40ss@127.0.0.1:55672/%2F")
        #expect(url.host == "127.0.0.1" && url.port == 55672)
        #expect(url.user == "baton" && url.password == "p@ss")
        #expect(url.virtualHost == "/")
        #expect(url.heartbeatSeconds == 10)
        #expect(!url.tls)
        let plain = try AMQPURL("amqp://h")
        #expect(plain.port == 5672 && plain.user == "guest" && plain.virtualHost == "/")
        let tls = try AMQPURL("amqps://u:p@broker.example/prod?cacertfile=/etc/ca.pem&heartbeat=5")
        #expect(tls.tls && tls.port == 5671 && tls.virtualHost == "prod")
        #expect(tls.caCertificateFile == "/etc/ca.pem" && tls.heartbeatSeconds == 5 && tls.verifyPeer)
    }

    @Test func descriptionHidesThePassword() throws {
        let url = try AMQPURL("amqp://baton:very-secret-pw@127.0.0.1:55672/%2F")
        #expect("\(url)" == "amqp://baton:********@127.0.0.1:55672/%2F")
        #expect(!"\(url)".contains("very-secret-pw"))
    }

    @Test(arguments: [
        ("http://u:hunter2-x@h/", "scheme"),
        ("amqp://u:hunter2-x@h/?heartbeat=-1", "heartbeat '-1'"),
        ("amqp://u:hunter2-x@h/?colour=red", "parameter 'colour'"),
        ("amqp://u:hunter2-x@h/?cacertfile=/x", "need amqps://"),
        ("amqps://u:hunter2-x@h/?certfile=/x", "go together"),
        ("amqp://u:hunter2-x@h:70000/", "port 70000"),
    ])
    func invalidURLs(text: String, fragment: String) {
        do {
            _ = try AMQPURL(text)
            Issue.record("accepted \(text)")
        } catch {
            #expect(error.code == .invalidURL)
            #expect(error.description.contains(fragment), "\(error)")
            #expect(!error.description.contains("hunter2"))
        }
    }
}

/// Several nodes of one cluster in one setting.
@Suite struct AMQPURLListTests {
    @Test func commaSeparatedURLsAreTheNodesInOrder() throws {
        let nodes = try AMQPURL.list("amqp://u:p%2Cw@n1:5672/%2F, amqp://u:p%2Cw@n2:5673/%2F")
        #expect(nodes.map(\.host) == ["n1", "n2"] && nodes.map(\.port) == [5672, 5673])
        #expect(nodes[0].password == "p,w", "a comma in a password is written %2C")
        #expect(try AMQPURL.list("amqp://u:p@n1/%2F").count == 1)
    }

    @Test func aBadNodeIsNamedWithoutItsPassword() {
        do {
            _ = try AMQPURL.list("amqp://u:hunter2-secret@n1/%2F,http://u:hunter2-secret@n2/")
            Issue.record("accepted a list with an http:// node")
        } catch {
            #expect(!"\(error)".contains("hunter2"))
            #expect("\(error)".contains("n2"), "\(error)")
        }
    }
}
