"""The load client of the HTTP benchmarks: ``wrk`` (C, event loop) with a generated Lua script.

A Python client would be CPU-bound on a 2-core machine long before the servers are; wrk
drives 64 keep-alive connections from 2 threads at a few percent of a core. The script
cycles through a list of prepared POST requests (path + JSON body, same headers), each
wrk thread starting at a different place, and prints its summary as one JSON line.

Install: ``apt-get install wrk`` (Debian/Ubuntu package ``wrk``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

MARK = "WRKJSON "
#: wrk gives up on a call after this long (and counts it as a timeout error).
TIMEOUT_SECONDS = 10

LUA = r"""
local headers = %(headers)s
local requests = {}
local n = 0
local i = 0
local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("index", threads)
end

function init(args)
  for line in io.lines(%(requests)s) do
    local path, body = line:match("^([^\t]*)\t(.*)$")
    n = n + 1
    requests[n] = wrk.format("POST", path, headers, body)
  end
  i = ((index or 1) * 7919) %% n
end

function request()
  i = i %% n + 1
  return requests[i]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "%(mark)s{\"requests\": %%d, \"duration_us\": %%d, \"non2xx\": %%d, \"connect\": %%d, \"read\": %%d, " ..
    "\"write\": %%d, \"timeout\": %%d, \"p50_us\": %%d, \"p99_us\": %%d, \"max_us\": %%d}\n",
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


@dataclasses.dataclass
class Result:
    """One wrk run: completed requests and latency percentiles (wrk's, over every response)."""

    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p99_ms: float

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds


def available() -> bool:
    return shutil.which("wrk") is not None


def _lua_table(headers: Mapping[str, str]) -> str:
    return "{" + ", ".join(f"[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()) + "}"


def write_script(folder: Path, name: str, headers: Mapping[str, str], requests: Sequence[tuple[str, str]]) -> Path:
    """A Lua script sending ``requests`` ((path, JSON body) pairs) round-robin with ``headers``."""
    requests_file = folder / f"{name}.requests"
    requests_file.write_text("".join(f"{path}\t{body}\n" for path, body in requests))
    script = folder / f"{name}.lua"
    script.write_text(LUA % {"headers": _lua_table(headers), "requests": json.dumps(str(requests_file)), "mark": MARK})
    return script


def run(url: str, script: Path, *, seconds: float, connections: int, threads: int = 2) -> Result:
    """Drive ``url`` with the script for ``seconds``; raises if wrk fails."""
    completed = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", f"{TIMEOUT_SECONDS}s",
         "-s", str(script), url],
        capture_output=True, text=True, timeout=seconds + 120,
    )
    line = next((line for line in completed.stdout.splitlines() if line.startswith(MARK)), None)
    if completed.returncode != 0 or line is None:
        raise RuntimeError(f"wrk exited {completed.returncode}: {completed.stderr.strip()}\n{completed.stdout[-2000:]}")
    data = json.loads(line[len(MARK):])
    errors = data["non2xx"] + data["connect"] + data["read"] + data["write"] + data["timeout"]
    p50_ms, p99_ms = data["p50_us"] / 1000, data["p99_us"] / 1000
    # wrk keeps no latency for a call it timed out: when those are over 1 % of the calls,
    # the p99 is at least the timeout (and the p50 too if they are half).
    timed_out = data["timeout"] / max(1, data["requests"] + data["timeout"])
    if timed_out > 0.01:
        p99_ms = max(p99_ms, TIMEOUT_SECONDS * 1000)
    if timed_out >= 0.5:
        p50_ms = max(p50_ms, TIMEOUT_SECONDS * 1000)
    return Result(requests=data["requests"], seconds=data["duration_us"] / 1e6, errors=errors,
                  p50_ms=p50_ms, p99_ms=p99_ms)
