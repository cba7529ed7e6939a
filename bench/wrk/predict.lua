-- wrk script for fpn-serve: POSTs a random pre-built JSON body per request and prints one JSON
-- summary line (throughput, latency percentiles, errors) at the end.
--
--   wrk -t1 -c8 -d10s -s bench/wrk/predict.lua http://127.0.0.1:8000 -- BODIES_FILE PATH
--
-- BODIES_FILE holds one request body per line (bench/serve_load.py writes them);
-- PATH defaults to /v1/models/mnist-fpn/predict.

local bodies = {}
local path = "/v1/models/mnist-fpn/predict"
local headers = { ["Content-Type"] = "application/json" }
local counter = 0

function init(args)
  local file = args[1]
  if args[2] ~= nil then path = args[2] end
  for line in io.lines(file) do
    if #line > 0 then bodies[#bodies + 1] = line end
  end
  math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16) % 100000)
end

function request()
  counter = counter + 1
  return wrk.format("POST", path, headers, bodies[math.random(#bodies)])
end

function done(summary, latency, requests)
  local seconds = summary.duration / 1e6
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "seconds": %.3f, "rps": %.1f, "p50_ms": %.3f, "p90_ms": %.3f, '
      .. '"p95_ms": %.3f, "p99_ms": %.3f, "mean_ms": %.3f, "max_ms": %.3f, '
      .. '"non_2xx": %d, "socket_errors": %d}\n',
    summary.requests, seconds, summary.requests / seconds,
    latency:percentile(50) / 1e3, latency:percentile(90) / 1e3, latency:percentile(95) / 1e3,
    latency:percentile(99) / 1e3, latency.mean / 1e3, latency.max / 1e3,
    e.status, e.connect + e.read + e.write + e.timeout))
end
