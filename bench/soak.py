"""Soak: the reliability suite (tests/reliability) for a bounded time against real `flow serve`
processes on loopback, two side by side: the engine in the server process, and in two worker
processes (`--workers 2`). Each server (4 KV slots, 32 rows per request, a 10 s session TTL, a
`--token-file` of two identities) goes through every case, then SIGTERM; new pairs follow while
time lasts. Cases:

- malformed: raw bytes and invalid messages at every `flow.v1.Tier` method (a generic
  `channel.unary_unary`, no serializer); the session they aimed at must still answer right;
- oversized: more rows than `max_rows`, a 65 MiB message, absurd shapes, top-k and lengths;
- bad_token: no token, wrong tokens, malformed headers; another identity's calls on a session;
- flood: waves of devices (exit, speculative, cloud) 2.5 x the KV slots, sessions abandoned by
  the dozen, and the three cases above, all at once;
- churn: sessions opened, answered, then closed, abandoned, rolled back, or a stream dropped;
- kill (workers): kill -9 a worker mid-generation; the devices replay on the other one;
- freeze: SIGSTOP the server for --freeze seconds while devices generate in cloud, exit and
  speculative modes; they go on with their member, then with the tier again.

Counted per case: tried; refused cleanly (RESOURCE_EXHAUSTED, INVALID_ARGUMENT, UNAUTHENTICATED,
UNAVAILABLE, DEADLINE_EXCEEDED, NOT_FOUND, FAILED_PRECONDITION, or a device going on alone);
verified (the tier's tokens are the full model's greedy choices given their prefix, the
device's its member's: on the family's torch model, near ties as in tests/greedy.py);
unexpected (any other status, a wrong or missing token, a call past its deadline, no right
answer within 10 s of a fault, a server that died, outlived SIGTERM or printed a traceback).
Memory: VmRSS summed over each server's process tree, sampled every 0.2 s.

    python bench/soak.py                         # 120 s, a tiny family built in a temp dir
    python bench/soak.py --duration 600 --family runs/demo/family --exit 1   # after `make demo`

--duration bounds the whole run, family build included, to within about 10 s, and one pass of
both servers (about 40 s on 2 cores) always runs. Writes bench/results/soak.json; exits 1 if
anything was unexpected, 130 if interrupted; every process it started is killed either way.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import common
import grpc
import numpy as np
from common import REPO, write_json

sys.path.insert(0, str(REPO / "tests"))  # the tests' family builders and near-tie tolerance
from device import DeviceClient  # noqa: E402
from device.client import DEVICE  # noqa: E402
from flow.artifact import read_manifest  # noqa: E402
from flow.tier import TierError  # noqa: E402
from flow.tier_client import GrpcSession, GrpcTier  # noqa: E402
from flow.v1 import tier_pb2 as pb  # noqa: E402
from flow.wire import rows_to_tensor  # noqa: E402
from greedy import NEAR_TIE  # noqa: E402

try:
    import psutil
except ImportError:  # the process tree is then read from /proc
    psutil = None

CLEAN = frozenset({"RESOURCE_EXHAUSTED", "INVALID_ARGUMENT", "UNAUTHENTICATED", "UNAVAILABLE",
                   "DEADLINE_EXCEEDED", "NOT_FOUND", "FAILED_PRECONDITION"})
KINDS = ("flood", "malformed", "oversized", "bad_token", "churn", "kill", "freeze", "server")
CONFIGS = {"in-process": 0, "workers-2": 2}  # name: --workers
SLOTS, MAX_ROWS, TTL_S = 4, 32, 10
LIFETIME_S, MIN_LIFETIME_S, RECOVERY_S, STOP_S = 30.0, 10.0, 10.0, 7.0
METHODS = ("OpenSession", "Continue", "Rollback", "CloseSession", "Generate")
COUNTS = ("tried", "refused_cleanly", "verified", "unexpected", "offline_tokens")


class Ledger:
    """Counts per case, and each unexpected outcome by description; thread-safe. A `view` shares
    them and names the server configuration its entries come from; once `closed` (the run was
    interrupted and its servers killed) nothing more counts."""

    def __init__(self):
        self.cases = {kind: dict.fromkeys(COUNTS, 0) for kind in KINDS}
        self.details = Counter()  # (kind, config, what): times
        self.config, self._lock, self.closed = "", threading.Lock(), threading.Event()

    def view(self, config: str) -> Ledger:
        view = copy.copy(self)
        view.config = config
        return view

    def add(self, kind: str, tried=0, refused=False, verified=False, offline=0, unexpected=None):
        with self._lock:
            if self.closed.is_set():
                return
            case = self.cases[kind]
            case["tried"] += tried
            case["refused_cleanly"] += bool(refused)
            case["verified"] += bool(verified)
            case["unexpected"] += bool(unexpected)
            case["offline_tokens"] += offline
            if unexpected:
                self.details[(kind, self.config, " ".join(str(unexpected).split())[:200])] += 1

    def rpc(self, kind: str, call, *args, answer_ok=True, **kwargs):
        """`call(*args, **kwargs)`, counted: a documented status (raw, or as the `flow.tier` error
        GrpcTier makes of it) is a clean refusal, any other unexpected, and so is an answer
        unless `answer_ok`. Returns the answer, or None."""
        try:
            answer = call(*args, **kwargs)
        except grpc.RpcError as err:
            clean = err.code().name in CLEAN
            self.add(kind, 1, clean, unexpected=None if clean else f"{err.code().name}: {err.details()}")
        except TierError as err:  # a bare one is INTERNAL, or "CODE: ..." for codes flow lacks
            clean = type(err) is not TierError or str(err).split(":")[0] in CLEAN
            self.add(kind, 1, clean, unexpected=None if clean else str(err))
        else:
            self.add(kind, 1, unexpected=None if answer_ok else "answered instead of refusing")
            return answer
        return None


class Reference:
    """The family's torch model: the full model's and the member's greedy choices."""

    def __init__(self, family_dir: Path, exit: int):
        import torch

        from flow import Family

        torch.set_num_threads(1)  # the cores are the servers' and the devices'
        self.no_grad, self.family, self.exit = torch.no_grad, Family.load(family_dir), exit
        self.last = self.family.config.last_exit

    def rows(self, ids: list[int]) -> np.ndarray:
        with self.no_grad():
            return self.family.handoff(ids, exit=self.exit)[0].float().numpy()  # (T, hidden)

    def wrong(self, ids: list[int], exit: int, tokens: dict[int, int]) -> str | None:
        """The first of `tokens` (position: the token after it) that is neither exit `exit`'s
        greedy choice given `ids` up to there nor within NEAR_TIE of it, said; else None."""
        with self.no_grad():
            logits = self.family.logits(ids, exit=exit)[0].float()  # (T, vocab)
        for position, token in tokens.items():
            best = int(logits[position].argmax())
            if token != best and float(logits[position, best] - logits[position, token]) >= NEAR_TIE:
                return f"{token} after position {position}, where exit {exit} takes {best}"
        return None

    def check(self, prompt: list[int], steps, mode: str) -> str | None:
        """Tokens the tier settled (and speculative drafts it accepted) are the full model's
        choices given their prefix; the device's other tokens are its member's."""
        ids, settled = prompt + [s.token for s in steps], {self.last: {}, self.exit: {}}
        for position, step in enumerate(steps, start=len(prompt) - 1):
            by_full = step.tier != DEVICE or (mode == "speculative" and not step.offline)
            settled[self.last if by_full else self.exit][position] = step.token
        wrong = [w for exit, tokens in settled.items() if (w := self.wrong(ids, exit, tokens))]
        return f"{mode} generation: {wrong[0]}" if wrong else None


