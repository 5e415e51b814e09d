"""The Lua scripts of the protocol. Each runs atomically inside Redis; each documents its KEYS and ARGV.

Every key a script touches is passed in KEYS, and all of them are keys of one shard, so in a Redis Cluster
each script runs on one slot. A key the script can only name once it has read a job (the result key of a
job it dead-letters) is declared up front by the caller, who reads the processing lists first.

No script fails halfway: Redis does not roll back a script that raises, so whatever could raise (cjson
on an element anyone may have pushed) runs under pcall, and an element it cannot handle is dead-lettered.
"""

from __future__ import annotations

# Acknowledges a finished batch: writes its dead letters, keeps the newest DEAD_LETTER_MAX, and
# deletes the batch's processing list. Does nothing when that list is gone, so it is idempotent: a
# replay after a lost reply, or a batch the reaper already took back from a worker it thought dead.
#   KEYS[1]  the batch's processing list
#   KEYS[2]  the dead-letter list
#   ARGV[1]  DEAD_LETTER_MAX
#   ARGV[2:] the batch's dead letters (JSON), if any
# Returns 1 when the batch was acknowledged, 0 when there was nothing to acknowledge.
ACK = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if #ARGV > 1 then
  redis.call('LPUSH', KEYS[2], unpack(ARGV, 2))
  redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[1]) - 1)
end
redis.call('DEL', KEYS[1])
return 1
"""

# The part shared by REAP and RELEASE: `release` moves a processing list back to the head of the
# queue list of each job's own priority level (its `priority`; `normal` when it names none it knows). A job
# out of attempts, too large, or unreadable goes to the dead letters instead (metadata and reason, never the
# image), and its client gets an error result when the job names it and the caller declared that result key
# (`answerable`, from KEYS).
# Both scripts take the same first seven ARGV:
#   ARGV[1] result key prefix   ARGV[2] MAX_ATTEMPTS    ARGV[3] RESULT_TTL   ARGV[4] seconds a result
#   outlives its job's deadline  ARGV[5] MAX_JOB_BYTES  ARGV[6] DEAD_LETTER_MAX  ARGV[7] now (Unix time)
_RELEASE = """
local result_prefix, max_attempts, result_ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local grace, max_bytes, dead_max, now = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local answerable = {}

-- KEYS[first..] are result keys the caller declared.
local function declare_results(first)
  for i = first, #KEYS do answerable[KEYS[i]] = true end
end

local function finite(v)
  return type(v) == 'number' and v == v and v ~= math.huge and v ~= -math.huge
end

-- The rules of job.py (ID_PATTERN, ORIGIN_PATTERN): an id or origin becomes part of a result key, so
-- one the web would not mint (a ':' or '*', bytes that are not text, any length) is never used in a key
-- nor kept in a dead letter. A codec is kept when it looks like a codec name (the Python side checks
-- it against image_codecs.CODECS).
local VALID_ID = '^' .. string.rep('[0-9a-f]', 32) .. '$'
local VALID_ORIGIN = '^' .. string.rep('[0-9a-f]', 12) .. '$'
local VALID_CODEC = '^[a-z0-9]+$'
local function valid(value, pattern)
  return type(value) == 'string' and string.match(value, pattern) ~= nil
end
local function valid_origin(origin)
  return origin == 'submitted' or valid(origin, VALID_ORIGIN)  -- keys.SUBMITTED
end

-- The queue lists of the three levels (priority.PRIORITIES), declared from KEYS[first] on in that order.
local function level_lists(first)
  return {high = KEYS[first], normal = KEYS[first + 1], low = KEYS[first + 2]}
end
local function level_of(job)
  if job.priority == 'high' or job.priority == 'low' then return job.priority end
  return 'normal'
end

