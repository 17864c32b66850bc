-- Release a lock: compare-and-delete, never a plain DEL, so a holder whose lock expired cannot
-- delete the lock of the next holder. Wakes waiters with a PUBLISH.
--
-- KEYS[1]  the lock key
-- KEYS[2]  the election record (deleted only if it carries our token)
-- ARGV[1]  our token
-- ARGV[2]  the wake-up channel
-- ARGV[3]  the prefix of this lock's release markers (the marker is ARGV[3] .. ARGV[1])
-- ARGV[4]  the marker's lifetime in ms (twice the client's request timeout)
--
-- Returns 1 if the lock was ours and is now deleted, or if a release with our token already
-- deleted it (its marker is there); else 0 (nothing changed).
--
-- The marker tells a release whose reply was lost, sent again on a new connection (the
-- client cannot tell a reply lost from a request never sent), that its first run did the
-- work: without it, the second run's "not ours" could be either that or a lock lost (the
-- key expired, or the server restarted empty, and another client may hold it). It is set
-- and read with `redis.pcall`, and built from ARGV rather than declared in KEYS, so that a
-- user whose ACL does not grant `baton:released:*` (written before the marker existed)
-- still releases, and still learns of a loss: only a lost reply is then reported as one.
--
-- The PUBLISH is a wake-up only, and never fails the script: `redis.pcall`, because a user
-- without the channel in its ACL (Redis 7's default `acl-pubsub-default resetchannels`)
-- would otherwise abort it after its writes, which Redis does not roll back. Waiters that
-- miss the message find the change by their fallback poll.
local marker = ARGV[3] .. ARGV[1]
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  if redis.pcall('EXISTS', marker) == 1 then
    return 1
  end
  return 0
end
redis.call('DEL', KEYS[1])
if redis.call('HGET', KEYS[2], 'token') == ARGV[1] then
  redis.call('DEL', KEYS[2])
end
redis.pcall('SET', marker, '1', 'PX', ARGV[4])
redis.pcall('PUBLISH', ARGV[2], ARGV[1] .. ':0')
return 1
