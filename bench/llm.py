"""``df.modal.llm`` against a hand-written ``ThreadPoolExecutor`` loop, on a local OpenAI-compatible server.

5,000 rows, 256 requests in flight, and a server (``tests/openai_server``, in processes of its own
so it doesn't share the client's interpreter) that answers every request after 50 ms. The ideal is
``ceil(5000 / 256) x 50 ms = 1.00 s``; the target is modal_magic within 15% of it. Beside it:

- modal_magic again with ``processes=`` the core count (at least 2): the requests sent from that many
  worker processes, each with its own client;
- ``ThreadPoolExecutor(256)`` over the sync ``openai.OpenAI`` client, as a user would write it;
- ``asyncio.gather`` over ``openai.AsyncOpenAI`` with a semaphore of 256, the hand-written async way,
  with the client's default transport and again with its aiohttp transport (which modal_magic uses);
- the lightest call through the openai client (``client.post`` to a dict, aiohttp transport) in a bare
  ``asyncio.gather``: how modal_magic sends its requests, with no engine around it. Its CPU time per
  request, times the rows, over the cores, is a lower bound for every run through the client;
- raw ``aiohttp`` with no OpenAI client and no engine: what this machine's Python can do at all
  (the floor; when it is far from the ideal, the machine, not the library, sets the pace).

Every client talks to the same server, sends the same prompts with ``max_tokens=10``, and keeps
its own retries off. modal_magic runs with ``progress=False`` and ``cache=False``. Each cell is the
best of ``--reps`` timed calls after one untimed warm-up call on 500 rows; cells run in interleaved
rounds. The client's CPU seconds (its worker processes' included) are printed too: past a thousand
or so requests a second, one Python process's CPU, not the latency, is the limit. Exit code 0 whatever the target says (this is a report)::

    .venv/bin/python bench/llm.py                  # best of 3, two to three minutes on 2 cores
    .venv/bin/python bench/llm.py --reps 1 --rows 2000
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
KEY = "sk-bench-not-a-real-key"
MODEL = "gpt-4o-mini"
PROMPT = "Classify this review as POSITIVE, NEGATIVE or NEUTRAL: {text}"
LIMIT = 1.15  # x ideal
WARMUP_ROWS = 500

sys.path.insert(0, str(ROOT))


# --- the server ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_servers(processes: int, latency_s: float) -> tuple[list[subprocess.Popen], str]:
    """``processes`` server processes sharing one port (SO_REUSEPORT); return them and the base URL."""
    port = free_port()
    argv = [sys.executable, "-m", "tests.openai_server", "--port", str(port), "--latency", str(latency_s),
            "--no-record", "--reuse-port"]
    procs = [subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    urls = {p.stdout.readline().strip() for p in procs}  # type: ignore[union-attr]
    if len(urls) != 1 or not next(iter(urls)).startswith("http://127.0.0.1:"):
        stop_servers(procs)
        raise SystemExit(f"the test server didn't start: {urls}")
    return procs, urls.pop()


def stop_servers(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()


# --- the contenders -------------------------------------------------------------------------------------


PROCESSES = max(2, CORES)


def modal_magic_llm(texts: list[str], url: str, concurrency: int, processes: int = 1) -> list[str]:
    import pandas as pd

    import modal_magic  # noqa: F401  (registers df.modal)

    out = pd.DataFrame({"text": texts}).modal.llm(
        PROMPT, into="label", model=MODEL, max_tokens=10, base_url=url, api_key=KEY, max_retries=0,
        max_containers=concurrency, processes=processes, progress=False, cache=False)
    errors = out["label_error"].dropna()
    if len(errors):
        raise RuntimeError(f"{len(errors)} rows failed, e.g. {errors.iloc[0]}")
    return out["label"].tolist()


def modal_magic_llm_processes(texts: list[str], url: str, concurrency: int) -> list[str]:
    return modal_magic_llm(texts, url, concurrency, processes=PROCESSES)


def thread_pool(texts: list[str], url: str, concurrency: int) -> list[str]:
    import openai

    client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)

    def classify(text: str) -> str:
        response = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": PROMPT.format(text=text)}], max_tokens=10)
        return response.choices[0].message.content.strip()

    try:
        with ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(classify, texts))
    finally:
        client.close()


def _gather_over_async_client(texts: list[str], url: str, concurrency: int, *, aiohttp_transport: bool,
                              lightest: bool) -> list[str]:
    """``asyncio.gather`` over one ``openai.AsyncOpenAI``, ``concurrency`` requests at a time.

    ``lightest`` sends each request with ``client.post`` to a plain dict (no typed request or
    response models), as modal_magic does, instead of ``client.chat.completions.create``.
    """
    import openai

    async def main() -> list[str]:
        http_client = openai.DefaultAioHttpClient() if aiohttp_transport else None
        client = openai.AsyncOpenAI(base_url=url, api_key=KEY, max_retries=0, http_client=http_client)
        limit = asyncio.Semaphore(concurrency)

        async def classify(text: str) -> str:
            messages = [{"role": "user", "content": PROMPT.format(text=text)}]
            async with limit:
                if lightest:
                    body = {"model": MODEL, "max_tokens": 10, "messages": messages}
                    data = await client.post("/chat/completions", cast_to=object, body=body)
                    return data["choices"][0]["message"]["content"].strip()
                response = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10)
                return response.choices[0].message.content.strip()

        try:
            return await asyncio.gather(*(classify(t) for t in texts))
        finally:
            await client.close()

    return asyncio.run(main())


def asyncio_gather(texts: list[str], url: str, concurrency: int) -> list[str]:
    return _gather_over_async_client(texts, url, concurrency, aiohttp_transport=False, lightest=False)


def asyncio_gather_aiohttp(texts: list[str], url: str, concurrency: int) -> list[str]:
    return _gather_over_async_client(texts, url, concurrency, aiohttp_transport=True, lightest=False)


def lightest_client_call(texts: list[str], url: str, concurrency: int) -> list[str]:
    """The least work a request through the openai client can be: ``client.post`` to a plain dict,
    aiohttp transport, no engine around it. modal_magic sends its requests this way."""
    return _gather_over_async_client(texts, url, concurrency, aiohttp_transport=True, lightest=True)


def raw_aiohttp(texts: list[str], url: str, concurrency: int) -> list[str]:
    import json

    import aiohttp

    async def main() -> list[str]:
        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        limit = asyncio.Semaphore(concurrency)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
            async def classify(text: str) -> str:
                body = json.dumps({"model": MODEL, "max_tokens": 10,
                                   "messages": [{"role": "user", "content": PROMPT.format(text=text)}]})
                async with limit, session.post(f"{url}/chat/completions", data=body, headers=headers) as r:
                    return (await r.json())["choices"][0]["message"]["content"].strip()

            return await asyncio.gather(*(classify(t) for t in texts))

    return asyncio.run(main())


CONTENDERS: dict[str, Callable[[list[str], str, int], list[str]]] = {
    "modal_magic df.modal.llm": modal_magic_llm,
    f"  same, processes={PROCESSES}": modal_magic_llm_processes,
    "ThreadPoolExecutor + OpenAI": thread_pool,
    "asyncio.gather + AsyncOpenAI": asyncio_gather,
    "  same, aiohttp transport": asyncio_gather_aiohttp,
    "openai client, lightest call": lightest_client_call,
    "raw aiohttp, no client (floor)": raw_aiohttp,
}


# --- measuring ----------------------------------------------------------------------------------------


def _worker_cpu(servers: set[int]) -> dict[int, float]:
    """CPU seconds so far of this process's children that aren't the server (modal_magic's workers)."""
    import psutil

    out = {}
    for child in psutil.Process().children(recursive=True):
        if child.pid not in servers:
            try:
                times = child.cpu_times()
            except psutil.NoSuchProcess:
                continue
            out[child.pid] = times.user + times.system
    return out


def measure(fn: Callable[[list[str], str, int], list[str]], texts: list[str], url: str,
            concurrency: int, servers: set[int]) -> tuple[float, float, list[str]]:
    """Wall seconds, client CPU seconds (this process and any worker processes it used), answers."""
    before = _worker_cpu(servers)
    cpu, wall = time.process_time(), time.perf_counter()
    labels = fn(texts, url, concurrency)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    after = _worker_cpu(servers)
    return wall, cpu + sum(t - before.get(pid, 0.0) for pid, t in after.items()), labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds the server waits per request")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--server-procs", type=int, default=max(1, min(4, CORES // 4)),
                        help="server processes sharing the port (default: a quarter of the cores, 1 to 4)")
    args = parser.parse_args(argv)

    texts = [f"review {i}: {('great value, works well' if i % 3 == 0 else 'broke after a week' if i % 3 == 1 else 'it is a lamp')}"
             for i in range(args.rows)]
    ideal = math.ceil(args.rows / args.concurrency) * args.latency
    procs, url = start_servers(args.server_procs, args.latency)
    servers = {p.pid for p in procs}
    best: dict[str, list[tuple[float, float]]] = {name: [] for name in CONTENDERS}
    failures: dict[str, str] = {}
    try:
        for name, fn in CONTENDERS.items():  # warm-up: imports, connection pools, the engine's first run
            try:
                fn(texts[:WARMUP_ROWS], url, args.concurrency)
            except Exception as e:  # a broken contender is reported, the table goes on
                failures[name] = f"{type(e).__name__}: {e}"
        expected = None
        for rep in range(args.reps):
            names = list(CONTENDERS) if rep % 2 == 0 else list(reversed(CONTENDERS))
            for name in names:
                if name in failures:
                    continue
                try:
                    wall, cpu, labels = measure(CONTENDERS[name], texts, url, args.concurrency, servers)
                except Exception as e:
                    failures[name] = f"{type(e).__name__}: {e}"
                    continue
                expected = expected or labels
                if labels != expected:
                    failures[name] = "different answers from the other contenders"
                    continue
                best[name].append((wall, cpu))
    finally:
        stop_servers(procs)

    print(f"LLM map: {args.rows:,} rows, {args.concurrency} requests in flight, server latency "
          f"{args.latency * 1000:.0f} ms, {args.server_procs} server process(es)")
    print(f"machine: {CORES} cores, Python {platform.python_version()}, openai {metadata.version('openai')}, "
          f"aiohttp {metadata.version('aiohttp')}; best of {args.reps}")
    print(f"ideal: ceil({args.rows}/{args.concurrency}) x {args.latency * 1000:.0f} ms = {ideal:.2f} s\n")
    header = f"{'':32} {'seconds':>8} {'x ideal':>8} {'rows/s':>8} {'client CPU s':>13} {'spread':>7}"
    print(header)
    print("-" * len(header))
    for name, runs in best.items():
        if name in failures or not runs:
            print(f"{name:32} ERROR {failures.get(name, 'no run')}")
            continue
        wall, cpu = min(runs)
        spread = (max(r[0] for r in runs) / wall - 1) if len(runs) > 1 else 0.0
        print(f"{name:32} {wall:8.2f} {wall / ideal:8.2f} {args.rows / wall:8,.0f} {cpu:13.2f} {spread:6.0%}")
    print()
    ours = best["modal_magic df.modal.llm"]
    spread = best[f"  same, processes={PROCESSES}"]
    if ours:
        ratio = min(ours)[0] / ideal
        verdict = "PASS" if ratio <= LIMIT else "FAIL"
        print(f"{verdict}: modal_magic {ratio:.2f}x ideal (target <= {LIMIT:.2f}x)")
        if spread:
            ratio = min(spread)[0] / ideal
            verdict = "PASS" if ratio <= LIMIT else "FAIL"
            print(f"{verdict}: modal_magic with processes={PROCESSES}: {ratio:.2f}x ideal (target <= {LIMIT:.2f}x)")
        floor = best["raw aiohttp, no client (floor)"]
        if floor:
            print(f"      floor on this machine (raw aiohttp, no client library): {min(floor)[0] / ideal:.2f}x ideal")
        client = best["openai client, lightest call"]
        if client:
            # The openai client's own CPU per request (measured just above, with no engine around it)
            # bounds any run that sends every request through it, whatever the engine does.
            per_request = min(client)[1] / args.rows
            bound = per_request * args.rows / CORES
            print(f"      the openai client's lightest call costs {per_request * 1000:.2f} ms of CPU per request here: "
                  f"{args.rows:,} requests need {per_request * args.rows:.2f} CPU-s,\n"
                  f"      at least {bound:.2f} s = {bound / ideal:.2f}x ideal on {CORES} cores even with a free "
                  f"server and a free engine")
            print(f"      modal_magic takes {min(ours)[0] / min(client)[0]:.2f}x as long as that call alone in a bare asyncio.gather")
        threads = best["ThreadPoolExecutor + OpenAI"]
        if threads:
            print(f"      vs ThreadPoolExecutor(256) over the sync client: {min(threads)[0] / min(ours)[0]:.1f}x faster")
    if statistics and failures:
        for name, why in failures.items():
            print(f"ERROR {name}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
