-- Publish a new value for the leader of an election, only while we hold its lock.
--
-- KEYS[1]  the lock key
-- KEYS[2]  the election record
-- ARGV[1]  our token
-- ARGV[2]  the new value
-- ARGV[3]  the wake-up channel
--
-- Returns the record's new version, or 0 if we no longer lead (nothing changed).
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
if redis.call('HGET', KEYS[2], 'token') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[2], 'value', ARGV[2])
local ver = redis.call('HINCRBY', KEYS[2], 'ver', 1)
local pttl = redis.call('PTTL', KEYS[1])
if pttl > 0 then
  redis.call('PEXPIRE', KEYS[2], pttl)
end
redis.call('PUBLISH', ARGV[3], ARGV[1] .. ':' .. ver)
return ver
