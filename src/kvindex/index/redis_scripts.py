"""Server-side Lua for the Redis index (see docs/redis.md for the key schema).

Every script takes ``KEYS[1]`` = the epoch key (so Redis Cluster routes it to the slot of the
index's hash tag; all other keys it touches carry the same tag) and ``ARGV[1]`` = the key
prefix including the tag and trailing colon (``{kvi}:``), ``ARGV[2]`` = a fresh epoch token
to install if the epoch key is missing (Redis lost its data). Each returns the epoch first.

Content keys and engine hashes stay strings on the Lua side: Lua 5.1 numbers are doubles and
would round 64-bit keys. Holder bitmaps use Redis bit order (offset 0 = MSB of byte 0).
Real Redis ships the ``bit`` library; fakeredis (lupa) does not, so byte-wide fallbacks in
plain arithmetic are defined when it is absent.
"""

from __future__ import annotations

__all__ = [
    "AGE",
    "APPLY",
    "ASSIGN",
    "ENGINES",
    "ENGINE_LEASES",
    "LEASE_ACQUIRE",
    "LEASE_RELEASE",
    "LEASE_RENEW",
    "LOOKUP",
    "MEMBERS",
    "PING",
    "RESOLVE",
]

_PROLOGUE = r"""
local P = ARGV[1]
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  redis.call('SET', KEYS[1], ARGV[2])
  epoch = ARGV[2]
end
"""

_BYTE_OPS = r"""
local band, bor
if bit then
  band, bor = bit.band, bit.bor
else
  band = function(a, b)
    local r, m = 0, 1
    while a > 0 and b > 0 do
      if a % 2 == 1 and b % 2 == 1 then r = r + m end
      a = math.floor(a / 2); b = math.floor(b / 2); m = m * 2
    end
    return r
  end
  bor = function(a, b)
    local r, m = 0, 1
    while a > 0 or b > 0 do
      if a % 2 == 1 or b % 2 == 1 then r = r + m end
      a = math.floor(a / 2); b = math.floor(b / 2); m = m * 2
    end
    return r
  end
end
local MASK = {128, 64, 32, 16, 8, 4, 2, 1}
"""

# Clearing one engine's bit in a holder bitmap never creates the key (it may have expired or
# been evicted) and deletes it once no engine holds the content key in that tier.
_CLEAR_HELPERS = r"""
local function clear_bit(hk, slot)
  if redis.call('EXISTS', hk) == 1 then
    redis.call('SETBIT', hk, slot, 0)
    if redis.call('BITCOUNT', hk) == 0 then redis.call('DEL', hk) end
  end
end
local function clear_value(tier, value, slot)
  for ck in string.gmatch(value, '[^,]+') do clear_bit(P .. 'h:' .. tier .. ':' .. ck, slot) end
end
local function clear_tier(slot, tier)
  local map = P .. 'm:' .. slot .. ':' .. tier
  local values = redis.call('HVALS', map)
  for _, value in ipairs(values) do clear_value(tier, value, slot) end
  redis.call('DEL', map)
end
"""

PING = _PROLOGUE + "return {epoch}\n"

# Copy state of one engine block (docs/index.md, "Duplicates"), as in MemoryIndex: an integer
# in the hash {P}c:<slot>:<tier> (field: engine hash), present only for blocks with copy state:
# extra copies beyond the first (0-3, MAX_COPIES - 1 at most) + 4 aged + 8 absorbed.
_COPY_HELPERS = r"""
local function cp_extra(state) return state % 4 end
local function cp_aged(state) return math.floor(state / 4) % 2 == 1 end
local function cp_absorbed(state) return math.floor(state / 8) % 2 == 1 end
"""

