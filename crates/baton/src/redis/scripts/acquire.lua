-- Take a lock with `SET key token NX PX ttl`: the command redsync and redis-py's Lock use, so
-- they and Baton exclude each other. On success, in the same script, bump the lock's fencing
-- counter and (for an election) write the leader's record.
--
-- KEYS[1]  the lock key
-- KEYS[2]  the fencing counter (a separate key, never expiring)
-- KEYS[3]  the election record (a hash: token, fence, ver, value)
-- ARGV[1]  our token (128 random bits)
-- ARGV[2]  the TTL in milliseconds
-- ARGV[3]  "1" to bump the fencing counter (single instance), "0" not to (Redlock)
-- ARGV[4]  "1" to write the election record with value ARGV[5] and publish on ARGV[6]
-- ARGV[7]  the prefix of this lock's release markers (see release.lua)
--
-- Returns {1, fencing token (0 if not bumped)} when taken, or {0, PTTL of the holder's key}.
--
-- A key that already holds our token is ours: an earlier call with this token took it and
-- its reply was lost (the connection dropped), or its clean-up could not reach this server.
-- It is taken afresh, for the full TTL from now: tokens are unique to one acquisition, and
-- nobody else bumps the fencing counter while we hold the key, so the counter holds our
-- fencing token.
--
-- The PUBLISH is a wake-up only, and never fails the script: `redis.pcall`, because a user
-- without the channel in its ACL (Redis 7's default `acl-pubsub-default resetchannels`)
-- would otherwise abort it after its writes, which Redis does not roll back. Waiters that
-- miss the message find the change by their fallback poll.
local fence = 0
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  if ARGV[3] == '1' then
    fence = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
  end
elseif redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if ARGV[3] == '1' then
    fence = redis.call('INCR', KEYS[2])
  end
else
  return {0, redis.call('PTTL', KEYS[1])}
end
-- A release marker of our token (left when this lock() call let go of a take, or cleaned
-- up a failed attempt, with the same token) must not outlive into this hold: a later
-- release that finds the key lost would take it for its own earlier run, and say "freed".
redis.pcall('DEL', ARGV[7] .. ARGV[1])
if ARGV[4] == '1' then
  redis.call('DEL', KEYS[3])
  redis.call('HSET', KEYS[3], 'token', ARGV[1], 'fence', fence, 'ver', 1, 'value', ARGV[5])
  redis.call('PEXPIRE', KEYS[3], ARGV[2])
  redis.pcall('PUBLISH', ARGV[6], ARGV[1] .. ':1')
end
return {1, fence}
