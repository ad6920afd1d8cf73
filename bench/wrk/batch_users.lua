-- POST /v1/batch: 100 track events like ../shared/bench/wrk/batch.lua, but each event's
-- anonymousId names one of USERS users (default 10000) instead of one for all, so per-user
-- ordering in delivery sees many users. Needs the shared segment.lua: SEGMENT_LUA_DIR, else
-- ../../../shared/bench/wrk/ from this file.
-- usage: wrk -t1 -c16 -d15s -s bench/wrk/batch_users.lua http://127.0.0.1:18080
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local shared = os.getenv("SEGMENT_LUA_DIR") or (here .. "../../../shared/bench/wrk/")
package.path = shared .. "?.lua;" .. package.path
local seg = require("segment")
seg.label, seg.events_per_request = "batch_users", seg.batch_size

local users = tonumber(os.getenv("USERS") or "10000")
local n = 0
local base = seg.track_event
-- The shared event with its one anonymousId swapped for the user's own.
function seg.track_event()
  n = n + 1
  local event = base()
  return (event:gsub('"anonymousId":"[^"]*"', '"anonymousId":"anon-' .. (n % users) .. '"', 1))
end

setup = seg.setup
done = seg.done
function init(args) seg.init_thread() end
function request() return seg.request("/v1/batch", seg.batch_body()) end
