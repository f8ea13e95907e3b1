"""The only module that talks to Redis: the handful of commands memofill sends, and nothing else.

Each method returns what the client returns: a value for ``redis.Redis`` and
``redis.cluster.RedisCluster``, an awaitable for ``redis.asyncio`` clients. The
drivers in :mod:`memofill.drivers` await it or not, so the commands, like
the algorithm, are written once.

Every key one fill touches (data, lock, wake) shares a Redis Cluster hash slot
(see :func:`memofill.keys.lock_key`), so a cluster client routes them to one node.
"""

from __future__ import annotations

import copy
import inspect
import os
import secrets
import weakref
from collections.abc import Callable
from typing import Any

from redis.exceptions import (
    NoScriptError,
    ResponseError,
)

from memofill.errors import ConfigurationError
from memofill.keys import tomb_key
from memofill.scripts import (
    ACQUIRE_SCRIPT,
    HOLD_SCRIPT,
    INVALIDATE_KEY_SCRIPT,
    INVALIDATE_SCRIPT,
    INVALIDATE_TAG_SCRIPT,
    READ_META_SCRIPT,
    RELEASE_SCRIPT,
    STORE_SCRIPT,
    TAG_MARKS_SCRIPT,
    TOMB_MS,
)

__all__ = [
    "Commands",
    "acl_rule",
    "is_hold",
    "newest_entry",
    "stream_entries",
]

#: Every command memofill sends, including those its scripts run and ``SCRIPT LOAD``,
#: which redis-py sends when a script is not cached yet. ``MGET`` reads a page (``many()``).
#: ``SET``, ``GET``, ``XREVRANGE``,
#: ``TIME`` and ``GETRANGE`` serve the lock and the conditional write; ``DEL`` and
#: ``SET`` ``invalidate``; ``PTTL``, ``STRLEN`` and ``GETRANGE`` ``memofill inspect``
#: (``PTTL`` near copies too); ``HGET``, ``HSET``, ``HINCRBY``, ``HGETALL`` and ``INFO``
#: (the server's ``run_id``, to notice a restart) the invalidation marks, with ``HSCAN``
#: and ``HDEL`` (the clean-up of the tags hash). The last six
#: are the near-cache listener's (:mod:`memofill.listener`), on its own connection:
#: ``HELLO`` where the client speaks RESP3, ``CLIENT ID``, ``CLIENT TRACKING``,
#: ``SUBSCRIBE`` to :data:`LISTENER_CHANNEL` (granted by the rule's channel pattern) and ``PING``.
#: ``memofill purge`` needs ``SCAN`` and ``UNLINK`` besides: an operator's rights, not
#: every caller's.
ACL_COMMANDS = (
    "get",
    "mget",
    "set",
    "del",
    "evalsha",
    "script|load",
    "xread",
    "xrevrange",
    "xadd",
    "pexpire",
    "hincrby",
    "hset",
    "hget",
    "hgetall",
    "hmget",
    "hscan",
    "hdel",
    "time",
    "info",
    "pttl",
    "strlen",
    "getrange",
    "hello",
    "client|id",
    "client|tracking",
    "subscribe",
    "ping",
)

#: The channel Redis sends a redirected RESP2 connection its invalidations on.
LISTENER_CHANNEL = "__redis__:invalidate"


def acl_rule(prefix: str) -> str:
    """The ACL key patterns and commands a least-privilege Redis user needs under ``prefix``.

    Lock and wake keys begin with ``{`` (``{<key>}#lock``, see
    :func:`memofill.keys.lock_key`) so that they share the data key's Cluster
    slot: ``~<prefix>*`` alone does not cover them; ``~{<prefix>*`` does (ACL
    patterns treat ``{`` as an ordinary character). With a prefix that is a hash
    tag itself (``{app}:``) every key already starts with the prefix, and the
    second pattern is harmless. The channel pattern lets a near-cache listener
    subscribe to its invalidations (Redis 7 grants no channel by default).
    """
    keys = f"~{prefix}* ~{{{prefix}*" if prefix else "~*"
    commands = " ".join("+" + command for command in ACL_COMMANDS)
    return f"{keys} &{LISTENER_CHANNEL} {commands}"


