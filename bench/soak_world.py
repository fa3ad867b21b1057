"""What the soak (bench/soak.py) runs against and keeps: a `Ledger` of counts per case, the
`Reference` model that checks the tier's tokens, a `Server` (one `flow serve` process, its
tree's memory sampled), and the `Context` one server's cases share."""

from __future__ import annotations

import copy
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from common import REPO

sys.path.insert(0, str(REPO / "tests"))  # the tests' family builders and near-tie tolerance
from device import DeviceClient  # noqa: E402
from device.client import DEVICE  # noqa: E402
from flow.tier import TierError  # noqa: E402
from flow.tier_client import GrpcTier  # noqa: E402
from greedy import NEAR_TIE  # noqa: E402

try:
    import psutil
except ImportError:  # the process tree is then read from /proc
    psutil = None

CLEAN = frozenset({"RESOURCE_EXHAUSTED", "INVALID_ARGUMENT", "UNAUTHENTICATED", "UNAVAILABLE",
                   "DEADLINE_EXCEEDED", "NOT_FOUND", "FAILED_PRECONDITION"})
KINDS = ("flood", "malformed", "oversized", "bad_token", "churn", "kill", "freeze", "server")
COUNTS = ("tried", "refused_cleanly", "verified", "unexpected", "offline_tokens")
SLOTS, MAX_ROWS, TTL_S = 4, 32, 10  # each server's --max-sessions, --max-rows, --session-ttl
RECOVERY_S, STOP_S = 10.0, 7.0


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
