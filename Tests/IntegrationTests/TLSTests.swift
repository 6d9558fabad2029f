import BatonAMQP
import Foundation
import Testing

/// amqps:// against a TLS terminator (socat, installed with rabbitmq-server) in front of the
/// test broker, with a throwaway CA whose server certificate names `localhost` only.
@Suite struct TLSTests {
    struct Terminator {
        let directory: URL
        let port: Int
        let process: Process
    }

    static func sh(_ command: String, in directory: URL) throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/sh")
        process.arguments = ["-c", command]
        process.currentDirectoryURL = directory
        process.standardInput = FileHandle.nullDevice
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        // Reap the child ourselves: Foundation's waitUntilExit did not always return here.
        var status: Int32 = 0
        while waitpid(process.processIdentifier, &status, 0) == -1, errno == EINTR {}
        guard (status >> 8) & 0xFF == 0 else { throw TestFailure("failed: \(command)") }
    }

    static func startTerminator() throws -> Terminator {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("baton-tls-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        try sh("""
            openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj '/CN=Baton Test CA' -keyout ca.key -out ca.pem && \
            openssl req -newkey rsa:2048 -nodes -subj '/CN=localhost' -keyout server.key -out server.csr && \
            printf 'subjectAltName=DNS:localhost\\n' > san.ext && \
            openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile san.ext -out server.crt && \
            cat server.crt server.key > server.pem && \
            openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj '/CN=Other CA' -keyout other.key -out other.pem
            """, in: directory)
        let broker = try AMQPURL(TestBroker.urlText)
        let port = Int.random(in: 41_000...49_000)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/socat")
        process.arguments = [
            "OPENSSL-LISTEN:\(port),bind=127.0.0.1,reuseaddr,fork,cert=\(directory.path)/server.pem,verify=0",
            "TCP:\(broker.host):\(broker.port)",
        ]
        process.standardInput = FileHandle.nullDevice
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        return Terminator(directory: directory, port: port, process: process)
    }

    func url(_ terminator: Terminator, host: String = "localhost", ca: String = "ca.pem") async throws -> AMQPURL {
        let broker = try await TestBroker.url()
        var url = try AMQPURL("amqps://\(host):\(terminator.port)/?cacertfile=\(terminator.directory.path)/\(ca)")
        url.user = broker.user
        url.password = broker.password
        url.virtualHost = broker.virtualHost
        return url
    }

    @Test func verifiedTLSConnectsAndWrongNamesOrCAsAreRefused() async throws {
        let terminator = try Self.startTerminator()
        defer { kill(terminator.process.processIdentifier, SIGKILL) }
        #expect(await Deployment.eventually(.seconds(5)) {
            guard let probe = try? await AMQPConnection.connect(to: try await url(terminator), name: "tls probe") else { return false }
            await probe.close()
            return true
        }, "amqps:// with the right CA and host name connects")

        let connection = try await AMQPConnection.connect(to: try await url(terminator), name: "tls")
        let channel = try await connection.openChannel()
        try await channel.declareExchange("baton.test.tls", type: "fanout", durable: false)
        await connection.close()

        // The certificate names localhost, not 127.0.0.1: host name verification must refuse it.
        let wrongHost = try await #require(throws: AMQPError.self) { try await AMQPConnection.connect(to: try await url(terminator, host: "127.0.0.1"), name: "tls") }
        #expect(wrongHost.code == .connectionFailed)
        // A CA that did not sign the server's certificate: refused.
        let wrongCA = try await #require(throws: AMQPError.self) { try await AMQPConnection.connect(to: try await url(terminator, ca: "other.pem"), name: "tls") }
        #expect(wrongCA.code == .connectionFailed)
        #expect(wrongCA.description.contains("verification failed"), "\(wrongCA)")
        #expect(wrongHost.description.contains("hostname verification failed"), "\(wrongHost)")
    }
}
