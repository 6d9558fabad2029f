import BatonLab
import Foundation
import Testing

/// The Python client (clients/python) and its own tests, against a live worker of a scratch deployment:
/// `python -m pytest` in the virtual environment scripts/test prepares (`.build-python/venv`, or
/// `BATON_PYTHON`). With `CI` set, a missing Python environment fails the run.
@Suite struct PythonClientTests {
    static var python: URL? {
        if let path = ProcessInfo.processInfo.environment["BATON_PYTHON"], !path.isEmpty { return URL(fileURLWithPath: path) }
        let venv = Deployment.repositoryRoot.appendingPathComponent(".build-python/venv/bin/python")
        return FileManager.default.isExecutableFile(atPath: venv.path) ? venv : nil
    }

    @Test func thePythonClientsTestsPassAgainstALiveWorker() async throws {
        guard let python = Self.python else {
            let message = "no Python environment for clients/python: run scripts/test (it creates .build-python/venv) or set BATON_PYTHON"
            if ProcessInfo.processInfo.environment["CI"] != nil { throw TestFailure(message) }
            print("skipped: \(message)")
            return
        }
        let partitions = 4
        let deployment = try await Deployment.make(partitions: partitions)
        let worker = deployment.startWorker()
        var environment = ProcessInfo.processInfo.environment
        // Plain amqp://user:password@host:port/vhost URLs (the Swift side's query parameters are its own).
        func plain(_ url: String) -> String { String(url.prefix { $0 != "?" }) }
        environment["BATON_TEST_AMQP_URL"] = plain(deployment.frontendURL.connectionString)
        environment["BATON_TEST_OPERATOR_AMQP_URL"] = plain(deployment.operatorURL.connectionString)
        environment["BATON_TEST_PARTITIONS"] = String(partitions)
        environment["CI"] = "true"  // inside this harness a missing variable is a failure, never a skip
        let log = FileManager.default.temporaryDirectory.appendingPathComponent("baton-python-tests-\(getpid()).log")
        try? FileManager.default.removeItem(at: log)
        // clients/python/run_tests.py exits when this process dies (its standard input, a pipe, closes).
        let process = try ChildProcess(
            executable: python,
            arguments: ["clients/python/run_tests.py", "-q", "-p", "no:cacheprovider", "-c", "clients/python/pyproject.toml", "clients/python/tests"],
            environment: environment, log: log, directory: Deployment.repositoryRoot
        )
        let status = await process.wait(timeout: .seconds(300))
        if status == nil { await process.stop(grace: .seconds(2)) }
        await worker.stop()
        let output = (try? String(contentsOf: log, encoding: .utf8)) ?? ""
        let summary = output.split(separator: "\n").last { $0.contains(" passed") || $0.contains(" failed") || $0.contains(" error") } ?? "no summary"
        print("clients/python: \(summary)")
        #expect(status == 0, "pytest exited with \(status.map(String.init) ?? "no status (killed after 300 s)"); its output ended with:\n\(output.split(separator: "\n").suffix(40).joined(separator: "\n"))")
        #expect(!summary.contains("skipped"), "no Python test may skip here: \(summary)")
        try? FileManager.default.removeItem(at: log)
    }
}
