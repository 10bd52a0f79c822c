"""``RedisStore``: leases in Redis, shared by every process and host that points at it.

Every mutating call is one Lua script, so it is one round trip and atomic: the
checks that ``LeaseStore`` promises (a child of a dead parent is refused, a
subtree is revoked whole, an expired lease is claimed by exactly one reaper)
hold across any number of brokers without a lock.

Key layout, for a store with prefix ``p`` (``{p}`` is a Redis Cluster hash tag,
so every key of one store lives in one slot and the scripts may touch them all)::

    {p}:lease:<id>            hash: the lease, one field per codec column
                              (absent field = None); dead ones carry a TTL
    {p}:exp                   zset: id -> expires_at of leases neither revoked nor
                              claimed that need no on_expire hook; membership *is*
                              "still awaiting its claim"
    {p}:due:<expire_hooks>    zset: the same for leases that need these on_expire
                              hooks (a claim reads only the sets of hooks it runs)
    {p}:hooks                 set: the expire_hooks values that have a due set
    {p}:dead                  zset: JSON [id, task, parent, owner, subject, key_id,
                              issuer, task_run, provider] -> expires_at of revoked
                              or claimed leases, for purge (older members lack
                              the last ones)
    {p}:all                   set: every stored id (``find`` with an empty filter)
    {p}:idx:<field>:<value>   set: ids whose task/parent/owner/subject/key_id/
                              issuer/task_run/provider is value
    {p}:live:<subject>        zset: id -> expires_at of the subject's leases neither
    {p}:live:<subject>\x1f<owner>   revoked nor claimed (and of those with this owner):
                              a quota's count is one ZCOUNT
    {p}:epoch                 string: the server time (seconds) the store's data
                              began, written by the first add into an empty store
    {p}:revseq                string: the number of the last revocation
    {p}:revlog                stream: {n, ids} per revocation, {n, ids = [], keys}
                              per key retirement, trimmed after an hour
    {p}:retired               hash: kid -> retired at, the retired signing keys
                              every broker sharing the store reads (see _RETIRE)
    {p}:caches                hash: cache id -> "acked seen_ms staleness_ms" of each
                              live revocation cache (see _CACHES and the feed)
    {p}:job:<id>, {p}:queue:<kind>, {p}:parked, {p}:jobs
                              the outbox: see ``jitbroker.stores.redis_outbox``

The scripts are declared with the three fixed keys and build the per-lease keys
from the prefix; all share the hash tag, so Redis Cluster routes them to the one
node that owns the slot (tests run against a single node).

The outbox: ``add``, the revokes and ``claim_expired`` write the event's jobs
(``event_jobs``) in their own script, from the caller's ``Outbox`` passed as the
script's last arguments, so an event never commits without its jobs and costs
no extra round trip (see ``jitbroker.stores.redis_outbox``).

Memory: each script opens with a Redis 7 shebang whose flags say what it may do
past ``maxmemory`` (under ``noeviction``). Scripts that store or lengthen
authority (``add``, ``extend``) carry none, so Redis refuses them whole, before
they run, and issuance fails closed. Scripts that end authority or free memory
(revoke, revoke_where, claim_expired, purge) carry ``allow-oom``: revocation must
work when memory is short. ``find`` is ``no-writes``. (Without a shebang, Redis
checks memory only at a script's first *denyoom* command, and only if nothing was
written before it: ``add``, whose first write is a ZREM, ran to the end past
``maxmemory`` while ``revoke`` was refused.) Hence Redis >= 7.0. A shebang script
may touch keys it did not declare, within one slot (no ``allow-cross-slot-keys``).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import operator
import threading
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from itertools import chain
from typing import Any, Generic, TypeVar, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .._drive import Step, Steps, run
from ..clock import Clock, system_clock
from ..errors import InvalidRequest, StoreError, StoreUnavailable
from ..lease import Lease
from ..revocations import (
    ACK_MARGIN,
    RevocationCache,
    acknowledged,
    sleep,
    start_feed,
)
from ..usage import MAX_USED_BY, Usage, UsageRecord
from .base import NO_OUTBOX, Job, LeaseFilter, Outbox, Quota
from .codec import from_mapping, to_mapping

__all__ = ["RedisStore"]


#: The Redis version the scripts need: 7.0 brought the shebang and its flags.
_REDIS_REQUIRED = "7.0"

# -- the Lua scripts -----------------------------------------------------------
# The first line of each script is its shebang (see the module docstring):
_FAILS_OOM = "#!lua\n"  # refused whole while Redis is past maxmemory
_RUNS_OOM = "#!lua flags=allow-oom\n"  # ends authority or frees memory: runs anyway
_READS = "#!lua flags=no-writes\n"  # reads only: runs anyway, writes would fail

# Every script gets KEYS = (exp, dead, all) and ARGV[1] = key prefix "{p}:",
# ARGV[2] = retention in ms (0: dead records keep no TTL); its own arguments
# follow from ARGV[3]. Times arrive as Python's repr of a float and are written
# back as those same strings: Lua's tostring() keeps only 14 digits.

# Held on_issue hook jobs inline in their lease's record (see redis_outbox):
# ``held_records`` reads them as job records, ``unhold`` moves them into job
# hashes of their own. Needs BASE; included by the prelude and the outbox's head.
HELD = """
local HELD = BASE .. 'held'
local INLINE_FIELDS = {issue_hooks = true, issue_claim = true, issue_due = true, issue_limit = true}

