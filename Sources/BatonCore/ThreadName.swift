#if canImport(Glibc)
import Glibc
#endif

/// Names the calling thread as `top -H`, `perf` and `/proc/PID/task/*/comm` show it (at most 15 bytes are
/// kept). Foundation's `Thread.name` does not reach the kernel on Linux, so the service's own threads
/// would otherwise all read as the dispatch pool's.
public func nameThisThread(_ name: String) {
    #if os(Linux)
    let fd = open("/proc/thread-self/comm", O_WRONLY)
    guard fd >= 0 else { return }
    defer { close(fd) }
    let bytes = Array(name.utf8.prefix(15))
    _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
    #endif
}
