"""The Redis store's Lua scripts and key layout.

Contract: every key sits under one hash tag (the prefix), and every script receives all of them through KEYS
in the order of ``KEY_NAMES``; no script builds a key name. Times come from ``redis.call('TIME')``, never from
a client's clock. Counts (a worker's reservations, a tenant's calls) are derived from lexicographic ZSETs of
``"<owner>\\0<item>"`` members, never from counters that could drift, so ids must not contain NUL.

Details (each key, its type and content): docs/routing.md#scripts-and-keys-scriptspy.
"""

from __future__ import annotations

KEY_NAMES = (
    "call:worker", "call:tenant", "tenant:calls", "worker:calls", "call:lease",
    "worker:capacity", "worker:url", "worker:alive", "worker:free", "worker:draining",
    "worker:personas", "persona:workers", "call:released",
)

# Functions shared by the scripts (prepended to each).
PRELUDE = r"""
local K_CALL, K_TENANT, K_TC, K_WC, K_LEASE = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local K_CAP, K_URL, K_ALIVE, K_FREE, K_DRAIN = KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local K_WP, K_PW, K_GONE = KEYS[11], KEYS[12], KEYS[13]
local SCAN = 16        -- routing-index entries read per step
local PERSONA_MAX = 64 -- persona-cached workers looked at

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function lo(owner) return '[' .. owner .. '\0' end
local function hi(owner) return '(' .. owner .. '\1' end

local function items(key, owner)
  local out, n = {}, string.len(owner) + 2
  for i, m in ipairs(redis.call('ZRANGEBYLEX', key, lo(owner), hi(owner))) do out[i] = string.sub(m, n) end
  return out
end

local function reserved(w) return redis.call('ZLEXCOUNT', K_WC, lo(w), hi(w)) end

-- keep the routing index current for a worker that is in it (draining/suspect/dead ones stay out)
local function refresh_free(w)
  local cap = tonumber(redis.call('HGET', K_CAP, w) or 0)
  redis.call('ZADD', K_FREE, 'XX', cap - reserved(w), w)
end

local function live(w, now) return tonumber(redis.call('ZSCORE', K_ALIVE, w) or 0) > now end

local function cached(w, persona)
  if persona ~= '' and redis.call('ZSCORE', K_WP, w .. '\0' .. persona) then return 1 end
  return 0
end

local function place(call, w)
  redis.call('HSET', K_CALL, call, w)
  redis.call('ZADD', K_WC, 0, w .. '\0' .. call)
  refresh_free(w)
end

local function unplace(call, w)
  redis.call('ZREM', K_WC, w .. '\0' .. call)
  refresh_free(w)
end

-- record the call's tenant if the store has none (a call recovered from a worker's heartbeat)
local function own_tenant(call, tenant)
  if tenant ~= '' and not redis.call('HGET', K_TENANT, call) then
    redis.call('HSET', K_TENANT, call, tenant)
    redis.call('ZADD', K_TC, 0, tenant .. '\0' .. call)
  end
end

-- a live, non-draining worker with a free slot: persona-cached first (most free), else most free
local function pick(now, persona, excluded)
  if persona ~= '' then
    local best, best_free = nil, 0
    local members = redis.call('ZRANGEBYLEX', K_PW, lo(persona), hi(persona), 'LIMIT', 0, PERSONA_MAX)
    local n = string.len(persona) + 2
    for _, m in ipairs(members) do
      local w = string.sub(m, n)
      if not excluded[w] then
        local f = tonumber(redis.call('ZSCORE', K_FREE, w) or 0)
        if f > best_free and live(w, now) then best, best_free = w, f end
      end
    end
    if best then return best, 1 end
  end
  local offset = 0
  while true do
    local batch = redis.call('ZREVRANGEBYSCORE', K_FREE, '+inf', 1, 'LIMIT', offset, SCAN)
    if #batch == 0 then return nil, 0 end
    local kept = 0
    for _, w in ipairs(batch) do
      if not live(w, now) then
        redis.call('ZREM', K_FREE, w)  -- stale: its heartbeat stopped; the reaper finishes the job
      elseif excluded[w] then
        kept = kept + 1
      else
        return w, cached(w, persona)
      end
    end
    offset = offset + kept
  end
end

local function release(call, now, gone_ms)
  local w = redis.call('HGET', K_CALL, call)
  if not w then return 0 end
  local t = redis.call('HGET', K_TENANT, call)
  if t then redis.call('ZREM', K_TC, t .. '\0' .. call) end
  redis.call('HDEL', K_CALL, call)
  redis.call('HDEL', K_TENANT, call)
  redis.call('ZREM', K_LEASE, call)
  unplace(call, w)
  redis.call('ZADD', K_GONE, now + gone_ms, call)
  return 1
end
"""

