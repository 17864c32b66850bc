-- Publish a new value for the leader of an election, only while we hold its lock.
--
-- KEYS[1]  the lock key
-- KEYS[2]  the election record
-- ARGV[1]  our token
-- ARGV[2]  the new value
-- ARGV[3]  the wake-up channel
-- ARGV[4]  the record's new version: the leader's own counter, a new one for each proclaim,
--          so that one version always means one value on every node (on Redlock, a
--          proclaim that reached only some nodes must not share a version with a later one)
--
-- Returns ARGV[4] once written; the record's version if it is already that high or higher
-- (nothing changed); 0 if we no longer lead (nothing changed).
--
-- The PUBLISH is a wake-up only, and never fails the script: `redis.pcall`, because a user
-- without the channel in its ACL (Redis 7's default `acl-pubsub-default resetchannels`)
-- would otherwise abort it after its writes, which Redis does not roll back. Waiters that
-- miss the message find the change by their fallback poll.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
if redis.call('HGET', KEYS[2], 'token') ~= ARGV[1] then
  return 0
end
local cur = tonumber(redis.call('HGET', KEYS[2], 'ver') or '0') or 0
local ver = tonumber(ARGV[4])
if ver <= cur then
  return cur
end
redis.call('HSET', KEYS[2], 'value', ARGV[2], 'ver', ARGV[4])
local pttl = redis.call('PTTL', KEYS[1])
if pttl > 0 then
  redis.call('PEXPIRE', KEYS[2], pttl)
end
redis.pcall('PUBLISH', ARGV[3], ARGV[1] .. ':' .. ARGV[4])
return ver
