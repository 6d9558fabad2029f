import BatonCore
import CRabbitMQ
import Foundation
import Logging
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// The outcome of one confirm-mode publish, resolved by the I/O thread.
typealias ConfirmWait = ReplyWait<PublishOutcome>

/// The broker's answer to one request the I/O thread sent without waiting for it (a publisher confirm, a
/// `basic.consume-ok`), resolved once, by the answer, a failure or the caller's timeout.
final class ReplyWait<Value: Sendable>: Sendable {
    private struct State {
        var result: Result<Value, AMQPError>?
        var continuation: CheckedContinuation<Result<Value, AMQPError>, Never>?
    }

    private let state = Mutex(State())

    /// Resolves the wait; false when it was resolved before (only the first result counts).
    @discardableResult
    func resolve(_ result: Result<Value, AMQPError>) -> Bool {
        let (taken, continuation) = state.withLock { state -> (Bool, CheckedContinuation<Result<Value, AMQPError>, Never>?) in
            guard state.result == nil else { return (false, nil) }
            state.result = result
            defer { state.continuation = nil }
            return (true, state.continuation)
        }
        continuation?.resume(returning: result)
        return taken
    }

    /// The answer, or `timedOut` once `timeout` has passed without one.
    func value(timeout: Duration, timedOut: @autoclosure @escaping @Sendable () -> AMQPError) async throws(AMQPError) -> Value {
        let timer = WaitTimer.shared.schedule(after: timeout) { [weak self] in
            self?.resolve(.failure(timedOut()))
        }
        defer { WaitTimer.shared.cancel(timer) }
        let result = await withCheckedContinuation { (continuation: CheckedContinuation<Result<Value, AMQPError>, Never>) in
            let ready = state.withLock { state -> Result<Value, AMQPError>? in
                if let result = state.result { return result }
                state.continuation = continuation
                return nil
            }
            if let ready { continuation.resume(returning: ready) }
        }
        return try result.get()
    }
}

extension ReplyWait where Value == PublishOutcome {
    func value(timeout: Duration) async throws(AMQPError) -> PublishOutcome {
        try await value(timeout: timeout, timedOut: AMQPError(code: .timeout, message: "no publisher confirm within \(timeout)"))
    }
}

/// A request the I/O thread sent on a channel without waiting for its answer: the answer's method, and
/// what to do with it or with a failure (both on the I/O thread).
struct PendingReply {
    /// Which request it is, to abandon it after its caller's timeout.
    let id: ObjectIdentifier
    let expected: amqp_method_number_t
    let answered: (IOThread, ChannelState, amqp_method_t) -> Void
    let failed: (AMQPError) -> Void
}

/// A queue's ready messages and consumers, from its declare-ok.
struct QueueCounts: Sendable {
    let messages: Int
    let consumers: Int
}

/// What the I/O thread knows about one channel.
final class ChannelState {
    let number: UInt16
    var confirmMode = false
    var nextPublishTag: UInt64 = 1
    var confirmWaits: [UInt64: ConfirmWait] = [:]
    var tagsByMessageID: [String: UInt64] = [:]
    var returned: [UInt64: PublishOutcome] = [:]
    var consumers: [String: any DeliverySink] = [:]
    var returnHandler: (@Sendable (String?, Int, String) -> Void)?
    /// Publishes without a ``ConfirmWait``, tracked for ``AMQPChannel/oldestUnconfirmedPublish`` (confirm mode only).
    var unconfirmed: UnconfirmedPublishes?
    /// A request sent without waiting for its answer (``IOThread/send(_:_:expecting:channel:doing:pending:)``).
    var pending: PendingReply?

    init(number: UInt16) {
        self.number = number
    }

    /// Fails everything pending on the channel.
    func fail(_ error: AMQPError, consumersToo: Bool = true) {
        // A request still unanswered fails (a consumer that never started is not ended: its caller gets
        // the error instead of a tag).
        pending?.failed(error)
        pending = nil
        unconfirmed?.clear()
        for wait in confirmWaits.values { wait.resolve(.failure(error)) }
        confirmWaits.removeAll()
        tagsByMessageID.removeAll()
        if consumersToo {
            for queue in consumers.values { queue.finish(error) }
            consumers.removeAll()
        }
    }
}

/// The thread that owns one rabbitmq-c connection and everything on it.
///
/// `@unchecked Sendable`: the fields under "I/O thread only" are touched only by
/// jobs running on the thread; the rest is guarded by `lock`.
final class IOThread: @unchecked Sendable {
    let url: AMQPURL
    let name: String
    let logger: Logger