-- The job records (flat HSET pairs) a lease's record holds inline, and their ids.
local function held_records(id)
  local key = BASE .. 'lease:' .. id
  local record = redis.call('HGETALL', key)
  local lease = {}
  for i = 1, #record, 2 do
    if not INLINE_FIELDS[record[i]] then lease[record[i]] = record[i + 1] end
  end
  local inline = redis.call('HMGET', key, 'issue_hooks', 'issue_claim', 'issue_due', 'issue_limit')
  local jobs, ids = {}, {}
  if not inline[1] then return jobs, ids end
  local snapshot = cjson.encode(lease)
  for name in string.gmatch(inline[1], '%S+') do
    local jid = id .. '/on_issue/' .. name
    jobs[#jobs + 1] = {'id', jid, 'event', 'on_issue', 'name', name, 'lease', snapshot,
      'due', inline[3], 'limit', inline[4], 'attempts', '0', 'error', '', 'parked', '0',
      'claim', inline[2]}
    ids[#ids + 1] = jid
  end
  return jobs, ids
end

-- Move a lease's inline held jobs into job hashes (a job already there is kept).
local function unhold(id)
  if not redis.call('ZSCORE', HELD, id) then return end
  local jobs, ids = held_records(id)
  for i, job in ipairs(jobs) do
    local jkey = BASE .. 'job:' .. ids[i]
    if redis.call('EXISTS', jkey) == 0 then
      redis.call('HSET', jkey, unpack(job))
      redis.call('ZADD', BASE .. 'queue:on_issue:' .. job[6], job[10], ids[i])
      redis.call('ZADD', BASE .. 'jobs', job[10], ids[i])
    end
  end
  local key = BASE .. 'lease:' .. id
  redis.call('HDEL', key, 'issue_hooks', 'issue_claim', 'issue_due', 'issue_limit')
  redis.call('ZREM', HELD, id)
end
"""

_PRELUDE = (
    """
local EXP, DEAD, ALL = KEYS[1], KEYS[2], KEYS[3]
local BASE, RETENTION = ARGV[1], tonumber(ARGV[2])
local INDEXED = {
  'task', 'parent', 'owner', 'subject', 'key_id', 'issuer', 'task_run', 'provider'
}

local function lease_key(id) return BASE .. 'lease:' .. id end
local function index_key(field, value) return BASE .. 'idx:' .. field .. ':' .. value end

-- Where a lease awaits its claim, given its record's expire_hooks (false: none):
-- EXP, or the due set of those hooks.
local function due_key(hooks)
  if hooks then return BASE .. 'due:' .. hooks end
  return EXP
end

-- The lease's expires_at while it awaits its claim (neither revoked nor
-- claimed), else false. The score is kept equal to the record's expires_at by
-- add and extend.
local function awaiting(id)
  local score = redis.call('ZSCORE', EXP, id)
  if score then return score end
  local hooks = redis.call('HGET', lease_key(id), 'expire_hooks')
  if hooks then return redis.call('ZSCORE', due_key(hooks), id) end
  return false
end

-- Active at `at`: still awaiting its claim (not revoked, not claimed) and not yet expired.
local function live(id, at)
  local expires_at = awaiting(id)
  return expires_at ~= false and tonumber(at) < tonumber(expires_at)
end

-- The record's index values ({} if there is no record) and its DEAD member:
-- JSON [id, task, parent, owner, subject, key_id, issuer, task_run, provider],
-- '' for a missing value.
local function indexed(id, key)
  local values = redis.call('HMGET', key, unpack(INDEXED))
  local entry = {id}
  for i = 1, #INDEXED do entry[i + 1] = values[i] or '' end
  return values, cjson.encode(entry)
end

-- Quota counting: the leases neither revoked nor claimed, per subject and per
-- subject and owner, scored by expires_at, so a count is one ZCOUNT. The
-- separator \\31 cannot occur in a subject (printable text only); a key whose
-- last lease left is deleted by Redis itself.
local function live_keys(subject, owner)
  local keys = {BASE .. 'live:' .. subject}
  if owner then keys[2] = keys[1] .. '\\31' .. owner end
  return keys
end

-- `values` as indexed() gives them: owner is values[3], subject values[4].
local function count_in(id, values, expires_at)
  if not values[4] then return end
  for _, k in ipairs(live_keys(values[4], values[3] or nil)) do
    redis.call('ZADD', k, expires_at, id)
  end
end

local function uncount(id, values)
  if not values[4] then return end
  for _, k in ipairs(live_keys(values[4], values[3] or nil)) do redis.call('ZREM', k, id) end
end

"""
    + HELD
    + """
-- A lease dies (revoked or claimed): it leaves its due set and enters DEAD. The
-- DEAD member carries its index values, so purge can unindex it even after
-- Redis itself dropped the record at the end of its retention TTL.
local function bury(id, key)
  unhold(id)  -- its record gets a TTL: held jobs inline in it move out first
  local values, entry = indexed(id, key)
  uncount(id, values)
  redis.call('ZREM', due_key(redis.call('HGET', key, 'expire_hooks')), id)
  redis.call('ZADD', DEAD, redis.call('HGET', key, 'expires_at'), entry)
  if RETENTION > 0 then redis.call('PEXPIRE', key, RETENTION) end
end

-- Ids matching every (field, value) pair given from ARGV[first]: the
-- intersection of their index sets, or every id if no pair is given.
local function matching(first)
  local sets = {}
  for i = first, #ARGV, 2 do sets[#sets + 1] = index_key(ARGV[i], ARGV[i + 1]) end
  if #sets == 0 then return redis.call('SMEMBERS', ALL) end
  return redis.call('SINTER', unpack(sets))
end
"""
)

# ARGV: id, parent ('' if none), issued_at, expires_at, revoked ('1'/'0'), then
# the record's field/value pairs, then the outbox's (see EVENT_JOBS). 1 if stored,
# with its on_issue jobs; 0 (nothing written) if the parent is not active at
# issued_at.
_ADD = """
-- The epoch: set by the first add into an empty store (a new prefix, or one
-- whose keys were lost), so revocation caches can tell the data they follow
-- from data that is gone (see jitbroker.revocations). Server time: no lease's
-- timestamps, which come from brokers' clocks and may be anywhere.
if redis.call('EXISTS', BASE .. 'epoch') == 0 then
  local now = redis.call('TIME')
  redis.call('SET', BASE .. 'epoch', now[1] .. '.' .. string.format('%06d', tonumber(now[2])))
end

