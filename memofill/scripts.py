"""The Lua scripts memofill runs inside Redis: what each reads, writes and returns.

Rules:

- Only text lives here: :mod:`memofill.commands` registers and sends these
  scripts, the coordinator decides what their replies mean.
- Every script touches keys of one Cluster hash slot (a key, its lock, wake
  stream and tomb share one; each hash of marks is one key), so a cluster
  client routes each call to one node.
- Redis's clock (``TIME``) is read inside the scripts that stamp or mark, so
  that a stamp and the marks it is compared with come from one clock per node;
  marks never go backward, and losing them makes values less servable, never
  more (a hash found missing is born again).
"""

from __future__ import annotations

__all__ = [
    "ACQUIRE_SCRIPT",
    "HOLD_SCRIPT",
    "INVALIDATE_KEY_SCRIPT",
    "INVALIDATE_SCRIPT",
    "INVALIDATE_TAG_SCRIPT",
    "READ_META_SCRIPT",
    "RELEASE_SCRIPT",
    "STORE_SCRIPT",
    "TAG_MARKS_SCRIPT",
    "TOMB_MS",
]

#: Token-safe release, sent by EVALSHA (reloaded on NOSCRIPT by redis-py's Script).
#:
#: KEYS[1]: the lock key. KEYS[2]: the wake stream.
#: ARGV[1]: this caller's token. ARGV[2]: how long the wake entry lives (ms).
#: ARGV[3]: how the fill ended, for the followers: ``stored``, ``none`` or ``error:<Type>``.
#:
#: Deletes the lock only while it still holds this caller's token: a leader whose
#: lease ran out must not delete the lock a later leader now holds. Then adds an
#: entry to the wake stream, so that followers blocked in XREAD return at once:
#: to read the data key, or, when the fetch returned ``None`` or raised, to
#: answer at once even if nothing was stored for them (``negative_ttl_s = 0``).
#: Returns 1 if the lock was deleted, 0 if it was no longer ours.
RELEASE_SCRIPT = """
local released = 0
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('DEL', KEYS[1])
    released = 1
end
redis.call('XADD', KEYS[2], 'MAXLEN', '1', '*', 'result', ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return released
"""


#: Token-safe hold after a failed fetch, sent by EVALSHA like :data:`RELEASE_SCRIPT`.
#:
#: KEYS[1]: the lock key. KEYS[2]: the wake stream.
#: ARGV[1]: this caller's token. ARGV[2]: how long to hold the lock (``refresh_retry_ms``).
#: ARGV[3]: how the fetch ended, ``error:<Type>``. ARGV[4]: how long a plain wake entry lives.
#:
#: Instead of deleting the lock, keeps it for ARGV[2] ms more while it still holds this
#: caller's token: every process then finds it held, keeps serving its stale value, and
#: does not retry until it lapses, so the origin sees one call per ``refresh_retry_ms``
#: fleet-wide while it fails. The wake entry tells followers blocked now that the fetch
#: raised; with a ``hold`` field (the hold's ms) it also tells callers that arrive while
#: the lock is held that it is held after a failure, not for a fetch in progress, so they
#: answer at once rather than wait. Old followers read only ``result``. A lock that is no
#: longer ours is left alone and the entry carries no ``hold``.
#: Returns 1 if the lock is now held for ARGV[2] ms, 0 if it was no longer ours.
HOLD_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    redis.call('XADD', KEYS[2], 'MAXLEN', '1', '*', 'result', ARGV[3], 'hold', ARGV[2])
    redis.call('PEXPIRE', KEYS[2], ARGV[2])
    return 1
