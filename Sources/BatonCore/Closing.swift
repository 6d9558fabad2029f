/// Runs `body` with `resource`, then closes it with `close`, whether `body` returns or throws: the
/// structured form of "open, use, close" for connections, pools and scratch namespaces (no detached
/// cleanup task, nothing left open on an error path).
public func withClosing<Resource, Result>(
    _ resource: Resource, close: (Resource) async -> Void, _ body: (Resource) async throws -> Result
) async throws -> Result {
    do {
        let result = try await body(resource)
        await close(resource)
        return result
    } catch {
        await close(resource)
        throw error
    }
}