# ARGV: worker, capacity, url, draining (0/1), ttl_ms, lease_ms, n_personas, personas..., active calls...
# -> {reserved, free, draining (0/1), {recovered call ids}}
HEARTBEAT = PRELUDE + r"""
local w, cap, url = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local ttl_ms, lease_ms, np = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local now = now_ms()
redis.call('HSET', K_CAP, w, cap)
redis.call('HSET', K_URL, w, url)
-- A drain is sticky while the worker lives; one that comes back after its deadline passed (restarted
-- under the same id before a reaper removed it) starts afresh.
if tonumber(redis.call('ZSCORE', K_ALIVE, w) or 0) <= now then redis.call('SREM', K_DRAIN, w) end
redis.call('ZADD', K_ALIVE, now + ttl_ms, w)
if ARGV[4] == '1' then redis.call('SADD', K_DRAIN, w) end
local want = {}
for i = 8, 7 + np do want[ARGV[i]] = true end
for _, p in ipairs(items(K_WP, w)) do
  if want[p] then
    want[p] = nil
  else
    redis.call('ZREM', K_WP, w .. '\0' .. p)
    redis.call('ZREM', K_PW, p .. '\0' .. w)
  end
end
for p in pairs(want) do
  redis.call('ZADD', K_WP, 0, w .. '\0' .. p)
  redis.call('ZADD', K_PW, 0, p .. '\0' .. w)
end
local recovered = {}
for i = 8 + np, #ARGV do
  local c = ARGV[i]
  local at = redis.call('HGET', K_CALL, c)
  if not at then
    if tonumber(redis.call('ZSCORE', K_GONE, c) or 0) <= now then
      redis.call('HSET', K_CALL, c, w)
      redis.call('ZADD', K_WC, 0, w .. '\0' .. c)
      redis.call('ZADD', K_LEASE, now + lease_ms, c)
      recovered[#recovered + 1] = c
    end
  elseif at == w then
    redis.call('ZADD', K_WC, 0, w .. '\0' .. c)
  end
end
local r = reserved(w)
local draining = redis.call('SISMEMBER', K_DRAIN, w)
if draining == 1 then
  redis.call('ZREM', K_FREE, w)
else
  redis.call('ZADD', K_FREE, cap - r, w)
end
return {r, cap - r, draining, recovered}
"""

# ARGV: call, tenant, limit (-1: none), persona ('' none), lease_ms, excluded workers...
# -> {'claimed'|'reused'|'moved', worker, url, cached (0/1), tenant} or {'no_capacity'} or {'tenant_limit'}
CLAIM = PRELUDE + r"""
local call, tenant, limit, persona = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local lease_ms = tonumber(ARGV[5])
local excluded = {}
for i = 6, #ARGV do excluded[ARGV[i]] = true end
local now = now_ms()
local at = redis.call('HGET', K_CALL, call)
if at then
  if not excluded[at] and live(at, now) then
    own_tenant(call, tenant)
    redis.call('ZADD', K_LEASE, now + lease_ms, call)
    return {'reused', at, redis.call('HGET', K_URL, at), cached(at, persona), redis.call('HGET', K_TENANT, call)}
  end
  excluded[at] = true
  local w, c = pick(now, persona, excluded)
  if not w then return {'no_capacity'} end
  unplace(call, at)
  place(call, w)
  own_tenant(call, tenant)
  redis.call('ZADD', K_LEASE, now + lease_ms, call)
  return {'moved', w, redis.call('HGET', K_URL, w), c, redis.call('HGET', K_TENANT, call)}
end
if limit >= 0 and redis.call('ZLEXCOUNT', K_TC, lo(tenant), hi(tenant)) >= limit then
  return {'tenant_limit'}
end
local w, c = pick(now, persona, excluded)
if not w then return {'no_capacity'} end
redis.call('ZREM', K_GONE, call)
own_tenant(call, tenant)
place(call, w)
redis.call('ZADD', K_LEASE, now + lease_ms, call)
return {'claimed', w, redis.call('HGET', K_URL, w), c, tenant}
"""