# ARGV[3] fencing owner ('' = unfenced), ARGV[4] fencing lease: 'G' the single writer lease,
# 'E' the engine's own lease, ARGV[5] TTL seconds of holder keys (0 = none), ARGV[6] engine,
# ARGV[7] '1' if the batch stores (a slot is allocated only then), ARGV[8] the stream position
# (seq) this batch brings the engine to ('' = none), ARGV[9..] ops:
# 'S' tier n first_copy {hash nkeys key...}*n (blocks from first_copy on are new physical
# copies when already held; first_copy = n: none) | 'R' tier n hash*n | 'C' tier|'*' 0 |
# 'P' '*' 0 (purge: clear all tiers, free the slot, forget the position).
# Returns {epoch, status}: 1 applied, 0 rejected (fencing owner does not hold the lease).
APPLY = (
    _PROLOGUE
    + _CLEAR_HELPERS
    + _COPY_HELPERS
    + r"""
local engine = ARGV[6]
if ARGV[3] ~= '' then
  local lk = P .. 'lease'
  if ARGV[4] == 'E' then lk = P .. 'lease:' .. engine end
  if redis.call('GET', lk) ~= ARGV[3] then return {epoch, 0} end
end
local ttl = tonumber(ARGV[5])
local slot = redis.call('HGET', P .. 'eng', engine)
if not slot then
  if ARGV[7] ~= '1' then
    if ARGV[8] ~= '' then redis.call('HSET', P .. 'seq', engine, ARGV[8]) end
    return {epoch, 1}
  end
  local free = redis.call('ZPOPMIN', P .. 'free')
  if free[1] then slot = free[1] else slot = redis.call('INCR', P .. 'next') - 1 end
  redis.call('HSET', P .. 'eng', engine, slot)
  redis.call('HSET', P .. 'name', slot, engine)
end
local function remove(tier, hashes)
  local map = P .. 'm:' .. slot .. ':' .. tier
  local ck = P .. 'c:' .. slot .. ':' .. tier
  local has_copies = redis.call('EXISTS', ck) == 1
  for _, h in ipairs(hashes) do
    local keep = false
    if has_copies then
      local state = tonumber(redis.call('HGET', ck, h) or '-1')
      if state >= 0 then
        if cp_extra(state) > 0 then  -- another physical copy remains: still held, for now
          redis.call('HSET', ck, h, cp_extra(state) - 1 + 8)
          keep = true
        else
          redis.call('HDEL', ck, h)
        end
      end
    end
    if not keep then
      local value = redis.call('HGET', map, h)
      if value then
        redis.call('HDEL', map, h)
        clear_value(tier, value, slot)
      end
    end
  end
end
local i = 9
local n_args = #ARGV
while i <= n_args do
  local kind, tier, n = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  i = i + 3
  if kind == 'S' then
    local first_copy = tonumber(ARGV[i])
    i = i + 1
    local map = P .. 'm:' .. slot .. ':' .. tier
    local ck = P .. 'c:' .. slot .. ':' .. tier
    local has_copies = redis.call('EXISTS', ck) == 1
    local hprefix = P .. 'h:' .. tier .. ':'
    for b = 0, n - 1 do
      local h, nk = ARGV[i], tonumber(ARGV[i + 1])
      i = i + 2
      for k = i, i + nk - 1 do
        local hk = hprefix .. ARGV[k]
        redis.call('SETBIT', hk, slot, 1)
        if ttl > 0 then redis.call('EXPIRE', hk, ttl) end
      end
      local value
      if nk == 1 then value = ARGV[i] else value = table.concat(ARGV, ',', i, i + nk - 1) end
      local new_copy = b >= first_copy
      if new_copy or has_copies then
        local old = redis.call('HGET', map, h)
        if old then
          local state = tonumber(redis.call('HGET', ck, h) or '0')
          if old == value then  -- confirmed (aged / absorbed marks go), maybe one more copy
            if state > 0 or new_copy then
              local extra = cp_extra(state)
              if new_copy then extra = math.min(extra + 1, 3) end
              if extra > 0 then
                redis.call('HSET', ck, h, extra)
                has_copies = true
              else
                redis.call('HDEL', ck, h)
              end
            end
          elseif state > 0 then  -- another block under this hash: its copies are not this one's
            redis.call('HDEL', ck, h)
          end
        end
      end
      redis.call('HSET', map, h, value)
      i = i + nk
    end
  elseif kind == 'R' then
    local hashes = {}
    for k = i, i + n - 1 do hashes[#hashes + 1] = ARGV[k] end
    remove(tier, hashes)
    i = i + n
  elseif kind == 'C' then
    local tiers = {tier}
    if tier == '*' then tiers = {0, 1, 2} end
    for _, t in ipairs(tiers) do
      redis.call('DEL', P .. 'c:' .. slot .. ':' .. t)
      clear_tier(slot, t)
    end
  elseif kind == 'P' then
    for t = 0, 2 do
      redis.call('DEL', P .. 'c:' .. slot .. ':' .. t)
      clear_tier(slot, t)
    end
    redis.call('HDEL', P .. 'eng', engine)
    redis.call('HDEL', P .. 'name', slot)
    redis.call('HDEL', P .. 'seq', engine)
    redis.call('ZADD', P .. 'free', slot, slot)
    return {epoch, 1}
  else
    return redis.error_reply('kvindex: unknown op ' .. tostring(kind))
  end
end
if ARGV[8] ~= '' then redis.call('HSET', P .. 'seq', engine, ARGV[8]) end
return {epoch, 1}
"""
)

