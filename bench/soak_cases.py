"""The soak's cases (bench/soak.py): malformed, oversized and bad-token calls, a flood of
devices, session churn, and devices generating through a fault (a killed worker, a frozen
server); each counts what it tried and saw in the server's `Ledger`."""

from __future__ import annotations

import math
import os
import random
import signal
import threading
import time

import numpy as np
from soak_world import MAX_ROWS, SLOTS, Context, Ledger  # first: via common, puts the repo on sys.path

from device import DeviceClient
from flow.tier_client import GrpcSession
from flow.v1 import tier_pb2 as pb
from flow.wire import rows_to_tensor

METHODS = ("OpenSession", "Continue", "Rollback", "CloseSession", "Generate")


def run_all(ledger: Ledger, kind: str, jobs, seconds: float) -> None:
    """`jobs` (name, callable) on daemon threads; one that raises, or still runs after `seconds`
    (hung), is unexpected."""
    def guarded(name, job) -> None:
        try:
            job()
        except Exception as err:  # noqa: BLE001 - counted; the soak goes on
            ledger.add(kind, unexpected=f"{name}: {type(err).__name__}: {err}")

    threads = [(name, threading.Thread(target=guarded, args=(name, job), daemon=True))
               for name, job in jobs]
    for _, thread in threads:
        thread.start()
    deadline = time.monotonic() + seconds
    for name, thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            ledger.add(kind, unexpected=f"{name} still ran {seconds:g} s after it began")


def malformed(ctx: Context) -> None:
    """Bytes that are no message, and messages no tier can honour, at every method."""
    rng = random.Random()
    session = ctx.ledger.rpc("malformed", ctx.shared.open, ctx.family_hash, ctx.exit)
    sid, rows = session.session_id if session else "none", ctx.reference.rows(ctx.prompt(rng))
    hidden, bad = rows_to_tensor(rows, "fp32"), pb.Tensor
    calls = [(method, payload) for method in METHODS
             for payload in (rng.randbytes(rng.randint(1, 300)), b"\xff" * 7)]
    calls += [(method, message.SerializeToString()) for method, message in (
        ("Continue", pb.ContinueRequest(session_id=sid, hidden=rows_to_tensor(rows * np.nan, "fp32"))),
        ("Continue", pb.ContinueRequest(session_id=sid, hidden=bad(shape=[1, 3], data=rows.tobytes()))),
        ("Continue", pb.ContinueRequest(session_id=sid, hidden=bad(codec=77, shape=list(rows.shape),
                                                                   data=rows.tobytes()))),
        ("Continue", pb.ContinueRequest(session_id=sid, hidden=hidden, returns=9, rollback=True)),
        ("Continue", pb.ContinueRequest(session_id="x" * 1000, hidden=hidden)),
        ("Rollback", pb.RollbackRequest(session_id=sid, position=2**64 - 1)),
        ("OpenSession", pb.OpenSessionRequest(family_hash=ctx.family_hash, from_exit=99, codec=42)),
        ("Generate", pb.GenerateRequest(family_hash=ctx.family_hash, token_ids=[-1, 2**30],
                                        max_new_tokens=4)),
        ("Generate", pb.GenerateRequest(family_hash=ctx.family_hash, token_ids=[1], max_new_tokens=4,
                                        sampling=pb.Sampling(temperature=math.nan, top_p=5.0))))]
    calls.append(("Continue", pb.ContinueRequest(session_id=sid, hidden=hidden).SerializeToString()[:40]))
    for method, payload in calls:
        ctx.send("malformed", method, payload)
    if session is not None:  # the session all this aimed at still answers right
        ctx.answers_right("malformed", ctx.shared, session)


def oversized(ctx: Context, huge_message: bool) -> None:
    """More than a server takes: rows, bytes, shapes, top-k, prompt and generation lengths."""
    config = ctx.reference.family.config
    session = ctx.ledger.rpc("oversized", ctx.shared.open, ctx.family_hash, ctx.exit)
    sid = session.session_id if session else "none"
    zeros = np.zeros((MAX_ROWS + 1, config.hidden_size), np.float32)
    messages = [pb.ContinueRequest(session_id=sid, hidden=rows_to_tensor(zeros, "fp32")),
                pb.ContinueRequest(session_id=sid, hidden=rows_to_tensor(zeros[:1], "fp32"), top_k=10**6),
                pb.ContinueRequest(session_id=sid, hidden=pb.Tensor(shape=[10**12, config.hidden_size])),
                pb.GenerateRequest(family_hash=ctx.family_hash, token_ids=[1] * 10**5, max_new_tokens=4)]
    if huge_message:  # past a server's 64 MiB message limit
        messages.append(pb.ContinueRequest(session_id=sid, hidden=pb.Tensor(
            shape=[1, config.hidden_size], data=b"\0" * (65 << 20))))
    for message in messages:
        method = "Generate" if isinstance(message, pb.GenerateRequest) else "Continue"
        ctx.send("oversized", method, message.SerializeToString(), answer_ok=False)
    tokens = ctx.ledger.rpc("oversized", lambda: list(ctx.shared.generate(  # ends with the context
        [1, 2, 3], 2**32 - 1, family_hash=ctx.family_hash)))
    if tokens is not None and len(tokens) > config.max_seq_len:
        ctx.ledger.add("oversized", unexpected=f"a generation went {len(tokens)} tokens long, past "
                                               f"the {config.max_seq_len}-position context")