def is_cluster(client: Any) -> bool:
    """Whether ``client`` is a Redis Cluster client (blocking or asyncio)."""
    return hasattr(client, "nodes_manager")


def new_token() -> str:
    """A random lock token, new for every attempt, so no two attempts can release each other."""
    return secrets.token_hex(16)


def socket_timeout_ms(client: Any) -> float | None:
    """The client's socket timeout in ms, or ``None``: a blocking wait must end before it."""
    try:
        timeout = client.get_connection_kwargs().get("socket_timeout")
    except (AttributeError, TypeError):
        return None
    return None if timeout is None else float(timeout) * 1000


def check_client(client: Any) -> None:
    """Refuse a client that cannot carry raw bytes, with a message that says why."""
    if not hasattr(client, "get_encoder"):
        raise ConfigurationError(
            f"memofill needs a redis-py client (redis.Redis, redis.asyncio.Redis or "
            f"redis.cluster.RedisCluster), not {type(client).__name__}"
        )
    if getattr(client.get_encoder(), "decode_responses", False):
        raise ConfigurationError(
            "the Redis client was made with decode_responses=True; memofill stores orjson "
            "bytes and needs them back as bytes: pass a client made without it"
        )


def stream_entries(reply: Any) -> list[Any]:
    """The entries of an ``XREAD`` reply, RESP2 (``[[stream, entries]]``) or RESP3 (a dict)."""
    if not reply:
        return []
    streams = reply.values() if isinstance(reply, dict) else (item[1] for item in reply)
    return [entry for entries in streams for entry in entries]


def newest_entry(entries: list[Any], current: str) -> tuple[str, str | None]:
    """The last entry's id and ``result`` field, or ``(current, None)`` when there is none.

    ``entries`` are ``(id, fields)`` pairs, as :func:`stream_entries` and
    ``XREVRANGE`` give them.
    """
    newest, result = current, None
    for entry in entries:
        if entry and entry[0]:
            newest, fields = _text(entry[0]), entry[1] if len(entry) > 1 else None
            found = (
                fields.get(b"result", fields.get("result")) if isinstance(fields, dict) else None
            )
            result = None if found is None else _text(found)
    return newest, result


def is_hold(entries: Any) -> bool:
    """Whether the newest of ``entries`` says the lock is held after a failure (a hold)."""
    if not entries or isinstance(entries, Exception):
        return False
    fields = entries[-1][1] if len(entries[-1]) > 1 else None
    return isinstance(fields, dict) and (b"hold" in fields or "hold" in fields)


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


#: A script call recorded for a pipeline: the registered script, its keys, its arguments.
_Queued = tuple[Any, list[Any], list[Any]]
#: The attributes of :class:`Commands` that hold the scripts a fill's steps run.
_SCRIPTED = ("_acquire", "_store", "_release", "_hold")


class _Recorder:
    """Stands for a registered script while a pipeline is filled: records the call instead."""

    def __init__(self, script: Any, queued: list[_Queued]) -> None:
        self.script, self.queued = script, queued

    def __call__(self, keys: list[Any], args: list[Any]) -> None:
        self.queued.append((self.script, keys, args))


def _unknown(replies: list[Any]) -> list[int]:
    """The indexes of replies saying the server does not know the script (``NOSCRIPT``)."""
    return [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]


def _apart(raw: Any, marks: Any) -> list[Any]:
    """A value (or values) and the marks read beside it put together: ``[raw, born,
    fields...]``; an error raised."""
    for reply in (raw, marks):
        if isinstance(reply, Exception):
            raise reply
    return [raw, *marks]


#: The tags hash's field of its birth (:mod:`memofill.tags`).
BORN = "born"


def _packed_in_python(commands: list[tuple[str, ...]]) -> list[bytes]:
    """``commands`` in the Redis protocol, their texts in UTF-8 (as :func:`_packed`)."""
    out = bytearray()
    for command in commands:
        out += b"*%d\r\n" % len(command)
        for text in command:
            arg = text.encode()
            out += b"$%d\r\n%b\r\n" % (len(arg), arg)
    return [bytes(out)]


try:
    from hiredis import pack_command as _pack_command
except ImportError:  # the extra is not installed
    _packed = _packed_in_python
