-- Read one key as `baton status` shows it: is it a lock key, who holds it, for how long, and
-- how many of Baton's FIFO waiters queue for it.
--
-- KEYS[1]  the key
-- KEYS[2]  its fencing counter (baton:fence:KEY)
-- KEYS[3]  its election record (baton:leader:KEY)
-- KEYS[4]  its queue of FIFO waiters' tokens (baton:queue:KEY)
-- ARGV[1]  the prefix of its waiter keys (baton:waiter:KEY:)
--
-- Returns {} unless the key is a string with an expiry, as every lock key is (Baton's,
-- redsync's, redis-py's); else {value, pttl, fence, is_election, waiters} where fence is the
-- counter's value ('0' if there is none), is_election is 1 if the record names the holder,
-- and waiters counts the queued tokens whose waiter key is alive. Keys of another type
-- where Baton's would be (a user's own key named baton:...) count as absent. Reads only.
local function is(key, t)
  return redis.call('TYPE', key)['ok'] == t
end
if not is(KEYS[1], 'string') then
  return {}
end
local pttl = redis.call('PTTL', KEYS[1])
if pttl < 0 then
  return {}
end
local value = redis.call('GET', KEYS[1])
local fence = '0'
if is(KEYS[2], 'string') then
  fence = redis.call('GET', KEYS[2])
end
local election = 0
if is(KEYS[3], 'hash') and redis.call('HGET', KEYS[3], 'token') == value then
  election = 1
end
local waiters = 0
if is(KEYS[4], 'list') then
  for _, token in ipairs(redis.call('LRANGE', KEYS[4], 0, -1)) do
    if redis.call('EXISTS', ARGV[1] .. token) == 1 then
      waiters = waiters + 1
    end
  end
end
return {value, tostring(pttl), fence, tostring(election), tostring(waiters)}
