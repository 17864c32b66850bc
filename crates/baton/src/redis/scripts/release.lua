-- Release a lock: compare-and-delete, never a plain DEL, so a holder whose lock expired cannot
-- delete the lock of the next holder. Wakes waiters with a PUBLISH.
--
-- KEYS[1]  the lock key
-- KEYS[2]  the election record (deleted only if it carries our token)
-- ARGV[1]  our token
-- ARGV[2]  the wake-up channel
--
-- Returns 1 if the lock was ours and is now deleted, else 0 (nothing changed).
--
-- The PUBLISH is a wake-up only, and never fails the script: `redis.pcall`, because a user
-- without the channel in its ACL (Redis 7's default `acl-pubsub-default resetchannels`)
-- would otherwise abort it after its writes, which Redis does not roll back. Waiters that
-- miss the message find the change by their fallback poll.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
if redis.call('HGET', KEYS[2], 'token') == ARGV[1] then
  redis.call('DEL', KEYS[2])
end
redis.pcall('PUBLISH', ARGV[2], ARGV[1] .. ':0')
return 1
