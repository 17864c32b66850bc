-- Take a lock in turn (FIFO waiters, one Redis server): `SET key token PX ttl` when the key
-- is free and no live waiter is queued ahead of us; else queue us (once) and mark us alive.
-- The lock key is the same string redsync and redis-py use; the queue is Baton's alone.
--
-- KEYS[1]  the lock key
-- KEYS[2]  the fencing counter
-- KEYS[3]  the queue of waiters' tokens (a list, oldest first)
-- KEYS[4]  our waiter key (KEYS[5]'s prefix plus our token): alive while it exists
-- ARGV[1]  our token
-- ARGV[2]  the TTL in milliseconds
-- ARGV[3]  the waiter key's lifetime in ms; "0": take the lock if free, never queue (try_lock)
-- ARGV[4]  the prefix of every waiter key of this lock
-- ARGV[5]  the prefix of this lock's release markers (see release.lua): ours is deleted
--          whenever the lock is ours, so a marker an earlier let-go of this call's token left
--          never answers for this hold
--
-- Returns {1, fence} when taken now; {2, fence, since} when a release already handed the
-- lock to us (see handoff.lua); else {0, PTTL of the holder's key (-2: none), the fencing
-- counter now}. A hand-off message to us with a fencing token no higher than that counter
-- is stale: its grant ended before this call ran, or this call would have found it.
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  local grant = redis.call('GET', KEYS[4])
  if grant then
    local fence, since = string.match(grant, '^g:(%d+):(%d+)$')
    if fence then
      redis.call('DEL', KEYS[4])
      redis.pcall('DEL', ARGV[5] .. ARGV[1])
      return {2, tonumber(fence), tonumber(since)}
    end
  end
  -- Ours already, with no hand-off waiting: an earlier call of this waiter (tokens are
  -- unique to one lock() call) took the lock, or took its hand-off, and the reply was lost.
  -- Take it afresh, for the full TTL from now, out of the queue. Nobody else can bump the
  -- fencing counter while we hold the key, so it holds our fence.
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  if redis.call('DEL', KEYS[4]) == 1 then
    redis.call('LREM', KEYS[3], 1, ARGV[1])
  end
  redis.pcall('DEL', ARGV[5] .. ARGV[1])
  return {1, tonumber(redis.call('GET', KEYS[2]) or '0') or 0}
end
-- Our waiter key holds a grant (handoff.lua) of a lock we do not hold: the lock was handed
-- to us, then deleted (or it expired, or another took it after that) before we learnt of
-- the grant. The hand-off took us out of the queue, and we were its oldest live waiter: we
-- are first again, not behind those who queued after us.
local mine = redis.call('GET', KEYS[4])
local orphaned = mine and string.sub(mine, 1, 2) == 'g:'
if not holder then
  -- Drop waiters that stopped refreshing their waiter key; stop at the first live one.
  local ahead = false
  while not orphaned do
    local head = redis.call('LINDEX', KEYS[3], 0)
    if not head or head == ARGV[1] then
      break
    end
    if redis.call('EXISTS', ARGV[4] .. head) == 1 then
      ahead = true
      break
    end
    redis.call('LPOP', KEYS[3])
  end
  if not ahead then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    local fence = redis.call('INCR', KEYS[2])
    if redis.call('DEL', KEYS[4]) == 1 then
      redis.call('LREM', KEYS[3], 1, ARGV[1])
    end
    redis.pcall('DEL', ARGV[5] .. ARGV[1])
    return {1, fence}
  end
end
if ARGV[3] ~= '0' then
  -- Queue us if we are new, or if the queue is gone while our place lived on (it expired:
  -- nobody else refreshed it); at the head if a hand-off to us was lost (see above). A live
  -- waiter key otherwise means we are in the queue.
  if orphaned then
    redis.call('LPUSH', KEYS[3], ARGV[1])
  elseif not mine or redis.call('EXISTS', KEYS[3]) == 0 then
    redis.call('RPUSH', KEYS[3], ARGV[1])
  end
  -- The value is what a hand-off needs: the TTL to grant, and the lifetime, so that the
  -- time since our last refresh is the lifetime minus the key's PTTL.
  redis.call('SET', KEYS[4], ARGV[2] .. ':' .. ARGV[3], 'PX', ARGV[3])
  -- An abandoned queue goes away by itself: four lifetimes of the waiter with the longest
  -- one, so a waiter with a short one never cuts the queue from under a slower one.
  local keep = tonumber(ARGV[3]) * 4
  if redis.call('PTTL', KEYS[3]) < keep then
    redis.call('PEXPIRE', KEYS[3], keep)
  end
end
local counter = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
return {0, redis.call('PTTL', KEYS[1]), counter}
