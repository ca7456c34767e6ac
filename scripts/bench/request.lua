-- wrk script of scripts/bench.sh: POST the same body on every request, with a new idempotency
-- key each time on Signet routes, so every request is a new exchange on a new trace (requests of
-- one trace would serialize on its chain head).
--   wrk ... -s request.lua <url> -- <body file> <plain|signet>

local counter = 0
local next_thread_index = 0

function setup(thread)
    thread:set("thread_index", next_thread_index)
    next_thread_index = next_thread_index + 1
end

function init(args)
    local file = assert(io.open(args[1], "rb"))
    wrk.body = file:read("*a")
    file:close()
    wrk.method = "POST"
    wrk.headers["Content-Type"] = "application/json"
    signet = args[2] == "signet"
    if signet then
        wrk.headers["X-SIGNET-API-Key"] = "demo-key"
    end
    run_id = string.format("%d-%d", os.time(), math.random(1, 1e9))
end

function request()
    if not signet then
        return wrk.format()
    end
    counter = counter + 1
    local headers = {}
    for name, value in pairs(wrk.headers) do
        headers[name] = value
    end
    headers["X-SIGNET-Idempotency-Key"] = string.format("bench-%s-%d-%d", run_id, thread_index, counter)
    return wrk.format(nil, nil, headers)
end
