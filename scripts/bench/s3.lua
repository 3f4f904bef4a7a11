-- lighttpd mod_magnet rule for serve.sh, after the seed's /etc/lighttpd/s3.lua: stat the
-- physical path; if the file is not on disk, 302 to S3. Written against the lighty.r / lighty.c
-- API of lighttpd >= 1.4.60 (the seed's lighty.env / lighty.stat are its deprecated form).
-- The whole URL path goes into Location, as nginx's "return 302 ...$uri" does, instead of the
-- seed's one-segment match, so keys in sub-folders work too.
local r = lighty.r
if not lighty.c.stat(r.req_attr["physical.path"]) then
  r.resp_header["Location"] = "http://s3.example/bucket" .. r.req_attr["uri.path"]
  return 302
end