local function metadata(raw, job)
  local meta = {bytes = #raw}
  if type(job) ~= 'table' then return meta end
  if valid(job.id, VALID_ID) then meta.id = job.id end
  if valid_origin(job.origin) then meta.origin = job.origin end
  if valid(job.codec, VALID_CODEC) and #job.codec <= 16 then meta.codec = job.codec end
  if job.priority == 'high' or job.priority == 'normal' or job.priority == 'low' then meta.priority = job.priority end
  for _, k in ipairs({'enqueued_at', 'deadline', 'attempts'}) do
    if finite(job[k]) then meta[k] = job[k] end
  end
  return meta
end

local function answer(job, reason)
  if type(job) ~= 'table' or not valid(job.id, VALID_ID) or not valid_origin(job.origin) then return end
  local ttl = result_ttl
  if finite(job.deadline) then ttl = math.max(1, math.min(result_ttl, math.floor(job.deadline - now) + grace)) end
  local key = result_prefix .. job.origin .. ':' .. job.id
  if not answerable[key] then return end  -- not declared: its client gets a 504 at its deadline instead
  local msg = cjson.encode({success = false, status = 500, error = 'job failed: ' .. reason})
  redis.call('SET', key, msg, 'EX', ttl)
end

local function read(raw)
  if #raw > max_bytes then
    return nil, 'job is ' .. #raw .. ' bytes; the limit is ' .. max_bytes .. ' (MAX_JOB_BYTES)'
  end
  local ok, job = pcall(cjson.decode, raw)
  if not ok or type(job) ~= 'table' or type(job.id) ~= 'string' then
    return nil, 'unreadable job in a released processing list'
  end
  if not valid(job.id, VALID_ID) then return job, 'job has a malformed id' end  -- no worker would take it
  return job, nil
end

-- Returns the job re-encoded for the queue, or nil and why it goes to the dead letters instead.
local function requeue(job, count_attempt, why)
  local attempts = tonumber(job.attempts) or 0
  if attempts ~= attempts then attempts = math.huge end
  if count_attempt == 1 then attempts = attempts + 1 end
  if attempts >= max_attempts then
    return nil, why .. '; delivered ' .. attempts .. ' times (MAX_ATTEMPTS=' .. max_attempts .. ')'
  end
  job.attempts = attempts
  local ok, encoded = pcall(cjson.encode, job)
  if ok then return encoded, nil end
  return nil, 'the job cannot be written back to the queue (' .. tostring(encoded) .. ')'
end

local function release(plist, queues, dead, worker, count_attempt, why)
  local requeued, dead_lettered = 0, 0
  for _, raw in ipairs(redis.call('LRANGE', plist, 0, -1)) do
    local job, reason = read(raw)
    local encoded
    if job and not reason then encoded, reason = requeue(job, count_attempt, why) end
    if encoded then
      redis.call('RPUSH', queues[level_of(job)], encoded)
      requeued = requeued + 1
    else
      redis.call('LPUSH', dead, cjson.encode({reason = reason, worker = worker, at = now, job = metadata(raw, job)}))
      answer(job, reason)
      dead_lettered = dead_lettered + 1
    end
  end
  if dead_lettered > 0 then redis.call('LTRIM', dead, 0, dead_max - 1) end
  redis.call('DEL', plist)
  return {requeued, dead_lettered}
end
"""

# Takes back the jobs of one worker whose heartbeat expired in this shard, counting an attempt, and forgets
# the worker there. Does nothing while its heartbeat lives (it came back since the caller looked).
# Idempotent: a replay finds nothing left to take.
#   KEYS[1]  the worker's heartbeat   KEYS[2]  the workers set
#   KEYS[3], KEYS[4], KEYS[5]  the queue lists of levels high, normal, low   KEYS[6]  the dead letters
#   KEYS[7 .. 6+ARGV[9]]  the worker's processing lists (one per batch slot)
#   KEYS[7+ARGV[9] ..]    result keys of the jobs in them, which the script may answer
#   ARGV[1..7] as for release (above)   ARGV[8]  the worker's id   ARGV[9]  batch slots per worker
# Returns {workers reaped (0 or 1), jobs requeued, jobs dead-lettered}.
REAP = (
    _RELEASE
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return {0, 0, 0} end
local slots = tonumber(ARGV[9])
declare_results(7 + slots)
local requeued, dead_lettered = 0, 0
for i = 7, 6 + slots do
  local r = release(KEYS[i], level_lists(3), KEYS[6], ARGV[8], 1, 'worker ' .. ARGV[8] .. ' stopped sending heartbeats')
  requeued, dead_lettered = requeued + r[1], dead_lettered + r[2]
end
redis.call('SREM', KEYS[2], ARGV[8])
return {1, requeued, dead_lettered}
"""
)