# ARGV: call, dead worker, persona ('' none), lease_ms, tenant ('' unknown)
# -> {'rehomed'|'reused', worker, url, cached, tenant} or {'no_capacity'}
REHOME = PRELUDE + r"""
local call, dead, persona, lease_ms, tenant = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local now = now_ms()
local at = redis.call('HGET', K_CALL, call)
if at and at ~= dead and live(at, now) then
  own_tenant(call, tenant)
  return {'reused', at, redis.call('HGET', K_URL, at), cached(at, persona), redis.call('HGET', K_TENANT, call) or ''}
end
redis.call('ZREM', K_FREE, dead)  -- suspect: out of the index until its next heartbeat
local excluded = {[dead] = true}
if at then excluded[at] = true end
local w, c = pick(now, persona, excluded)
if not w then return {'no_capacity'} end
if at then unplace(call, at) else redis.call('ZREM', K_GONE, call) end
place(call, w)
own_tenant(call, tenant)
redis.call('ZADD', K_LEASE, now + lease_ms, call)
return {'rehomed', w, redis.call('HGET', K_URL, w), c, redis.call('HGET', K_TENANT, call) or ''}
"""

# ARGV: lease_ms, then (call, tenant, worker) triples -> {call ids the store has on another worker}
RENEW = PRELUDE + r"""
local lease_ms = tonumber(ARGV[1])
local now = now_ms()
local moved = {}
for i = 2, #ARGV, 3 do
  local call, tenant, w = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local at = redis.call('HGET', K_CALL, call)
  if not at then
    redis.call('ZREM', K_GONE, call)
    place(call, w)
  elseif at ~= w then
    moved[#moved + 1] = call
  end
  own_tenant(call, tenant)
  redis.call('ZADD', K_LEASE, now + lease_ms, call)
end
return moved
"""

# ARGV: call, released_ms -> 1 released, 0 not placed
RELEASE = PRELUDE + r"""
return release(ARGV[1], now_ms(), tonumber(ARGV[2]))
"""

# ARGV: worker -> 1 drained, 0 unknown worker
DRAIN = PRELUDE + r"""
local w = ARGV[1]
if redis.call('HEXISTS', K_CAP, w) == 0 then return 0 end
redis.call('SADD', K_DRAIN, w)
redis.call('ZREM', K_FREE, w)
return 1
"""

# ARGV: max per kind, released_ms -> {{dead workers}, {their orphaned calls}, {expired calls}}
REAP = PRELUDE + r"""
local max, gone_ms = tonumber(ARGV[1]), tonumber(ARGV[2])
local now = now_ms()
local dead = redis.call('ZRANGEBYSCORE', K_ALIVE, '-inf', now, 'LIMIT', 0, max)
local orphans = {}
for _, w in ipairs(dead) do
  for _, c in ipairs(items(K_WC, w)) do orphans[#orphans + 1] = c end
  redis.call('ZREMRANGEBYLEX', K_WC, lo(w), hi(w))
  for _, p in ipairs(items(K_WP, w)) do redis.call('ZREM', K_PW, p .. '\0' .. w) end
  redis.call('ZREMRANGEBYLEX', K_WP, lo(w), hi(w))
  redis.call('HDEL', K_CAP, w)
  redis.call('HDEL', K_URL, w)
  redis.call('SREM', K_DRAIN, w)
  redis.call('ZREM', K_FREE, w)
  redis.call('ZREM', K_ALIVE, w)
end
local expired = redis.call('ZRANGEBYSCORE', K_LEASE, '-inf', now, 'LIMIT', 0, max)
for _, c in ipairs(expired) do release(c, now, gone_ms) end
redis.call('ZREMRANGEBYSCORE', K_GONE, '-inf', now)
return {dead, orphans, expired}
"""

# -> {{worker, url, capacity, reserved, ms to deadline, draining, personas}, ...}
WORKERS = PRELUDE + r"""
local now = now_ms()
local out = {}
local caps = redis.call('HGETALL', K_CAP)
for i = 1, #caps, 2 do
  local w = caps[i]
  local deadline = tonumber(redis.call('ZSCORE', K_ALIVE, w) or 0)
  out[#out + 1] = {
    w, redis.call('HGET', K_URL, w) or '', tonumber(caps[i + 1]), reserved(w), deadline - now,
    redis.call('SISMEMBER', K_DRAIN, w), redis.call('ZLEXCOUNT', K_WP, lo(w), hi(w)),
  }
end
return out
"""

SCRIPTS = {
    "heartbeat": HEARTBEAT, "claim": CLAIM, "rehome": REHOME, "renew": RENEW, "release": RELEASE,
    "drain": DRAIN, "reap": REAP, "workers": WORKERS,
}
