import Foundation
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A child process that dies with its parent, however the parent ends (SIGKILL included).
///
/// The child's standard input is the read end of a pipe whose write end only this process holds
/// (close-on-exec, so no other child inherits it). When this process ends, the kernel closes the
/// write end; the child sees end of file and stops (`baton worker --exit-with-parent` does so).
public final class ChildProcess: Sendable {
    /// The process id.
    public let pid: Int32
    private let lifeline: Int32
    /// Foundation reaps its children itself (so `waitpid` may find none); its view of the exit is used then.
    private let process: Process
    private let state = Mutex<Int32?>(nil)

    /// Starts `executable` with `arguments` and `environment`, its output appended to `log` (or discarded).
    public init(executable: URL, arguments: [String], environment: [String: String], log: URL? = nil, directory: URL? = nil) throws {
        var fds: [Int32] = [-1, -1]
        // pipe2(O_CLOEXEC) is not visible from Swift's Glibc module; set the flag right after.
        guard pipe(&fds) == 0 else { throw ChildProcessError("pipe failed: errno \(errno)") }
        for fd in fds { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        let process = Process()
        process.executableURL = executable
        process.arguments = arguments
        process.environment = environment
        if let directory { process.currentDirectoryURL = directory }
        process.standardInput = FileHandle(fileDescriptor: fds[0], closeOnDealloc: false)
        if let log {
            if !FileManager.default.fileExists(atPath: log.path) { _ = FileManager.default.createFile(atPath: log.path, contents: nil) }
            let handle = try FileHandle(forWritingTo: log)
            handle.seekToEndOfFile()
            process.standardOutput = handle
            process.standardError = handle
        } else {
            process.standardOutput = FileHandle.nullDevice
            process.standardError = FileHandle.nullDevice
        }
        do {
            try process.run()
        } catch {
            close(fds[0])
            close(fds[1])
            throw ChildProcessError("cannot start \(executable.path): \(error)")
        }
        close(fds[0])
        pid = process.processIdentifier
        lifeline = fds[1]
        self.process = process
    }

    deinit {
        close(lifeline)
    }

    /// Sends `signal`.
    public func signal(_ signal: Int32) {
        if state.withLock({ $0 }) == nil { kill(pid, signal) }
    }

    /// True until the child has exited (and been reaped here).
    public var isRunning: Bool { reap() == nil }

    /// The exit status (or 128 + signal), once the child has exited; reaps it.
    @discardableResult
    public func reap() -> Int32? {
        state.withLock { status in
            if let status { return status }
            var raw: Int32 = 0
            let result = waitpid(pid, &raw, WNOHANG)
            guard result == pid else {
                if result == -1, errno == ECHILD, !process.isRunning {  // reaped by Foundation
                    let code = process.terminationStatus
                    status = process.terminationReason == .uncaughtSignal ? 128 + code : code
                }
                return status
            }
            status = (raw & 0x7F) == 0 ? (raw >> 8) & 0xFF : 128 + (raw & 0x7F)
            return status
        }
    }

    /// Waits (without blocking a thread) until the child exits or `timeout` passes; returns its status.
    @discardableResult
    public func wait(timeout: Duration = .seconds(3600)) async -> Int32? {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if let status = reap() { return status }
            try? await Task.sleep(for: .milliseconds(20))
        }
        return reap()
    }

    /// SIGTERM, then SIGKILL after `grace`; returns the exit status.
    @discardableResult
    public func stop(grace: Duration = .seconds(10)) async -> Int32? {
        signal(SIGTERM)
        if let status = await wait(timeout: grace) { return status }
        signal(SIGKILL)
        return await wait(timeout: .seconds(5))
    }
}

extension ChildProcess {
    /// Runs `executable` with `arguments` to its end (without blocking a thread); returns its output
    /// (standard output and error, interleaved). Throws when it exits with a status other than 0 or
    /// outlives `timeout` (it is killed then), with the end of its output.
    @discardableResult
    public static func run(_ executable: URL, _ arguments: [String], timeout: Duration = .seconds(120)) async throws -> String {
        let log = FileManager.default.temporaryDirectory.appendingPathComponent("baton-run-\(getpid())-\(UInt64.random(in: 0...UInt64.max)).log")
        defer { try? FileManager.default.removeItem(at: log) }
        let process = try ChildProcess(executable: executable, arguments: arguments, environment: ProcessInfo.processInfo.environment, log: log)
        let status = await process.wait(timeout: timeout)
        if status == nil { await process.stop(grace: .seconds(2)) }
        let output = (try? String(contentsOf: log, encoding: .utf8)) ?? ""
        let command = ([executable.path] + arguments).joined(separator: " ")
        let tail = output.split(separator: "\n").suffix(5).joined(separator: "\n")
        guard let status else { throw ChildProcessError("\(command) did not end within \(timeout); its output ended with:\n\(tail)") }
        guard status == 0 else { throw ChildProcessError("\(command) exited with status \(status); its output ended with:\n\(tail)") }
        return output
    }
}

/// A child process could not be started, or did not end well.
public struct ChildProcessError: Error, Sendable, CustomStringConvertible {
    public let description: String
    init(_ description: String) { self.description = description }
}
