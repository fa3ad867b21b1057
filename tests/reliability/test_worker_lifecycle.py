"""Engine workers coming and going: a dead worker's sessions are replayed on a survivor (NOT_FOUND,
not UNAVAILABLE, while one is left); workers end with their front end, however it ends, and a
stopped front end leaves no socket file behind; a remote worker joins the front end that comes
back on its endpoint."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cloud.engine.frames import FRONT_END_SILENT_S
from flow.tier import SessionLost, TierUnavailable
from flow.tier_client import GrpcTier
from runs import free_port, start_flow_serve

OWNER = "owner-of-the-lifecycle-sessions"


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, exited but not reaped, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def wait_until_gone(pids: list[int], seconds: float) -> list[int]:
    """Those of `pids` still alive after up to `seconds`."""
    deadline = time.monotonic() + seconds
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def test_a_dead_worker_s_sessions_replay_on_a_survivor_until_none_is_left(pools, reference):
    """Catches: a request sent to a worker that was just killed, before the front end noticed,
    failing UNAVAILABLE (the device goes offline) although another worker could take the replay;
    and a pool with no worker left answering anything but UNAVAILABLE."""
    pool = pools(2)
    client = pool.client
    first, _ = pool.run(client.open_session(OWNER, 0))
    second, _ = pool.run(client.open_session(OWNER, 0))
    assert client.placement[first] != client.placement[second]

    async def kill_then_continue(session_id: str):
        # no await between the kill and the request: the front end cannot have noticed yet
        os.kill(client.workers[client.placement[session_id]].pid, signal.SIGKILL)
        return await client.continue_(session_id, OWNER, 0, reference.rows, return_all=True,
                                      top_k=0, rollback=False)

    with pytest.raises(SessionLost):
        pool.run(kill_then_continue(first))
    replayed, _ = pool.run(client.open_session(OWNER, 0))  # what the device does: reopen, replay
    answer = pool.run(client.continue_(replayed, OWNER, 0, reference.rows, return_all=True, top_k=0,
                                       rollback=False))
    assert answer.tokens == reference.tokens
    assert len(client.workers) == 1

    with pytest.raises(TierUnavailable) as refused:  # the last worker: nobody to replay on
        pool.run(kill_then_continue(second))
    assert not isinstance(refused.value, SessionLost)


def test_stopping_the_pool_ends_its_workers_and_removes_the_socket_file(pools):
    """Catches: a stopped front end leaving its ipc:// socket file behind (or its workers
    running)."""
    pool = pools(1)
    socket_file = Path(pool.endpoint.removeprefix("ipc://"))
    pids = pool.pids()
    assert socket_file.exists()
    pool.stop()
    assert not socket_file.exists()
    assert wait_until_gone(pids, 10) == []


def test_workers_exit_when_flow_serve_is_killed(device_family, tmp_path):
    """Catches: a front end killed with SIGKILL (no chance to tell its workers) leaving its
    worker processes, each holding a model, running forever, or the workers' secret key on disk.
    """
    family_dir, _ = device_family
    process, _ = start_flow_serve(family_dir, 0, "--workers", "1",
                                  "--bind", f"ipc://{tmp_path}/engine.sock")
    workers = children(process.pid)
    try:
        assert len(workers) == 1
        arguments = Path(f"/proc/{workers[0]}/cmdline").read_bytes().decode().split("\0")
        key_file = Path(arguments[arguments.index("--worker-key") + 1])
        process.kill()
        process.wait(10)
        assert wait_until_gone(workers, 8) == [], "the worker outlived its front end"
        assert not key_file.exists()
    finally:
        process.kill()
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_remote_worker_joins_the_front_end_that_replaces_a_killed_one(device_family, reference,
                                                                       tmp_path):
    """Catches: a worker on another host (no parent to watch) serving a front end that was
    SIGKILLed for ever, never joining the one restarted on the same endpoint, so the new tier
    stays NOT_SERVING with a worker idle beside it."""
    family_dir, family = device_family
    key_file = tmp_path / "worker.key"
    subprocess.run([sys.executable, "-m", "cloud.engine.keys", str(key_file)], check=True,
                   capture_output=True)
    bind = ["--workers", "0", "--bind", f"tcp://127.0.0.1:{free_port()}", "--worker-key", key_file]
    first, address = start_flow_serve(family_dir, 0, *bind)
    worker = subprocess.Popen([sys.executable, "-m", "cloud.engine.worker", str(family_dir),
                               "--connect", bind[3], "--worker-key", str(key_file),
                               "--threads", "1"], stderr=subprocess.PIPE, text=True)
    second = None
    try:
        _answers_the_reference(address, family, reference, within_s=60)
        first.kill()
        first.wait(10)
        second, address = start_flow_serve(family_dir, 0, *bind)
        _answers_the_reference(address, family, reference, within_s=FRONT_END_SILENT_S + 20)
        assert worker.poll() is None
    finally:
        for process in (first, second, worker):
            if process is not None:
                process.kill()
                process.wait(10)


def _answers_the_reference(address: str, family, reference, within_s: float) -> None:
    """Wait until the tier at `address` has a worker, then check its tokens."""
    tier = GrpcTier(address)
    deadline = time.monotonic() + within_s
    try:
        while True:
            try:
                session = tier.open(family.family_hash(), 0)
                break
            except TierUnavailable:
                assert time.monotonic() < deadline, "no worker joined"
                time.sleep(0.25)
        assert session.continue_(0, reference.rows, return_all=True).tokens == reference.tokens
    finally:
        tier.close()