def tree(pid: int) -> list[int]:
    """`pid` and every process below it."""
    if psutil is not None:
        try:
            return [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]
        except psutil.Error:
            return []
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found = [pid] if pid in parents else []
    for parent in found:  # grows while it is walked: breadth first
        found += [p for p, pp in parents.items() if pp == parent]
    return found


def rss(pid: int) -> int:
    """A process's resident memory in bytes (/proc/PID/status VmRSS); 0 once it is gone."""
    try:
        line = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
        return int(line.group(1)) * 1024 if line else 0
    except OSError:
        return 0


class Server:
    """One `flow serve` in its own process group, output in files, its tree's memory sampled."""

    def __init__(self, family_dir: Path, out: Path, exit: int, workers: int, token_file: Path):
        self.out, self.err = out.with_suffix(".out"), out.with_suffix(".err")
        with self.out.open("w") as stdout, self.err.open("w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "flow.cli.main", "serve", str(family_dir), "--port", "0",
                 "--from-exit", str(exit), "--workers", str(workers), "--max-sessions", str(SLOTS),
                 "--max-rows", str(MAX_ROWS), "--session-ttl", str(TTL_S),
                 "--token-file", str(token_file)],
                stdout=stdout, stderr=stderr, start_new_session=True, cwd=REPO)
        self.pid, self.peak_rss, self._done = self.process.pid, 0, threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def wait_listening(self, seconds: float = 120.0) -> str:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self.process.poll() is None:
            if match := re.search(r"^listening on (\S+)$", self.out.read_text(), re.M):
                return match.group(1)
            time.sleep(0.1)
        raise RuntimeError(f"flow serve did not start: {self.err.read_text()[-1500:]}")

    def _sample(self) -> None:
        while not self._done.wait(0.2):
            self.peak_rss = max(self.peak_rss, sum(rss(pid) for pid in tree(self.pid)))

    def stop(self, ledger: Ledger) -> None:
        """SIGTERM, then the whole group killed whatever happened; what went wrong is counted."""
        try:
            if (code := self.process.poll()) is not None:
                ledger.add("server", unexpected=f"flow serve exited by itself (code {code})")
            else:
                os.kill(self.pid, signal.SIGCONT)
                self.process.terminate()
                if code := self.process.wait(STOP_S):
                    ledger.add("server", unexpected=f"flow serve stopped with code {code}")
        except subprocess.TimeoutExpired:
            ledger.add("server", unexpected=f"flow serve still ran {STOP_S:g} s after SIGTERM")
        finally:
            self.kill()
        for exception in re.findall(r"^Traceback .*?\n(\S[^\n]*)", self.err.read_text(), re.M | re.S):
            ledger.add("server", unexpected=f"traceback in flow serve's stderr: {exception}")

    def kill(self) -> None:
        """SIGKILL to its process group, its workers included (idempotent)."""
        self._done.set()
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait()