# One tick of the copy clock over every engine of the group (MemoryIndex.age_copies).
# ARGV[3] the least interval between ticks in ms (0: always tick): replicas sharing the index
# all call it, the first one in each interval ticks. Returns {epoch, 1 ticked | 0 skipped}.
AGE = (
    _PROLOGUE
    + _CLEAR_HELPERS
    + _COPY_HELPERS
    + r"""
local interval = tonumber(ARGV[3])
if interval > 0 and not redis.call('SET', P .. 'aged', '1', 'PX', interval, 'NX') then
  return {epoch, 0}
end
local slots = redis.call('HVALS', P .. 'eng')
for _, slot in ipairs(slots) do
  for tier = 0, 2 do
    local ck = P .. 'c:' .. slot .. ':' .. tier
    local flat = redis.call('HGETALL', ck)
    local map = P .. 'm:' .. slot .. ':' .. tier
    for j = 1, #flat, 2 do
      local h, state = flat[j], tonumber(flat[j + 1])
      if cp_aged(state) then
        redis.call('HDEL', ck, h)
        if cp_absorbed(state) then  -- kept only by an unconfirmed copy: drop it
          local value = redis.call('HGET', map, h)
          if value then
            redis.call('HDEL', map, h)
            clear_value(tier, value, slot)
          end
        end
      else
        redis.call('HSET', ck, h, state + 4)
      end
    end
  end
end
return {epoch, 1}
"""
)

# The registry of engine groups (several groups only; on group 0). ARGV[3] engine,
# ARGV[4] '1' allocate when unknown (to the group with the fewest engines), '0' look up,
# 'D' forget; ARGV[5] number of groups. Returns {epoch, group | -1}.
ASSIGN = (
    _PROLOGUE
    + r"""
local engine = ARGV[3]
local g = redis.call('HGET', P .. 'grp', engine)
if ARGV[4] == 'D' then
  if g then
    redis.call('HDEL', P .. 'grp', engine)
    redis.call('HINCRBY', P .. 'gn', g, -1)
  end
  return {epoch, -1}
end
if g then return {epoch, tonumber(g)} end
if ARGV[4] ~= '1' then return {epoch, -1} end
local best, best_n = 0, nil
for k = 0, tonumber(ARGV[5]) - 1 do
  local n = tonumber(redis.call('HGET', P .. 'gn', k) or '0')
  if best_n == nil or n < best_n then best, best_n = k, n end
end
redis.call('HSET', P .. 'grp', engine, best)
redis.call('HINCRBY', P .. 'gn', best, 1)
return {epoch, best}
"""
)

