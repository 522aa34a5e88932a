"""asyncpg clients through pgcutover, run by tests/drivers.rs.

Workers insert through a statement they prepared once (reused for the whole run,
across pauses and a cutover) and run a query through asyncpg's statement cache
(Parse / Describe / Flush, then Bind / Execute / Sync); one more connection
prepares a statement and then waits, so that its session sits in a batch with no
Sync through every pause. Runs until a line arrives on stdin, then prints one JSON
object: the successes, every error with its SQLSTATE, the server port each
connection ended on, and what the waiting statement returned.
"""

import asyncio
import json
import sys

import asyncpg


async def worker(dsn, n, stop, out):
    conn = await asyncpg.connect(dsn)
    insert = await conn.prepare("INSERT INTO asyncpg_rows (worker, i) VALUES ($1, $2) RETURNING id")
    i = 0
    while not stop.is_set():
        i += 1
        try:
            await insert.fetchval(n, i)
            out["inserted"] += 1
            assert await conn.fetchval("SELECT $1::int + 1", i) == i + 1
            out["queries"] += 1
        except Exception as e:  # every error is a finding: report it
            out["errors"].append(f"{type(e).__name__} {getattr(e, 'sqlstate', '')}: {e}")
        await asyncio.sleep(0.002)
    out["ports"].append(await conn.fetchval("SELECT inet_server_port()"))
    await conn.close()


async def waiting(dsn, stop, out):
    conn = await asyncpg.connect(dsn)
    double = await conn.prepare("SELECT $1::int * 2")
    await stop.wait()
    out["waited"] = await double.fetchval(21)
    out["ports"].append(await conn.fetchval("SELECT inet_server_port()"))
    await conn.close()


async def main():
    dsn, workers = sys.argv[1], int(sys.argv[2])
    out = {"inserted": 0, "queries": 0, "errors": [], "ports": [], "waited": None}
    stop = asyncio.Event()
    tasks = [asyncio.create_task(worker(dsn, n, stop, out)) for n in range(workers)]
    tasks.append(asyncio.create_task(waiting(dsn, stop, out)))
    print("started", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    stop.set()
    for t in tasks:
        try:
            await t
        except Exception as e:
            out["errors"].append(f"{type(e).__name__} {getattr(e, 'sqlstate', '')}: {e}")
    print(json.dumps(out), flush=True)


asyncio.run(main())