    // Guarded by `lock`.
    private let lock = NSLock()
    private var jobs: [(IOThread) -> Void] = []
    private var stopping = false
    private var ended = false
    private var endError: AMQPError?
    private var closeWaiters: [CheckedContinuation<AMQPError?, Never>] = []
    /// Why the broker blocked publishing on this connection (connection.blocked), until connection.unblocked.
    private var blockedReason: String?
    /// A pipe that wakes the thread from poll() when a job arrives: [read end, write end].
    private let wakePipe: [Int32]

    // I/O thread only.
    var conn: amqp_connection_state_t?
    var failure: AMQPError?
    var channels: [UInt16: ChannelState] = [:]
    /// Channels this side closed without waiting (``abandonChannel(_:error:)``): their numbers are not
    /// used again until the broker's close-ok.
    private var closingChannels: Set<UInt16> = []
    private var nextChannel: UInt16 = 1
    private var pendingDeliveries: [ObjectIdentifier: (any DeliverySink, [AMQPMessage])] = [:]
    /// The thread's id once it runs (0 before): jobs submitted from the thread itself run at once.
    private let threadID = Atomic<UInt>(0)

    /// Bodies larger than this are not copied out of rabbitmq-c (see ``AMQPMessage/bodySize``).
    let maxBodyBytes: Int