@dataclass
class Context:
    """What the cases of one server share."""

    family_dir: Path
    exit: int
    family_hash: str
    reference: Reference
    ledger: Ledger
    address: str
    tokens: tuple[str, str]  # two identities

    def __post_init__(self):
        self.shared = self.tier()  # thread-safe, as gRPC channels are
        self.channel = grpc.insecure_channel(self.address, options=[("grpc.max_send_message_length", -1)])

    def close(self) -> None:
        self.shared.close()
        self.channel.close()

    def tier(self, timeout: float = 3.0, token: str | None = None) -> GrpcTier:
        return GrpcTier(self.address, token=token or self.tokens[0], timeout=timeout)

    def prompt(self, rng: random.Random) -> list[int]:
        return [rng.randrange(self.reference.family.config.vocab_size) for _ in range(rng.randint(3, 8))]

    def send(self, kind: str, method: str, payload: bytes, token=None, answer_ok=True):
        """`payload` as it is (no serializer) to `method` of flow.v1.Tier, with `token` as the
        authorization header ("": none; default the first identity's), counted."""
        call = (self.channel.unary_stream if method == "Generate" else self.channel.unary_unary)(
            f"/flow.v1.Tier/{method}")
        metadata = (("authorization", token or f"Bearer {self.tokens[0]}"),) if token != "" else ()
        self.ledger.rpc(kind, lambda: list(call(payload, timeout=20, metadata=metadata)),
                        answer_ok=answer_ok)

    def drive(self, kind: str, mode: str, until: float, count: int, pace: float = 0.0,
              timeout: float = 3.0, started: threading.Semaphore | None = None) -> None:
        """A device generating `count` tokens in `mode`, `pace` s apart, until `until` (at least
        once), each generation checked; `started` is released at each one's 3rd token."""
        rng, tier = random.Random(), self.tier(timeout)
        try:
            client = DeviceClient(self.family_dir, exit=self.exit, cloud=tier, mode=mode,
                                  threshold=0.99, draft_tokens=3, retry_interval=0.3,
                                  intra_op_threads=1)
            while True:
                prompt, steps = self.prompt(rng), []
                for step in client.generate(prompt, count, ignore_eos=True):
                    steps.append(step)
                    if started is not None and len(steps) == 3:
                        started.release()
                    time.sleep(pace)
                offline = sum(s.offline for s in steps)
                problem = (f"{mode}: {len(steps)} tokens of the {count} asked for"
                           if len(steps) != count else self.reference.check(prompt, steps, mode))
                self.ledger.add(kind, 1, offline > 0, offline=offline, unexpected=problem,
                                verified=problem is None and any(s.tier != DEVICE for s in steps))
                if time.monotonic() >= until:
                    return
        finally:
            tier.close()

    def answers_right(self, kind: str, tier: GrpcTier, session=None, first: int = 0) -> bool:
        """A prompt's rows from `first` (a new session, or `session` rolled back there) are
        answered with the full model's tokens; counted. False when refused."""
        ids, rpc = self.prompt(random.Random()), self.ledger.rpc
        rows = self.reference.rows(ids)
        session = session or rpc(kind, tier.open, self.family_hash, self.exit)
        if session is None or (first and rpc(kind, session.continue_, 0, rows) is None):
            return False
        if rpc(kind, session.rollback, first) is None:  # what was there before goes
            return False
        answer = rpc(kind, session.continue_, first, rows[first:], return_all=True)
        if answer is not None:
            problem = self.reference.wrong(ids, self.reference.last,
                                           dict(enumerate(answer.tokens, start=first)))
            self.ledger.add(kind, verified=problem is None,
                            unexpected=problem and f"the tier answered {problem}")
        return answer is not None

    def recovers(self, kind: str) -> None:
        """Within RECOVERY_S of a fault the tier answers a new session right."""
        deadline, tier = time.monotonic() + RECOVERY_S, self.tier(timeout=1.0)
        while not self.answers_right(kind, tier):
            if time.monotonic() > deadline:
                self.ledger.add(kind, unexpected=f"no answer within {RECOVERY_S:g} s of the {kind}")
                break
            time.sleep(0.3)
        tier.close()


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
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        os.kill(pid, signal.SIGCONT)


