"""The outbox of the Redis stores: its keys, its Lua, and its operations as steps.

A lease event's jobs are written by the event's own script (``add``, the
revokes, ``claim_expired`` in ``jitbroker.stores.redis``): ``EVENT_JOBS`` is
the Lua they include, ``event_jobs`` of ``stores/base.py`` line for line, fed
by the caller's ``Outbox`` as the script's last arguments (``outbox_args``). So an
event and its jobs are one atomic step, and one round trip. The other
operations (claim, finish, fail, list, retry, forget) are one script each.

Keys, for a store with prefix ``p`` (the hash tag ``{p}`` keeps them in the
store's one Redis Cluster slot)::

    {p}:job:<id>         hash: id, event, name, lease (the lease as JSON, its
                         record's fields), due, limit, attempts, error, parked
                         ('1'/'0'), claim (absent: none); no TTL, ever
    {p}:queue:<kind>     zset: id -> due of the unparked jobs of that kind
                         (``event:name``), held ones included: ``claim_jobs``
                         reads only the queues of the kinds it is asked for
    {p}:parked           zset: id -> due of the parked jobs
    {p}:jobs             zset: id -> due of every job (``jobs()``)
    {p}:held             zset: lease id -> due of the leases holding held
                         on_issue hook jobs inline (below)

A sorted set orders equal scores by member, byte by byte: (due, id), the
order the protocol asks for. ``purge`` never touches these keys: a job holds
its own snapshot of the lease and outlives the lease's record.

Held ``on_issue`` hook jobs of a lease without a provider (what every issue of
a broker with an ``on_issue`` hook writes, finished by that broker a moment
later) are written inline: four more fields of the lease's own record
(``issue_hooks``, the names; ``issue_claim``, ``issue_due``, ``issue_limit``)
in the add's one HSET, and one ``{p}:held`` entry. A job hash with its lease
snapshot and two queue entries, written and then deleted, was most of what a
hook cost an issue. Finishing a lease's inline jobs deletes those fields; a
claim after their deadline, a failure, ``forget``, or the lease's death (its
record then gets a TTL) first moves them into job hashes of their own
(``unhold``, in ``jitbroker.stores.redis``), which every other script reads.
``get`` and ``jobs()`` see inline jobs without moving them. An inline job's
``lease`` is the record as it is when the job is read: it may show a renewal
that came after the issue (its death moves the job out, with the revocation).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from .._drive import Steps
from ..errors import StoreError
from ..lease import Lease
from .base import NO_OUTBOX, Job, Outbox
from .codec import from_mapping
from .redis import _READS, _RUNS_OOM, HELD, _pairs, _text, _time, _translated

if TYPE_CHECKING:
    from .redis import RedisLeases

__all__ = ["EVENT_JOBS", "OutboxSteps", "add_args", "outbox_args"]

_KEYS = """
local JOBS, PARKED = BASE .. 'jobs', BASE .. 'parked'
local function job_key(id) return BASE .. 'job:' .. id end
local function queue_key(kind) return BASE .. 'queue:' .. kind end
"""

# Included by the event scripts after their prelude (which sets BASE). The
# script's last two arguments are the caller's Outbox as outbox_args() encodes
# it: its number of hooks, then the Outbox as JSON ('' for an add that makes
# no job: the section is skipped unread). They are removed from ARGV here,
# before the script reads its own arguments. A lease with no job (no hook, no
# provider) costs a scan of its record; the JSON is decoded once, when needed.
EVENT_JOBS = (
    _KEYS
    + """
local OUTBOX_ARG, HOOKS_ARG = table.remove(ARGV), table.remove(ARGV)
local HOOKS, OUTBOX, INLINE_DUE = HOOKS_ARG ~= '0', false, false
if HOOKS_ARG == 'inline' then  -- an add whose held hook jobs are in its record
  INLINE_DUE, OUTBOX_ARG = OUTBOX_ARG, ''
end

local function field(record, name)  -- of an HGETALL reply; false if absent
  for i = 1, #record, 2 do
    if record[i] == name then return record[i + 1] end
  end
  return false
end

