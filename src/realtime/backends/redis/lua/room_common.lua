-- A room's stored state, shared by the append, read and rebase scripts.
-- The seq hash (`<base>:seq`) holds `epoch`; the history is the stream
-- `<base>:hist:<epoch>`, one entry per message, ID `0-<offset>`: the stream counts
-- the offsets itself (`XADD ... 0-*` gives the next one) and the epoch is in the key's
-- name, so a pod that names the epoch it saw appends with one command, and one that
-- names an epoch the room no longer has finds no such stream. The seq hash outlives
-- the stream by `SEQ_MARGIN` ms: a stream never exists without the hash that names it.
-- The hash also holds `o:<epoch>` = `streams`: not a number, so a pod of the previous
-- version (which increments that field) has its scripts refused on this room instead
-- of moving it away behind this layout's back. Rooms stored by earlier versions
-- (history `<base>:hist`, IDs `<offset>-0`, the newest offset in the hash as
-- `o:<epoch>` or `offset`) are converted when next touched: same epoch, same offsets,
-- same entries, same TTL.
local SEQ_MARGIN = tonumber('@SEQ_MARGIN@')
local LAYOUT = 'streams'

local function history_key(seq, epoch)
  -- `<base>:seq` -> `<base>:hist:<epoch>` (one hash tag: one slot)
  return string.sub(seq, 1, -4) .. 'hist:' .. epoch
end

local function name_epoch(seq, epoch)
  -- the room is in `epoch`, stored in this layout
  redis.call('HSET', seq, 'epoch', epoch, 'o:' .. epoch, LAYOUT)
end

local function newest_of(hist)
  -- the newest offset the stream gave (entries trimmed or not), nil if there is no stream
  if redis.call('EXISTS', hist) == 0 then
    return nil
  end
  local info = redis.call('XINFO', 'STREAM', hist)
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then
      return tonumber(string.sub(info[i + 1], 3))
    end
  end
  return 0
end

local function empty_stream(hist, newest)
  -- a stream with no entries whose next offset is `newest + 1`
  redis.call('XADD', hist, '0-' .. newest, 'b', '')
  redis.call('XDEL', hist, '0-' .. newest)
end

local function convert(seq, epoch)
  -- a room stored by an earlier version: the same room in this layout
  local newest = redis.call('HGET', seq, 'o:' .. epoch)
  if newest == LAYOUT then
    return
  end
  newest = newest or redis.call('HGET', seq, 'offset')
  if not newest then
    return
  end
  local old = string.sub(seq, 1, -4) .. 'hist'
  local hist = history_key(seq, epoch)
  local ttl = redis.call('PTTL', seq)
  redis.call('DEL', hist)
  local top = 0
  for _, entry in ipairs(redis.call('XRANGE', old, '-', '+')) do
    top = tonumber(string.match(entry[1], '^(%d+)'))
    redis.call('XADD', hist, '0-' .. top, 'b', entry[2][2])
  end
  if tonumber(newest) > top then
    if top == 0 then
      empty_stream(hist, newest)
    else
      redis.call('XSETID', hist, '0-' .. newest)
    end
  end
  redis.call('DEL', old)
  redis.call('HDEL', seq, 'offset', 'refreshed')
  name_epoch(seq, epoch)
  if ttl > 0 then
    redis.call('PEXPIRE', seq, ttl + SEQ_MARGIN)
    redis.call('PEXPIRE', hist, ttl)
  end
end
