"""The HTTP bridge benchmark's fallback client (where ``ab`` is missing): ``-c`` concurrent POSTs, ``-n`` in all.

Like ``ab`` without keep-alive: every request opens its own connection, sends the body with
``Connection: close`` and reads the answer to the end. A request fails on a connection error, a timeout
or a status other than 200. Bounded by count and by ``--max-seconds``. Writes ``--report`` (JSON):
``{"latencies_ms", "failures", "non_2xx", "seconds", "complete"}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


async def _one(host: str, port: int, request: bytes, timeout: float) -> int:
    """One request on its own connection; its HTTP status."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    status_line = data.split(b"\r\n", 1)[0].split()
    return int(status_line[1]) if len(status_line) > 1 else 0


async def _run(url: str, body: bytes, total: int, concurrency: int, timeout: float, max_seconds: float
               ) -> dict[str, Any]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = (f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    latencies: list[float] = []
    counts = {"failures": 0, "non_2xx": 0, "started": 0}
    deadline = time.monotonic() + max_seconds

    async def worker() -> None:
        while counts["started"] < total and time.monotonic() < deadline:
            counts["started"] += 1
            t = time.perf_counter()
            try:
                status = await _one(host, port, request, timeout)
            except (TimeoutError, OSError, ValueError, IndexError):
                counts["failures"] += 1
                continue
            if status != 200:
                counts["non_2xx"] += 1
                counts["failures"] += 1
                continue
            latencies.append((time.perf_counter() - t) * 1000)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - t0
    return {"latencies_ms": latencies, "failures": counts["failures"], "non_2xx": counts["non_2xx"],
            "seconds": seconds, "complete": counts["started"]}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python -m bench._httpclient --url U --body B -n N -c C --report R``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--body", required=True, help="file holding the request body (JSON)")
    parser.add_argument("-n", type=int, required=True, help="requests in all")
    parser.add_argument("-c", type=int, required=True, help="requests at once")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    parser.add_argument("--max-seconds", type=float, default=120.0)
    parser.add_argument("--report", required=True)
    args = parser.parse_args(argv)
    body = Path(args.body).read_bytes()
    report = asyncio.run(_run(args.url, body, args.n, args.c, args.timeout, args.max_seconds))
    Path(args.report).write_text(json.dumps(report), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