-- Insert if absent, as every store does: a job already there is kept as it is.
local function put_job(lease_id, event, name, snapshot, due, claim)
  local id = lease_id .. '/' .. event .. '/' .. name
  local key = job_key(id)
  if redis.call('EXISTS', key) == 1 then return end
  local job = {'id', id, 'event', event, 'name', name, 'lease', snapshot, 'due', due,
    'limit', OUTBOX.l, 'attempts', '0', 'error', '', 'parked', '0'}
  if claim then
    job[#job + 1] = 'claim'
    job[#job + 1] = claim
  end
  redis.call('HSET', key, unpack(job))
  redis.call('ZADD', queue_key(event .. ':' .. name), due, id)
  redis.call('ZADD', JOBS, due, id)
end

-- event_jobs() of stores/base.py: the jobs `event` makes for the lease whose
-- record (an HGETALL reply, as the event left it) is `record`, at `at`: one per
-- hook, and the lease's provider's create (on_issue) or revoke (otherwise),
-- held by the caller's claim only if the caller has that provider.
local function record_jobs(event, record, at)
  if OUTBOX_ARG == '' then return end
  local expire_hooks, provider = false, field(record, 'provider')
  if event == 'on_expire' then
    expire_hooks = field(record, 'expire_hooks')
    if not expire_hooks and not provider then return end
  elseif not HOOKS and not provider then
    return
  end
  if not OUTBOX then OUTBOX = cjson.decode(OUTBOX_ARG) end
  local names = OUTBOX.h
  if event == 'on_expire' then  -- hook names carry no whitespace: split() alike
    names = {}
    for name in string.gmatch(expire_hooks or '', '%S+') do names[#names + 1] = name end
  end
  local lease = {}
  for i = 1, #record, 2 do lease[record[i]] = record[i + 1] end
  local snapshot, claim, held = cjson.encode(lease), OUTBOX.c, OUTBOX.c ~= nil
  for _, name in ipairs(names) do
    put_job(lease.id, event, name, snapshot, held and OUTBOX.u or at, claim)
  end
  if provider then
    local step = event == 'on_issue' and 'create' or 'revoke'
    local mine = held and OUTBOX.p[provider] ~= nil
    put_job(lease.id, step, provider, snapshot, mine and OUTBOX.u or at, mine and claim or nil)
  end
end
"""
)

# The outbox's own scripts get ARGV[1] = key prefix, ARGV[2] = retention (not
# used), their own arguments from ARGV[3], like the lease scripts.
_HEAD = (
    "local BASE = ARGV[1]\n"
    + _KEYS
    + HELD
    + """
-- A job leaves every set it is in (its event and name give its queue).
local function drop(id, event, name)
  redis.call('DEL', job_key(id))
  redis.call('ZREM', queue_key(event .. ':' .. name), id)
  redis.call('ZREM', JOBS, id)
  redis.call('ZREM', PARKED, id)
end
"""
)

# ARGV: now, claim, until, limit, then the kinds. The due jobs of those kinds,
# oldest first (due, then id), at most `limit`: each now held by `claim` until
# `until` (still in its queue, scored by the deadline: due again once it has
# passed). One script, so two claimers never take the same job.
_CLAIM = """
local now, holder, deadline, limit = ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
-- Ids compared byte by byte, as a sorted set orders its members (Lua's own
-- string comparison follows the server's locale).
local function before(a, b)
  if a[1] ~= b[1] then return a[1] < b[1] end
  for i = 1, math.min(#a[2], #b[2]) do
    local x, y = string.byte(a[2], i), string.byte(b[2], i)
    if x ~= y then return x < y end
  end
  return #a[2] < #b[2]
end
local due, seen = {}, {}
for i = 7, #ARGV do  -- held jobs past their deadline, still inline: out first
  if string.sub(ARGV[i], 1, 9) == 'on_issue:' then
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', HELD, '-inf', now, 'LIMIT', 0, limit)) do
      unhold(id)
    end
    break
  end
end
for i = 7, #ARGV do
  local queue = queue_key(ARGV[i])
  if not seen[queue] then
    seen[queue] = true
    local found = redis.call('ZRANGEBYSCORE', queue, '-inf', now, 'WITHSCORES', 'LIMIT', 0, limit)
    for j = 1, #found, 2 do due[#due + 1] = {tonumber(found[j + 1]), found[j], queue} end
  end
end
table.sort(due, before)
local taken = {}
for i = 1, math.min(limit, #due) do
  local id, queue = due[i][2], due[i][3]
  local key = job_key(id)
  redis.call('HSET', key, 'due', deadline, 'claim', holder)
  redis.call('ZADD', queue, deadline, id)
  redis.call('ZADD', JOBS, deadline, id)
  taken[i] = redis.call('HGETALL', key)
end
return taken
"""

# ARGV: claim, then ids. Deletes those `claim` still holds; how many. A job
# still inline leaves its lease's issue_hooks (the fields go with the last one).
_FINISH = """
local finished, seen = 0, {}
local function finish_inline(id)
  local lease_id, name = string.match(id, '^([^/]+)/on_issue/(.+)$')
  if not lease_id then return end
  local key = BASE .. 'lease:' .. lease_id
  local inline = redis.call('HMGET', key, 'issue_hooks', 'issue_claim')
  if not inline[1] or inline[2] ~= ARGV[3] then return end
  local left, found = {}, false
  for held in string.gmatch(inline[1], '%S+') do
    if held == name then found = true else left[#left + 1] = held end
  end
  if not found then return end
  finished = finished + 1
  if #left > 0 then
    redis.call('HSET', key, 'issue_hooks', table.concat(left, ' '))
  else
    redis.call('HDEL', key, 'issue_hooks', 'issue_claim', 'issue_due', 'issue_limit')
    redis.call('ZREM', HELD, lease_id)
  end
end
for i = 4, #ARGV do
  local id = ARGV[i]
  if not seen[id] then
    seen[id] = true
    local job = redis.call('HMGET', job_key(id), 'claim', 'event', 'name')
    if job[1] == ARGV[3] then
      drop(id, job[2], job[3])
      finished = finished + 1
    elseif not job[2] then
      finish_inline(id)
    end
  end
end
return finished
"""

# ARGV: id, claim, due, error, park ('1'/'0'), attempt ('1'/'0'). 1 if `claim`
# held the job (now released: due again at `due`, or parked), else 0.
_FAIL = """
local id, due, park = ARGV[3], ARGV[5], ARGV[7]
local lease_id = string.match(id, '^([^/]+)/on_issue/')
if lease_id then unhold(lease_id) end
local key = job_key(id)
local job = redis.call('HMGET', key, 'claim', 'event', 'name')
if job[1] ~= ARGV[4] then return 0 end
if ARGV[8] == '1' then redis.call('HINCRBY', key, 'attempts', 1) end
redis.call('HSET', key, 'error', ARGV[6], 'due', due, 'parked', park)
redis.call('HDEL', key, 'claim')
local queue = queue_key(job[2] .. ':' .. job[3])
if park == '1' then  -- out of its queue: no claim reads it again until retried
  redis.call('ZREM', queue, id)
  redis.call('ZADD', PARKED, due, id)
else
  redis.call('ZADD', queue, due, id)
end
redis.call('ZADD', JOBS, due, id)
return 1
"""

# ARGV: which ('all', 'parked' or 'unparked'), limit (> 0). Up to `limit` job
# records, oldest due first, then up to `limit` still inline (never parked):
# the caller merges the two (read only).
_LIST = """
local which, limit, found = ARGV[3], tonumber(ARGV[4]), {}
local function inline()
  local records = {}
  for _, id in ipairs(redis.call('ZRANGE', HELD, 0, limit - 1)) do
    for _, job in ipairs((held_records(id))) do records[#records + 1] = job end
  end
  return records
end
if which ~= 'unparked' then
  local ids = redis.call('ZRANGE', which == 'parked' and PARKED or JOBS, 0, limit - 1)
  for i, id in ipairs(ids) do found[i] = redis.call('HGETALL', job_key(id)) end
  if which == 'parked' then return {found, {}} end
  return {found, inline()}
end
-- Every job but the parked ones, page by page: parked jobs are few (each is a
-- failure an operator is shown), so this reads few more than it returns.
local offset = 0
while #found < limit do
  local ids = redis.call('ZRANGE', JOBS, offset, offset + limit - 1)
  if #ids == 0 then break end
  for _, id in ipairs(ids) do
    if #found < limit and not redis.call('ZSCORE', PARKED, id) then
      found[#found + 1] = redis.call('HGETALL', job_key(id))
    end
  end
  offset = offset + #ids
end
return {found, inline()}
"""

# ARGV: id. The job's record, from its hash or inline in its lease's; {} if none.
_GET = """
local id = ARGV[3]
local record = redis.call('HGETALL', job_key(id))
if #record > 0 then return record end
local lease_id = string.match(id, '^([^/]+)/on_issue/')
if not lease_id then return {} end
local jobs, ids = held_records(lease_id)
for i, job_id in ipairs(ids) do
  if job_id == id then return jobs[i] end
end
return {}
"""

# ARGV: now, then 'all' (every parked job) or 'ids' followed by ids. Each parked
# job among them is due at `now` with one more attempt (limit = attempts) and
# no claim; how many.
_RETRY = """
local now, retried = ARGV[3], 0
local function retry(id)
  if redis.call('ZREM', PARKED, id) == 0 then return end  -- not parked
  local key = job_key(id)
  local job = redis.call('HMGET', key, 'attempts', 'event', 'name')
  redis.call('HSET', key, 'parked', '0', 'due', now, 'limit', job[1])
  redis.call('HDEL', key, 'claim')
  redis.call('ZADD', queue_key(job[2] .. ':' .. job[3]), now, id)
  redis.call('ZADD', JOBS, now, id)
  retried = retried + 1
end
if ARGV[4] == 'all' then
  for _, id in ipairs(redis.call('ZRANGE', PARKED, 0, -1)) do retry(id) end
else
  for i = 5, #ARGV do retry(ARGV[i]) end
end
return retried
"""

# ARGV: ids. Deletes them whatever their state; the records deleted.
_FORGET = """
local gone = {}
for i = 3, #ARGV do
  local lease_id = string.match(ARGV[i], '^([^/]+)/on_issue/')
  if lease_id then unhold(lease_id) end
end
for i = 3, #ARGV do
  local record = redis.call('HGETALL', job_key(ARGV[i]))
  if #record > 0 then
    local job = {}
    for j = 1, #record, 2 do job[record[j]] = record[j + 1] end
    drop(ARGV[i], job.event, job.name)
    gone[#gone + 1] = record
  end
end
return gone
"""


def outbox_args(outbox: Outbox) -> tuple[str, str]:
    """``outbox`` as the event scripts' last two arguments (see ``EVENT_JOBS``):
    its number of hooks, and itself as JSON, times as the exact strings
    ``_time`` makes (Lua's numbers would keep 14 digits of them)."""
    if outbox is NO_OUTBOX:
        return _NO_OUTBOX_ARGS
    return str(len(outbox.hooks)), _encode(outbox)


def add_args(lease: Lease, outbox: Outbox) -> tuple[str, ...]:
    """The ``add`` script's last arguments: the JSON is '' if the lease makes no
    job (no hook, no provider), so the script skips the jobs section. Held hook
    jobs of a lease without a provider go inline: their fields join the
    record's, then ``inline`` and their deadline (see the module docstring)."""
    hooks = outbox.hooks
    if not hooks and lease.provider is None:
        return _NO_JOBS
    if outbox.claim is not None and lease.provider is None:
        until = _time("until", outbox.until)
        return ("issue_hooks", " ".join(hooks), "issue_claim", outbox.claim, "issue_due", until,
                "issue_limit", str(int(outbox.limit)), "inline", until)  # fmt: skip
    return outbox_args(outbox)


def _encode(outbox: Outbox) -> str:
    box: dict[str, Any] = {
        "h": list(outbox.hooks),
        "p": dict.fromkeys(outbox.providers, 1),  # a set, for the script
        "u": _time("until", outbox.until),
        "l": str(int(outbox.limit)),
    }
    if outbox.claim is not None:  # absent, not null: cjson's null is truthy in Lua
        box["c"] = outbox.claim
    return json.dumps(box, ensure_ascii=False, separators=(",", ":"))


#: What every revoke and sweep without hooks sends: encoded once.
_NO_OUTBOX_ARGS = ("0", _encode(NO_OUTBOX))
_NO_JOBS = ("0", "")


class OutboxSteps:
    """The outbox operations of a Redis store, each written once as steps (see
    ``RedisLeases``): ``RedisStore`` runs them, ``AsyncRedisStore`` awaits them."""

    def __init__(self, leases: RedisLeases[Any]) -> None:
        register = cast("Any", leases._client).register_script
        self._script = leases._script  # the store's keys and leading arguments
        self._claim = register(_RUNS_OOM + _HEAD + _CLAIM)
        # Ending or releasing work must run past maxmemory too: a revoke's job
        # is how a backend credential dies.
        self._finish = register(_RUNS_OOM + _HEAD + _FINISH)
        self._fail = register(_RUNS_OOM + _HEAD + _FAIL)
        self._list = register(_READS + _HEAD + _LIST)
        self._get = register(_READS + _HEAD + _GET)
        self._retry = register(_RUNS_OOM + _HEAD + _RETRY)
        self._forget = register(_RUNS_OOM + _HEAD + _FORGET)

    # The event scripts' last arguments (they live in jitbroker.stores.redis).
    args = staticmethod(outbox_args)
    add_args = staticmethod(add_args)

    def claim(
        self, now: float, kinds: Collection[str], claim: str, until: float, limit: int
    ) -> Steps[list[Job]]:
        args = (_time("now", now), claim, _time("until", until), int(limit))
        if not kinds or limit <= 0:
            return []
        with _translated("claim outbox jobs"):
            records = yield self._script(self._claim, *args, *kinds)
        return _jobs(records)

    def finish(self, ids: Collection[str], claim: str) -> Steps[int]:
        if not ids:
            return 0
        with _translated("finish outbox jobs"):
            return int((yield self._script(self._finish, claim, *ids)))

    def fail(
        self, job_id: str, claim: str, due: float, error: str, park: bool, attempt: bool
    ) -> Steps[bool]:
        flags = ("1" if park else "0", "1" if attempt else "0")
        step = self._script(self._fail, job_id, claim, _time("due", due), error, *flags)
        with _translated("release an outbox job"):
            return bool((yield step))

    def get(self, job_id: str) -> Steps[Job | None]:
        with _translated("read an outbox job"):
            record = yield self._script(self._get, job_id)
        return _job(_pairs(record)) if record else None

    def listed(self, parked: bool | None, limit: int) -> Steps[list[Job]]:
        if limit <= 0:
            return []
        which = "all" if parked is None else "parked" if parked else "unparked"
        with _translated("list outbox jobs"):
            stored, inline = yield self._script(self._list, which, int(limit))
        found = _jobs(stored) + _jobs(inline)
        found.sort(key=lambda job: (job.due, job.id))
        return found[:limit]

    def retry(self, ids: Collection[str] | None, now: float) -> Steps[int]:
        chosen = ("all",) if ids is None else ("ids", *ids)
        step = self._script(self._retry, _time("now", now), *chosen)
        if ids is not None and not ids:
            return 0
        with _translated("retry parked outbox jobs"):
            return int((yield step))

    def forget(self, ids: Collection[str]) -> Steps[list[Job]]:
        if not ids:
            return []
        with _translated("forget outbox jobs"):
            return _jobs((yield self._script(self._forget, *ids)))


def _jobs(records: Sequence[Sequence[Any]]) -> list[Job]:
    return [_job(_pairs(flat)) for flat in records]


def _job(record: Mapping[str, Any]) -> Job:
    """A job from its hash (bytes or str values, as the client decodes them)."""
    job_id = _text(record.get("id", "?"))
    try:
        claim = record.get("claim")
        return Job(
            job_id,
            _text(record["event"]),
            _text(record["name"]),
            from_mapping(json.loads(record["lease"])),
            float(record["due"]),
            int(record["limit"]),
            int(record["attempts"]),
            _text(record["error"]),
            _text(record["parked"]) == "1",
            None if claim is None else _text(claim),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(
            f"corrupt outbox job {job_id!r} in Redis: a field is missing or malformed"
        ) from exc
