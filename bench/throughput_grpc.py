"""The cloud throughput benchmark's gRPC level: a real tier server in a child process, and its
clients, each in a process of its own as devices are (bench/cloud_throughput.py, part 2).

A client opens its own channel and session, catches up a prompt in one request, then runs rounds
of single-row decode requests, the next sent after the answer (a device in exit mode): on the
session's `ContinueStream`, or with `streaming=False` one `Continue` call each. All clients
start each round together (a barrier across the processes); a round's tokens/s is every client's
calls over the round's wall time, from the first client's start to the last one's end, timed with
`time.perf_counter` (CLOCK_MONOTONIC on Linux: one clock for every process of the machine).
`clients_in="threads"` runs the clients as threads of this process instead, sharing its GIL: the
way this benchmark measured before, kept to show what that costs.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from common import REPO
from throughput_engine import context, latency_summary

READY = "cloud_throughput server listening on "
FRONT_END_ALONE = "front end alone"  # the server kind over NoEngine
A_CALL_EACH = "a call each"  # clients send a Continue call per request, not a stream
SCRIPT = REPO / "bench" / "cloud_throughput.py"  # runs serve_child with --serve-spec


def serve_child(spec_json: str) -> None:
    """Run as the server process: a ServerThread until the parent closes our stdin."""
    spec = json.loads(spec_json)  # on the cores of the parent (--cores split: the server's)
    import torch

    torch.set_num_threads(spec["threads"])
    from cloud.engine import EngineLimits
    from cloud.server import ServerConfig
    from cloud.service import ServerThread, TierSpec
    from flow.family import Family

    family_dir = Path(spec["family_dir"])
    limits = EngineLimits(max_sessions=spec["max_sessions"], max_rows_per_request=spec["max_rows"],
                          max_batch_rows=spec["max_batch_rows"], max_context=spec["max_context"])
    server = ServerThread(TierSpec(family_dir, 0, limits, ServerConfig(port=0), workers=spec["workers"]),
                          Family.load(family_dir), engine=NoEngine() if spec["no_engine"] else None)
    address = server.start()
    print(READY + address, flush=True)
    sys.stdin.read()  # until the parent is done with us
    server.stop()


class NoEngine:
    """An engine client without a model: every continue is answered at once with token 0. Behind
    the real front end (gRPC, the request guard, decoding the rows, metrics, the event loop) it
    measures what the front end alone can serve on this machine, the ceiling for any engine
    behind it. A measurement baseline of this benchmark, never served."""

    def __init__(self):
        self._sessions = itertools.count()

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def open_session(self, owner: str, from_exit: int) -> tuple[str, int]:
        return f"session-{next(self._sessions)}", 0

    async def continue_(self, session_id, owner, start, rows, return_all, top_k, rollback):
        from flow.tier import Answer

        return Answer([0] * (len(rows) if return_all else 1), start + len(rows))

    async def close(self, session_id: str, owner: str) -> None:
        pass

    async def stats(self) -> dict:
        return {}


@contextlib.contextmanager
def server_process(family_dir: Path, args, workers: int, max_batch_rows: int, max_sessions: int,
                   no_engine: bool = False):
    """A tier server in a child process (its front end over `NoEngine` with `no_engine`); yields
    (its address, its pid)."""
    spec = dict(family_dir=str(family_dir), threads=args.threads, workers=workers,
                max_sessions=max_sessions, max_rows=max(args.prompt, args.gen_prompt),
                max_batch_rows=max_batch_rows, max_context=context(args), no_engine=no_engine)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if workers:  # the workers inherit it: threads / workers torch threads each, not threads each
        env["OMP_NUM_THREADS"] = str(max(1, args.threads // workers))
    child = subprocess.Popen([sys.executable, str(SCRIPT), "--serve-spec", json.dumps(spec)],
                             cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        address = None
        for line in child.stdout:
            if line.startswith(READY):
                address = line[len(READY):].strip()
                break
        if address is None:
            raise RuntimeError(f"the server process exited ({child.wait()}) before listening")
        yield address, child.pid
    finally:
        child.stdin.close()
        try:
            child.wait(60)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def run_client(address: str, family_hash: str, rows: np.ndarray, prompt: int, steps: int,
               rounds: int, barrier, streaming: bool = True) -> dict:
    """One client: catch up, then `rounds` rounds of `steps` decode calls (round 0 warms up).
    Its spans (monotonic seconds), each timed call's latency, and the last round's tokens."""
    from flow.tier_client import GrpcTier

    tier = GrpcTier(address, timeout=600.0, streaming=streaming)
    try:
        session = tier.open(family_hash, 0)
        barrier.wait(600)
        started = time.perf_counter()
        session.continue_(0, rows[:prompt])
        mine = {"catch_up": (started, time.perf_counter()), "spans": [], "latencies": [],
                "tokens": []}
        cpu = 0.0  # this client's CPU seconds in its timed rounds
        for r in range(rounds):
            barrier.wait(600)
            began, cpu_began = time.perf_counter(), time.process_time()
            for n in range(steps):
                sent = time.perf_counter()
                answer = session.continue_(prompt + n, rows[prompt + n:prompt + n + 1],
                                           rollback=n == 0)
                if r:
                    mine["latencies"].append(time.perf_counter() - sent)
                if r == rounds - 1:
                    mine["tokens"] += answer.tokens
            mine["spans"].append((began, time.perf_counter()))
            if r:
                cpu += time.process_time() - cpu_began
        mine["cpu_s"] = cpu
        # Nobody closes or exits before every client is done: a process tearing down takes CPU
        # from the clients still timing their last round.
        barrier.wait(600)
        session.close()
        return mine
    except BaseException:
        barrier.abort()  # the other clients stop waiting for this one
        raise
    finally:
        tier.close()


def _client_process(index: int, address: str, family_hash: str, rows_file: str, prompt: int,
                    steps: int, rounds: int, barrier, results, cpus: list[int] | None,
                    streaming: bool) -> None:
    """A client process (on `cpus`, when given): its result (or its traceback) goes to `results`."""
    try:
        if cpus:
            os.sched_setaffinity(0, cpus)
        rows = np.load(rows_file, mmap_mode="r")[index]
        results.put((index, run_client(address, family_hash, np.ascontiguousarray(rows), prompt,
                                       steps, rounds, barrier, streaming), None))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        results.put((index, None, traceback.format_exc()))


def _in_processes(address: str, family_hash: str, rows: np.ndarray, clients: int, args,
                  rounds: int, streaming: bool) -> list[dict]:
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter each, as a device has
    barrier, results = spawn.Barrier(clients), spawn.Queue()
    with tempfile.TemporaryDirectory(prefix="throughput-rows-") as temp:
        rows_file = str(Path(temp) / "rows.npy")
        np.save(rows_file, rows[:clients])
        processes = [spawn.Process(target=_client_process, daemon=True,
                                   args=(i, address, family_hash, rows_file, args.prompt,
                                         args.grpc_steps, rounds, barrier, results,
                                         args.client_cpus, streaming))
                     for i in range(clients)]
        for process in processes:
            process.start()
        try:
            outcomes = {i: (mine, error) for i, mine, error in
                        (results.get(timeout=900) for _ in range(clients))}
        finally:
            for process in processes:
                process.join(30)
                if process.is_alive():
                    process.kill()
    failed = [error for _, error in outcomes.values() if error is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} of {clients} client processes failed; the first:\n{failed[0]}")
    return [outcomes[i][0] for i in range(clients)]


def _in_threads(address: str, family_hash: str, rows: np.ndarray, clients: int, args,
                rounds: int, streaming: bool) -> list[dict]:
    barrier = threading.Barrier(clients)
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(run_client, address, family_hash, rows[i], args.prompt,
                               args.grpc_steps, rounds, barrier, streaming) for i in range(clients)]
        return [future.result() for future in futures]


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of process `pid` and its live descendants (engine workers)."""
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for process in (root, *root.children(recursive=True)):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def grpc_run(address: str, family_hash: str, rows: np.ndarray, clients: int, args,
             streaming: bool = True, server_pid: int | None = None) -> dict:
    """`clients` clients (args.clients_in: processes or threads), each its own channel and
    session: catch up, then rounds of decode requests (on streams, or a call each). CPU per
    request: the server's (`server_pid` and its workers) over the whole run, every request
    counted; the clients' over their timed rounds."""
    rounds = args.rounds + 1  # round 0 warms up
    run = _in_processes if args.clients_in == "processes" else _in_threads
    server_cpu = cpu_seconds(server_pid) if server_pid else None
    outcomes = run(address, family_hash, rows, clients, args, rounds, streaming)
    requests = clients * (1 + rounds * args.grpc_steps)
    if server_pid:
        server_cpu = (cpu_seconds(server_pid) - server_cpu) / requests
    walls = [max(o["spans"][r][1] for o in outcomes) - min(o["spans"][r][0] for o in outcomes)
             for r in range(1, rounds)]
    per_round = [clients * args.grpc_steps / wall for wall in walls]
    catch_wall = (max(o["catch_up"][1] for o in outcomes) - min(o["catch_up"][0] for o in outcomes))
    return {"clients": clients, "tokens_per_s": statistics.median(per_round),
            "tokens_per_s_rounds": per_round, "catch_up_rows_per_s": clients * args.prompt / catch_wall,
            "latency": latency_summary([x for o in outcomes for x in o["latencies"]]),
            "server_cpu_ms_per_request": None if server_cpu is None else server_cpu * 1e3,
            # (client threads share one process clock: no figure per client then)
            "client_cpu_ms_per_request": None if args.clients_in == "threads" else
            1e3 * sum(o["cpu_s"] for o in outcomes) / (clients * args.rounds * args.grpc_steps),
            "tokens": [o["tokens"] for o in outcomes]}


def grpc_level(address: str, family_hash: str, rows: np.ndarray, args, label: str,
               concurrency: list[int], streaming: bool = True,
               server_pid: int | None = None) -> list[dict]:
    results = []
    for clients in concurrency:
        row = grpc_run(address, family_hash, rows, clients, args, streaming, server_pid)
        results.append(row)
        server_cpu = row["server_cpu_ms_per_request"]
        print(f"   {label} C={clients:>3}: {row['tokens_per_s']:7.0f} tok/s, p50 {row['latency']['p50_ms']:6.1f} ms, "
              f"p99 {row['latency']['p99_ms']:6.1f} ms; CPU ms per request: server "
              f"{_ms(server_cpu)}, client {_ms(row['client_cpu_ms_per_request'])}", flush=True)
    return results


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
