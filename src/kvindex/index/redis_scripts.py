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

__all__ = ["APPLY", "ENGINES", "LEASE_ACQUIRE", "LEASE_RELEASE", "LEASE_RENEW", "LOOKUP", "PING"]

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

# ARGV[3] fencing owner ('' = unfenced), ARGV[4] TTL seconds of holder keys (0 = none),
# ARGV[5] engine, ARGV[6] '1' if the batch stores (a slot is allocated only then),
# ARGV[7..] ops: 'S' tier n {hash nkeys key...}*n | 'R' tier n hash*n | 'C' tier|'*' 0 |
# 'P' '*' 0 (purge: clear all tiers, free the slot).
# Returns {epoch, status}: 1 applied, 0 rejected (fencing owner does not hold the lease).
APPLY = (
    _PROLOGUE
    + _CLEAR_HELPERS
    + r"""
if ARGV[3] ~= '' and redis.call('GET', P .. 'lease') ~= ARGV[3] then return {epoch, 0} end
local ttl = tonumber(ARGV[4])
local engine = ARGV[5]
local slot = redis.call('HGET', P .. 'eng', engine)
if not slot then
  if ARGV[6] ~= '1' then return {epoch, 1} end
  local free = redis.call('ZPOPMIN', P .. 'free')
  if free[1] then slot = free[1] else slot = redis.call('INCR', P .. 'next') - 1 end
  redis.call('HSET', P .. 'eng', engine, slot)
  redis.call('HSET', P .. 'name', slot, engine)
end
local i = 7
local n_args = #ARGV
while i <= n_args do
  local kind, tier, n = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  i = i + 3
  if kind == 'S' then
    local map = P .. 'm:' .. slot .. ':' .. tier
    local hprefix = P .. 'h:' .. tier .. ':'
    for _ = 1, n do
      local h, nk = ARGV[i], tonumber(ARGV[i + 1])
      i = i + 2
      for k = i, i + nk - 1 do
        local hk = hprefix .. ARGV[k]
        redis.call('SETBIT', hk, slot, 1)
        if ttl > 0 then redis.call('EXPIRE', hk, ttl) end
      end
      if nk == 1 then
        redis.call('HSET', map, h, ARGV[i])
      else
        redis.call('HSET', map, h, table.concat(ARGV, ',', i, i + nk - 1))
      end
      i = i + nk
    end
  elseif kind == 'R' then
    local map = P .. 'm:' .. slot .. ':' .. tier
    for k = i, i + n - 1 do
      local value = redis.call('HGET', map, ARGV[k])
      if value then
        redis.call('HDEL', map, ARGV[k])
        clear_value(tier, value, slot)
      end
    end
    i = i + n
  elseif kind == 'C' then
    if tier == '*' then
      for t = 0, 2 do clear_tier(slot, t) end
    else
      clear_tier(slot, tier)
    end
  elseif kind == 'P' then
    for t = 0, 2 do clear_tier(slot, t) end
    redis.call('HDEL', P .. 'eng', engine)
    redis.call('HDEL', P .. 'name', slot)
    redis.call('ZADD', P .. 'free', slot, slot)
    return {epoch, 1}
  else
    return redis.error_reply('kvindex: unknown op ' .. tostring(kind))
  end
end
return {epoch, 1}
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