@dataclass
class Run:
    """What every server of a run shares."""

    args: argparse.Namespace
    family_dir: Path
    exported: Future  # done once the devices' member is exported
    reference: Reference
    work: Path  # a temporary directory: the token file, the servers' output
    tokens: tuple[str, str]  # two identities, in `token_file`
    token_file: Path
    live: list  # every Server started, for the cleanup


def lifetime(run: Run, ledger: Ledger, workers: int, out: Path, until: float) -> dict:
    """One server through every case until `until`, then stopped; its figures."""
    args, family_dir = run.args, run.family_dir
    began, server = time.monotonic(), Server(family_dir, out, args.exit, workers, run.token_file)
    run.live.append(server)
    ledger.add("server", 1)
    ctx = None
    try:
        ctx = Context(family_dir, args.exit, read_manifest(family_dir, weights=False).family_hash,
                      run.reference, ledger, server.wait_listening(), run.tokens)
        run.exported.result(timeout=300)  # the devices' member
        malformed(ctx)  # first on a quiet server, where the session they aim at is not evicted
        oversized(ctx, huge_message=True)
        bad_token(ctx)
        share = max(0.0, until - time.monotonic() - args.freeze - 7.0 - 3.0 * bool(workers)) / 2
        flood(ctx, time.monotonic() + share)
        churn(ctx, time.monotonic() + share)
        if workers:  # kill -9 a worker mid-generation
            under_fault(ctx, "kill", ("exit", "speculative") * 2,
                        lambda: os.kill(tree(server.pid)[1], signal.SIGKILL), 0.03, 40, 3.0, 0.0)
        under_fault(ctx, "freeze", ("cloud", "exit", "speculative"),
                    lambda: freeze(server.pid, args.freeze), 0.04, 48, 1.0, args.freeze + 2.0)
    except Exception as err:  # noqa: BLE001 - it did not start, or a case failed: counted
        ledger.add("server", unexpected=f"{type(err).__name__}: {err}")
    finally:
        server.stop(ledger)
        if ctx is not None:
            ctx.close()
    return {"config": ledger.config, "seconds": round(time.monotonic() - began, 1),
            "peak_rss_bytes": server.peak_rss}


