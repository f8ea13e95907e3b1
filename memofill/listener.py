"""The invalidation listener: one connection of its own, told by Redis of every write it tracks.

Per instance and process, one daemon thread holds one connection that runs
``CLIENT ID``, then ``CLIENT TRACKING ON REDIRECT <its own id> BCAST PREFIX
<p> ...``, then ``SUBSCRIBE __redis__:invalidate``; Redis then sends it the
name of every key written (set, deleted, expired, evicted) under those
prefixes, and a null for a flush. It works on Redis 6.0 and later, with RESP2
(the invalidations come as Pub/Sub messages) and RESP3 (as ``invalidate``
pushes), on its own connection, not redis-py's ``PubSub``: that one reconnects
silently and subscribes again without the tracking, after which nothing arrives.

Why a thread, for asyncio applications too: all the listener does is drop
entries from the process's store, which any thread may do. A thread keeps
invalidations flowing while an event loop is blocked (an asyncio task would
stop with it), needs no loop of its own, and serves every loop of the process.
A CPU-bound thread delays it by at most the interpreter's switch interval.

Liveness: it pings every ``heartbeat_ms``; every answer vouches that every
invalidation Redis sent before that ping has been applied, and copies are
served until two heartbeats after the answered ping was sent
(:meth:`~memofill.near.LocalStore.heard`). Any error, a closed connection, a
ping unanswered for three heartbeats, a flush, or a subscription it did not
ask for drops every copy at once (``epoch += 1``); it reconnects with a
backoff, and tracking is on again (before the subscription) before any copy
is made. A forked child starts its own listener on its first near read.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import logging
import os
import random
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import redis
import redis.connection

from memofill.commands import LISTENER_CHANNEL, Commands, is_cluster
from memofill.keys import meta_key, tags_key
from memofill.near import LocalStore, NearCache
from memofill.policy import Dataset

logger = logging.getLogger("memofill")

#: The channel Redis publishes invalidations on for a redirected RESP2 client.
CHANNEL = LISTENER_CHANNEL.encode()
#: The first and the longest pause between two connection attempts.
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 2.0
#: A ping unanswered for this many heartbeats: the connection is given up and made again.
DEAD_AFTER_HEARTBEATS = 3


class ListenerError(Exception):
    """Redis refused a command of the listener, or its connection stopped answering."""


class _StoreGone(Exception):
    """The store the listener served was garbage-collected: the listener ends."""


class _Incomplete(Exception):
    """The buffer ends inside a reply: wait for more bytes."""


def command(*args: str | bytes) -> bytes:
    """One command in RESP: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class Reader:
    """Splits the bytes of a RESP2 or RESP3 connection into replies.

    Strings come back as bytes, errors as ``ListenerError`` values,
    arrays, sets and pushes as lists, maps as dicts, nulls as ``None``;
    attributes (RESP3 metadata) are skipped.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        """Add bytes read from the connection."""
        self._buffer += data

    def replies(self) -> Iterator[Any]:
        """Every complete reply in the buffer, in order; a partial one waits for more bytes."""
        position = 0
        try:
            while position < len(self._buffer):
                reply, position = self._parse(position)
                yield reply
        except _Incomplete:
            pass
        finally:
            del self._buffer[:position]

    def _line(self, position: int) -> tuple[bytes, int]:
        end = self._buffer.find(b"\r\n", position)
        if end < 0:
            raise _Incomplete
        return bytes(self._buffer[position:end]), end + 2

    def _parse(self, position: int) -> tuple[Any, int]:
        kind = bytes(self._buffer[position : position + 1])
        line, position = self._line(position + 1)
        if kind in (b"+", b",", b"(", b"#"):
            return line, position
        if kind == b"-":
            return ListenerError(line.decode("utf-8", "replace")), position
        if kind == b":":
            return int(line), position
        if kind == b"_":
            return None, position
        if kind in (b"$", b"=", b"!"):
            length = int(line)
            if length < 0:
                return None, position
            end = position + length
            if len(self._buffer) < end + 2:
                raise _Incomplete
            data = bytes(self._buffer[position:end])
            if kind == b"!":
                return ListenerError(data.decode("utf-8", "replace")), end + 2
            return (data[4:] if kind == b"=" else data), end + 2
        if kind in (b"*", b"~", b">", b"%", b"|"):
            count = int(line)
            if count < 0:
                return None, position
            items = []
            for _ in range(count * 2 if kind in (b"%", b"|") else count):
                item, position = self._parse(position)
                items.append(item)
            if kind == b"|":  # metadata about the reply that follows: skip it
                return self._parse(position)
            if kind == b"%":
                return dict(zip(items[0::2], items[1::2], strict=True)), position
            return items, position
        raise ListenerError(f"unexpected reply type {kind!r}")


#: The connection settings a listener copies from the application's client: where Redis is
#: and how to log in, never its pool, retries or parser.
_COPIED = (
    "host",
    "port",
    "path",
    "db",
    "username",
    "password",
    "credential_provider",
    "protocol",
    "socket_keepalive",
    "socket_keepalive_options",
    "ssl_keyfile",
    "ssl_certfile",
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_ca_data",
    "ssl_ca_path",
    "ssl_check_hostname",
    "ssl_password",
    "ssl_min_version",
    "ssl_ciphers",
)


#: The kinds of connection a listener can copy: redis-py's own, blocking or asyncio.
_KINDS = ("Connection", "SSLConnection", "UnixDomainSocketConnection")


def connection_factory(client: Any, timeout_s: float) -> Callable[[], Any] | None:
    """A function that opens a new blocking connection to ``client``'s Redis, logged in.

    The application's client may be blocking or asyncio: the listener always
    runs in a thread, so it gets a blocking connection of the same kind (TCP,
    TLS or Unix socket) with the same address, database, credentials and
    protocol, and its own time-outs (a paused Redis must not hang it).
    ``None`` for a client whose connections are not redis-py's own (fakeredis,
    say): there is no server to listen to.
    """
    pool = getattr(client, "connection_pool", None)
    connection_class = getattr(pool, "connection_class", None)
    module = getattr(connection_class, "__module__", "")
    kind = getattr(connection_class, "__name__", "")
    if pool is None or kind not in _KINDS or not module.startswith("redis."):
        return None
    connection_class = getattr(redis.connection, kind)
    accepted: set[str] = set()
    for base in connection_class.__mro__:
        accepted |= set(inspect.signature(vars(base).get("__init__", object.__init__)).parameters)
    kwargs = {
        name: value
        for name, value in pool.connection_kwargs.items()
        if name in _COPIED and name in accepted
    }
    kwargs["socket_timeout"] = timeout_s
    kwargs["socket_connect_timeout"] = timeout_s

    def connect() -> Any:
        connection = connection_class(**kwargs)
        connection.connect()
        return connection

    return connect


class Listener:
    """Keeps ``store``'s near copies honest: drops them as Redis reports writes and losses."""

    def __init__(
        self,
        store: LocalStore,
        connect: Callable[[], Any],
        prefixes: tuple[str, ...],
        heartbeat_ms: int,
        spec: object = None,
    ) -> None:
        self._store = weakref.ref(store)
        self._connect = connect
        self.prefixes = prefixes
        self.heartbeat_s = heartbeat_ms / 1000
        #: The configuration the listener was made for (one that differs makes a new one).
        self.spec = spec
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._stopped = False
        self._connection: Any = None
        self._lock = threading.Lock()
        #: How many times tracking was established, and the connection's id the last time.
        self.sessions = 0
        self.client_id = 0
        self._told_failure = False
        _live_listeners.add(self)

    def ensure_running(self) -> None:
        """Start the listener thread in this process, unless it runs already."""
        thread = self._thread
        if thread is not None and self._pid == os.getpid() and thread.is_alive():
            return
        with self._lock:
            thread = self._thread
            if self._stopped or (
                thread is not None and self._pid == os.getpid() and thread.is_alive()
            ):
                return
            self._pid = os.getpid()
            self._thread = threading.Thread(
                target=self._run, name="memofill-near-listener", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        """Stop listening: the thread ends and closes its connection."""
        self._stopped = True
        self._interrupt()

    def _interrupt(self) -> None:
        connection = self._connection
        sock = getattr(connection, "_sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _run(self) -> None:
        backoff = BACKOFF_MIN_S
        while not self._stopped:
            tracked = False
            try:
                tracked = self._session()
            except _StoreGone:
                break
            except Exception as exc:  # any failure: every copy is dropped, then try again
                self._tell(exc)
            store = self._store()
            if store is None:
                break
            if not self._stopped:  # a stopped listener's store has another one, or none
                store.tracking(False)
            del store  # held only while used: a store nobody else holds ends its listener
            if tracked:
                backoff = BACKOFF_MIN_S
            if self._stopped:
                break
            time.sleep(backoff * (0.5 + random.random() / 2))  # jitter only
            backoff = min(backoff * 2, BACKOFF_MAX_S)
        self._close()

    def _tell(self, exc: Exception) -> None:
        """The first loss at WARNING; later ones at DEBUG, counted by ``near.flushes``."""
        if self._stopped or self._told_failure:
            logger.debug("near-cache listener: %s: %s", type(exc).__name__, exc)
            return
        self._told_failure = True
        logger.warning(
            "near-cache listener lost (%s: %s): near copies are not served until it is back "
            "(it reconnects by itself; told once: later losses are logged at DEBUG and "
            "counted in memofill_near_flushes_total)",
            type(exc).__name__,
            exc,
            extra={"error": type(exc).__name__},
        )

    def _close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.disconnect()
            except Exception:  # closing a broken connection may fail; nothing to do then
                logger.debug("near-cache listener: closing failed", exc_info=True)

    def _held(self) -> LocalStore:
        store = self._store()
        if store is None:
            raise _StoreGone
        return store

    def _session(self) -> bool:
        """Connect, track, subscribe, then apply what arrives until the connection fails."""
        self._close()
        self._connection = connection = self._connect()
        if self._stopped:
            return False
        sock: socket.socket = connection._sock
        reader = Reader()

        def ask(*args: str) -> Any:
            sock.sendall(command(*args))
            return self._next_reply(sock, reader)

        client_id = ask("CLIENT", "ID")
        tracking = ["CLIENT", "TRACKING", "ON", "REDIRECT", str(client_id), "BCAST"]
        for prefix in self.prefixes:
            if prefix:  # an empty head: no PREFIX at all, which tracks every key
                tracking += ["PREFIX", prefix]
        answer = ask(*tracking)
        if isinstance(answer, Exception):
            raise answer
        sock.sendall(command("SUBSCRIBE", CHANNEL.decode()))
        self._subscribed(sock, reader)
        self._held().tracking(True)
        self.client_id = int(client_id)
        self.sessions += 1
        self._listen(sock, reader)
        return True

    def _subscribed(self, sock: socket.socket, reader: Reader) -> None:
        """Wait for the ``SUBSCRIBE`` reply, applying the invalidations that come before it.

        Tracking is on from its own reply: a key written meanwhile is told at
        once, and may arrive ahead of the subscription's confirmation.
        """
        while True:
            reply = self._next_reply(sock, reader)
            if isinstance(reply, list) and reply and reply[0] == b"subscribe":
                return
            if isinstance(reply, list) and len(reply) == 3 and reply[:2] == [b"message", CHANNEL]:
                self._invalidate(self._held(), reply[2])
            elif isinstance(reply, list) and len(reply) == 2 and reply[0] == b"invalidate":
                self._invalidate(self._held(), reply[1])
            else:
                raise ListenerError(f"SUBSCRIBE answered {reply!r}")

    def _next_reply(self, sock: socket.socket, reader: Reader) -> Any:
        while True:
            for reply in reader.replies():
                return reply
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("the listener's connection was closed")
            reader.feed(data)

    def _listen(self, sock: socket.socket, reader: Reader) -> None:
        heartbeat = self.heartbeat_s
        pings: collections.deque[float] = collections.deque()
        next_ping = time.monotonic()
        while not self._stopped:
            now = time.monotonic()
            if now >= next_ping:
                self._held()  # once a heartbeat: is the store still used?
                sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                pings.append(now)
                next_ping = now + heartbeat
            sock.settimeout(max(0.001, next_ping - now))
            try:
                data = sock.recv(65536)
            except TimeoutError:
                # Judged only after a read found nothing: a listener thread that was itself
                # held up finds the answers waiting, and keeps its connection.
                waited = time.monotonic() - pings[0] if pings else 0.0
                if waited > DEAD_AFTER_HEARTBEATS * heartbeat:
                    raise ListenerError(f"no answer to a ping for {waited:.2f} s") from None
                continue
            if not data:
                raise ConnectionError("the listener's connection was closed")
            reader.feed(data)
            store = self._held()
            for reply in reader.replies():
                self._apply(store, reply, pings, heartbeat)
            del store

    def _apply(
        self, store: LocalStore, reply: Any, pings: collections.deque[float], heartbeat: float
    ) -> None:
        """Act on one message: invalidation, flush, ping answer, or something unexpected."""
        if isinstance(reply, ListenerError):
            raise reply
        if isinstance(reply, list) and reply:
            kind = reply[0]
            if kind == b"message" and len(reply) == 3 and reply[1] == CHANNEL:
                self._invalidate(store, reply[2])
            elif kind == b"invalidate" and len(reply) == 2:
                self._invalidate(store, reply[1])
            elif kind == b"pong":
                self._pong(store, pings, heartbeat)
            elif kind in (b"subscribe", b"unsubscribe"):
                store.flush()  # not asked for: whatever changed, the copies are suspect
        elif reply == b"PONG":
            self._pong(store, pings, heartbeat)

    @staticmethod
    def _invalidate(store: LocalStore, keys: Any) -> None:
        if keys is None:
            store.flush()  # FLUSHDB / FLUSHALL
        else:
            store.invalidate(key.decode("utf-8", "surrogateescape") for key in keys)

    @staticmethod
    def _pong(store: LocalStore, pings: collections.deque[float], heartbeat: float) -> None:
        if pings:
            sent = pings.popleft()
            store.heard(sent + 2 * heartbeat)


def tracked_prefixes(heads: list[str]) -> tuple[str, ...]:
    """The prefixes to track for these key heads: the shortest of any that overlap.

    Redis refuses overlapping prefixes in one ``CLIENT TRACKING`` call; a head
    that another starts with is covered by it. An empty head covers every key.
    """
    kept: list[str] = []
    for head in sorted(set(heads)):
        if not any(head.startswith(shorter) for shorter in kept):
            kept.append(head)
    return tuple(kept)


_live_listeners: weakref.WeakSet[Listener] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """The parent's listener thread is not the child's, nor is its socket to close."""
    for listener in list(_live_listeners):
        listener._connection = None
        listener._thread = None
        listener._lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def follow(
    store: LocalStore,
    *,
    near: NearCache | None,
    commands: Commands | None,
    prefix: str,
    policies: Mapping[str, Dataset] | None,
    on_meta_change: Callable[[], object],
) -> None:
    """Give an instance's store the invalidation listener its near datasets need, if any.

    With ``invalidation="tracking"``, the listener follows the client (the
    blocking one, else the asyncio one) and tracks the literal heads of the
    near datasets' final keys; a configuration that changes either makes a new
    listener, and every copy made under the old one is dropped. Until the
    policies are loaded, nothing is served near.
    """
    # A tag invalidated anywhere may concern any tagged copy: all go (a tag names no keys).
    store.tagged_heads = _tagged_heads(prefix, policies)
    store.watch = {meta_key(prefix): on_meta_change, tags_key(prefix): store.drop_tagged}
    if near is not None:
        store.max_entries = store.max_entries if near.max_entries is None else near.max_entries
        store.max_bytes = store.max_bytes if near.max_bytes is None else near.max_bytes
    if near is None or near.invalidation == "ttl":
        if store.listener is not None or store.live_until == 0.0:
            store.attach(None, needed=False)
        return
    heads = _near_heads(prefix, policies)
    if commands is None or not heads or is_cluster(commands.client):
        if store.listener is not None:
            store.attach(None)
        store.live_until = 0.0
        return
    spec = (commands.client, heads, near.heartbeat_ms)
    listener = store.listener
    if isinstance(listener, Listener) and listener.spec == spec:
        return
    timeout_s = max(1.0, 4 * near.heartbeat_ms / 1000)
    connect = connection_factory(commands.client, timeout_s)
    if connect is None:  # nothing to listen to (fakeredis): nothing is served near
        store.attach(None)
        if store in _told_unlistenable:
            return
        _told_unlistenable.add(store)
        logger.warning(
            "near copies need invalidation='ttl' with this Redis client (%s): it has no "
            "connection a listener can copy, so every call reads Redis",
            type(commands.client).__name__,
        )
        return
    store.attach(Listener(store, connect, heads, near.heartbeat_ms, spec))


#: Stores already told that their client cannot be listened to.
_told_unlistenable: weakref.WeakSet[LocalStore] = weakref.WeakSet()

#: The last policies :func:`_near_heads` looked at, and what it found: decorating thousands
#: of functions must not scan thousands of datasets each time.
_heads_memo: list[Any] = [None, "", ()]


def _tagged_heads(prefix: str, policies: Mapping[str, Dataset] | None) -> tuple[str, ...]:
    """The literal heads of the final keys of the datasets with tags (every key: unknown)."""
    if policies is None:
        return (prefix,)
    return tuple(prefix + d.template.parts[0] for d in policies.values() if d.tag_templates)


def _near_heads(prefix: str, policies: Mapping[str, Dataset] | None) -> tuple[str, ...]:
    """The prefixes to track: the literal heads of the near datasets' final keys."""
    if policies is None:
        return ()
    if _heads_memo[0] is policies and _heads_memo[1] == prefix:
        return _heads_memo[2]  # type: ignore[no-any-return]
    heads = [prefix + d.template.parts[0] for d in policies.values() if d.near_ms > 0]
    # The meta and tags hashes too: another process's invalidation arrives in milliseconds.
    found = tracked_prefixes([*heads, meta_key(prefix), tags_key(prefix)]) if heads else ()
    _heads_memo[:] = [policies, prefix, found]
    return found
