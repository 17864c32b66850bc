-- Read one key as `baton status` shows it: is it a lock key, who holds it, for how long.
--
-- KEYS[1]  the key
-- KEYS[2]  its fencing counter (baton:fence:KEY)
-- KEYS[3]  its election record (baton:leader:KEY)
--
-- Returns {} unless the key is a string with an expiry, as every lock key is (Baton's,
-- redsync's, redis-py's); else {value, pttl, fence, is_election} where fence is the
-- counter's value ('0' if there is none) and is_election is 1 if the record names the
-- holder. Reads only.
if redis.call('TYPE', KEYS[1])['ok'] ~= 'string' then
  return {}
end
local pttl = redis.call('PTTL', KEYS[1])
if pttl < 0 then
  return {}
end
local value = redis.call('GET', KEYS[1])
local fence = redis.call('GET', KEYS[2]) or '0'
local election = 0
if redis.call('HGET', KEYS[3], 'token') == value then
  election = 1
end
return {value, tostring(pttl), fence, tostring(election)}
