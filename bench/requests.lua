-- wrk script: send pre-generated requests in file order, each one once while the file lasts.
--
--   [BENCH_RATE=N] wrk ... -s bench/requests.lua URL -- FILE [OFFSET]
--
-- FILE has one request per line: method, path, then "Name: value" headers, separated
-- by tabs. OFFSET (default 0) is the first line to send, so a measured run does not
-- repeat the requests of its warm-up. BENCH_RATE (requests per second per wrk thread)
-- puts each thread on a fixed schedule: each request takes the next slot, and delay()
-- waits until that slot. It is an environment variable because wrk decides whether the
-- script has a delay() before it passes the arguments, and a delay() that returns 0
-- still costs a timer per request. Without it, requests go as fast as the connections allow.
-- done() prints one line "BENCH_RESULT {json}" with the counts and latency percentiles,
-- and "restarts": how often the schedule fell a second behind and started again.

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clock_id, bench_timespec *tp);
]]
local CLOCK_MONOTONIC = 1
local now_spec = ffi.new("bench_timespec")

local function now_ms()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, now_spec)
  return tonumber(now_spec.tv_sec) * 1000 + tonumber(now_spec.tv_nsec) / 1e6
end

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

requests_list = {}
count = 0
position = 0
issued = 0
wraps = 0
restarts = 0
local rate = tonumber(os.getenv("BENCH_RATE") or "0") or 0
local interval_ms = 0
if rate > 0 then
  interval_ms = 1000 / rate
end
local next_slot = 0

function init(args)
  local file = args[1]
  local offset = tonumber(args[2] or "0")
  local handle = assert(io.open(file, "r"), "cannot open request file " .. tostring(file))
  for line in handle:lines() do
    local fields = {}
    for field in string.gmatch(line, "[^\t]+") do
      table.insert(fields, field)
    end
    local headers = {}
    for i = 3, #fields do
      local name, value = string.match(fields[i], "^([^:]+): (.*)$")
      headers[name] = value
    end
    count = count + 1
    requests_list[count] = wrk.format(fields[1], fields[2], headers)
  end
  handle:close()
  if count == 0 then
    error("request file " .. file .. " is empty")
  end
  position = offset % count
end

function request()
  position = position + 1
  if position > count then
    position = 1
    wraps = wraps + 1
  end
  issued = issued + 1
  return requests_list[position]
end

if rate > 0 then
  function delay()
    local now = now_ms()
    if next_slot == 0 then
      -- The first request starts the schedule.
      next_slot = now
    elseif next_slot < now - 1000 then
      -- More than a second behind (the server stalled): restart the schedule rather
      -- than send a burst to catch up.
      next_slot = now
      restarts = restarts + 1
    end
    next_slot = next_slot + interval_ms
    local wait = next_slot - now
    if wait < 1 then
      return 0
    end
    return math.floor(wait)
  end
end

function done(summary, latency, requests)
  local total_issued, total_wraps, total_restarts, file_count = 0, 0, 0, 0
  for _, thread in ipairs(threads) do
    total_issued = total_issued + thread:get("issued")
    total_wraps = total_wraps + thread:get("wraps")
    total_restarts = total_restarts + thread:get("restarts")
    file_count = thread:get("count")
  end
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,"errors_connect":%d,"errors_read":%d,' ..
    '"errors_write":%d,"errors_status":%d,"errors_timeout":%d,"issued":%d,"wraps":%d,"restarts":%d,"file_count":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.status, summary.errors.timeout, total_issued, total_wraps, total_restarts,
    file_count,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
