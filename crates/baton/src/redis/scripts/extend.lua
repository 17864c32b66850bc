-- Extend a lock: compare-and-PEXPIRE. Never re-creates a key that expired or was deleted.
--
-- KEYS[1]  the lock key
-- KEYS[2]  the election record (extended too if it carries our token)
-- ARGV[1]  our token
-- ARGV[2]  the new TTL in milliseconds
-- ARGV[3]  '1' for a leader's hold: its record must carry our token
--
-- Returns 1 if extended, 0 if the key holds another token, -1 if the key is gone, -2 if
-- a leader's record is gone or another's (nothing extended: without its record nobody
-- sees the leader, so it must step down and let another candidate lead).
local v = redis.call('GET', KEYS[1])
if not v then
  return -1
end
if v ~= ARGV[1] then
  return 0
end
local ours = redis.call('HGET', KEYS[2], 'token') == ARGV[1]
if ARGV[3] == '1' and not ours then
  return -2
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if ours then
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
return 1