    init(url: AMQPURL, name: String, logger: Logger, maxBodyBytes: Int = .max) {
        self.url = url
        self.name = name
        self.logger = logger
        self.maxBodyBytes = maxBodyBytes
        var fds: [Int32] = [-1, -1]
        if pipe(&fds) != 0 { fatalError("pipe() failed: errno \(errno)") }
        for fd in fds { _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) }
        wakePipe = fds
        let thread = Thread { [self] in loop() }
        thread.name = "baton.amqp \(name)"
        thread.start()
    }

    var isOpen: Bool {
        lock.withLock { !ended && !stopping }
    }

    /// The broker's reason while it blocks publishing on this connection (memory or disk alarm), else nil.
    var blocked: String? {
        lock.withLock { blockedReason }
    }

    // MARK: - Jobs

    /// Runs `body` on the I/O thread and returns its result.
    func run<T: Sendable>(_ body: @escaping @Sendable (IOThread) throws(AMQPError) -> T) async throws(AMQPError) -> T {
        let result: Result<T, AMQPError> = await withCheckedContinuation { continuation in
            let accepted = submit { io in
                if let failure = io.failure {
                    continuation.resume(returning: .failure(failure))
                    return
                }
                do throws(AMQPError) {
                    continuation.resume(returning: .success(try body(io)))
                } catch {
                    continuation.resume(returning: .failure(error))
                }
            }
            if !accepted {
                continuation.resume(returning: .failure(AMQPError(code: .closed, message: "the connection \(name) is closed")))
            }
        }
        return try result.get()
    }

    /// Runs `job` on the I/O thread: at once when called from it (and `inline`), else queued; `refused` runs at once
    /// when the connection is closed.
    func submit(inline: Bool = true, _ job: @escaping @Sendable (IOThread) -> Void, refused: () -> Void) {
        if inline, isCurrent {
            if lock.withLock({ stopping }) { refused() } else { job(self) }
            return
        }
        if !submit(job) { refused() }
    }

    private func submit(_ job: @escaping (IOThread) -> Void) -> Bool {
        let (accepted, first) = lock.withLock { () -> (Bool, Bool) in
            guard !stopping else { return (false, false) }
            jobs.append(job)
            return (true, jobs.count == 1)
        }
        // The thread takes every queued job before it sleeps, so only the first job of a burst must
        // wake it; the byte it leaves in the pipe until then wakes it at most once more.
        if first { wake() }
        return accepted
    }

    private func wake() {
        var byte: UInt8 = 1
        _ = Glibc.write(wakePipe[1], &byte, 1)
    }

    /// Ends the thread after the queued jobs; the connection is destroyed.
    func stop() {
        let first = lock.withLock { () -> Bool in
            defer { stopping = true }
            return !stopping
        }
        if first { wake() }
    }

    func waitUntilClosed() async -> AMQPError? {
        await withCheckedContinuation { continuation in
            let done = lock.withLock { () -> AMQPError?? in
                if ended { return .some(endError) }
                closeWaiters.append(continuation)
                return nil
            }
            if let done { continuation.resume(returning: done) }
        }
    }

    // MARK: - The loop

    /// Whether the caller runs on this connection's I/O thread (inside a job, a consumer handler or a completion).
    var isCurrent: Bool {
        threadID.load(ordering: .relaxed) == UInt(pthread_self())
    }

    private func loop() {
        threadID.store(UInt(pthread_self()), ordering: .relaxed)
        // The name `top -H` and /proc show (Foundation's `Thread.name` does not set it on Linux).
        nameThisThread("amqp " + (name.split(separator: " ").last.map(String.init) ?? ""))  // the connection's role: "consume", "reply", ...
        while true {
            let (batch, stop) = lock.withLock { () -> ([(IOThread) -> Void], Bool) in
                defer { jobs.removeAll() }
                return (jobs, stopping)
            }
            if !batch.isEmpty, conn != nil, failure == nil {
                // rabbitmq-c 0.11 can block in a publish without a deadline once the heartbeat
                // receive time has passed (rabbitmq-c #780): read first, which detects a dead peer.
                drain()
            }
            for job in batch { job(self) }
            flushDeliveries()
            if stop {
                finish(failure ?? AMQPError(code: .closed, message: "the connection \(name) was closed"))
                break
            }
            guard let conn, failure == nil else {
                waitForWake(timeoutMilliseconds: 1000)
                continue
            }
            if amqp_frames_enqueued(conn) != 0 || amqp_data_in_buffer(conn) != 0 {
                drain()
                flushDeliveries()
                continue
            }
            if lock.withLock({ !jobs.isEmpty || stopping }) { continue }
            // Sleep until the socket has data, a job arrives, or it is time to service heartbeats.
            let heartbeat = url.heartbeatSeconds
            let timeout = heartbeat > 0 ? Int32(max(100, heartbeat * 1000 / 4)) : 1000
            var fds = [
                pollfd(fd: amqp_get_sockfd(conn), events: Int16(POLLIN), revents: 0),
                pollfd(fd: wakePipe[0], events: Int16(POLLIN), revents: 0),
            ]
            let ready = poll(&fds, 2, timeout)
            if ready > 0, fds[1].revents != 0 { clearWake() }
            if ready == 0 || fds[0].revents != 0 {
                // Readable, closed, or idle for a while: rabbitmq-c reads, and sends or checks heartbeats, inside this call.
                drain()
                flushDeliveries()
            }
        }
    }

    private func waitForWake(timeoutMilliseconds: Int32) {
        var fds = [pollfd(fd: wakePipe[0], events: Int16(POLLIN), revents: 0)]
        if poll(&fds, 1, timeoutMilliseconds) > 0 { clearWake() }
    }

    private func clearWake() {
        var buffer = [UInt8](repeating: 0, count: 256)
        while Glibc.read(wakePipe[0], &buffer, buffer.count) > 0 {}
    }

    private func finish(_ error: AMQPError) {
        fail(error)
        if let conn {
            amqp_destroy_connection(conn)
            self.conn = nil
        }
        close(wakePipe[0])
        close(wakePipe[1])
        // Jobs submitted after `stopping` are refused by `submit`; none can be left.
    }

    /// Marks the connection dead and fails everything on it.
    func fail(_ error: AMQPError) {
        if failure == nil {
            failure = error
            if error.code != .closed {
                logger.warning("AMQP connection lost", metadata: ["baton.amqp": "\(url)", "baton.error": "\(error)"])
            }
        }
        for channel in channels.values { channel.fail(error) }
        channels.removeAll()
        closingChannels.removeAll()
        flushDeliveries()
        let (waiters, reason) = lock.withLock { () -> ([CheckedContinuation<AMQPError?, Never>], AMQPError?) in
            if !ended {
                // The first failure is the reason the connection ended; a later close does not replace it.
                ended = true
                endError = error.code == .closed ? nil : error
            }
            defer { closeWaiters.removeAll() }
            return (closeWaiters, endError)
        }
        for waiter in waiters { waiter.resume(returning: reason) }
    }

    // MARK: - Reading

    /// Reads every frame available now: deliveries, confirms, returns, cancels and closes.
    private func drain() {
        guard let conn else { return }
        var zero = timeval(tv_sec: 0, tv_usec: 0)
        for _ in 0..<4096 {
            guard failure == nil else { return }
            amqp_maybe_release_buffers(conn)
            var envelope = amqp_envelope_t()
            let reply = amqp_consume_message(conn, &envelope, &zero, 0)
            switch reply.reply_type {
            case AMQP_RESPONSE_NORMAL:
                deliver(envelope)
                amqp_destroy_envelope(&envelope)
            case AMQP_RESPONSE_LIBRARY_EXCEPTION where reply.library_error == AMQP_STATUS_TIMEOUT.rawValue:
                return
            case AMQP_RESPONSE_LIBRARY_EXCEPTION where reply.library_error == AMQP_STATUS_UNEXPECTED_STATE.rawValue:
                var frame = amqp_frame_t()
                let status = amqp_simple_wait_frame(conn, &frame)
                guard status == AMQP_STATUS_OK.rawValue else {
                    fail(AMQPError(code: .connectionClosed, message: "reading from \(url) failed: \(statusText(status))"))
                    return
                }
                handle(frame)
            case AMQP_RESPONSE_LIBRARY_EXCEPTION:
                fail(AMQPError(code: .connectionClosed, message: "connection to \(url) lost: \(statusText(reply.library_error))"))
                return
            default:
                let (message, code) = describe(reply)
                fail(AMQPError(code: .connectionClosed, message: message, replyCode: code))
                return
            }
        }
    }

    private func deliver(_ envelope: amqp_envelope_t) {
        let tag = envelope.consumer_tag.string
        guard let queue = channels[envelope.channel]?.consumers[tag] else { return }
        let raw = envelope.message.properties
        var properties = AMQPProperties()
        func has(_ flag: Int32) -> Bool { Int32(bitPattern: raw._flags) & flag != 0 }
        if has(AMQP_BASIC_CONTENT_TYPE_FLAG) { properties.contentType = raw.content_type.string }
        if has(AMQP_BASIC_CORRELATION_ID_FLAG) { properties.correlationIDBytes = raw.correlation_id.array }
        if has(AMQP_BASIC_REPLY_TO_FLAG) { properties.replyTo = raw.reply_to.string }
        if has(AMQP_BASIC_MESSAGE_ID_FLAG) { properties.messageID = raw.message_id.string }
        if has(AMQP_BASIC_EXPIRATION_FLAG) { properties.expiration = raw.expiration.string }
        if has(AMQP_BASIC_DELIVERY_MODE_FLAG) { properties.deliveryMode = raw.delivery_mode }
        if has(AMQP_BASIC_USER_ID_FLAG) { properties.userID = raw.user_id.string }
        // rabbitmq-c has already read the body into its own buffer (freed right after this call); an
        // oversize body is not copied, so consumers never hold more than maxBodyBytes per message.
        let size = envelope.message.body.len
        let message = AMQPMessage(
            body: size > maxBodyBytes ? [] : envelope.message.body.array, properties: properties, deliveryTag: envelope.delivery_tag,
            redelivered: envelope.redelivered != 0, exchange: envelope.exchange.string, routingKey: envelope.routing_key.string,
            bodySize: size
        )
        let key = ObjectIdentifier(queue)
        pendingDeliveries[key, default: (queue, [])].1.append(message)
    }

    private func flushDeliveries() {
        guard !pendingDeliveries.isEmpty else { return }
        // A handler may run jobs inline (acks, publishes) that fail the connection and flush again: take the batch first.
        let pending = pendingDeliveries
        pendingDeliveries.removeAll(keepingCapacity: true)
        for (sink, messages) in pending.values { sink.push(messages) }
    }

    private func handle(_ frame: amqp_frame_t) {
        guard frame.frame_type == UInt8(AMQP_FRAME_METHOD) else { return }
        let channelNumber = frame.channel
        let method = frame.payload.method
        // The answer to a request sent without waiting (a consume, a declare).
        if let state = channels[channelNumber], let pending = state.pending, pending.expected == method.id {
            state.pending = nil
            pending.answered(self, state, method)
            return
        }
        switch method.id {
        case AMQP_BASIC_ACK_METHOD:
            let ack = method.decoded.assumingMemoryBound(to: amqp_basic_ack_t.self).pointee
            confirm(channel: channelNumber, tag: ack.delivery_tag, multiple: ack.multiple != 0, outcome: .confirmed)
        case AMQP_BASIC_NACK_METHOD:
            let nack = method.decoded.assumingMemoryBound(to: amqp_basic_nack_t.self).pointee
            confirm(channel: channelNumber, tag: nack.delivery_tag, multiple: nack.multiple != 0, outcome: .nacked)
        case AMQP_BASIC_RETURN_METHOD:
            let returned = method.decoded.assumingMemoryBound(to: amqp_basic_return_t.self).pointee
            let code = Int(returned.reply_code)
            let text = returned.reply_text.string
            var message = amqp_message_t()
            let reply = amqp_read_message(conn, channelNumber, &message, 0)
            var messageID: String?
            if reply.reply_type == AMQP_RESPONSE_NORMAL {
                if Int32(bitPattern: message.properties._flags) & AMQP_BASIC_MESSAGE_ID_FLAG != 0 {
                    messageID = message.properties.message_id.string
                }
                amqp_destroy_message(&message)
            }
            guard let state = channels[channelNumber] else { return }
            if let messageID, let tag = state.tagsByMessageID[messageID] {
                state.returned[tag] = .returned(replyCode: code, replyText: text)
            }
            state.returnHandler?(messageID, code, text)
        case AMQP_BASIC_CANCEL_METHOD:
            let cancel = method.decoded.assumingMemoryBound(to: amqp_basic_cancel_t.self).pointee
            let tag = cancel.consumer_tag.string
            logger.warning("the broker cancelled a consumer", metadata: ["baton.consumer": "\(tag)"])
            channels[channelNumber]?.consumers.removeValue(forKey: tag)?.finish(AMQPError(
                code: .consumerCancelled, message: "the broker cancelled consumer \(tag) (its queue was deleted or is unavailable)"
            ))
        case AMQP_CHANNEL_CLOSE_OK_METHOD:
            closingChannels.remove(channelNumber)
        case AMQP_CHANNEL_CLOSE_METHOD:
            let close = method.decoded.assumingMemoryBound(to: amqp_channel_close_t.self).pointee
            var ok = amqp_channel_close_ok_t(dummy: 0)
            amqp_send_method(conn, channelNumber, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok)
            closingChannels.remove(channelNumber)
            let error = AMQPError(code: .channelClosed, message: "the broker closed channel \(channelNumber): \(close.reply_text.string)", replyCode: Int(close.reply_code))
            channels.removeValue(forKey: channelNumber)?.fail(error)
        case AMQP_CONNECTION_CLOSE_METHOD:
            let close = method.decoded.assumingMemoryBound(to: amqp_connection_close_t.self).pointee
            var ok = amqp_connection_close_ok_t(dummy: 0)
            amqp_send_method(conn, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok)
            fail(AMQPError(code: .connectionClosed, message: "the broker closed the connection: \(close.reply_text.string)", replyCode: Int(close.reply_code)))
        case AMQP_CONNECTION_BLOCKED_METHOD:
            let blocked = method.decoded.assumingMemoryBound(to: amqp_connection_blocked_t.self).pointee
            let reason = blocked.reason.string
            lock.withLock { blockedReason = reason.isEmpty ? "resource alarm" : reason }
            logger.warning("the broker blocked publishing on this connection", metadata: ["baton.amqp": "\(url)", "baton.reason": "\(reason)"])
        case AMQP_CONNECTION_UNBLOCKED_METHOD:
            lock.withLock { blockedReason = nil }
            logger.info("the broker unblocked publishing on this connection", metadata: ["baton.amqp": "\(url)"])
        default:
            logger.debug("ignored an AMQP method", metadata: ["baton.method": "\(method.id)", "baton.channel": "\(channelNumber)"])
        }
    }

    private func confirm(channel number: UInt16, tag: UInt64, multiple: Bool, outcome: PublishOutcome) {
        guard let state = channels[number] else { return }
        state.unconfirmed?.answered(tag, multiple: multiple, nacked: outcome == .nacked)
        let tags = multiple ? state.confirmWaits.keys.filter { $0 <= tag } : [tag]
        for confirmed in tags {
            let final = outcome == .confirmed ? (state.returned.removeValue(forKey: confirmed) ?? outcome) : outcome
            state.confirmWaits.removeValue(forKey: confirmed)?.resolve(.success(final))
        }
        if multiple {
            state.returned = state.returned.filter { $0.key > tag }
        } else {
            state.returned.removeValue(forKey: tag)
        }
        if !state.tagsByMessageID.isEmpty {
            state.tagsByMessageID = state.tagsByMessageID.filter { state.confirmWaits[$0.value] != nil }
        }
    }

    // MARK: - Operations (called from jobs)

    func open() throws(AMQPError) {
        guard let conn = amqp_new_connection() else {
            throw AMQPError(code: .connectionFailed, message: "out of memory creating a connection to \(url)")
        }
        self.conn = conn
        let socket: OpaquePointer?
        if url.tls {
            socket = amqp_ssl_socket_new(conn)
            guard let socket else { throw connectFailure("cannot create a TLS socket") }
            amqp_ssl_socket_set_verify_peer(socket, url.verifyPeer ? 1 : 0)
            amqp_ssl_socket_set_verify_hostname(socket, url.verifyPeer ? 1 : 0)
            let caFile = url.caCertificateFile ?? (FileManager.default.fileExists(atPath: "/etc/ssl/certs/ca-certificates.crt") ? "/etc/ssl/certs/ca-certificates.crt" : nil)
            if let caFile {
                let status = amqp_ssl_socket_set_cacert(socket, caFile)
                guard status == AMQP_STATUS_OK.rawValue else { throw connectFailure("cannot read CA file \(caFile): \(statusText(status))") }
            }
            if let certificate = url.certificateFile, let key = url.keyFile {
                let status = amqp_ssl_socket_set_key(socket, certificate, key)
                guard status == AMQP_STATUS_OK.rawValue else { throw connectFailure("cannot read client certificate \(certificate) or key: \(statusText(status))") }
            }
        } else {
            socket = amqp_tcp_socket_new(conn)
        }
        guard let socket else { throw connectFailure("cannot create a socket") }
        let milliseconds = url.connectionTimeoutMilliseconds
        var timeout = timeval(tv_sec: milliseconds / 1000, tv_usec: suseconds_t((milliseconds % 1000) * 1000))
        let opened = amqp_socket_open_noblock(socket, url.host, Int32(url.port), &timeout)
        guard opened == AMQP_STATUS_OK.rawValue else { throw connectFailure(statusText(opened)) }
        amqp_set_handshake_timeout(conn, &timeout)
        amqp_set_rpc_timeout(conn, &timeout)

        let arena = CArena()
        var properties = arena.table([
            "product": .string("baton"),
            "connection_name": .string(name),
            "capabilities": .table([
                "consumer_cancel_notify": .bool(true),
                "connection.blocked": .bool(true),
                "publisher_confirms": .bool(true),
                "basic.nack": .bool(true),
                "exchange_exchange_bindings": .bool(true),
                "authentication_failure_close": .bool(true),
            ]),
        ])
        let reply = CBaton_amqp_login_plain(conn, url.virtualHost, 0, 131_072, Int32(url.heartbeatSeconds), &properties, url.user, url.password)
        guard reply.reply_type == AMQP_RESPONSE_NORMAL else {
            let (message, code) = describe(reply)
            throw AMQPError(code: .connectionFailed, message: "cannot log in to \(url) as \(url.user): \(message)", replyCode: code)
        }
        logger.debug("connected to RabbitMQ", metadata: ["baton.amqp": "\(url)", "baton.connection": "\(name)"])
    }

    private func connectFailure(_ reason: String) -> AMQPError {
        AMQPError(code: .connectionFailed, message: "cannot connect to \(url): \(reason)")
    }

    func openChannel() throws(AMQPError) -> UInt16 {
        var number = nextChannel
        while channels[number] != nil || closingChannels.contains(number) { number = number == UInt16.max ? 1 : number + 1 }
        nextChannel = number == UInt16.max ? 1 : number + 1
        amqp_channel_open(conn, number)
        try check(amqp_get_rpc_reply(conn), channel: number, doing: "open channel \(number)")
        channels[number] = ChannelState(number: number)
        return number
    }

    func closeChannel(_ number: UInt16) {
        guard let state = channels.removeValue(forKey: number) else { return }
        let error = AMQPError(code: .channelClosed, message: "channel \(number) was closed by the application")
        state.fail(error, consumersToo: false)
        for queue in state.consumers.values { queue.finish(nil) }
        let reply = amqp_channel_close(conn, number, AMQP_REPLY_SUCCESS)
        if reply.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION {
            fail(AMQPError(code: .connectionClosed, message: "closing channel \(number) failed: \(statusText(reply.library_error))"))
        }
    }

    /// Sends `method` on `channel` without waiting for its answer: the I/O thread goes on with the other
    /// channels, and the answer (`expecting`, handled as it arrives) goes to `pending`. A quorum queue
    /// answers a consume or a declare from its leader, so a stalled leader would otherwise hold the whole
    /// connection (every other channel's deliveries and acks) until it answers.
    func send(
        _ id: amqp_method_number_t, _ decoded: UnsafeMutableRawPointer, expecting: amqp_method_number_t, channel number: UInt16, doing what: String,
        pending: PendingReply
    ) throws(AMQPError) {
        guard let state = channels[number], state.pending == nil else {
            throw AMQPError(code: .channelClosed, message: "\(what): channel \(number) is closed or already waits for an answer")
        }
        try status(amqp_send_method(conn, number, id, decoded), doing: what)
        state.pending = pending
    }

    /// Sends `basic.consume` without waiting (``send(_:_:expecting:channel:doing:pending:)``): its
    /// consume-ok starts `sink` and resolves `wait` with the tag.
    func startConsume(
        queue: String, noAck: Bool, exclusive: Bool, arguments: [String: AMQPValue], channel number: UInt16, sink: any DeliverySink, wait: ReplyWait<String>
    ) throws(AMQPError) {
        let arena = CArena()
        var method = amqp_basic_consume_t(
            ticket: 0, queue: arena.bytes(queue), consumer_tag: amqp_empty_bytes, no_local: 0, no_ack: noAck ? 1 : 0,
            exclusive: exclusive ? 1 : 0, nowait: 0, arguments: arena.table(arguments)
        )
        let pending = PendingReply(
            id: ObjectIdentifier(wait), expected: AMQP_BASIC_CONSUME_OK_METHOD,
            answered: { io, state, method in
                let tag = method.decoded.assumingMemoryBound(to: amqp_basic_consume_ok_t.self).pointee.consumer_tag.string
                if wait.resolve(.success(tag)) {
                    state.consumers[tag] = sink
                } else {
                    // The caller gave up waiting: nobody takes these deliveries, so the channel goes (and
                    // with it the consumer; the broker returns what it delivered to the queue).
                    io.abandonChannel(state.number, error: AMQPError(code: .channelClosed, message: "channel \(state.number) was closed: its consume was answered after the caller gave up"))
                }
            },
            failed: { wait.resolve(.failure($0)) }
        )
        try send(AMQP_BASIC_CONSUME_METHOD, &method, expecting: AMQP_BASIC_CONSUME_OK_METHOD, channel: number, doing: "consume from '\(queue)'", pending: pending)
    }

    /// Sends `queue.declare` without waiting (``send(_:_:expecting:channel:doing:pending:)``): its
    /// declare-ok resolves `wait` with the queue's ready messages and consumers.
    func startDeclare(
        queue: String, passive: Bool, durable: Bool, arguments: [String: AMQPValue], channel number: UInt16, wait: ReplyWait<QueueCounts>
    ) throws(AMQPError) {
        let arena = CArena()
        var method = amqp_queue_declare_t(
            ticket: 0, queue: arena.bytes(queue), passive: passive ? 1 : 0, durable: durable ? 1 : 0, exclusive: 0, auto_delete: 0, nowait: 0,
            arguments: arena.table(arguments)
        )
        let pending = PendingReply(
            id: ObjectIdentifier(wait), expected: AMQP_QUEUE_DECLARE_OK_METHOD,
            answered: { _, _, method in
                let ok = method.decoded.assumingMemoryBound(to: amqp_queue_declare_ok_t.self).pointee
                wait.resolve(.success(QueueCounts(messages: Int(ok.message_count), consumers: Int(ok.consumer_count))))
            },
            failed: { wait.resolve(.failure($0)) }
        )
        try send(AMQP_QUEUE_DECLARE_METHOD, &method, expecting: AMQP_QUEUE_DECLARE_OK_METHOD, channel: number, doing: "declare queue '\(queue)'", pending: pending)
    }

    /// The caller of ``send(_:_:expecting:channel:doing:pending:)`` stopped waiting for request `id`: when
    /// it is still unanswered, its channel is closed without waiting (``abandonChannel(_:error:)``).
    func abandon(_ id: ObjectIdentifier, channel number: UInt16, error: AMQPError) {
        guard channels[number]?.pending?.id == id else { return }
        abandonChannel(number, error: error)
    }

    /// Closes `number` without waiting for the broker's close-ok (which a channel stuck on a stalled
    /// queue sends late): everything pending on it fails with `error` now, and its number stays unused
    /// until the close-ok arrives.
    func abandonChannel(_ number: UInt16, error: AMQPError) {
        guard let conn, failure == nil, let state = channels.removeValue(forKey: number) else { return }
        state.fail(error)
        closingChannels.insert(number)
        var close = amqp_channel_close_t(reply_code: UInt16(AMQP_REPLY_SUCCESS), reply_text: amqp_empty_bytes, class_id: 0, method_id: 0)
        let sent = amqp_send_method(conn, number, AMQP_CHANNEL_CLOSE_METHOD, &close)
        if sent != AMQP_STATUS_OK.rawValue {
            fail(AMQPError(code: .connectionClosed, message: "closing channel \(number) failed: \(statusText(sent))"))
        }
    }

    func closeConnection() {
        guard let conn, failure == nil else { return }
        _ = amqp_connection_close(conn, AMQP_REPLY_SUCCESS)
        fail(AMQPError(code: .closed, message: "the connection \(name) was closed"))
    }

    /// Publishes on `channel`; returns the confirm tag (meaningful in confirm mode).
    func publish(_ message: OutgoingMessage, channel number: UInt16) throws(AMQPError) -> UInt64 {
        guard let state = channels[number] else {
            throw AMQPError(code: .channelClosed, message: "channel \(number) is closed")
        }
        let arena = CArena()
        var raw = amqp_basic_properties_t()
        var flags: Int32 = 0
        let p = message.properties
        if let value = p.contentType { raw.content_type = arena.bytes(value); flags |= AMQP_BASIC_CONTENT_TYPE_FLAG }
        if let value = p.correlationIDBytes { raw.correlation_id = arena.bytes(value); flags |= AMQP_BASIC_CORRELATION_ID_FLAG }
        if let value = p.replyTo { raw.reply_to = arena.bytes(value); flags |= AMQP_BASIC_REPLY_TO_FLAG }
        if let value = p.messageID { raw.message_id = arena.bytes(value); flags |= AMQP_BASIC_MESSAGE_ID_FLAG }
        if let value = p.expiration { raw.expiration = arena.bytes(value); flags |= AMQP_BASIC_EXPIRATION_FLAG }
        if let value = p.deliveryMode { raw.delivery_mode = value; flags |= AMQP_BASIC_DELIVERY_MODE_FLAG }
        if let value = p.userID { raw.user_id = arena.bytes(value); flags |= AMQP_BASIC_USER_ID_FLAG }
        if !p.headers.isEmpty { raw.headers = arena.table(p.headers.mapValues { .string($0) }); flags |= AMQP_BASIC_HEADERS_FLAG }
        raw._flags = amqp_flags_t(UInt32(bitPattern: flags))
        let status = amqp_basic_publish(
            conn, number, arena.bytes(message.exchange), arena.bytes(message.routingKey),
            message.mandatory ? 1 : 0, 0, &raw, arena.bytes(message.body)
        )
        try self.status(status, doing: "publish to '\(message.exchange)' with key '\(message.routingKey)'")
        let tag = state.nextPublishTag
        if state.confirmMode { state.nextPublishTag += 1 }
        return tag
    }

    /// Runs publishes, acks and rejects on `channel`, in order.
    func perform(_ actions: [ChannelAction], channel: UInt16) throws(AMQPError) {
        for action in actions {
            switch action {
            case .publish(let message):
                let tag = try publish(message, channel: channel)
                if let unconfirmed = channels[channel]?.unconfirmed { unconfirmed.sent(tag, at: .now) }
            case .ack(let tag, let multiple): try status(amqp_basic_ack(conn, channel, tag, multiple ? 1 : 0), doing: "ack")
            case .reject(let tag, let requeue): try status(amqp_basic_reject(conn, channel, tag, requeue ? 1 : 0), doing: "reject")
            }
        }
    }

    /// Turns a failed rabbitmq-c status into an error (and marks the connection dead when it is).
    func status(_ status: Int32, doing what: String) throws(AMQPError) {
        guard status != AMQP_STATUS_OK.rawValue else { return }
        let error = AMQPError(code: .connectionClosed, message: "\(what) failed: \(statusText(status))")
        fail(error)
        throw error
    }

    /// Checks a synchronous call's reply, answering broker-initiated closes.
    func check(_ reply: amqp_rpc_reply_t, channel: UInt16, doing what: String) throws(AMQPError) {
        switch reply.reply_type {
        case AMQP_RESPONSE_NORMAL:
            return
        case AMQP_RESPONSE_SERVER_EXCEPTION where reply.reply.id == AMQP_CHANNEL_CLOSE_METHOD:
            var ok = amqp_channel_close_ok_t(dummy: 0)
            amqp_send_method(conn, channel, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok)
            let (message, code) = describe(reply)
            let error = AMQPError(code: .channelClosed, message: "\(what): \(message)", replyCode: code)
            channels.removeValue(forKey: channel)?.fail(error)
            throw error
        case AMQP_RESPONSE_SERVER_EXCEPTION where reply.reply.id == AMQP_CONNECTION_CLOSE_METHOD:
            var ok = amqp_connection_close_ok_t(dummy: 0)
            amqp_send_method(conn, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok)
            let (message, code) = describe(reply)
            let error = AMQPError(code: .connectionClosed, message: "\(what): \(message)", replyCode: code)
            fail(error)
            throw error
        case AMQP_RESPONSE_LIBRARY_EXCEPTION where reply.library_error == AMQP_STATUS_TIMEOUT.rawValue:
            let error = AMQPError(code: .timeout, message: "\(what): the broker did not answer within \(url.connectionTimeoutMilliseconds) ms")
            fail(error)
            throw error
        default:
            let (message, code) = describe(reply)
            let error = AMQPError(code: .connectionClosed, message: "\(what): \(message)", replyCode: code)
            fail(error)
            throw error
        }
    }
}
