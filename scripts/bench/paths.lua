-- wrk script for serve.sh: cycles through the benchmark's files in order (f0000.jpg,
-- f0001.jpg, ...), so every server answers the same set of keys, not one hot file.
-- The requests are built once per thread in init(), after wrk has set the Host header,
-- so wrk spends no time formatting during the run.
local n = tonumber(os.getenv("BENCH_FILES") or "1000")
local reqs = {}
local i = 0

function init(args)
  for k = 0, n - 1 do
    reqs[k + 1] = wrk.format("GET", string.format("/static/f%04d.jpg", k))
  end
end

function request()
  i = i % n + 1
  return reqs[i]
end