# Returns one processing list to the heads of its jobs' levels. Idempotent: a replay finds the list gone.
#   KEYS[1]  the processing list   KEYS[2], KEYS[3], KEYS[4]  the queue lists of levels high, normal, low
#   KEYS[5]  the dead-letter list   KEYS[6..]  result keys of the jobs in the list, which the script may answer
#   ARGV[1..7] as for release (above)
#   ARGV[8]  the worker's id (for the dead letters)
#   ARGV[9]  1 to count a delivery attempt (the batch failed), 0 not to (a clean shutdown)
#   ARGV[10] the reason, for jobs that run out of attempts
# Returns {jobs requeued, jobs dead-lettered}.
RELEASE = (
    _RELEASE
    + """
declare_results(6)
return release(KEYS[1], level_lists(2), KEYS[5], ARGV[8], tonumber(ARGV[9]), ARGV[10])
"""
)


# CANCEL: cancel a submitted job that no worker has taken yet, for its owner only.
#   KEYS[1]  the job's ticket ({q}:ticket:{id}: "queued N O" or "running N O", N its shard, O its owner,
#            and " M" after them for a job of a model M other than resnet50)
#   ARGV[1]  the caller's owner id
# Returns 1 when the job was queued (its ticket is now deleted, so the worker that claims it skips it),
# 0 when a worker already took it, -1 when there is no ticket (unknown, expired or cancelled before), it is
# another owner's (the caller learns nothing of other owners' jobs), or it is not in this format.
CANCEL = """
local ticket = redis.call('GET', KEYS[1])
if not ticket then return -1 end
local status, shard, owner = string.match(ticket, '^(%a+) (%d+) (%S+)$')
if not status then status, shard, owner = string.match(ticket, '^(%a+) (%d+) (%S+) [%w_-]+$') end
if owner ~= ARGV[1] or (status ~= 'queued' and status ~= 'running') then return -1 end
if status == 'running' then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""

# HOLD: count jobs against their owner's share of the queue (MAX_QUEUE_PER_KEY), all or none.
#   KEYS[1]  the owner's jobs ({q}:owner:{owner}, a sorted set of job ids scored by deadline)
#   ARGV[1]  now (Unix time): entries whose deadline passed are dropped first
#   ARGV[2]  the owner's limit   ARGV[3]  the jobs' deadline   ARGV[4..]  the jobs' ids
# Returns 1 when the jobs are now held, 0 (nothing changed but the expired entries) when they would take
# the owner past its limit. The set expires a little after its newest deadline.
HOLD = """
local now, limit, deadline = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) + #ARGV - 3 > limit then return 0 end
for i = 4, #ARGV do redis.call('ZADD', KEYS[1], deadline, ARGV[i]) end
local newest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')[2]
redis.call('EXPIREAT', KEYS[1], math.ceil(tonumber(newest)) + 1)
return 1
"""

# LEASE_RELEASE: give up a lease on a cached result ({q}:lease:{digest}), only if it is still the caller's: a
# lease that expired and was taken by another web request stays that one's.
#   KEYS[1]  the lease   ARGV[1]  the caller's token
# Returns 1 when the lease was deleted, 0 when it was not the caller's (or gone).
LEASE_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
