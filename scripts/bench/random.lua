-- wrk script for cluster.sh's cold-metadata cases: every request picks one of the
-- benchmark's files at random (f0000.jpg .. f{BENCH_FILES-1}.jpg), so with a short
-- http.metadata_ttl most keys have expired between two requests for them and the metadata
-- lookup (shared catalog or S3 HEAD) is on the measured path. Requests are built once in
-- init(), as in paths.lua.
local n = tonumber(os.getenv("BENCH_FILES") or "5000")
local reqs = {}

function init(args)
  math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)") or "0", 16) % 100000)
  for k = 0, n - 1 do
    reqs[k + 1] = wrk.format("GET", string.format("/static/f%04d.jpg", k))
  end
end

function request()
  return reqs[math.random(n)]
end