def build_family(path: Path, exported: Future) -> None:
    """The tests' tiny family (5 layers, exits after 1, 2, 4, context 96; heads sharpened, early
    members agreeing with the full model often but not always), saved; member 0 is exported on
    a thread (`exported` is done then) while the servers, which need only the weights, start."""
    from builders import agreeing_copy, sharpen_heads, tiny_config
    from flow import Family
    from flow.onnx_export import export_family_members

    agreeing_copy(sharpen_heads(Family.random(tiny_config(head_dim=16, max_seq_len=96), seed=11))).save(path)

    def export() -> None:
        try:
            with common.quiet():
                exported.set_result(export_family_members(path, exits=[0]))
        except Exception as err:  # noqa: BLE001 - the lifetimes waiting for it raise it
            exported.set_exception(err)

    threading.Thread(target=export, daemon=True).start()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=120.0,
                        help="seconds the whole run takes, give or take 10 (default 120)")
    parser.add_argument("--family", type=Path, default=None,
                        help="family directory with weights and members/<exit>/device.onnx, e.g. "
                             "runs/demo/family (default: the tests' tiny family, built in a "
                             "temporary directory, so that a fresh checkout runs it)")
    parser.add_argument("--exit", type=int, default=0, help="the devices' member (default 0)")
    parser.add_argument("--freeze", type=float, default=5.0, help="seconds a SIGSTOP lasts (default 5)")
    parser.add_argument("--results", type=Path, default=common.RESULTS,
                        help="directory soak.json is written to (default bench/results)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # cleaned up as after Ctrl-C
    began = time.monotonic()
    deadline, ledger, lifetimes, live, interrupted = began + args.duration, Ledger(), [], [], False
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        try:
            family_dir, exported = (args.family or Path(tmp) / "family").resolve(), Future()
            if args.family:
                exported.set_result(None)
            else:
                build_family(family_dir, exported)
            tokens = (secrets.token_hex(16), secrets.token_hex(16))
            (token_file := Path(tmp) / "tokens.txt").write_text("\n".join(tokens) + "\n")
            run = Run(args, family_dir, exported, Reference(family_dir, args.exit), Path(tmp), tokens,
                      token_file, live)
            overshoot = 0.0  # how far a pass ran past its `until` (its fixed cases and stops)
            for passes in range(10**6):  # a pair of servers per pass
                if passes and time.monotonic() + MIN_LIFETIME_S + overshoot > deadline:
                    break
                until = min(time.monotonic() + LIFETIME_S, deadline - overshoot)
                pair = [threading.Thread(target=lambda *a: lifetimes.append(lifetime(*a)), daemon=True,
                                         args=(run, ledger.view(name), workers, run.work / f"{name}-{passes}", until))
                        for name, workers in CONFIGS.items()]
                for thread in pair:
                    thread.start()
                for thread in pair:
                    thread.join()
                overshoot = max(overshoot, time.monotonic() - until)
        except KeyboardInterrupt:
            interrupted = True
            ledger.closed.set()
        finally:
            for server in live:
                server.kill()
    report(args, ledger, lifetimes, live, time.monotonic() - began, interrupted)
    return 130 if interrupted else int(any(c["unexpected"] for c in ledger.cases.values()))


def report(args, ledger: Ledger, lifetimes: list[dict], servers: list[Server], seconds: float,
           interrupted: bool) -> None:
    cases = ledger.cases
    totals = {count: sum(case[count] for case in cases.values()) for count in COUNTS}
    peak = max((server.peak_rss for server in servers), default=0)
    common.RESULTS = args.results
    path = write_json("soak", {
        "config": {"duration_s": args.duration, "family": str(args.family or "tiny, built"),
                   "exit": args.exit, "freeze_s": args.freeze, "max_sessions": SLOTS,
                   "max_rows": MAX_ROWS, "session_ttl_s": TTL_S, "servers": CONFIGS},
        "seconds": round(seconds, 1), "interrupted": interrupted, "cases": cases, **totals,
        "peak_rss_bytes": peak, "lifetimes": lifetimes,
        "unexpected_details": [{"case": kind, "config": config, "what": what, "count": count}
                               for (kind, config, what), count in ledger.details.most_common()]})
    print(f"{'case':<10} {'tried':>6} {'refused':>8} {'verified':>9} {'offline':>8} {'unexpected':>11}")
    for kind, c in [*cases.items(), ("total", totals)]:
        print(f"{kind:<10} {c['tried']:>6} {c['refused_cleanly']:>8} {c['verified']:>9} "
              f"{c['offline_tokens']:>8} {c['unexpected']:>11}")
    print(f"{len(servers)} servers in {seconds:.0f} s; peak RSS of a server's process tree "
          f"{peak / 2**20:.0f} MiB; wrote {path}")
    for (kind, config, what), count in ledger.details.most_common():
        print(f"  unexpected [{kind}, {config}] x{count}: {what}")


if __name__ == "__main__":
    sys.exit(main())