else:

    def _packed(commands: list[tuple[str, ...]]) -> list[bytes]:
        """``commands``, all texts, in the Redis protocol: one buffer for one write.

        The client's own packing checks and encodes each argument in Python, which
        cost a tagged hit more than its second command (a read's ``GET`` and
        ``HMGET`` are texts only, and :class:`Commands` writes them this way only
        for a client that encodes texts in UTF-8).
        """
        return [b"".join(map(_pack_command, commands))]  # type: ignore[arg-type]  # map: no frame


def _two_sync(pool: Any, commands: list[tuple[str, ...]]) -> list[Any]:
    """Write ``commands`` to one connection of ``pool`` at once; their replies, in order.

    One round trip without a pipeline's cost. A reply that is an error (a
    key of another type) is returned in its place, as a pipeline returns it,
    once every reply is read; a connection that failed is dropped.
    """
    connection = pool.get_connection()
    try:
        connection.send_packed_command(_packed(commands))
        replies = []
        for _ in commands:
            try:
                replies.append(connection.read_response())
            except ResponseError as exc:
                replies.append(exc)
        return replies
    except BaseException:
        connection.disconnect()
        raise
    finally:
        pool.release(connection)


async def _two_async(pool: Any, commands: list[tuple[str, ...]]) -> list[Any]:
    """:func:`_two_sync` on an asyncio pool."""
    connection = await pool.get_connection()
    try:
        await connection.send_packed_command(_packed(commands))
        replies = []
        for _ in commands:
            try:
                replies.append(await connection.read_response())
            except ResponseError as exc:
                replies.append(exc)
        return replies
    except BaseException:
        await connection.disconnect()
        raise
    finally:
        await pool.release(connection)


#: The bytes ``memofill inspect`` reads of a value: its header and the longest marker.
HEAD_BYTES = 320


def _is_async(client: Any) -> bool:
    return inspect.iscoroutinefunction(getattr(client, "execute_command", None))