end
redis.call('XADD', KEYS[2], 'MAXLEN', '1', '*', 'result', ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 0
"""

#: Lock, recheck, newest wake entry and Redis's clock, in one round trip (EVALSHA).
#:
#: KEYS[1]: the lock key. KEYS[2]: the data key. KEYS[3]: the wake stream.
#: ARGV[1]: this caller's token. ARGV[2]: the lease in ms.
#:
#: ``SET lock token NX PX lease``, then ``GET key`` (the recheck) and the newest
#: wake entry, then ``TIME``: the fill's **stamp**, Redis's clock before the fetch
#: begins, which its write is later judged by (``STORE_SCRIPT``). A script,
#: not a pipeline, so that the clock is the data key's own node's on a Cluster.
#: Returns ``[1 or 0, stored bytes or nil, [newest entry] or [], seconds, µs]``.
ACQUIRE_SCRIPT = """
local acquired = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
local read, data = pcall(redis.call, 'GET', KEYS[2])
if not read then data = false end
local listed, newest = pcall(redis.call, 'XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)
if not listed then newest = {} end
local now = redis.call('TIME')
return {acquired and 1 or 0, data, newest, now[1], now[2]}
"""

#: The conditional write of every fill, sent by EVALSHA: one round trip, like a ``SET``.
#:
#: KEYS[1]: the data key. KEYS[2]: its tomb (:func:`memofill.keys.tomb_key`). KEYS[3],
#: for a fill that took the lock: the lock. ARGV[1]: the bytes. ARGV[2]: their ``PX``.
#: ARGV[3]: the fill's stamp (µs, Redis's clock no later than its fetch began).
#: ARGV[4]: how long tombs live (ms). ARGV[5], with KEYS[3]: the fill's lock token.
#:
#: Writes only when nothing newer was decided for the key since the fetch began:
#: ``invalidated`` when the key's tomb is at or after the stamp (``invalidate()``
#: ran meanwhile), ``newer`` when the value there carries a later stamp (a leader
#: that took over after this one's lease ran out), ``old`` when the fetch began
#: longer ago than a tomb lives (a tomb that might have said so is gone),
#: ``restarted`` when the fill's lock is gone and the server started after the
#: stamp (a restart lost the lock, and may have lost a tomb with it: ``INFO``'s
#: uptime, read only then). Returns ``stored`` or the reason it refused.
STORE_SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local stamp = tonumber(ARGV[3])
if now - stamp >= tonumber(ARGV[4]) * 1000 then return 'old' end
local tomb = redis.call('GET', KEYS[2])
if tomb and tonumber(tomb) >= stamp then return 'invalidated' end
if KEYS[3] and redis.call('GET', KEYS[3]) ~= ARGV[5] then
    local asked, info = pcall(redis.call, 'INFO', 'server')
    local up = asked and type(info) == 'string' and string.match(info, 'uptime_in_seconds:(%d+)')
    if up and stamp < now - tonumber(up) * 1000000 then return 'restarted' end
end
local read, head = pcall(redis.call, 'GETRANGE', KEYS[1], 0, 47)
if read and string.len(head) == 48 and string.sub(head, 1, 2) == string.char(1) .. '2' then
    local theirs = tonumber(string.sub(head, 35, 48), 16)
    if theirs and theirs > stamp then return 'newer' end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 'stored'
"""

#: ``invalidate()`` of one key, sent by EVALSHA: a tomb with Redis's clock, then ``DEL``.
#:
#: KEYS[1]: the data key. KEYS[2]: its tomb. ARGV[1]: how long the tomb lives (ms).
#:
#: The tomb never goes backward (a second invalidation in the same µs is one
#: later), and lives as long as a fill may take to be refused as ``old``. Returns
#: ``[the tomb's time (µs, as text), how many values were deleted]``.
INVALIDATE_KEY_SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local before = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
if before >= now then now = before + 1 end
local tomb = string.format('%.0f', now)
redis.call('SET', KEYS[2], tomb, 'PX', ARGV[1])
return {tomb, redis.call('DEL', KEYS[1])}
"""

#: The start of both scripts on the meta hash: Redis's clock, and when the hash was born.
#:
#: ``born`` is Redis's clock when the hash was made, made again when it is missing
#: (a restart without persistence, a ``DEL``, an eviction) or when the server's
#: ``run_id`` changed (a restart, perhaps from an older snapshot that lost the last
#: marks): every value stamped before it is older than any mark that may have been
#: lost, and is served by no process (:class:`memofill.generations.Generations`).
#: Losing marks thus costs refills, never serves an invalidated value. Without
#: ``INFO`` (an ACL), a restart that kept the hash is not noticed.
_META_PRELUDE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local run = nil
local asked, info = pcall(redis.call, 'INFO', 'server')
if asked and type(info) == 'string' then run = string.match(info, 'run_id:(%w+)') end
local born = redis.call('HGET', KEYS[1], 'born')
if not born or (run and redis.call('HGET', KEYS[1], 'run') ~= run) then
    born = string.format('%.0f', now)
    if not pcall(redis.call, 'HSET', KEYS[1], 'born', born, 'run', run or '-') then
        born = '0'  -- out of memory: nothing is lost that a birth would stand for
    end
end
"""

#: Whole-dataset invalidation (:mod:`memofill.generations`), sent by EVALSHA.
#:
#: KEYS[1]: the meta hash (``<prefix>#meta``). ARGV[1]: the mark's field
#: (``hard:<dataset>`` or ``soft:<dataset>``).
#:
#: The mark is Redis's clock (µs), one more than the mark before when the clock
#: has not moved past it, so marks never go backward; ``v`` counts changes, so
#: that readers know when to read the hash again. Returns the mark (as text).
INVALIDATE_SCRIPT = (
    _META_PRELUDE
    + """
local before = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0') or 0
if before >= now then now = before + 1 end
local mark = string.format('%.0f', now)
redis.call('HSET', KEYS[1], ARGV[1], mark)
redis.call('HINCRBY', KEYS[1], 'v', 1)
return mark
"""
)

#: Tag invalidation (:mod:`memofill.tags`), sent by EVALSHA.
#:
#: KEYS[1]: the tags hash (``<prefix>#tags``). ARGV[1]: the tag. ARGV[2]: ``1`` soft,
#: ``0`` hard. ARGV[3]: how long the mark must be kept (ms). ``born`` as for the meta
#: hash; ``t:<tag>`` holds ``"<hard> <soft> <keep_until>"`` (µs), each only moving
#: forward as the meta marks do. Then about 16 fields from ``cursor`` on (``HSCAN``) are
#: looked at, and the tags past their ``keep_until`` removed: each call cleans about as
#: much as it adds. Returns the mark (as text).
INVALIDATE_TAG_SCRIPT = (
    _META_PRELUDE
    + """
local field = 't:' .. ARGV[1]
local held = {string.match(redis.call('HGET', KEYS[1], field) or '', '^(%d+) (%d+) (%d+)$')}
local marks = {tonumber(held[1]) or 0, tonumber(held[2]) or 0, tonumber(held[3]) or 0}
local kind = ARGV[2] == '1' and 2 or 1  -- hard, soft, keep_until
local mark = math.max(now, marks[kind] + 1)
marks[kind], marks[3] = mark, math.max(marks[3], now + tonumber(ARGV[3]) * 1000)
redis.call('HSET', KEYS[1], field, string.format('%.0f %.0f %.0f', marks[1], marks[2], marks[3]))
local step = redis.call('HSCAN', KEYS[1], redis.call('HGET', KEYS[1], 'cursor') or 0, 'COUNT', 16)
for i = 1, #step[2], 2 do
    local name, text = step[2][i], step[2][i + 1]
    if string.sub(name, 1, 2) == 't:' and tonumber(string.match(text, ' (%d+)$') or 0) < now then
        redis.call('HDEL', KEYS[1], name)
    end
end
redis.call('HSET', KEYS[1], 'cursor', step[1])
return string.format('%.0f', mark)
"""
)

#: The start of the scripts that read the tags hash: ``born``, made when the hash is missing
#: (as ``_META_PRELUDE`` makes it, the server's run id with it), without reading
#: ``INFO`` on every read: a restart from an older snapshot is told by the meta hash,
#: whose birth is every dataset's mark.
_TAGS_PRELUDE = """
local born = redis.call('HGET', KEYS[#KEYS], 'born')
if not born then
    local clock = redis.call('TIME')
    born = string.format('%.0f', tonumber(clock[1]) * 1000000 + tonumber(clock[2]))
    local run = '-'
    local asked, info = pcall(redis.call, 'INFO', 'server')
    if asked and type(info) == 'string' then run = string.match(info, 'run_id:(%w+)') or '-' end
    if not pcall(redis.call, 'HSET', KEYS[#KEYS], 'born', born, 'run', run) then
        born = '0'  -- out of memory: nothing is lost that a birth would stand for
    end
end
"""

#: The marks of some tags, the tags hash born if it is missing. KEYS[1]: the tags hash.
#: ARGV: the tags' fields (``t:<tag>``). Returns ``[born, each field or nil]``. A tagged
#: hit reads the hash with a plain ``HMGET`` beside its ``GET``; this script is for a
#: hash found without ``born``, and a cluster client's reads (no plain pipeline
#: without it to learn the birth of a missing hash).
TAG_MARKS_SCRIPT = (
    _TAGS_PRELUDE
    + """
local reply = {born}
local marks = redis.call('HMGET', KEYS[1], unpack(ARGV))
for i = 1, #ARGV do reply[i + 1] = marks[i] end
return reply
"""
)

#: What a process reads of the meta hash, sent by EVALSHA every ``meta_check_ms`` at most.
#:
#: KEYS[1]: the meta hash. ARGV[1]: the version the reader knows (``born:v``).
#:
#: Returns ``[Redis's clock in µs, version]`` while the reader's version is
#: current, so the steady cost is flat in the number of datasets and marks; else
#: ``[clock, version, the whole hash as HGETALL gives it in a script]``.
READ_META_SCRIPT = (
    _META_PRELUDE
    + """
local version = born .. ':' .. (redis.call('HGET', KEYS[1], 'v') or '0')
local stamp = string.format('%.0f', now)
if version == ARGV[1] then return {stamp, version} end
return {stamp, version, redis.call('HGETALL', KEYS[1])}
"""
)

#: How long a tomb lives, and so the longest a fill's fetch may take and still be written.
TOMB_MS = 600_000
