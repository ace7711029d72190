-- wrk script: POST /v1/messages with an API key, the same request each time.
-- KEY: the API key; BODY: a file holding one JSON job (scripts/api-wrk makes both).
local file = assert(io.open(os.getenv("BODY"), "r"))
wrk.method = "POST"
wrk.body = file:read("*a")
file:close()
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("KEY")