class Commands:
    """The Redis commands of one client; each returns a value, or an awaitable for asyncio."""

    def __init__(self, client: Any) -> None:
        check_client(client)
        self.client = client
        #: ``GET key``: the stored bytes or ``None``. The client's own method, not a
        #: wrapper around it: every hit calls it, and a wrapper would add a call.
        self.get: Callable[[str], Any] = client.get
        self.socket_timeout_ms = socket_timeout_ms(client)
        self._release = client.register_script(RELEASE_SCRIPT)
        self._hold = client.register_script(HOLD_SCRIPT)
        self._invalidate = client.register_script(INVALIDATE_SCRIPT)
        self._acquire = client.register_script(ACQUIRE_SCRIPT)
        self._store = client.register_script(STORE_SCRIPT)
        self._invalidate_key = client.register_script(INVALIDATE_KEY_SCRIPT)
        self._read_meta = client.register_script(READ_META_SCRIPT)
        self._invalidate_tag = client.register_script(INVALIDATE_TAG_SCRIPT)
        self._tag_marks = client.register_script(TAG_MARKS_SCRIPT)
        #: Whether a value and the tags hash may live in different slots (a cluster).
        self._apart = is_cluster(client)
        self._async = _is_async(client)
        #: Whether two commands may be written to one of the pool's connections directly:
        #: no single connection of the client's own, no wrapper around its commands,
        #: and texts encoded as :func:`_packed` encodes them.
        encoder = client.get_encoder()
        self._plain = (
            getattr(client, "connection", None) is None
            and not ({"execute_command", "pipeline"} & set(vars(client)))
            and str(encoder.encoding).replace("_", "-").lower() in {"utf-8", "utf8"}
            and encoder.encoding_errors == "strict"
        )
        _live_commands.add(self)

    def mget(self, keys: list[str]) -> Any:
        """``MGET key ...``: each key's stored bytes or ``None``, in one round trip.

        On a cluster the keys may live on several nodes: one ``MGET`` per node,
        sent together (redis-py's ``mget_nonatomic``), the replies put back in order.
        """
        if is_cluster(self.client):
            return self.client.mget_nonatomic(keys)
        return self.client.mget(keys)

    def tagged_get(self, key: str, tags_key: str, fields: list[str]) -> Any:
        """``GET key`` and the marks of its tags (``fields``), in one round trip.

        ``[stored bytes or None, born, each field or None]``. Two plain
        commands, ``GET`` and ``HMGET`` of the tags hash, written to one
        connection together (a script would cost Redis more than the read
        itself); a hash found without ``born`` is born by
        ``TAG_MARKS_SCRIPT``, once. On a cluster, or a client whose commands
        are wrapped (a single-connection client, the testing harness), a
        pipeline of ``GET`` and the script: the value and the tags hash may
        live on different nodes.
        """
        if self._apart or not self._plain:
            pipe = self.client.pipeline(transaction=False)
            pipe.get(key)
            pipe.execute_command("EVALSHA", self._tag_marks.sha, 1, tags_key, *fields)
            if self._async:
                return self._apart_async(pipe.execute(raise_on_error=False), tags_key, fields)
            raw, marks = pipe.execute(raise_on_error=False)
            if isinstance(marks, NoScriptError):  # a node that never ran it: loaded, sent again
                marks = self._tag_marks(keys=[tags_key], args=fields)
            return _apart(raw, marks)
        commands = [("GET", key), ("HMGET", tags_key, BORN, *fields)]
        if self._async:
            return self._together_async(commands, tags_key, fields)
        raw, marks = _two_sync(self.client.connection_pool, commands)
        if not isinstance(marks, Exception) and marks[0] is None:  # no hash yet, or lost
            marks = self._tag_marks(keys=[tags_key], args=fields)  # born now, by the script
        return _apart(raw, marks)

    async def _together_async(
        self, commands: list[tuple[Any, ...]], tags_key: str, fields: list[str]
    ) -> Any:
        raw, marks = await _two_async(self.client.connection_pool, commands)
        if not isinstance(marks, Exception) and marks[0] is None:
            marks = await self._tag_marks(keys=[tags_key], args=fields)
        return _apart(raw, marks)

    async def _apart_async(self, sent: Any, tags_key: str, fields: list[str]) -> Any:
        raw, marks = await sent
        if isinstance(marks, NoScriptError):
            marks = await self._tag_marks(keys=[tags_key], args=fields)
        return _apart(raw, marks)

    def mget_tagged(self, keys: list[str], tags_key: str, fields: list[str]) -> Any:
        """:meth:`mget` and the marks of ``fields`` (the keys' tags): ``[values, born, ...]``.

        One round trip on a single server (a pipeline of ``MGET`` and
        ``TAG_MARKS_SCRIPT``); on a cluster, an ``MGET`` per node and then the marks.
        """
        if self._apart:
            if _is_async(self.client):
                return self._mget_apart_async(keys, tags_key, fields)
            values = self.client.mget_nonatomic(keys)
            return [values, *self._tag_marks(keys=[tags_key], args=fields)]
        pipe = self.client.pipeline(transaction=False)
        pipe.mget(keys)
        pipe.execute_command("EVALSHA", self._tag_marks.sha, 1, tags_key, *fields)
        if _is_async(self.client):
            return self._apart_async(pipe.execute(raise_on_error=False), tags_key, fields)
        raw, marks = pipe.execute(raise_on_error=False)
        if isinstance(marks, NoScriptError):  # the server never ran it: loaded, sent again
            marks = self._tag_marks(keys=[tags_key], args=fields)
        return _apart(raw, marks)

    async def _mget_apart_async(self, keys: list[str], tags_key: str, fields: list[str]) -> Any:
        values = await self.client.mget_nonatomic(keys)
        return [values, *await self._tag_marks(keys=[tags_key], args=fields)]

    def pipelined(self, steps: list[tuple[str, tuple[Any, ...]]]) -> Any:
        """Send several script steps (``(method name, args)``) in one round trip; their replies.

        The steps of several fills at once (``memofill.lockstep``): each is the
        method of that name (``acquire``, ``write``, ``release``, ``hold``) as it
        would run alone, sent as ``EVALSHA`` in one pipeline (on a cluster, one
        request per node, sent together). A reply that is an error is returned in
        its place, not raised; a failure of the whole pipeline is raised. A script
        the server does not know yet is loaded and its steps sent once more.
        """
        queued = self._queued(steps)
        if _is_async(self.client):
            return self._send_async(queued)
        replies = self._send(queued)
        again = _unknown(replies)
        if again:
            for script in {id(queued[i][0]): queued[i][0] for i in again}.values():
                script.sha = self.client.script_load(script.script)
            for i, reply in zip(again, self._send([queued[i] for i in again]), strict=True):
                replies[i] = reply
        return replies

    async def _send_async(self, queued: list[_Queued]) -> list[Any]:
        replies = await self._send(queued)
        again = _unknown(replies)
        if again:
            for script in {id(queued[i][0]): queued[i][0] for i in again}.values():
                script.sha = await self.client.script_load(script.script)
            for i, reply in zip(again, await self._send([queued[i] for i in again]), strict=True):
                replies[i] = reply
        return replies  # type: ignore[no-any-return]

    def _queued(self, steps: list[tuple[str, tuple[Any, ...]]]) -> list[_Queued]:
        """The scripts, keys and arguments ``steps`` run: each method, its scripts recorded."""
        queued: list[_Queued] = []
        view = copy.copy(self)
        for name in _SCRIPTED:
            setattr(view, name, _Recorder(getattr(self, name), queued))
        for name, args in steps:
            getattr(view, name)(*args)
        return queued

    def _send(self, queued: list[_Queued]) -> Any:
        pipe = self.client.pipeline(transaction=False)
        for script, keys, args in queued:
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        return pipe.execute(raise_on_error=False)

    def read_near_tagged(self, key: str, tags_key: str, fields: list[str]) -> Any:
        """:meth:`read_near` and the marks of the value's tags, in one round trip.

        ``[stored bytes, ms left, born, each field or None]``: ``GET``, ``PTTL``
        and ``HMGET`` of the tags hash in one pipeline (the listener's clients
        are never clusters); a hash found without ``born`` is born by
        ``TAG_MARKS_SCRIPT``.
        """
        pipe = self.client.pipeline(transaction=False)
        pipe.get(key)
        pipe.pttl(key)
        pipe.hmget(tags_key, [BORN, *fields])
        if self._async:
            return self._near_tagged_async(pipe.execute(), tags_key, fields)
        raw, ms_left, marks = pipe.execute()
        if marks[0] is None:
            marks = self._tag_marks(keys=[tags_key], args=fields)
        return [raw, ms_left, *marks]

    async def _near_tagged_async(self, sent: Any, tags_key: str, fields: list[str]) -> Any:
        raw, ms_left, marks = await sent
        if marks[0] is None:
            marks = await self._tag_marks(keys=[tags_key], args=fields)
        return [raw, ms_left, *marks]

    def read_near(self, key: str) -> Any:
        """``GET key`` and ``PTTL key`` in one round trip: ``[stored bytes, ms left]``.

        What a near copy is made from: its time left in Redis bounds how long it
        may be served, so that a copy never outlives the value. Both commands
        name one key, so a cluster pipeline sends them to one node.
        """
        pipe = self.client.pipeline(transaction=False)
        pipe.get(key)
        pipe.pttl(key)
        return pipe.execute()

    def write(  # noqa: PLR0917  # sent as a Command, whose args are positional
        self, key: str, payload: bytes, ttl_ms: int, stamp: int, lock: str = "", token: str = ""
    ) -> Any:
        """Run ``STORE_SCRIPT``: write ``payload`` unless something newer was decided.

        One round trip, the payload sent as raw bytes; returns ``stored`` or why not.
        A fill that took the lock names it (``lock``, ``token``): a lock lost to a
        restart refuses the write.
        """
        keys, args = [key, tomb_key(key)], [payload, ttl_ms, stamp, TOMB_MS]
        if lock:
            keys.append(lock)
            args.append(token)
        return self._store(keys=keys, args=args)

    def acquire(self, lock_key: str, token: str, lease_ms: int, key: str, wake_key: str) -> Any:
        """Run ``ACQUIRE_SCRIPT``: the lock, the recheck, the newest wake entry, the clock.

        One round trip. Returns ``[1 or 0, stored bytes or None, [newest entry],
        seconds, µs]``; a follower reads the wake stream from that entry on, so it
        never takes an earlier fill's signal for this one's. The keys share a slot.
        """
        return self._acquire(keys=[lock_key, key, wake_key], args=[token, lease_ms])

    def release(
        self, lock_key: str, wake_key: str, token: str, wake_ttl_ms: int, result: str = "stored"
    ) -> Any:
        """Run :data:`~memofill.scripts.RELEASE_SCRIPT`: free the lock if still ours, wake all."""
        return self._release(keys=[lock_key, wake_key], args=[token, wake_ttl_ms, result])

    def hold(  # noqa: PLR0917  # sent as a Command, whose args are positional
        self, lock_key: str, wake_key: str, token: str, hold_ms: int, wake_ttl_ms: int, result: str
    ) -> Any:
        """Run :data:`~memofill.scripts.HOLD_SCRIPT`: keep the lock ``hold_ms`` more if ours."""
        return self._hold(keys=[lock_key, wake_key], args=[token, hold_ms, result, wake_ttl_ms])

    def wait(self, wake_key: str, last_id: str, block_ms: int) -> Any:
        """``XREAD BLOCK block_ms STREAMS wake_key last_id``: a leader's signal, or a time-out."""
        return self.client.xread({wake_key: last_id}, count=1, block=block_ms)

    def delete(self, key: str) -> Any:
        """Run ``INVALIDATE_KEY_SCRIPT``: a tomb, then ``DEL``: ``[tomb µs, deleted]``."""
        return self._invalidate_key(keys=[key, tomb_key(key)], args=[TOMB_MS])

    def invalidate_dataset(self, meta_key: str, mark: str) -> Any:
        """Run :data:`~memofill.scripts.INVALIDATE_SCRIPT`: one command, whatever the keys."""
        return self._invalidate(keys=[meta_key], args=[mark])

    def invalidate_tag(self, tags_key: str, tag: str, soft: bool, keep_ms: int) -> Any:
        """Run ``INVALIDATE_TAG_SCRIPT``: one command, whatever the number of values."""
        return self._invalidate_tag(keys=[tags_key], args=[tag, "1" if soft else "0", keep_ms])

    def read_meta(self, meta_key: str, version: str) -> Any:
        """Run ``READ_META_SCRIPT``: the clock, and the marks if ``version`` is not current."""
        return self._read_meta(keys=[meta_key], args=[version])

    def scan_keys(self, pattern: str, count: int) -> Any:
        """``SCAN ... MATCH pattern COUNT count`` to the end, on every primary of a cluster."""
        return self.client.scan_iter(match=pattern, count=count)

    def unlink(self, keys: list[bytes]) -> Any:
        """``UNLINK key ...``: the memory is freed by Redis in the background."""
        return self.client.unlink(*keys)

    def describe(self, key: str, lock_key: str) -> Any:
        """What ``memofill inspect`` shows: data TTL, size and head, lock and tomb.

        Returns ``[data PTTL, data STRLEN, first bytes, lock PTTL, lock token,
        tomb PTTL, tomb]``; the first bytes are enough for a header and the longest
        marker. The three keys share a slot, so a cluster pipeline sends them to one node.
        """
        tomb = tomb_key(key)
        pipe = self.client.pipeline(transaction=False)
        pipe.pttl(key)
        pipe.strlen(key)
        pipe.getrange(key, 0, HEAD_BYTES - 1)
        pipe.pttl(lock_key)
        pipe.get(lock_key)
        pipe.pttl(tomb)
        pipe.get(tomb)
        return pipe.execute()


_live_commands: weakref.WeakSet[Commands] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child must not use the parent's sockets: its asyncio pools start empty.

    redis-py's blocking pools notice the fork themselves (they compare the
    pid before handing out a connection); its asyncio pools do not, so the
    child would send commands on the connections the parent still uses, and
    their replies would interleave. The parent's connections are dropped
    without being closed: closing them would not be the child's business.
    """
    for commands in list(_live_commands):
        pool = getattr(commands.client, "connection_pool", None)
        if pool is not None and type(pool).__module__.startswith("redis.asyncio"):
            pool.reset()


os.register_at_fork(after_in_child=_after_fork_in_child)
