-- Read who holds a lock, and the election record if the holder wrote one.
--
-- KEYS[1]  the lock key
-- KEYS[2]  the election record
--
-- Returns {} if the lock is free; {token} if it is held without a record of the holder
-- (a plain lock, or another client); else {token, fence, ver, value}.
local t = redis.call('GET', KEYS[1])
if not t then
  return {}
end
local r = redis.call('HMGET', KEYS[2], 'token', 'fence', 'ver', 'value')
if r[1] ~= t then
  return {t}
end
return {t, r[2], r[3], r[4]}