def bad_token(ctx: Context) -> None:
    """No valid token: UNAUTHENTICATED at every method. Another identity's calls change nothing
    of a session. A device with a wrong token is told so (or goes on with its member)."""
    request = pb.OpenSessionRequest(family_hash=ctx.family_hash, from_exit=ctx.exit)
    for token in ("", "Bearer wrong", "Bearer ", f"Basic {ctx.tokens[0]}", f"Bearer {ctx.tokens[0]}x"):
        for method in METHODS:
            ctx.send("bad_token", method, request.SerializeToString(), token, False)
    owner, other = ctx.shared, ctx.tier(token=ctx.tokens[1])
    if session := ctx.ledger.rpc("bad_token", owner.open, ctx.family_hash, ctx.exit):
        stolen = GrpcSession(other, session.session_id, 0, "fp32")
        ctx.ledger.rpc("bad_token", stolen.continue_, 0, ctx.reference.rows([1, 2]), answer_ok=False)
        ctx.ledger.rpc("bad_token", stolen.close)  # answers, and closes nothing
        ctx.answers_right("bad_token", owner, session)
    other.close()
    tier = ctx.tier(token="not-a-token")
    client = DeviceClient(ctx.family_dir, exit=ctx.exit, cloud=tier, mode="exit", threshold=0.99)
    ctx.ledger.rpc("bad_token", client.complete, [1, 2, 3], 4, ignore_eos=True)
    tier.close()


def flood(ctx: Context, until: float) -> None:
    """Waves of devices (2.5 x the KV slots), sessions abandoned by the dozen, and malformed,
    oversized and bad-token calls, all at once, until `until` (at least one wave)."""
    modes = ("exit", "speculative", "cloud")
    for wave in range(10**6):
        if wave and time.monotonic() >= until:
            break
        jobs = [(f"a flooding {mode} device", lambda m=mode: ctx.drive("flood", m, 0, 24))
                for mode in (modes * SLOTS)[:SLOTS * 5 // 2]]
        jobs += [("the abandoned sessions", lambda: [ctx.ledger.rpc(
                     "flood", ctx.shared.open, ctx.family_hash, ctx.exit) for _ in range(3 * SLOTS)]),
                 ("the malformed calls", lambda: malformed(ctx)),
                 ("the oversized calls", lambda: oversized(ctx, huge_message=False)),
                 ("the bad-token calls", lambda: bad_token(ctx))]
        run_all(ctx.ledger, "flood", jobs, 60.0)


def churn(ctx: Context, until: float) -> None:
    """Three clients opening sessions and answering a prompt, then closing, abandoning (for the
    LRU eviction or the TTL), rolling back, or dropping a stream after a token, until `until`."""
    def loop(seed: int) -> None:
        tier = ctx.tier()
        for cycle in range(seed, 10**6, 3):
            if cycle > seed and time.monotonic() >= until:
                break
            if cycle % 4 == 3:
                stream = tier.generate(ctx.prompt(random.Random()), 16, family_hash=ctx.family_hash)
                ctx.ledger.rpc("churn", next, stream)
                stream.close()
            elif session := ctx.ledger.rpc("churn", tier.open, ctx.family_hash, ctx.exit):
                ctx.answers_right("churn", tier, session, first=int(cycle % 4 == 2))  # 2: rollback
                if cycle % 4 == 0:  # 1: abandoned
                    ctx.ledger.rpc("churn", session.close)
        tier.close()

    run_all(ctx.ledger, "churn", [(f"churn client {s}", lambda s=s: loop(s)) for s in range(3)],
            max(0.0, until - time.monotonic()) + 30.0)


def under_fault(ctx: Context, kind: str, modes, fault, pace: float, count: int, timeout: float,
                loop_s: float) -> None:
    """Devices in `modes` generate (`pace` s per token, for `loop_s` s or one generation);
    `fault()` strikes once each has 3 tokens; then the tier must answer right again."""
    started, until = threading.Semaphore(0), time.monotonic() + loop_s
    jobs = [(f"a {mode} device through the {kind}",
             lambda m=mode: ctx.drive(kind, m, until, count, pace, timeout, started)) for mode in modes]
    runner = threading.Thread(target=run_all, args=(ctx.ledger, kind, jobs, loop_s + 40), daemon=True)
    runner.start()
    if all(started.acquire(timeout=20) for _ in modes):
        fault()
        ctx.ledger.add(kind, 1)
    else:
        ctx.ledger.add(kind, unexpected="the devices had not generated 3 tokens within 20 s")
    runner.join()
    ctx.recovers(kind)


def freeze(pid: int, seconds: float) -> None:
    """SIGSTOP `pid` for `seconds`, then SIGCONT (also if interrupted)."""
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        os.kill(pid, signal.SIGCONT)
