"""The Lua scripts of the global tier. Each runs atomically in Redis, so nodes that sync, borrow
and donate at the same moment still see and leave a consistent state.

Data model, for a key prefix P:
  P:nodes          ZSET  node id -> heartbeat expiry (ms, Redis clock). Live nodes = N.
  P:b:<bucket>     HASH  pool        unused budget given back by nodes, capped at the burst
                         d:<node>    the node's demand for this bucket (tokens/s, last interval)
                         a:<node>    what it admitted (tokens/s, last interval)
                         h:<node>    the share of the limit the node holds now

Invariant kept by SYNC: the shares held by live nodes add up to at most 1. A node's new share is
its demand-based target, but never more than what the other nodes do not hold yet; a node
giving up share does so at its own sync, and the taker gets it at its next one. Tokens are only
ever moved (node -> pool -> node), never made, so the cluster admits at most the configured rate
plus the burst, whatever the load looks like.
"""

from __future__ import annotations

# KEYS[1] = nodes zset, KEYS[2..] = bucket hashes.
# ARGV[1] node id, ARGV[2] ttl ms, ARGV[3] demand headroom,
# then per bucket 5 values: demand/s, admitted/s, donation, pool cap (burst), limit rate.
# Returns {N, share_1, pool_1, share_2, pool_2, ...} (numbers as strings: Lua floats would be
# truncated to integers in the reply).
SYNC = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me = ARGV[1]
local ttl = tonumber(ARGV[2])
local headroom = tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], now + ttl, me)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], ttl * 4)
local live = redis.call('ZRANGE', KEYS[1], 0, -1)
local n = #live
local alive = {}
for _, id in ipairs(live) do alive[id] = true end
local out = {tostring(n)}
for i = 2, #KEYS do
  local k = KEYS[i]
  local base = 4 + (i - 2) * 5
  local demand = tonumber(ARGV[base])
  local admitted = tonumber(ARGV[base + 1])
  local donation = tonumber(ARGV[base + 2])
  local cap = tonumber(ARGV[base + 3])
  local rate = tonumber(ARGV[base + 4])
  local h = redis.call('HGETALL', k)
  local dem, held = {}, {}
  local pool = 0
  for j = 1, #h, 2 do
    local f, v = h[j], h[j + 1]
    if f == 'pool' then
      pool = tonumber(v)
    else
      local kind, id = string.sub(f, 1, 2), string.sub(f, 3)
      if not alive[id] then
        redis.call('HDEL', k, f)
      elseif kind == 'd:' then
        dem[id] = tonumber(v)
      elseif kind == 'h:' then
        held[id] = tonumber(v)
      end
    end
  end
  dem[me] = demand
  -- Water-filling: nodes asking for less than a fair part of what is left get what they ask
  -- (with headroom); the rest is split among the hungrier ones; what nobody asked for is
  -- spread evenly so that an idle node can still take a burst.
  local wants = {}
  for _, id in ipairs(live) do
    local w = 0
    if dem[id] then w = math.min(1, dem[id] * headroom / rate) end
    table.insert(wants, {id, w})
  end
  table.sort(wants, function(a, b) return a[2] < b[2] end)
  local remaining, left = 1.0, n
  local target = {}
  for _, e in ipairs(wants) do
    local give = math.min(e[2], remaining / left)
    target[e[1]] = give
    remaining = remaining - give
    left = left - 1
  end
  local mine = (target[me] or 0) + remaining / n
  local others = 0
  for id, s in pairs(held) do
    if id ~= me then others = others + s end
  end
  local share = math.max(0, math.min(mine, 1 - others))
  pool = math.min(cap, pool + donation)
  redis.call('HSET', k, 'pool', tostring(pool), 'd:' .. me, tostring(demand),
             'a:' .. me, tostring(admitted), 'h:' .. me, tostring(share))
  redis.call('PEXPIRE', k, ttl * 4)
  table.insert(out, tostring(share))
  table.insert(out, tostring(pool))
end
return out
"""

# KEYS[1] bucket hash; ARGV[1] most wanted, ARGV[2] least useful amount.
# Takes min(pool, wanted) when the pool holds at least the least useful amount; returns it.
BORROW = r"""
local pool = tonumber(redis.call('HGET', KEYS[1], 'pool') or '0')
local want = tonumber(ARGV[1])
if pool < tonumber(ARGV[2]) then return '0' end
local take = math.min(pool, want)
redis.call('HSET', KEYS[1], 'pool', tostring(pool - take))
return tostring(take)
"""

# KEYS = bucket hashes; ARGV pairs: amount, cap. Returns the pools after the donation.
DONATE = r"""
local out = {}
for i = 1, #KEYS do
  local pool = tonumber(redis.call('HGET', KEYS[i], 'pool') or '0')
  pool = math.min(tonumber(ARGV[2 * i]), pool + tonumber(ARGV[2 * i - 1]))
  redis.call('HSET', KEYS[i], 'pool', tostring(pool))
  table.insert(out, tostring(pool))
end
return out
"""

# KEYS[1] nodes zset, KEYS[2..] bucket hashes; ARGV[1] node id. A node leaving hands its share
# back at once instead of making the others wait for its heartbeat to expire.
LEAVE = r"""
redis.call('ZREM', KEYS[1], ARGV[1])
for i = 2, #KEYS do
  redis.call('HDEL', KEYS[i], 'd:' .. ARGV[1], 'a:' .. ARGV[1], 'h:' .. ARGV[1])
end
return 1
"""
