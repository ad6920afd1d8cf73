-- POST /v1/batch: 100 track events like ../shared/bench/wrk/batch.lua, each connection
-- pausing PAUSE_MS (default 128) after each answer, so that C connections offer about
-- C * 100 * 1000 / PAUSE_MS events/s: a steady ingest rate, not as fast as the server
-- answers. Needs the shared segment.lua: SEGMENT_LUA_DIR, else ../../../shared/bench/wrk/
-- from this file.
-- usage: PAUSE_MS=128 wrk -t1 -c64 -d30s -s bench/wrk/batch_paced.lua http://127.0.0.1:18080
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local shared = os.getenv("SEGMENT_LUA_DIR") or (here .. "../../../shared/bench/wrk/")
package.path = shared .. "?.lua;" .. package.path
local seg = require("segment")
seg.label, seg.events_per_request = "batch_paced", seg.batch_size

local pause = tonumber(os.getenv("PAUSE_MS") or "128")

setup = seg.setup
done = seg.done
function init(args) seg.init_thread() end
function request() return seg.request("/v1/batch", seg.batch_body()) end
function delay() return pause end
