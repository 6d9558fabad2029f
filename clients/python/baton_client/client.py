"""The Baton client (protocol sections 3, 9, 12, 15, 17, 18)."""

from __future__ import annotations

import json
import logging
import threading
import time
import unicodedata
import weakref
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FuturesTimeout
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Union
from urllib.parse import unquote, urlsplit, urlunsplit

import pika

from ._io import Call, IOThread
from ._partition import partition as _partition
from .errors import (
    BatonError,
    BatonTimeoutError,
    ClientClosedError,
    ProtocolError,
    RejectedError,
)
from .requests import (
    ADMIN_EXCHANGE,
    MAX_BODY_BYTES,
    REQUESTS_EXCHANGE,
    Request,
    deadline_after,
    waiting_claim_times,
)
from .lease import KeptMembership, Lease, LeaseChange
from .watch import Watch
from .types import (
    Description,
    EventsPage,
    Membership,
    ReleasedConnection,
    Reply,
    parse_reply,
)



log = logging.getLogger("baton_client")

__all__ = ["Client", "redact_url"]

#: Deadlines may lie at most 300 s after the database's time (section 3.2).
MAX_TIMEOUT = 300.0
#: The revision that brought waiting claims (``wait_ms``, section 19).
WAIT_REVISION = 4
#: The revision that added replica memberships (``join``, ``leave``; section 20).
MEMBERSHIP_REVISION = 6


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``********``.

    A password with an unencoded ``/``, ``?`` or ``#`` makes the URL parse with the host part cut
    before the ``@``; everything between ``://`` and the last ``@`` is then treated as the user
    information, so the password never survives redaction.
    """
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        userinfo, _, after = rest.rpartition("@")
        if any(c in userinfo for c in "/?#"):
            user = userinfo.split(":", 1)[0]
            return f"{scheme}://{user}:********@{after}" if ":" in userinfo else f"{scheme}://********@{after}"
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, hostport = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:********@{hostport}" if ":" in userinfo else f"{user}@{hostport}"
    query = parts.query
    if "password=" in query:
        query = "&".join("password=********" if q.startswith("password=") else q
                         for q in query.split("&"))
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"),
                      allow_nan=False).encode("utf-8")


class Client:
    """A Baton client on one AMQP connection.

    **Thread model.** A client owns one background I/O thread that owns the pika connection; every
    public method may be called from any number of threads at once (each call blocks only its own
    thread). Leases (:meth:`lease`) renew from their own threads and watches (:meth:`watch`) are
    iterated by the thread that iterates them. Close the client (or use it as a context manager)
    to stop the I/O thread.

    :param url: ``amqp://user:password@host:port/vhost`` (the vhost percent-encoded; ``amqps://`` for
        TLS, with pika's ``ssl_options``). The URL's user is sent as ``user_id``, the principal
        (section 3.1). Several comma-separated URLs name the nodes of one broker cluster, all with
        the same user: the client connects to the first that answers and, when its connection fails
        or dies, tries the next one first (a comma in a password is written ``%2C``).
    :param partitions: N. When ``None``, N is discovered with ``describe`` (section 17).
    :param timeout: default timeout of a call, in seconds (at most 300, the deadline limit).
    :param resend_after: resend an unanswered request (same body, same ``request_id``) every this
        many seconds; ``None`` never resends.
    :param confirms: publish in publisher-confirm mode (a nack resends at once).
    :param stale_after: with confirms, when a request has had no broker confirm for this many
        seconds, every waiting call is published again on a new channel (0 never). The broker
        confirms once the partition's queue holds the request, whatever the workers do; a missing
        confirm means it cannot reach the queue (a RabbitMQ 3.10 channel keeps sending to a quorum
        queue leader whose node froze; docs/protocol.md, section 9).
    """

    def __init__(self, url: str, partitions: Optional[int] = None, timeout: float = 5.0,
                 resend_after: Optional[float] = 1.5, *, confirms: bool = True,
                 stale_after: float = 1.0, connection_name: Optional[str] = None, connect_timeout: Optional[float] = None,
                 orphan_window: float = 120.0):
        if not 0 < timeout <= MAX_TIMEOUT:
            raise ValueError(f"timeout must be in (0, {MAX_TIMEOUT:g}] seconds, got {timeout!r}")
        if partitions is not None and (isinstance(partitions, bool) or
                                       not isinstance(partitions, int) or
                                       not 1 <= partitions <= 1024):
            raise ValueError(f"partitions must be an integer from 1 to 1024, got {partitions!r}")
        # Several comma-separated URLs name the nodes of one broker cluster (a comma in a password is
        # written %2C): the client connects to the first that answers and moves on when it dies.
        urls = [u.strip() for u in url.split(",")]
        self.url_redacted = ",".join(redact_url(u) for u in urls)
        nodes: List[pika.URLParameters] = []
        secrets: List[str] = []
        users: List[str] = []
        for one in urls:
            redacted = redact_url(one)
            if not one:
                raise ValueError(f"an empty broker URL in {self.url_redacted!r}")
            parts = urlsplit(one)
            try:
                params = pika.URLParameters(one)
            except Exception as exc:
                raise ValueError(f"invalid AMQP URL {redacted}: {type(exc).__name__}") from None
            node_user = getattr(params.credentials, "username", None) or unquote(parts.username or "")
            if not node_user:
                raise ValueError(f"the AMQP URL {redacted} names no user; the user is the "
                                 f"principal sent as user_id")
            params.client_properties = {"connection_name": connection_name or f"baton-python:{node_user}",
                                        "product": "baton_client (python)"}
            nodes.append(params)
            secrets.append(unquote(parts.password or ""))
            users.append(node_user)
        if len(set(users)) > 1:
            raise ValueError(f"the broker URLs name different users ({', '.join(sorted(set(users)))}): the user "
                             f"is the principal sent as user_id, one per client")
        user = users[0]
        self.user = user
        self.timeout = float(timeout)
        self.resend_after = resend_after
        self.orphan_window = orphan_window
        self.revision: Optional[int] = None
        self.description: Optional[Description] = None
        # The revision each partition's worker reported (describe answers with its partition).
        self._revisions: Dict[int, int] = {}
        self._closed = False
        self._background: Set[threading.Thread] = set()
        self._bg_lock = threading.Lock()
        self._leases: "weakref.WeakSet[Any]" = weakref.WeakSet()
        self._watches: "weakref.WeakSet[Any]" = weakref.WeakSet()
        if not stale_after >= 0:
            raise ValueError(f"stale_after must be 0 or more seconds, got {stale_after!r}")
        self._io = IOThread(nodes, user=user, redacted_url=[redact_url(u) for u in urls], secret=secrets,
                            confirms=confirms, stale_after=float(stale_after))
        self._io.start()
        try:
            self._io.wait_connected(connect_timeout if connect_timeout is not None else timeout)
            # Always once (section 9, "Discovering the deployment"): N when it was not given, the
            # revision in any case, and a given N checked against the deployment's.
            try:
                d = self.describe()
            except BatonTimeoutError:
                if partitions is None:
                    raise
                # N is given and no worker answers yet: go on; the revision stays unknown.
                log.warning("describe got no reply; using partitions=%d with the revision unknown", partitions)
                d = None
            except RejectedError as exc:
                if exc.code != "unknown_op":
                    raise
                if partitions is None:
                    raise BatonError(
                        "the worker does not know describe (it speaks a revision below 3): "
                        "pass partitions=N") from exc
                self.revision = 2
                d = None
            if d is not None:
                if not 1 <= d.partitions <= 1024:
                    raise ProtocolError(f"describe reported partitions={d.partitions}")
                if partitions is not None and partitions != d.partitions:
                    raise ValueError(f"partitions={partitions} was given, but the deployment has "
                                     f"N={d.partitions} (describe): requests would be misrouted")
                partitions = d.partitions
        except BaseException:
            self._io.close(1.0)
            raise
        assert partitions is not None  # given, or described (every path without either raised)
        self.partitions: int = partitions

    # ------------------------------------------------------------------ lifecycle

    def close(self, wait_background: Optional[float] = None) -> None:
        """Close the client: release the leases its keepers still hold, end its watches, wait up
        to ``wait_background`` seconds (default: the timeout) for background clean-ups of
        cancelled claims (section 9, "Cancelled calls") and close the connection."""
        if self._closed:
            return
        wait = self.timeout if wait_background is None else wait_background
        end = time.monotonic() + wait
        for w in list(self._watches):
            w.close()
        for lease in list(self._leases):
            try:
                lease.release(timeout=max(0.5, min(self.timeout, end - time.monotonic())))
            except Exception as exc:  # never let one lease stop the close
                log.warning("releasing %r on close failed: %s", lease.buffer, exc)
        with self._bg_lock:
            threads = list(self._background)
        for t in threads:
            t.join(max(0.0, end - time.monotonic()))
        self._closed = True
        self._io.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._io.connected

    def partition_of(self, buffer: str) -> int:
        """The partition of ``buffer`` in its NFC form, as requests carry it (section 3.2)."""
        return _partition(unicodedata.normalize("NFC", buffer), self.partitions)

    def _route(self, req: Request) -> int:
        """The partition of a request about one buffer."""
        if req.buffer is None:
            raise ValueError(f"a {req.op} request names no buffer: give its partition")
        return self.partition_of(req.buffer)

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosedError("the client is closed")

    def _timeout(self, timeout: Optional[float]) -> float:
        t = self.timeout if timeout is None else float(timeout)
        if not 0 < t <= MAX_TIMEOUT:
            raise ValueError(f"timeout must be in (0, {MAX_TIMEOUT:g}] seconds, got {timeout!r}")
        return t

    def _send_deadline(self) -> bool:
        # `deadline` is a revision 2 field (compatibility rules).
        return self.revision is None or self.revision >= 2

    def _require_revision(self, rev: int, what: str) -> None:
        if self.revision is not None and self.revision < rev:
            raise BatonError(f"{what} needs protocol revision {rev}; the worker speaks revision "
                             f"{self.revision}")

    # ------------------------------------------------------------------ low level

    def _make_call(self, requests: Union[Request, Sequence[Request]], routing_key: int,
                   timeout: float, resend_after: Optional[float], label: str,
                   publish_for: Optional[float] = None, waiting: bool = False,
                   max_resend_interval: Optional[float] = None) -> Call:
        """A call that waits ``timeout`` seconds for its reply; its ``deadline`` and
        ``expiration`` end ``publish_for`` seconds from now (default: ``timeout``)."""
        publish = timeout if publish_for is None else min(publish_for, timeout)
        deadline = deadline_after(publish) if self._send_deadline() else None
        if isinstance(requests, Request):
            body = requests.body(deadline)
            exchange = requests.exchange
            expected = 0
            rid: Optional[str] = requests.request_id
        else:
            body = {"v": 1, "batch": [r.body(deadline) for r in requests]}
            exchange = ADMIN_EXCHANGE if any(r.op == "force_release" for r in requests) \
                else REQUESTS_EXCHANGE
            expected = len(requests)
            rid = None
        data = _dumps(body)
        if len(data) > MAX_BODY_BYTES:
            raise ValueError(f"the request body is {len(data)} bytes; at most {MAX_BODY_BYTES} "
                             f"are allowed (section 3.2)")
        return Call(exchange=exchange, routing_key=str(routing_key), body=data, timeout=timeout,
                    resend_after=resend_after, expected=expected, label=label, request_id=rid,
                    publish_for=publish, waiting=waiting, max_resend_interval=max_resend_interval)

    def _wait(self, call: Call) -> Any:
        try:
            return call.future.result(timeout=call.timeout + 5.0)
        except BatonError:
            raise
        except CancelledError:
            raise ClientClosedError("the call was cancelled") from None
        except FuturesTimeout:
            self._io.cancel(call)
            raise BatonTimeoutError(f"no reply to {call.label} within {call.timeout:g} s",
                                    call.request_id) from None
        except BaseException:  # KeyboardInterrupt and the like: stop resending it
            self._io.cancel(call)
            raise

    def _submit(self, call: Call) -> Call:
        self._check_open()
        return self._io.submit(call)

    def _single(self, req: Request, partition: int, timeout: Optional[float] = None,
                resend_after: Any = "default") -> Reply:
        t = self._timeout(timeout)
        ra = self.resend_after if resend_after == "default" else resend_after
        call = self._submit(self._make_call(req, partition, t, ra, req.op))
        return self._finish_single(call)

    @staticmethod
    def _finish_single_obj(obj: Any) -> Reply:
        return parse_reply(obj).raise_for_error()

    def _finish_single(self, call: Call) -> Reply:
        return self._finish_single_obj(self._wait(call))

    def _routing_partition(self, buffer: Optional[str], partition: Optional[int]) -> int:
        if partition is not None:
            return int(partition)
        if buffer is not None:
            return self.partition_of(buffer)
        return 0

    # ------------------------------------------------------------------ ops

    def claim(self, buffer: str, user: str, connection: str, lease_ms: Optional[int] = None, *,
              wait_ms: Optional[int] = None, request_id: Optional[str] = None,
              timeout: Optional[float] = None) -> Reply:
        """Claim ``buffer`` (section 4). Returns a ``granted`` or ``denied`` reply.

        With ``wait_ms`` (1-300000, revision 4, section 19) a claim that finds the buffer held waits
        in the buffer's line for up to ``wait_ms`` milliseconds instead of being denied: the call
        returns ``granted`` when the line reaches it, or ``denied`` when the wait ran out. The call
        then waits up to ``wait_ms`` plus ``timeout`` for the answer; the request's ``deadline``
        and ``expiration`` are the same, but at most 299 s ahead (the protocol allows 300 s; the
        worker then lets the claim wait only until that deadline). A waiting claim is always sent
        alone and only to a partition whose worker reports revision 4 or later (``describe``);
        it is resent with the same ``request_id`` and body (every ``resend_after`` and after a
        reconnect), which moves the answer to the new channel.

        If the call times out or is interrupted, the client does not leave the possible grant
        behind (section 9, "Cancelled calls"): in the background it asks again with the same
        ``request_id`` and body and releases what was granted (for a waiting claim, for as long
        as the claim can still be granted)."""
        req = Request.claim(buffer, user, connection, lease_ms, request_id=request_id,
                            wait_ms=wait_ms)
        return self._claim(req, timeout)[0]

    def _claim(self, req: Request, timeout: Optional[float],
               resend_after: Any = "default") -> "tuple[Reply, Call]":
        t = self._timeout(timeout)
        ra = self.resend_after if resend_after == "default" else resend_after
        p = self._route(req)
        if req.waiting:
            self._check_open()
            self._require_partition_revision(p, WAIT_REVISION, "a claim with wait_ms")
            wait_ms = req.fields["wait_ms"]
            local, publish = waiting_claim_times(wait_ms, t)
            call = self._make_call(req, p, local, ra, f"claim (waiting up to {wait_ms} ms)",
                                   publish_for=publish, waiting=True)
        else:
            call = self._make_call(req, p, t, ra, "claim")
        self._submit(call)
        try:
            obj = self._wait(call)
        except (BatonTimeoutError, KeyboardInterrupt, SystemExit, ClientClosedError):
            self._io.cancel(call)
            self._resolve_orphan_claim(req, call)
            raise
        return self._finish_single_obj(obj), call

    def renew(self, buffer: str, connection: str, token: int, lease_ms: Optional[int] = None, *,
              request_id: Optional[str] = None, timeout: Optional[float] = None) -> Reply:
        """Renew a lease, or a membership by its token (sections 4, 20): ``renewed`` (a
        :class:`~baton_client.types.Membership` for a membership) or ``not_owner``."""
        req = Request.renew(buffer, connection, token, lease_ms, request_id=request_id)
        return self._single(req, self._route(req), timeout)

    def release(self, buffer: str, connection: str, token: int, *,
                request_id: Optional[str] = None, timeout: Optional[float] = None) -> Reply:
        """Release a lease (section 4): ``released`` or ``not_owner``."""
        req = Request.release(buffer, connection, token, request_id=request_id)
        return self._single(req, self._route(req), timeout)

    def join(self, buffer: str, user: str, connection: str, lease_ms: Optional[int] = None, *,
             request_id: Optional[str] = None, timeout: Optional[float] = None) -> Membership:
        """Join ``buffer``'s collaborators (section 20, revision 6): a ``joined``
        :class:`~baton_client.types.Membership` whose ``replica_id`` is unique among the buffer's
        live members; a join by a connection that is a member already extends it (same id and
        token). Sent only to a partition whose worker reports revision 6 or later. Raises
        :class:`~baton_client.errors.RejectedError` for ``members_full`` or a connection that is
        a member under another user (``invalid_request``)."""
        req = Request.join(buffer, user, connection, lease_ms, request_id=request_id)
        p = self._route(req)
        self._require_partition_revision(p, MEMBERSHIP_REVISION, "join")
        reply = self._single(req, p, timeout).raise_for_error()
        if not isinstance(reply, Membership) or reply.status != "joined":
            raise ProtocolError(f"join was answered with status {reply.status!r}")
        return reply

    def leave(self, buffer: str, connection: str, token: int, *, request_id: Optional[str] = None,
              timeout: Optional[float] = None) -> Reply:
        """End the membership of ``connection`` holding ``token`` at once (section 20): ``left``
        (a :class:`~baton_client.types.Membership`; the id is free for the next join) or
        ``not_member``."""
        req = Request.leave(buffer, connection, token, request_id=request_id)
        p = self._route(req)
        self._require_partition_revision(p, MEMBERSHIP_REVISION, "leave")
        return self._single(req, p, timeout)

    def inspect(self, buffer: str, *, timeout: Optional[float] = None) -> Reply:
        """The buffer's ``state`` (section 4): a :class:`~baton_client.types.State`, with the
        buffer's live members from revision 6 workers."""
        req = Request.inspect(buffer)
        return self._single(req, self._route(req), timeout)

    def force_release(self, buffer: str, reason: Optional[str] = None, *,
                      request_id: Optional[str] = None,
                      timeout: Optional[float] = None) -> Reply:
        """Release ``buffer`` whoever holds it, through ``baton.admin`` (section 12); needs an
        operator's broker user. ``released`` or ``not_owner``; raises
        :class:`~baton_client.errors.ForbiddenError` when the broker refuses the publish."""
        req = Request.force_release(buffer, reason, request_id=request_id)
        return self._single(req, self._route(req), timeout)

    def describe(self, *, partition: int = 0, timeout: Optional[float] = None) -> Description:
        """Describe the deployment (section 17); also records ``revision`` on the client."""
        req = Request.describe()
        d = self._single(req, partition, timeout)
        if not isinstance(d, Description):
            raise ProtocolError(f"describe was answered with status {d.status!r}")
        self.description = d
        self.revision = d.revision
        if d.partition is not None:
            self._revisions[d.partition] = d.revision
        return d

    def _require_partition_revision(self, partition: int, rev: int, what: str) -> None:
        """Refuse ``what`` unless the worker of ``partition`` reported revision ``rev`` or later
        (compatibility rules; section 17: during a rolling upgrade, send a revision's fields only
        to partitions that answered ``describe`` with at least that revision). A partition not
        yet known (or known below ``rev``, which an upgrade may have changed) is asked once more
        with ``describe``; only a revision of at least ``rev`` is remembered."""
        known = self._revisions.get(partition)
        if known is not None and known >= rev:
            return
        try:
            d = self._single(Request.describe(), partition)
        except BatonTimeoutError as exc:
            raise BatonTimeoutError(
                f"{what} needs protocol revision {rev}, and the revision of partition "
                f"{partition}'s worker is unknown: describe got no reply ({exc})") from None
        except RejectedError as exc:
            if exc.code != "unknown_op":
                raise
            d = None  # a worker below revision 3 (section 9, "Discovering the deployment")
        got = d.revision if isinstance(d, Description) else 2
        if isinstance(d, Description) and got >= rev:
            self._revisions[partition] = got
            return
        raise BatonError(f"{what} needs protocol revision {rev}; the worker of partition "
                         f"{partition} speaks revision {got} (describe)")

    def events(self, partition: Optional[int] = None, *, buffer: Optional[str] = None,
               after: Optional[int] = None, limit: Optional[int] = None,
               timeout: Optional[float] = None) -> EventsPage:
        """Read a partition's history after position ``after`` (section 18). Give ``partition``,
        or ``buffer`` (its partition, and only its changes), or both (they must agree, otherwise
        the worker answers ``misrouted``)."""
        if partition is None and buffer is None:
            raise ValueError("give a partition or a buffer")
        self._require_revision(3, "events")
        req = Request.events(buffer, after, limit)
        page = self._single(req, self._routing_partition(buffer, partition), timeout)
        if not isinstance(page, EventsPage):
            raise ProtocolError(f"events was answered with status {page.status!r}")
        return page

    def _events_call(self, partition: int, buffer: Optional[str], after: Optional[int],
                     limit: Optional[int], timeout: Optional[float] = None) -> Call:
        req = Request.events(buffer, after, limit)
        t = self._timeout(timeout)
        return self._submit(self._make_call(req, partition, t, self.resend_after, "events"))

    def release_connection(self, connection: str, *, request_id: Optional[str] = None,
                           timeout: Optional[float] = None) -> ReleasedConnection:
        """Release every buffer the connection holds (of this principal), on all N partitions
        (sections 4, 9): one ``request_id`` and body to every partition; the replies' ``buffers``
        are merged (sorted) and their ``released_count`` added up. Partitions that do not answer
        are resent with the same ``request_id`` until the timeout; then
        :class:`~baton_client.errors.BatonTimeoutError` has ``partial`` = the replies by
        partition."""
        req = Request.release_connection(connection, request_id=request_id)
        t = self._timeout(timeout)
        deadline = deadline_after(t) if self._send_deadline() else None
        data = _dumps(req.body(deadline))
        calls = []
        for p in range(self.partitions):
            calls.append(Call(exchange=REQUESTS_EXCHANGE, routing_key=str(p), body=data,
                              timeout=t, resend_after=self.resend_after,
                              label=f"release_connection (partition {p})",
                              request_id=req.request_id))
        for c in calls:
            self._submit(c)
        replies: Dict[int, Reply] = {}
        missing: List[int] = []
        first_exc: Optional[BaseException] = None
        for p, c in enumerate(calls):
            try:
                r = parse_reply(self._wait(c))
            except BatonTimeoutError:
                missing.append(p)
                continue
            except BaseException as exc:  # unroutable, forbidden, closed
                if first_exc is None:
                    first_exc = exc
                continue
            replies[p] = r
        if first_exc is not None:
            raise first_exc
        if missing:
            raise BatonTimeoutError(
                f"no reply to release_connection (request_id {req.request_id}) from partitions "
                f"{missing} within {t:g} s; retry with the same request_id", req.request_id,
                partial=replies)
        for p in sorted(replies):
            replies[p].raise_for_error()
        per = tuple(r for _, r in sorted(replies.items()))
        bufs = sorted({b for r in per if isinstance(r, ReleasedConnection) for b in r.buffers})
        count = sum(r.released_count for r in per if isinstance(r, ReleasedConnection))
        ended = sum(r.ended_memberships for r in per if isinstance(r, ReleasedConnection))
        ats = [r.at for r in per if r.at]
        return ReleasedConnection(
            status="released_connection", request_id=req.request_id, buffer=None, holder=None,
            token=None, expires_at=None, at=max(ats) if ats else None, partition=None,
            raw={"replies": [r.raw for r in per]}, buffers=tuple(bufs), released_count=count,
            replies=per, ended_memberships=ended)

    def batch(self, requests: Sequence[Request], *, partition: Optional[int] = None,
              timeout: Optional[float] = None) -> List[Reply]:
        """Send several requests for one partition in one message (section 15) and return their
        replies in order. An element that failed is an ``error`` reply in its place (call
        ``reply.raise_for_error()``); an error about the whole message raises
        :class:`~baton_client.errors.RejectedError`.

        The partition is ``partition`` or else the one of the elements' buffers (which must all
        agree), or 0 when no element has a buffer. A batch with a ``force_release`` element goes
        through ``baton.admin``."""
        reqs = list(requests)
        waiting = [i for i, r in enumerate(reqs) if isinstance(r, Request) and r.waiting]
        if waiting:
            raise ValueError(f"the batch's element(s) {waiting} are claims with wait_ms; a waiting "
                             f"claim must be sent alone, never in a coalesced message (section "
                             f"19): use client.claim(..., wait_ms=...)")
        if not 1 <= len(reqs) <= 256:
            raise ValueError("a batch holds 1 to 256 requests")
        parts = {self.partition_of(r.buffer) for r in reqs if r.buffer is not None}
        if partition is None:
            if len(parts) > 1:
                raise ValueError(f"the batch's buffers belong to several partitions "
                                 f"{sorted(parts)}; a batch is for one partition")
            p = parts.pop() if parts else 0
        else:
            p = int(partition)
        t = self._timeout(timeout)
        call = self._submit(self._make_call(reqs, p, t, self.resend_after,
                                            f"batch of {len(reqs)}"))
        self.last_batch_call = call  # diagnostics (tests): call.messages
        try:
            res = self._wait(call)
        except (BatonTimeoutError, KeyboardInterrupt, SystemExit, ClientClosedError):
            # Only the claims that got no reply are settled, each with its own body (the original
            # deadline): a grant the caller saw in ``partial`` is the caller's.
            elements = json.loads(call.body)["batch"]
            for index, r in enumerate(reqs):
                if r.op == "claim" and call.parts.get(index) is None:
                    self._resolve_orphan_claim(r, None, body=_dumps(elements[index]), routing_key=call.routing_key)
            raise
        if isinstance(res, list):
            return [parse_reply(o) for o in res]
        reply = parse_reply(res)
        reply.raise_for_error()
        raise ProtocolError(f"a batch was answered with status {reply.status!r}")

    def send_raw(self, body: Union[bytes, str, Mapping[str, Any], List[Any]], partition: int, *,
                 with_user_id: bool = True, exchange: str = REQUESTS_EXCHANGE,
                 timeout: Optional[float] = None, resend: bool = False) -> Any:
        """Publish ``body`` unchanged (bytes, a string sent as UTF-8, or a JSON value sent compact)
        to routing key ``partition`` and return the first reply message's JSON value, whatever its
        status (conformance tests, debugging)."""
        if isinstance(body, (bytes, bytearray)):
            data = bytes(body)
        elif isinstance(body, str):
            data = body.encode("utf-8")
        else:
            data = _dumps(body)
        t = self._timeout(timeout)
        call = Call(exchange=exchange, routing_key=str(partition), body=data, timeout=t,
                    resend_after=self.resend_after if resend else None,
                    with_user_id=with_user_id, label="raw request", first_message_only=True)
        return self._wait(self._submit(call))

    # ------------------------------------------------------------------ cancelled claims

    def _resolve_orphan_claim(self, req: Request, call: Optional[Call], *, body: Optional[bytes] = None,
                              routing_key: Optional[str] = None) -> None:
        """Section 9, "Cancelled calls": ask again with the same request_id and the same body
        (the original deadline, so that a claim that was never decided stays undecided:
        ``deadline_exceeded``) and release what it granted, unless a lease this client keeps holds
        that token (a claim by the same user and connection only extends a live lease)."""
        if self._closed:
            return
        if body is None and call is not None:
            body = call.body
        if routing_key is None:
            routing_key = call.routing_key if call is not None else str(self._route(req))
        if body is None:
            body = _dumps(req.body(deadline_after(0.0) if self._send_deadline() else None))
        window = self.orphan_window
        if req.waiting and call is not None:
            # A waiting claim can still be granted until its deadline (section 19): keep asking
            # until then, and a timeout longer for the answer.
            window = max(window, call.publish_until - time.monotonic() + self.timeout)

        def run() -> None:
            end = time.monotonic() + window
            try:
                while time.monotonic() < end and not self._closed:
                    probe = Call(exchange=REQUESTS_EXCHANGE, routing_key=routing_key, body=body,
                                 timeout=min(self.timeout, max(0.5, end - time.monotonic())),
                                 resend_after=self.resend_after, label="claim (clean-up)",
                                 request_id=req.request_id)
                    try:
                        reply = parse_reply(self._wait(self._io.submit(probe)))
                    except BatonTimeoutError:
                        continue
                    kept = any(getattr(lease, "buffer", None) == req.fields["buffer"]
                               and getattr(lease, "connection", None) == req.fields["connection"]
                               and getattr(lease, "token", None) == reply.token
                               for lease in list(self._leases))
                    if reply.status == "granted" and reply.token is not None and not kept:
                        log.info("releasing the grant of a cancelled claim of %r (token %s)",
                                 req.buffer, reply.token)
                        rel = Request.release(req.fields["buffer"], req.fields["connection"],
                                              reply.token)
                        while time.monotonic() < end and not self._closed:
                            try:
                                self._single(rel, int(routing_key),
                                             min(self.timeout, max(0.5, end - time.monotonic())))
                                return
                            except BatonTimeoutError:
                                continue
                    return
            except (ClientClosedError, BatonError) as exc:
                log.warning("clean-up of a cancelled claim of %r failed: %s", req.buffer, exc)

        self._in_background("baton-claim-cleanup", run)

    def _release_in_background(self, buffer: str, connection: str, token: int) -> None:
        """Release a grant nobody will use (a lease keeper interrupted while it confirmed a
        waiting grant), retrying timeouts within the orphan window; ``close()`` waits for it."""
        if self._closed:
            return
        rel = Request.release(buffer, connection, token)

        def run() -> None:
            end = time.monotonic() + self.orphan_window
            try:
                while time.monotonic() < end and not self._closed:
                    try:
                        self._single(rel, self._route(rel),
                                     min(self.timeout, max(0.5, end - time.monotonic())))
                        return
                    except BatonTimeoutError:
                        continue
            except BatonError as exc:
                log.warning("releasing %r (token %s) failed: %s", buffer, token, exc)

        self._in_background("baton-release", run)

    def _in_background(self, name: str, body: Any) -> None:
        """Run ``body`` on a daemon thread that ``close()`` waits for."""
        def run() -> None:
            try:
                body()
            finally:
                with self._bg_lock:
                    self._background.discard(threading.current_thread())

        th = threading.Thread(target=run, name=name, daemon=True)
        with self._bg_lock:
            self._background.add(th)
        th.start()

    # ------------------------------------------------------------------ lease keeper, watch

    def lease(self, buffer: str, user: str, connection: str, lease_ms: int = 30000, *,
              margin_ms: Optional[int] = None, renew_fraction: float = 1 / 3,
              on_change: "Optional[Callable[[LeaseChange], None]]" = None,
              claim_timeout: Optional[float] = None, wait_ms: Optional[int] = None) -> "Lease":
        """A lease keeper as a context manager (section 9, "Keeping a lease")::

            with client.lease("doc:1", user="ann", connection=conn, lease_ms=30000) as lease:
                ...  # write while lease.state is LeaseState.HELD, sending lease.token

        Entering claims the buffer (raises :class:`~baton_client.errors.LeaseDeniedError` when
        another holder has it), renews it in a background thread and releases it on exit.
        ``wait_ms=`` (revision 4) waits in the buffer's line instead (section 19); the grant is
        then confirmed with an immediate renewal and the lease counts from that renewal."""

        lease = Lease(self, buffer, user=user, connection=connection, lease_ms=lease_ms, margin_ms=margin_ms,
                      renew_fraction=renew_fraction, on_change=on_change, claim_timeout=claim_timeout, wait_ms=wait_ms)
        self._leases.add(lease)
        return lease

    def membership(self, buffer: str, user: str, connection: str, lease_ms: int = 30000, *,
                   margin_ms: Optional[int] = None, renew_fraction: float = 1 / 3,
                   on_change: "Optional[Callable[[LeaseChange], None]]" = None,
                   claim_timeout: Optional[float] = None) -> KeptMembership:
        """A kept replica membership as a context manager (section 20, revision 6)::

            with client.membership("doc:1", user="ann", connection=conn) as member:
                ...  # member.replica_id is yours while member.state is LeaseState.HELD

        Entering joins the buffer's collaborators, renews the membership in a background thread
        and leaves on exit."""
        kept = KeptMembership(self, buffer, user=user, connection=connection, lease_ms=lease_ms,
                              margin_ms=margin_ms, renew_fraction=renew_fraction, on_change=on_change,
                              claim_timeout=claim_timeout)
        self._leases.add(kept)
        return kept

    def keep(self, buffer: str, user: str, connection: str, lease_ms: int = 30000, *,
             margin_ms: Optional[int] = None, renew_fraction: float = 1 / 3,
             on_change: "Optional[Callable[[LeaseChange], None]]" = None,
             claim_timeout: Optional[float] = None, wait_ms: Optional[int] = None) -> "Lease":
        """Claim ``buffer`` and keep it renewed; returns the started
        :class:`~baton_client.lease.Lease` (call ``lease.release()`` when done), or raises
        :class:`~baton_client.errors.LeaseDeniedError`. Takes the keyword arguments of
        :class:`~baton_client.lease.Lease`, among them ``wait_ms``."""

        lease = Lease(self, buffer, user=user, connection=connection, lease_ms=lease_ms, margin_ms=margin_ms,
                      renew_fraction=renew_fraction, on_change=on_change, claim_timeout=claim_timeout, wait_ms=wait_ms)
        self._leases.add(lease)
        lease.acquire()
        return lease

    def watch(self, buffer: Optional[str] = None, *, partition: Optional[int] = None,
              partitions: Optional[Iterable[int]] = None,
              positions: Optional[Mapping[int, int]] = None, limit: Optional[int] = None) -> "Watch":
        """Follow changes in order and without gaps (section 18): one buffer (``buffer``), one
        partition (``partition``), several (``partitions``), or everything (no argument). Returns
        a :class:`~baton_client.watch.Watch`, an iterator of
        :class:`~baton_client.types.Event` (and :class:`~baton_client.types.Missed` markers).
        ``positions`` resumes from saved positions (``watch.positions``); without them a watch
        starts from now."""

        self._require_revision(3, "watch")
        w = Watch(self, buffer=buffer, partition=partition, partitions=partitions,
                  positions=positions, limit=limit)
        self._watches.add(w)
        return w

    # ------------------------------------------------------------------ testing hooks

    def _drop_connection(self) -> None:
        """Tear the connection down underneath the client (fault injection for tests)."""
        self._io.drop_connection()
