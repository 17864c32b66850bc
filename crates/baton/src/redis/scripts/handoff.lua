-- Release a lock whose waiters queue (enqueue.lua): compare-and-delete, except that when a
-- live waiter is queued the key goes straight to the oldest one (SET to its token, with a new
-- fencing token, for the shorter of its TTL and its waiter key's lifetime) and only that
-- waiter is told, by a PUBLISH naming its token. Never a plain
-- DEL: a holder whose lock expired cannot release the next holder's lock.
--
-- KEYS[1]  the lock key
-- KEYS[2]  the fencing counter
-- KEYS[3]  the queue of waiters' tokens
-- ARGV[1]  our token
-- ARGV[2]  the wake-up channel
-- ARGV[3]  the prefix of every waiter key of this lock
-- ARGV[4]  the prefix of this lock's release markers (the marker is ARGV[4] .. ARGV[1])
-- ARGV[5]  the marker's lifetime in ms (twice the client's request timeout)
--
-- Returns {1} if the lock was ours and is now free; {2, next token, fence, since} if it was
-- ours and is now the next waiter's; the same if a release with our token already did that
-- (its marker says which); else {0} (not ours: if we were queued, we leave the queue, as a
-- waiter that gives up does).
--
-- The marker tells a release whose reply was lost, sent again on a new connection, what its
-- first run did (see release.lua): `1` (freed) or the grant's message (`g:next:fence:since`).
-- Set and read with `redis.pcall`, and built from ARGV rather than declared in KEYS, so that
-- a user whose ACL does not grant `baton:released:*` still releases, and learns of a loss.
--
-- `since` is how long ago (ms, rounded down, minus 1) the new holder last refreshed its
-- waiter key: the waiter adds it to the send time of its last refresh to get a moment no
-- later than this grant, from which its local deadline (plus the TTL) counts.
--
-- The PUBLISH is a wake-up only, and never fails the script: `redis.pcall`, because a user
-- without the channel in its ACL (Redis 7's default `acl-pubsub-default resetchannels`)
-- would otherwise abort it after its writes, which Redis does not roll back. Waiters that
-- miss the message find the change by their fallback poll.
local marker = ARGV[4] .. ARGV[1]
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  local done = redis.pcall('GET', marker)
  if done == '1' then
    return {1}
  end
  if type(done) == 'string' then
    local nxt, fence, since = string.match(done, '^g:(.+):(%d+):(%d+)$')
    if nxt then
      return {2, nxt, tonumber(fence), tonumber(since)}
    end
  end
  if redis.call('DEL', ARGV[3] .. ARGV[1]) == 1 then
    redis.call('LREM', KEYS[3], 0, ARGV[1])
  end
  return {0}
end
-- Our own waiter key, if the lock was handed to us: it holds the grant until it expires.
redis.call('DEL', ARGV[3] .. ARGV[1])
while true do
  local nxt = redis.call('LPOP', KEYS[3])
  if not nxt then
    break
  end
  local wk = ARGV[3] .. nxt
  local pttl = redis.call('PTTL', wk)
  local v = redis.call('GET', wk)
  local ttl, life
  if v then
    ttl, life = string.match(v, '^(%d+):(%d+)$')
  end
  if ttl and pttl > 0 then
    -- Granted for the shorter of its TTL and its waiter key's lifetime: a waiter that died
    -- a moment ago (its key not expired yet) blocks the lock no longer than that. A live
    -- one's watchdog extends it to the full TTL at once.
    local granted = math.min(tonumber(ttl), tonumber(life))
    redis.call('SET', KEYS[1], nxt, 'PX', granted)
    -- The next holder's own release marker, if an earlier let-go of its token left one,
    -- must not answer for this hold (see enqueue.lua).
    redis.pcall('DEL', ARGV[4] .. nxt)
    local fence = redis.call('INCR', KEYS[2])
    local since = tonumber(life) - pttl - 1
    if since < 0 then
      since = 0
    end
    -- Kept as long as the grant, for a refresh that crossed the message (enqueue.lua).
    -- Integers as digits: Lua 5.1 writes a number of 10^14 or more as "1e+14".
    local grant = string.format('%d:%d', fence, since)
    redis.call('SET', wk, 'g:' .. grant, 'PX', granted)
    redis.pcall('SET', marker, 'g:' .. nxt .. ':' .. grant, 'PX', ARGV[5])
    redis.pcall('PUBLISH', ARGV[2], 'g:' .. nxt .. ':' .. grant)
    return {2, nxt, fence, since}
  end
end
redis.call('DEL', KEYS[1])
redis.pcall('SET', marker, '1', 'PX', ARGV[5])
redis.pcall('PUBLISH', ARGV[2], ARGV[1] .. ':0')
return {1}