# Replica membership (on group 0): ARGV[3] owner, ARGV[4] TTL ms, ARGV[5] '1' heartbeat,
# '0' leave. Expired members are dropped (server time). Returns {epoch, live members}.
MEMBERS = (
    _PROLOGUE
    + r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local key = P .. 'members'
if ARGV[5] == '1' then
  redis.call('ZADD', key, now + tonumber(ARGV[4]), ARGV[3])
else
  redis.call('ZREM', key, ARGV[3])
end
redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
return {epoch, redis.call('ZCARD', key)}
"""
)

# Per-engine writer leases of one group: ARGV[3] owner, ARGV[4] TTL ms, ARGV[5] how many free
# leases this call may take, then (engine, action, state) triples; action 'K' keep (renew
# if ours), 'T' take if free (within the budget) or renew, 'R' release if ours, 'Q' query.
# While ours the engine's sync state is published ({P}st:<engine>, same TTL).
# Returns {epoch, then per engine: ours 0/1, held by anyone 0/1, writer's state|'', position|''}.
ENGINE_LEASES = (
    _PROLOGUE
    + r"""
local owner, ttl, budget = ARGV[3], ARGV[4], tonumber(ARGV[5])
local out = {epoch}
for k = 6, #ARGV, 3 do
  local engine, action, state = ARGV[k], ARGV[k + 1], ARGV[k + 2]
  local lk, sk = P .. 'lease:' .. engine, P .. 'st:' .. engine
  local holder = redis.call('GET', lk)
  local ours = 0
  if holder == owner then
    if action == 'R' then
      redis.call('DEL', lk, sk)
      holder = false
    else
      redis.call('PEXPIRE', lk, ttl)
      ours = 1
    end
  elseif not holder and action == 'T' and budget > 0 then
    redis.call('SET', lk, owner, 'PX', ttl)
    budget = budget - 1
    holder = owner
    ours = 1
  end
  if ours == 1 and state ~= '' then redis.call('SET', sk, state, 'PX', ttl) end
  local held = 0
  if holder then held = 1 end
  out[#out + 1] = ours
  out[#out + 1] = held
  out[#out + 1] = (holder and redis.call('GET', sk)) or ''
  out[#out + 1] = redis.call('HGET', P .. 'seq', engine) or ''
end
return out
"""
)

# ARGV[3] engine, ARGV[4] engine hash. Returns {epoch, value|false} (first tier that holds it).
RESOLVE = (
    _PROLOGUE
    + r"""
local slot = redis.call('HGET', P .. 'eng', ARGV[3])
if not slot then return {epoch, false} end
for t = 0, 2 do
  local value = redis.call('HGET', P .. 'm:' .. slot .. ':' .. t, ARGV[4])
  if value then return {epoch, value} end
end
return {epoch, false}
"""
)

# Returns {epoch, name, name, ...}: engines holding at least one block in some tier.
ENGINES = (
    _PROLOGUE
    + r"""
local out = {epoch}
local pairs_ = redis.call('HGETALL', P .. 'eng')
for j = 1, #pairs_, 2 do
  local slot = pairs_[j + 1]
  if redis.call('EXISTS', P .. 'm:' .. slot .. ':0', P .. 'm:' .. slot .. ':1',
                P .. 'm:' .. slot .. ':2') > 0 then
    out[#out + 1] = pairs_[j]
  end
end
return out
"""
)

# ARGV[3] number of candidate engines (-1 = all), then the candidate names, then the content
# keys of the prompt in chain order. Walks the chain ANDing holder bitmaps byte-wise and stops
# as soon as no engine is left, as the in-memory backend does.
# Returns {epoch, name, blocks, cpu_blocks, storage_blocks, ...}.
LOOKUP = (
    _PROLOGUE
    + _BYTE_OPS
    + r"""
local nf = tonumber(ARGV[3])
local width = math.ceil(tonumber(redis.call('GET', P .. 'next') or '0') / 8)
local active = {}
if nf < 0 then
  for j = 1, width do active[j] = 255 end
else
  for j = 1, width do active[j] = 0 end
  for k = 4, 3 + nf do
    local s = redis.call('HGET', P .. 'eng', ARGV[k])
    if s then
      s = tonumber(s)
      local j = math.floor(s / 8) + 1
      active[j] = bor(active[j], MASK[s % 8 + 1])
    end
  end
end
local alive = false
for j = 1, width do if active[j] ~= 0 then alive = true end end
local active_str = string.char(unpack(active))  -- compared with GPU bitmaps as a whole
local matched, n_cpu, n_storage = {}, {}, {}
local pos = 0
local first = 4 + math.max(nf, 0)
if alive then
  for i = first, #ARGV do
    local ck = ARGV[i]
    local v = redis.call('MGET', P .. 'h:0:' .. ck, P .. 'h:1:' .. ck, P .. 'h:2:' .. ck)
    local g, c, s = v[1] or '', v[2] or '', v[3] or ''
    -- When exactly the alive engines hold the key in GPU nothing changes (held = alive,
    -- none below GPU), whatever the other tiers say: one string comparison.
    if g ~= active_str then
      alive = false
      for j = 1, width do
        local a = active[j]
        if a ~= 0 then
          local gb = string.byte(g, j) or 0
          local cb = string.byte(c, j) or 0
          local held = band(bor(bor(gb, cb), string.byte(s, j) or 0), a)
          local dropped = a - held
          if dropped ~= 0 and pos > 0 then
            for b = 1, 8 do
              if band(dropped, MASK[b]) ~= 0 then matched[(j - 1) * 8 + b - 1] = pos end
            end
          end
          local below = held - band(held, gb)
          if below ~= 0 then
            for b = 1, 8 do
              local m = MASK[b]
              if band(below, m) ~= 0 then
                local sl = (j - 1) * 8 + b - 1
                if band(cb, m) ~= 0 then
                  n_cpu[sl] = (n_cpu[sl] or 0) + 1
                else
                  n_storage[sl] = (n_storage[sl] or 0) + 1
                end
              end
            end
          end
          active[j] = held
          if held ~= 0 then alive = true end
        end
      end
      active_str = string.char(unpack(active))
    end
    pos = pos + 1
    if not alive then break end
  end
  if alive and pos > 0 then
    for j = 1, width do
      local a = active[j]
      if a ~= 0 then
        for b = 1, 8 do
          if band(a, MASK[b]) ~= 0 then matched[(j - 1) * 8 + b - 1] = pos end
        end
      end
    end
  end
end
local out = {epoch}
for sl, blocks in pairs(matched) do
  local name = redis.call('HGET', P .. 'name', sl)
  if name then
    out[#out + 1] = name
    out[#out + 1] = blocks
    out[#out + 1] = n_cpu[sl] or 0
    out[#out + 1] = n_storage[sl] or 0
  end
end
return out
"""
)

# Writer lease: KEYS[1] = lease key, ARGV[1] = owner token, ARGV[2] = TTL ms.
LEASE_ACQUIRE = r"""
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

LEASE_RENEW = r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

LEASE_RELEASE = r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