local id, parent, issued_at, expires_at = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
if parent ~= '' and not live(parent, issued_at) then return 0 end
local key = lease_key(id)
-- An id stored again (a caller's bug, ids are random) replaces the old record
-- whole: its index entries and DEAD member go, and so do its fields and TTL.
local old, old_entry = indexed(id, key)
for i, field in ipairs(INDEXED) do
  if old[i] then redis.call('SREM', index_key(field, old[i]), id) end
end
uncount(id, old)
redis.call('ZREM', DEAD, old_entry)
if old[4] then  -- a record was there (every lease has a subject): out of its due set
  redis.call('ZREM', due_key(redis.call('HGET', key, 'expire_hooks')), id)
  unhold(id)  -- its held jobs are kept, as a job already there always is
end
redis.call('DEL', key)
redis.call('HSET', key, unpack(ARGV, 8))
local values = indexed(id, key)
for i, field in ipairs(INDEXED) do
  if values[i] then redis.call('SADD', index_key(field, values[i]), id) end
end
redis.call('SADD', ALL, id)
if ARGV[7] == '1' then
  bury(id, key)
else
  local hooks = redis.call('HGET', key, 'expire_hooks')
  if hooks then redis.call('SADD', BASE .. 'hooks', hooks) end
  redis.call('ZADD', due_key(hooks), expires_at, id)
  count_in(id, values, expires_at)
end
record_jobs('on_issue', {unpack(ARGV, 8)}, issued_at)  -- the record as written
if INLINE_DUE then redis.call('ZADD', HELD, INLINE_DUE, id) end  -- held jobs, inline
return 1
"""

# Runs before _ADD when the lease counts against quotas. ARGV[8] = n, then n
# triples (subject, owner or '', limit); they are removed from ARGV before _ADD
# reads its own. Counting and adding in one script: no issuer can overshoot.
# Returns -q (nothing written) if quota q (1-based) is full.
_QUOTAS = """
local quotas, at = tonumber(ARGV[8]), ARGV[5]
for q = 1, quotas do
  local base = 6 + 3 * q
  local subject, owner, limit = ARGV[base], ARGV[base + 1], tonumber(ARGV[base + 2])
  local keys = live_keys(subject, owner ~= '' and owner or nil)
  -- Expired but not yet claimed leases have a score <= at: not counted.
  if redis.call('ZCOUNT', keys[#keys], '(' .. at, '+inf') >= limit then return -q end
end
for _ = 1, 1 + 3 * quotas do table.remove(ARGV, 8) end
"""

# The revocation log and the caches that follow it (see the feed, below, and
# jitbroker.revocations). Each revocation that took something gets the next
# number of REVSEQ and one entry in the stream REVLOG ({n, ids}), written in the
# same script as the revocation itself; entries older than an hour are trimmed
# (a live feed is never that far behind; one that is sees a gap in the numbers
# and resyncs). CACHES holds, per live cache, "acked seen_ms staleness_ms": the
# number of the last revocation it applied, when it last confirmed it (server
# time), and how long after that it may still vouch.
_CACHES = (
    """
local REVSEQ, REVLOG, CACHES = BASE .. 'revseq', BASE .. 'revlog', BASE .. 'caches'
local LOG_HORIZON_MS = 3600000
local ACK_MARGIN_MS = """
    + str(round(ACK_MARGIN * 1000))
    + """

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- {caches that may still vouch and have not applied revocation `seq`, ms until
-- the last of them can no longer vouch (+ margin)}. Rows of caches silent for
-- an hour are dropped when `prune`.
local function waiting(seq, prune)
  local now, pending, longest = now_ms(), 0, 0
  local flat = redis.call('HGETALL', CACHES)
  for i = 1, #flat, 2 do
    local acked, seen, staleness = string.match(flat[i + 1], '^(%d+) (%d+) (%d+)$')
    if acked then
      local ends = tonumber(seen) + tonumber(staleness) + ACK_MARGIN_MS
      if ends > now and tonumber(acked) < seq then
        pending = pending + 1
        if ends - now > longest then longest = ends - now end
      elseif prune and ends < now - LOG_HORIZON_MS then
        redis.call('HDEL', CACHES, flat[i])
      end
    end
  end
  return {pending, longest}
end
"""
)

# Walks down from the roots. A lease that is already dead had its subtree
# revoked with it (or its children expired first), so the walk only descends
# through leases that transition now: each revoked exactly once, whoever races.
# Returns {n, {caches to wait for, ms}, records}: n = 0 if nothing transitioned.
_REVOKE_TREE = """
local function revoke_tree(roots, at, reason)
  local revoked, ids, stack = {}, {}, roots
  while #stack > 0 do
    local id = table.remove(stack)
    if live(id, at) then
      local key = lease_key(id)
      redis.call('HSET', key, 'revoked_at', at, 'revoke_reason', reason)
      bury(id, key)
      local record = redis.call('HGETALL', key)
      record_jobs('on_revoke', record, at)
      revoked[#revoked + 1] = record
      ids[#ids + 1] = id
      for _, child in ipairs(redis.call('SMEMBERS', index_key('parent', id))) do
        stack[#stack + 1] = child
      end
    end
  end
  if #ids == 0 then return {0, {0, 0}, revoked} end
  local seq = redis.call('INCR', REVSEQ)
  local trim = string.format('%d-0', now_ms() - LOG_HORIZON_MS)
  redis.call('XADD', REVLOG, 'MINID', '~', trim, '*', 'n', seq, 'ids', cjson.encode(ids))
  return {seq, waiting(seq, true), revoked}
end
"""

# ARGV: at, reason, id, the outbox's.
_REVOKE = "return revoke_tree({ARGV[5]}, ARGV[3], ARGV[4])"

# ARGV: at, reason, then the filter's field/value pairs, then the outbox's.
_REVOKE_WHERE = "return revoke_tree(matching(5), ARGV[3], ARGV[4])"

# ARGV: kid, at. A key retirement (invariant 11): recorded once (HSETNX), and
# numbered and logged like a revocation, in this script, as {n, ids = [], keys}
# (see jitbroker.revocations.parse_entry: a feed that knows nothing of keys
# reads it as a revocation of nothing). {n, {caches to wait for, ms}}; n = 0 if
# the kid was already retired.
_RETIRE = """
if redis.call('HSETNX', BASE .. 'retired', ARGV[3], ARGV[4]) == 0 then return {0, {0, 0}} end
local seq = redis.call('INCR', REVSEQ)
local trim = string.format('%d-0', now_ms() - LOG_HORIZON_MS)
local keys = cjson.encode({ARGV[3]})
redis.call('XADD', REVLOG, 'MINID', '~', trim, '*', 'n', seq, 'ids', '[]', 'keys', keys)
return {seq, waiting(seq, true)}
"""

# ARGV: n. What a strict revoke polls: see waiting().
_WAITING = "return waiting(tonumber(ARGV[3]), false)"

# A cache's acknowledgement and heartbeat. ARGV: cache id, the number of the
# last revocation it applied, its max staleness in ms. {epoch, current n}.
_ACK = """
local seen = string.format('%d', now_ms())
redis.call('HSET', CACHES, ARGV[3], ARGV[4] .. ' ' .. seen .. ' ' .. ARGV[5])
return {redis.call('GET', BASE .. 'epoch'), redis.call('GET', REVSEQ) or '0'}
"""

# ARGV: cache id. A cache that stops following: no revoke waits for it.
_LEAVE = "return redis.call('HDEL', CACHES, ARGV[3])"

# ARGV: id, expires_at, at. The updated record, or {} if the lease is not active.
# ZADD moves the lease's place in its due set, so a renewed lease is claimed at
# its new expiry.
_EXTEND = """
local id, expires_at = ARGV[3], ARGV[4]
if not live(id, ARGV[5]) then return {} end
local key = lease_key(id)
redis.call('HSET', key, 'expires_at', expires_at)
redis.call('ZADD', due_key(redis.call('HGET', key, 'expire_hooks')), expires_at, id)
count_in(id, indexed(id, key), expires_at)
return redis.call('HGETALL', key)
"""

# ARGV: max audiences, then (id, last used at, uses, JSON audiences) per lease.
# Usage merged into each stored lease's record (fields used_at, use_count,
# used_by); ids not stored are skipped, so a usage write never creates a record.
# The later time is kept as the string it arrived as (tostring keeps 14 digits).
_USAGE = """
local max_by = tonumber(ARGV[3])
for i = 4, #ARGV, 4 do
  local key = lease_key(ARGV[i])
  if redis.call('EXISTS', key) == 1 then
    local old = redis.call('HMGET', key, 'used_at', 'use_count', 'used_by')
    local last = ARGV[i + 1]
    if old[1] and tonumber(old[1]) > tonumber(last) then last = old[1] end
    local count = tonumber(ARGV[i + 2]) + (tonumber(old[2]) or 0)
    local by, seen = {}, {}
    local function add(list)
      for _, audience in ipairs(list) do
        if #by < max_by and not seen[audience] then
          seen[audience] = true
          by[#by + 1] = audience
        end
      end
    end
    if old[3] then add(cjson.decode(old[3])) end
    add(cjson.decode(ARGV[i + 3]))
    redis.call('HSET', key, 'used_at', last, 'use_count', string.format('%d', count),
      'used_by', cjson.encode(by))
  end
end
return 0
"""

# ARGV: the filter's field/value pairs. The matching records (read only).
_FIND = """
local found = {}
for _, id in ipairs(matching(3)) do
  local record = redis.call('HGETALL', lease_key(id))
  if #record > 0 then found[#found + 1] = record end  -- {} once Redis dropped it
end
return found
"""

# ARGV: now, limit, then the expire_hooks values the claimer runs, then the
# outbox's. Pops up to `limit` leases due by `now` from EXP (leases needing no
# hook) and from the due set of each of those values, never from another's:
# leases awaiting hooks the claimer lacks are not even read. Being one script,
# two reapers can never pop the same lease, and each popped lease gets its
# on_expire jobs. {claimed records, the lowest expires_at in DEAD after the
# claim (false: none)}: a purge right after it knows whether it has work.
_CLAIM_EXPIRED = """
local now, limit, claimed = ARGV[3], tonumber(ARGV[4]), {}
local function hooks_of(record)  -- its expire_hooks, read from the HGETALL reply
  for i = 1, #record, 2 do
    if record[i] == 'expire_hooks' then return record[i + 1] end
  end
  return false
end
local function claim_from(set)
  while #claimed < limit do
    local due = redis.call('ZRANGEBYSCORE', set, '-inf', now, 'LIMIT', 0, limit - #claimed)
    if #due == 0 then break end
    for _, id in ipairs(due) do
      local key = lease_key(id)
      local record = redis.call('HGETALL', key)
      if #record == 0 or due_key(hooks_of(record)) ~= set then
        redis.call('ZREM', set, id)  -- deleted behind our back, or stored again
      else
        bury(id, key)
        record_jobs('on_expire', record, now)
        claimed[#claimed + 1] = record
      end
    end
  end
end
claim_from(EXP)
for i = 5, #ARGV do
  local set = due_key(ARGV[i])
  claim_from(set)
  if redis.call('EXISTS', set) == 0 then redis.call('SREM', BASE .. 'hooks', ARGV[i]) end
end
local oldest = redis.call('ZRANGE', DEAD, 0, 0, 'WITHSCORES')
return {claimed, oldest[2] or false}
"""

# ARGV: now. {expire_hooks, count, ...} of the leases due by `now` still
# awaiting the hooks they need (read only).
_AWAITING = """
local counts = {}
for _, hooks in ipairs(redis.call('SMEMBERS', BASE .. 'hooks')) do
  local n = redis.call('ZCOUNT', due_key(hooks), '-inf', ARGV[3])
  if n > 0 then
    counts[#counts + 1] = hooks
    counts[#counts + 1] = n
  end
end
return counts
"""

# ARGV: now. How many leases are active at `now`: members of EXP and of each
# due set (neither revoked nor claimed) scored after `now`. One ZCOUNT per set,
# O(log n) each: a count costs the same at 1M leases as at 10 (read only).
_COUNT_LIVE = """
local after = '(' .. ARGV[3]
local n = redis.call('ZCOUNT', EXP, after, '+inf')
for _, hooks in ipairs(redis.call('SMEMBERS', BASE .. 'hooks')) do
  n = n + redis.call('ZCOUNT', due_key(hooks), after, '+inf')
end
return n
"""

# ARGV: before, limit. Deletes and unindexes up to `limit` dead leases with
# expires_at < before; {entries handled, records deleted}.
_PURGE = """
local entries = redis.call('ZRANGEBYSCORE', DEAD, '-inf', '(' .. ARGV[3], 'LIMIT', 0, ARGV[4])
local purged = 0
for _, entry in ipairs(entries) do
  local values = cjson.decode(entry)
  local id = values[1]
  -- A stale member of an id stored again after Redis dropped its old record
  -- must not take the new, live one with it.
  if awaiting(id) == false then
    for i, field in ipairs(INDEXED) do
      local value = values[i + 1]  -- nil in members written before a field was indexed
      if value and value ~= '' then redis.call('SREM', index_key(field, value), id) end
    end
    redis.call('SREM', ALL, id)
    purged = purged + redis.call('DEL', lease_key(id))  -- 0 if Redis dropped it already
  end
  redis.call('ZREM', DEAD, entry)
end
return {#entries, purged}
"""

#: Dead entries one purge script handles: bounds how long it holds the server.
PURGE_BATCH = 1000

_FILTER_FIELDS = ("task", "parent", "owner", "subject", "key_id", "issuer", "task_run", "provider")

#: What a store built from a URL gives its client (sync or asyncio) besides
#: ``retry=Retry(NoBackoff(), 0)``. No client-side retries: a retried script
#: after a lost reply would run twice (a revoke then reports [] for what it did
#: revoke), and backoff turns an outage into seconds of waiting per call.
#: Callers get StoreUnavailable at once and decide whether to retry.
CLIENT_OPTIONS: dict[str, Any] = {"socket_connect_timeout": 5, "socket_timeout": 5}

#: The sync connection class for a pool's (sync or asyncio) connection class.
_SYNC_CONNECTIONS: dict[str, type[redis.Connection] | type[redis.UnixDomainSocketConnection]] = {
    "SSLConnection": redis.SSLConnection,
    "UnixDomainSocketConnection": redis.UnixDomainSocketConnection,
}
#: The name of a revocation feed's connection (``CLIENT LIST``).
FEED_CLIENT_NAME = "jitbroker-revocations"

C = TypeVar("C")


class RedisLeases(Generic[C]):
    """What ``RedisStore`` and ``AsyncRedisStore`` share: the options, the key
    layout, the scripts, and every operation written once as steps (calls on the
    client, see ``jitbroker._drive``). The sync store runs the steps and the
    async one awaits them: only the waiting differs. Not public API.
    """

    def __init__(
        self,
        url_or_client: str | C,
        prefix: str = "jitbroker",
        *,
        retention: float | None = 86_400.0,
        strict_revocations: bool = True,
    ) -> None:
        if not prefix or "{" in prefix or "}" in prefix:
            raise InvalidRequest(f"prefix must be non-empty and free of braces, got {prefix!r}")
        if retention is not None and not (retention > 0 and math.isfinite(retention)):
            raise InvalidRequest(f"retention must be positive seconds or None, got {retention!r}")
        self._owns_client = isinstance(url_or_client, str)
        self._client: C = (
            _from_url(self._connect, url_or_client)
            if isinstance(url_or_client, str)
            else url_or_client
        )
        self.prefix = prefix
        self._base = f"{{{prefix}}}:"
        self._keys = (self._base + "exp", self._base + "dead", self._base + "all")
        self._epoch = self._base + "epoch"
        # Fixed leading ARGV of every script (see the scripts' header).
        self._head = (self._base, 0 if retention is None else max(1, round(retention * 1000)))
        # register_script does no I/O: a script is loaded on its first call
        # (EVALSHA, then SCRIPT LOAD on NOSCRIPT) and is one EVALSHA afterwards.
        script = cast("Any", self._client).register_script
        # The outbox needs this module's helpers: imported late, like the feed.
        from .redis_outbox import EVENT_JOBS, OutboxSteps

        adds = _FAILS_OOM + _PRELUDE + EVENT_JOBS
        self._add = script(adds + _ADD)
        self._add_counted = script(adds + _QUOTAS + _ADD)
        #: Whether ``revoke`` waits for every live revocation cache (see
        #: ``jitbroker.revocations``); False gives the feed's latency back to
        #: the caller: a cache may then accept a revoked token for milliseconds.
        self.strict_revocations = bool(strict_revocations)
        revokes = _RUNS_OOM + _PRELUDE + _CACHES + EVENT_JOBS + _REVOKE_TREE
        self._revoke = script(revokes + _REVOKE)
        self._revoke_where = script(revokes + _REVOKE_WHERE)
        self._waiting = script(_READS + _PRELUDE + _CACHES + _WAITING)
        self._retire = script(_RUNS_OOM + _PRELUDE + _CACHES + _RETIRE)
        self._extend = script(_FAILS_OOM + _PRELUDE + _EXTEND)
        self._find = script(_READS + _PRELUDE + _FIND)
        self._claim_expired = script(_RUNS_OOM + _PRELUDE + EVENT_JOBS + _CLAIM_EXPIRED)
        self._awaiting = script(_READS + _PRELUDE + _AWAITING)
        self._count_live = script(_READS + _PRELUDE + _COUNT_LIVE)
        self._purge = script(_RUNS_OOM + _PRELUDE + _PURGE)
        self._usage = script(_FAILS_OOM + _PRELUDE + _USAGE)
        self._outbox = OutboxSteps(self)  # claim_jobs and the rest of the outbox
        # The lowest expires_at in DEAD as the last claim saw it (inf: none), for
        # the purge right after it; None: unknown (see ``_purge_steps``).
        self._dead_floor: float | None = None

    def revocations(
        self,
        *,
        window: float = 86_400.0,
        max_staleness: float = 5.0,
        heartbeat: float = 1.0,
        clock: Clock = system_clock,
    ) -> RevocationCache:
        """A ``RevocationCache`` that follows this store's revocation log, for
        ``Verifier(..., store=store, revocations=...)``: online verification of
        JWS tokens with no round trip while the feed is live (see
        ``jitbroker.revocations``). ``window`` must be at least the longest
        token lifetime plus leeway; ``clock`` is the brokers' clock (a resync
        loads the leases that died and expired at most a minute before its
        "now"). The feed holds one connection of the client's pool, blocks on
        it for at most ``heartbeat`` seconds at a time (keep the client's
        ``socket_timeout`` above that), and registers the cache in the store so
        strict revocations wait for it. ``close()`` the cache to stop its thread."""
        cache = RevocationCache(window=window, max_staleness=max_staleness)

        def session(cache: RevocationCache, stop: threading.Event) -> None:
            client = self._feed_client()
            from .redis_feed import Feed  # the feed needs this module: imported late

            try:
                Feed(self, client, cache, heartbeat).follow(stop, clock)
            finally:
                with contextlib.suppress(redis.RedisError, OSError):
                    client.close()
                    client.connection_pool.disconnect()

        return start_feed(cache, session, heartbeat=heartbeat)

    def _feed_client(self) -> redis.Redis:
        """A client of its own for the feed's blocking reads, so they never tie up
        a connection of the store's pool: the same server and options, one
        connection, named ``FEED_CLIENT_NAME`` (kept across reconnects) so
        operators can tell it apart in ``CLIENT LIST``."""
        # The async store's client has the same options: the feed is a thread
        # with a sync connection of its own either way.
        pool = cast("Any", self._client).connection_pool
        options = {**pool.connection_kwargs, "client_name": FEED_CLIENT_NAME}
        options.pop("retry", None)  # an asyncio Retry; the sync default reconnects alike
        kind = _SYNC_CONNECTIONS.get(pool.connection_class.__name__, redis.Connection)
        own = redis.ConnectionPool(connection_class=kind, **options)
        return redis.Redis(connection_pool=own, single_connection_client=True)

    def _connect(self, url: str) -> C:
        """The client a store owns when given a URL (see ``CLIENT_OPTIONS``)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        # Never the URL: it may hold a password.
        return f"<{type(self).__name__} prefix={self.prefix!r}>"

    # -- every operation once, as steps --------------------------------------
    # A step is a call on the client (``operator.methodcaller`` for a plain
    # command); a generator and a step per call cost microseconds next to the
    # round trip, and buy one copy of each operation for both stores. Times are
    # checked (``_time``) before the first step, so a bad one does no I/O.
    def _script(self, script: Any, *args: Any) -> Step:
        argv = (*self._head, *args)
        return lambda client: script(keys=self._keys, args=argv, client=client)

    def _add_steps(
        self, lease: Lease, quotas: Sequence[Quota] = (), outbox: Outbox = NO_OUTBOX
    ) -> Steps[bool]:
        args = (
            lease.id,
            lease.parent or "",
            _time("issued_at", lease.issued_at),
            _time("expires_at", lease.expires_at),
            "0" if lease.revoked_at is None else "1",
        )
        record = (*_record(lease), *self._outbox.add_args(lease, outbox))
        if quotas:
            counted = [(q.subject, q.owner or "", q.limit) for q in quotas]
            step = self._script(self._add_counted, *args, len(quotas), *chain(*counted), *record)
        else:
            step = self._script(self._add, *args, *record)
        with _translated("store a lease"):
            answer = yield step
        if lease.revoked_at is not None:
            self._dead_floor = None  # stored dead
        if answer < 0:
            raise quotas[-answer - 1].exceeded()
        return bool(answer)

    def _get_steps(self, lease_id: str) -> Steps[Lease | None]:
        key = self._base + "lease:" + lease_id
        with _translated("read a lease"):
            record = yield operator.methodcaller("hgetall", key)
        return _lease_from(record) if record else None

    def _revoke_steps(
        self, lease_id: str, at: float, reason: str, outbox: Outbox = NO_OUTBOX
    ) -> Steps[list[Lease]]:
        args = (_time("at", at), reason, lease_id, *self._outbox.args(outbox))
        return (yield from self._revoked("revoke a lease", self._script(self._revoke, *args)))

    def _revoke_where_steps(
        self, where: LeaseFilter, at: float, reason: str, outbox: Outbox = NO_OUTBOX
    ) -> Steps[list[Lease]]:
        args = (_time("at", at), reason, *_filter(where), *self._outbox.args(outbox))
        return (yield from self._revoked("revoke leases", self._script(self._revoke_where, *args)))

    def _revoked(self, action: str, step: Step) -> Steps[list[Lease]]:
        """Run a revoke script; if strict, wait for the caches (``acknowledged``)."""
        with _translated(action):
            seq, (pending, longest_ms), records = yield step
        self._dead_floor = None  # what it revoked is dead now
        if self.strict_revocations and int(pending):
            waiting = (int(pending), int(longest_ms) / 1000)
            yield from acknowledged(int(seq), waiting, self._waiting_for, self._pause)
        return _leases(records)

    def _waiting_for(self, seq: int) -> Step:
        script = self._script(self._waiting, seq)

        def look(client: Any) -> Any:
            with _translated("read the caches' acknowledgements"):
                reply = script(client)
                if inspect.isawaitable(reply):
                    return _waiting_reply(reply)
                return _waiting(reply)

        return look

    def _pause(self, seconds: float) -> Step:
        """A step that sleeps (the async store awaits ``asyncio.sleep`` instead)."""
        return sleep(seconds)

    def _extend_steps(self, lease_id: str, expires_at: float, at: float) -> Steps[Lease | None]:
        args = (lease_id, _time("expires_at", expires_at), _time("at", at))
        with _translated("extend a lease"):
            record = yield self._script(self._extend, *args)
        return _lease_from(_pairs(record)) if record else None

    def _find_steps(self, where: LeaseFilter) -> Steps[list[Lease]]:
        with _translated("find leases"):
            found = _leases((yield self._script(self._find, *_filter(where))))
        # The sets are exact; this only guards against an id re-added with new values.
        return [lease for lease in found if where.matches(lease)]

    def _claim_expired_steps(
        self,
        now: float,
        limit: int,
        expire_hooks: Collection[str] = (),
        outbox: Outbox = NO_OUTBOX,
    ) -> Steps[list[Lease]]:
        args = (_time("now", now), int(limit), *expire_hooks, *self._outbox.args(outbox))
        step = self._script(self._claim_expired, *args)
        with _translated("claim expired leases"):
            records, oldest = yield step
        self._dead_floor = math.inf if oldest is None else float(oldest)
        return _leases(records)

    def _awaiting_hooks_steps(self, now: float) -> Steps[dict[str, int]]:
        with _translated("count leases awaiting hooks"):
            flat = yield self._script(self._awaiting, _time("now", now))
        return {_text(flat[i]): int(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}

    def _count_active_steps(self, now: float) -> Steps[int]:
        with _translated("count active leases"):
            count = yield self._script(self._count_live, _time("now", now))
        return int(count)

    def _record_usage_steps(self, batch: Sequence[UsageRecord]) -> Steps[None]:
        if not batch:
            return
        args: list[object] = [MAX_USED_BY]
        for rec in batch:
            by = json.dumps(list(rec.used_by))
            args += (rec.lease_id, _time("last_used_at", rec.last_used_at), rec.uses, by)
        with _translated("record lease usage"):
            yield self._script(self._usage, *args)

    def _lease_usage_steps(self, lease_ids: Collection[str]) -> Steps[dict[str, Usage]]:
        ids = list(lease_ids)
        fields = ("used_at", "use_count", "used_by")
        keys = [self._base + "lease:" + lease_id for lease_id in ids]

        def read(client: Any) -> Any:
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.hmget(key, fields)
            return pipe.execute()

        with _translated("read lease usage"):
            rows = yield read
        found: dict[str, Usage] = {}
        for lease_id, (last, count, by) in zip(ids, rows, strict=True):
            if last is not None and count is not None:
                audiences = tuple(json.loads(by)) if by else ()
                found[lease_id] = Usage(float(last), int(count), audiences)
        return found

    def _purge_steps(self, before: float) -> Steps[int]:
        purged, cutoff = 0, _time("before", before)
        # Right after a claim (a sweep's last step) that left nothing in DEAD
        # below ``before``, and with nothing written by this store since, there
        # is nothing to purge: no round trip. A lease that died meanwhile through
        # another store (another broker) is purged by the next sweep.
        floor, self._dead_floor = self._dead_floor, None  # good for one purge
        if floor is not None and floor >= before:
            return 0
        with _translated("purge dead leases"):
            while True:  # one script per batch, so a big purge never stalls the server
                handled, deleted = yield self._script(self._purge, cutoff, PURGE_BATCH)
                purged += int(deleted)
                if int(handled) < PURGE_BATCH:
                    return purged

    def _revoked_since_steps(self, since: float) -> Steps[list[str]]:
        dead, low = self._keys[1], _time("since", since)
        with _translated("read recent revocations"):
            entries = yield operator.methodcaller("zrangebyscore", dead, low, "+inf")
        return [str(json.loads(entry)[0]) for entry in entries]

    def _resync_steps(
        self, since: float
    ) -> Steps[tuple[float | None, int, list[str], str, list[str]]]:
        """One snapshot (MULTI) for a feed's resync: the epoch, the number of the
        last revocation, ``revoked_since(since)``, the id of the log's last
        entry (where to follow from; ``0-0`` if the log is empty), and every
        retired kid."""
        dead, low = self._keys[1], _time("since", since)

        def read(client: Any) -> Any:
            return (
                client.pipeline(transaction=True)
                .get(self._epoch)
                .get(self._base + "revseq")
                .zrangebyscore(dead, low, "+inf")
                .xrevrange(self._base + "revlog", count=1)
                .hkeys(self._base + "retired")
                .execute()
            )

        with _translated("read recent revocations"):
            epoch, seq, entries, last, retired = yield read
        last_id = _text(last[0][0]) if last else "0-0"
        ids = [str(json.loads(entry)[0]) for entry in entries]
        return _epoch(epoch), int(seq or 0), ids, last_id, [_text(kid) for kid in retired]

    def _epoch_steps(self) -> Steps[float | None]:
        with _translated("read the store's epoch"):
            return _epoch((yield operator.methodcaller("get", self._epoch)))

    def _retire_key_steps(self, kid: str, at: float) -> Steps[bool]:
        """Record and log the retirement (``_RETIRE``); if strict, wait for the
        caches as a revoke does (``acknowledged``)."""
        with _translated("record a retired key"):
            seq, (pending, longest_ms) = yield self._script(self._retire, kid, _time("at", at))
        if self.strict_revocations and int(pending):
            waiting = (int(pending), int(longest_ms) / 1000)
            yield from acknowledged(int(seq), waiting, self._waiting_for, self._pause)
        return bool(int(seq))

    def _retired_keys_steps(self) -> Steps[dict[str, float]]:
        with _translated("read the retired keys"):
            found = yield operator.methodcaller("hgetall", self._base + "retired")
        return {_text(kid): float(_text(at)) for kid, at in found.items()}

    def _clear_steps(self) -> Steps[int]:
        pattern, cursor, deleted = _glob_escape(self._base) + "*", 0, 0
        self._dead_floor = None
        with _translated("clear the store"):
            while True:  # SCAN page by page: never one long KEYS on a shared server
                cursor, keys = yield operator.methodcaller("scan", cursor, match=pattern, count=500)
                if keys:
                    deleted += int((yield operator.methodcaller("unlink", *keys)))
                if int(cursor) == 0:
                    return deleted


class RedisStore(RedisLeases[redis.Redis]):
    """Leases in Redis (sync, redis-py), shared by every broker that uses the same
    server and ``prefix``. Install with ``pip install 'jitbroker[redis]'``.

    ``url_or_client`` is a ``redis://`` URL (the store then owns the client and
    ``close`` closes it; socket timeouts go in the query, e.g.
    ``?socket_timeout=2``) or an existing ``redis.Redis`` (left open by ``close``).

    Each mutating method is one Lua script: one round trip, atomic. Revocations
    are numbered and logged in the stream ``{prefix}:revlog`` by the same
    script; ``revocations()`` follows it, and with ``strict_revocations`` (the
    default) ``revoke`` waits for every live cache. A lease event's outbox jobs
    are written by the event's script too; jobs have no TTL and ``purge`` never
    deletes them (see ``jitbroker.stores.redis_outbox``).

    Key expiry: when a lease dies (revoked or claimed), its record gets a TTL of
    ``retention`` seconds counted from that moment on the *server's* clock,
    never from the lease's own timestamps (which come from the broker's clock and
    may be anywhere in time). It is a backstop that bounds memory if nobody
    purges: ``purge`` still deletes dead records on the broker's schedule and
    unindexes them, including those Redis already dropped. Keep ``retention``
    longer than the broker's purge horizon (max TTL + leeway + its retention) so
    dead records stay visible to ``find`` until purged; ``None`` disables it.

    Needs Redis 7.0 or newer (script flags); an older server fails at the first
    script call with a ``StoreError`` that says so (no version check, so no
    extra round trip). Past ``maxmemory`` (policy ``noeviction``) ``add`` and
    ``extend`` raise ``StoreError`` and write nothing, while ``revoke``,
    ``revoke_where``, ``claim_expired``, ``purge`` and reads still run.

    The layout is Redis Cluster compatible: every key carries the hash tag
    ``{prefix}``. Errors reaching Redis raise ``StoreUnavailable``, any other
    Redis error ``StoreError``, each with the original as ``__cause__``.
    ``AsyncRedisStore`` is the same store for asyncio code.
    """

    blocking = True

    def _connect(self, url: str) -> redis.Redis:
        return redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **CLIENT_OPTIONS)

    # -- the protocol ------------------------------------------------------
    def add(
        self, lease: Lease, quotas: Sequence[Quota] = (), *, outbox: Outbox = NO_OUTBOX
    ) -> bool:
        """Store ``lease`` and its ``on_issue`` jobs; False (nothing written) if its
        parent is not active; ``QuotaExceeded`` (nothing written) if a quota is full."""
        return run(self._add_steps(lease, quotas, outbox), self._client)

    def get(self, lease_id: str) -> Lease | None:
        """The lease with this id, or None."""
        return run(self._get_steps(lease_id), self._client)

    def revoke(
        self, lease_id: str, *, at: float, reason: str, outbox: Outbox = NO_OUTBOX
    ) -> list[Lease]:
        """Revoke the lease and its active descendants, with their ``on_revoke``
        jobs; those that transitioned."""
        return run(self._revoke_steps(lease_id, at, reason, outbox), self._client)

    def revoke_where(
        self, where: LeaseFilter, *, at: float, reason: str, outbox: Outbox = NO_OUTBOX
    ) -> list[Lease]:
        """Revoke every active lease matching ``where`` and their descendants, with
        their ``on_revoke`` jobs."""
        return run(self._revoke_where_steps(where, at, reason, outbox), self._client)

    def extend(self, lease_id: str, *, expires_at: float, at: float) -> Lease | None:
        """Set a new expiry if the lease is active and unclaimed at ``at``."""
        return run(self._extend_steps(lease_id, expires_at, at), self._client)

    def find(self, where: LeaseFilter) -> list[Lease]:
        """Every stored lease matching ``where`` (live or dead, not yet purged)."""
        return run(self._find_steps(where), self._client)

    def claim_expired(
        self,
        now: float,
        limit: int = 1000,
        expire_hooks: Collection[str] = (),
        *,
        outbox: Outbox = NO_OUTBOX,
    ) -> list[Lease]:
        """Leases expired by ``now`` and not yet claimed, each handed out exactly once
        with its ``on_expire`` jobs: those needing no hook, and those whose
        ``expire_hooks`` is in ``expire_hooks``."""
        return run(self._claim_expired_steps(now, limit, expire_hooks, outbox), self._client)

    def awaiting_hooks(self, now: float) -> dict[str, int]:
        """Expired, unclaimed leases that need hooks, per ``expire_hooks`` value."""
        return run(self._awaiting_hooks_steps(now), self._client)

    def count_active(self, now: float) -> int:
        """How many leases are active at ``now``, for ``health()``: one script,
        one ZCOUNT per due set, O(log n): as cheap at 1M leases as at 10."""
        return run(self._count_active_steps(now), self._client)

    def purge(self, before: float) -> int:
        """Delete and unindex dead leases with ``expires_at < before``; how many."""
        return run(self._purge_steps(before), self._client)

    def record_usage(self, batch: Sequence[UsageRecord]) -> None:
        """Merge the batch into the leases' records: one script, one round trip."""
        run(self._record_usage_steps(batch), self._client)

    def lease_usage(self, lease_ids: Collection[str]) -> dict[str, Usage]:
        """The usage of those of ``lease_ids`` that were ever used (one pipeline)."""
        return run(self._lease_usage_steps(lease_ids), self._client)

    def close(self) -> None:
        """Close the client if this store created it from a URL. Idempotent."""
        if self._owns_client:
            with _translated("close the connection"):
                self._client.close()

    # -- the outbox (see jitbroker.stores.redis_outbox) ----------------------
    def claim_jobs(
        self, now: float, kinds: Collection[str], *, claim: str, until: float, limit: int = 100
    ) -> list[Job]:
        """Up to ``limit`` due jobs of ``kinds``, oldest first, now held by ``claim``
        until ``until``."""
        return run(self._outbox.claim(now, kinds, claim, until, limit), self._client)

    def finish_jobs(self, ids: Collection[str], claim: str) -> int:
        """Delete the jobs of ``ids`` that ``claim`` still holds; how many."""
        return run(self._outbox.finish(ids, claim), self._client)

    def fail_job(
        self, job_id: str, claim: str, *, due: float, error: str, park: bool, attempt: bool = True
    ) -> bool:
        """Release a job ``claim`` holds after a failure (due again, or parked)."""
        return run(self._outbox.fail(job_id, claim, due, error, park, attempt), self._client)

    def get_job(self, job_id: str) -> Job | None:
        """The job with this id, or None."""
        return run(self._outbox.get(job_id), self._client)

    def jobs(self, *, parked: bool | None = None, limit: int = 1000) -> list[Job]:
        """Up to ``limit`` jobs, oldest due first: parked ones, unparked ones, or all."""
        return run(self._outbox.listed(parked, limit), self._client)

    def retry_jobs(self, ids: Collection[str] | None, now: float) -> int:
        """Unpark the parked jobs of ``ids`` (all if None), due at ``now``; how many."""
        return run(self._outbox.retry(ids, now), self._client)

    def forget_jobs(self, ids: Collection[str]) -> list[Job]:
        """Delete the jobs of ``ids`` whatever their state; those deleted."""
        return run(self._outbox.forget(ids), self._client)

    def retire_key(self, kid: str, at: float) -> bool:
        """Record ``kid`` as retired at ``at``; True if this call recorded it."""
        return run(self._retire_key_steps(kid, at), self._client)

    def retired_keys(self) -> dict[str, float]:
        """Every retired kid and when it was retired."""
        return run(self._retired_keys_steps(), self._client)

    # -- beyond the protocol -----------------------------------------------
    def revoked_since(self, since: float) -> list[str]:
        """Ids of dead leases (revoked, or claimed expired) whose ``expires_at`` is
        at or after ``since``: what a revocation cache must know after a resync."""
        return run(self._revoked_since_steps(since), self._client)

    def holds_data(self) -> bool:
        """True if this prefix holds a store: a lease was ever added under it (its
        epoch is set). The CLI uses it to refuse a mistyped prefix."""
        with _translated("check the store"):
            return bool(self._client.exists(self._epoch))

    def clear(self) -> int:
        """Delete every key of this store's prefix; how many (tests, teardown).

        Uses SCAN, so it is not atomic: do not call it while brokers are running.
        """
        return run(self._clear_steps(), self._client)

    def _read_epoch(self) -> float | None:
        return run(self._epoch_steps(), self._client)


# -- helpers (no I/O) ----------------------------------------------------------
def _from_url(connect: Callable[[str], C], url: str) -> C:
    """The client for ``url``; ``InvalidRequest`` if redis-py cannot parse it."""
    try:
        return connect(url)
    except ValueError:
        # Not redis-py's message: it may quote the URL, password included.
        raise InvalidRequest(
            "not a valid Redis URL: use redis://, rediss:// or unix://, a port from"
            " 1 to 65535, and valid query options"
        ) from None


@contextmanager
def _translated(action: str) -> Iterator[None]:
    """Redis errors become ours at the boundary, the original chained as cause."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:  # incl. BusyLoadingError
        raise StoreUnavailable(f"could not reach Redis to {action}: {exc}") from exc
    except redis.exceptions.OutOfMemoryError as exc:
        # Only scripts without allow-oom get this, and Redis refuses them whole.
        raise StoreError(
            f"Redis is out of memory (used_memory > maxmemory) and refused to {action};"
            " nothing was written (revocation and sweeps still run): free memory"
            " or raise maxmemory"
        ) from exc
    except redis.RedisError as exc:
        if "Error compiling script" in str(exc):  # ours compile on 7.0: an older server
            raise StoreError(
                f"Redis could not compile the script to {action}: RedisStore needs"
                f" Redis {_REDIS_REQUIRED} or newer (script flags) ({exc})"
            ) from exc
        raise StoreError(f"Redis failed to {action}: {exc}") from exc


def _record(lease: Lease) -> list[str]:
    """The lease as HSET field/value pairs; a None field is left out."""
    pairs: list[str] = []
    for name, value in to_mapping(lease).items():
        if value is None:
            continue
        if isinstance(value, bool):
            text = "1" if value else "0"
        elif isinstance(value, float | int):
            text = _time(name, value)
        else:
            text = str(value)
        pairs += (name, text)
    return pairs


def _time(name: str, value: float) -> str:
    """``value`` as the shortest string that reads back as the same float.

    Checked before any I/O: Redis runs a script's commands up to a failing one
    (no rollback), and a ZADD of nan would fail halfway through a script.
    """
    if not math.isfinite(value):
        raise InvalidRequest(f"{name} must be a finite number of seconds, got {value!r}")
    return repr(value)


def _filter(where: LeaseFilter) -> list[str]:
    """The filter's set fields as field/value pairs, the scripts' ``matching`` input."""
    pairs: list[str] = []
    for name in _FILTER_FIELDS:
        value = getattr(where, name)
        if value is not None:
            pairs += (name, value)
    return pairs


def _waiting(reply: Sequence[Any]) -> tuple[int, float]:
    """The ``_WAITING`` script's reply: (caches pending, seconds)."""
    return int(reply[0]), int(reply[1]) / 1000


async def _waiting_reply(reply: Awaitable[Sequence[Any]]) -> tuple[int, float]:
    # The async client's reply; errors are translated where it is awaited.
    with _translated("read the caches' acknowledgements"):
        return _waiting(await reply)


def _epoch(value: Any) -> float | None:
    """The epoch key's value (None if the store has none yet)."""
    return None if value is None else float(value)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _pairs(flat: Sequence[Any]) -> dict[str, Any]:
    """An HGETALL reply as returned from Lua (a flat field, value list)."""
    return {_text(flat[i]): flat[i + 1] for i in range(0, len(flat) - 1, 2)}


def _lease_from(record: Mapping[Any, Any]) -> Lease:
    return from_mapping({_text(name): value for name, value in record.items()})


def _leases(records: Sequence[Sequence[Any]]) -> list[Lease]:
    return [_lease_from(_pairs(flat)) for flat in records]


def _glob_escape(text: str) -> str:
    return "".join("\\" + char if char in "*?[]\\" else char for char in text)
