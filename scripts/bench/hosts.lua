-- wrk script for route.sh: cycles through 100 Hosts × the benchmark's files, so Host
-- hashing spreads the requests over every backend. Requests are built once per thread.
local n = tonumber(os.getenv("BENCH_FILES") or "1000")
local hosts = tonumber(os.getenv("BENCH_HOSTS") or "100")
local reqs = {}
local i = 0

function init(args)
  for k = 0, n - 1 do
    local h = string.format("site%d.example", k % hosts)
    reqs[k + 1] = wrk.format("GET", string.format("/static/f%04d.jpg", k), { Host = h })
  end
end

function request()
  i = i % n + 1
  return reqs[i]
end
