"""Shows that the exactness and fault tests can fail: each mutation breaks the code on purpose, and
the tests named for it must then fail.

    .venv/bin/python tests/mutation_check.py            # every mutation (about 10 minutes)
    .venv/bin/python tests/mutation_check.py rollback   # those whose name contains "rollback"

Each mutation is applied to a copy of the working tree in a temporary directory (the checkout is
never touched), its tests run there with pytest, and the table says whether they failed as they
must. A mutation whose tests pass is a test that cannot catch that breakage: the run exits 1.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # file to break, relative to the repository root
    old: str  # text that must occur exactly once
    new: str
    tests: tuple[str, ...]  # pytest node ids (or -k expressions after "::-k ") that must fail


MUTATIONS = [
    Mutation("device keeps a rejected draft (no rollback of the accepted prefix)",
             "device/client.py", "        self.escalation.keep(kept)\n", "",
             ("tests/device/test_client.py::test_speculative_mode_is_exactly_the_full_model",)),
    Mutation("a tier ignores rollback=True (the rejected draft's positions stay)",
             "flow/tier.py", "    if start > frontier or (start != frontier and not rollback):",
             "    if start != frontier:",
             ("tests/cloud/test_service.py::test_speculative_through_the_service_is_the_full_model",)),
    Mutation("verdicts read one row late",
             "device/client.py", "verdicts = answer.tokens[length - 1 - start:]",
             "verdicts = answer.tokens[length - start:]",
             ("tests/device/test_client.py::test_speculative_mode_is_exactly_the_full_model",
              "tests/device/test_generate_command.py::test_speculative_generation_against_the_local_reference_is_the_full_model")),
    Mutation("an output truncated by one token",
             "device/client.py", "or len(self.tiers) >= self.max_new_tokens", "or len(self.tiers) >= self.max_new_tokens - 1",
             ("tests/device/test_client.py::test_exit_mode_with_no_confident_token_is_the_full_model",
              "tests/cloud/test_service.py::test_generations_through_the_service_are_the_full_model")),
    Mutation("edge keeps its cloud session's positions after a rejected draft",
             "cloud/edge.py", "            escalation.keep(start)  # what the device discarded (rollback) is gone here too\n", "",
             ("tests/cloud/test_edge.py::test_speculative_through_an_edge_is_the_full_model",)),
    Mutation("batched rows attend to another session's cache slot",
             "cloud/engine/core.py", "row_slots = torch.tensor([c.session.slot for c in group], device=self.device)",
             "row_slots = torch.tensor([c.session.slot for c in group][::-1], device=self.device)",
             ("tests/cloud/test_workers.py::test_32_concurrent_sessions_each_get_their_own_full_model_output",)),
    Mutation("a refused request still moves the session's frontier",
             "cloud/engine/core.py", "        session = self._idle_session(session_id, owner)\n        hidden = self._check_rows(rows)\n",
             "        session = self._idle_session(session_id, owner)\n        session.frontier = max(session.frontier, 1)\n        hidden = self._check_rows(rows)\n",
             ("tests/cloud/test_service.py::test_every_validation_rule_answers_its_code_and_others_keep_working",)),
    Mutation("shutdown cancels streams at once (no grace period)",
             "cloud/server.py", "        await self.server.stop(self.config.grace_s)", "        await self.server.stop(0)",
             ("tests/cloud/test_service.py::test_shutdown_lets_a_stream_in_flight_finish_within_the_grace_period",)),
    Mutation("an offline token is not the member's greedy token",
             "device/client.py", "                step = self.emit(self.sampler.pick(self.logits), DEVICE, offline=True)",
             "                step = self.emit(int(np.argsort(self.logits)[-2]), DEVICE, offline=True)",
             ("tests/cloud/test_faults.py::test_a_frozen_killed_and_restarted_tier_costs_offline_tokens_then_an_exact_replay",)),
    Mutation("the device does not adopt the frontier the tier reports",
             "flow/escalation.py", "                    self.frontier = err.frontier\n", "                    pass\n",
             ("tests/cloud/test_faults.py::test_an_answer_lost_after_the_tier_ran_it_costs_one_offline_token",)),
    Mutation("escalated sampling ignores the top-k ids",
             "device/client.py", "self.sampler.pick(answer.top_k[-1].logits, ids=answer.top_k[-1].ids)",
             "self.sampler.pick(answer.top_k[-1].logits)",
             ("tests/device/test_client.py::test_escalated_sampling_follows_the_tiers_top_k_distribution",)),
    Mutation("escalated sampling ignores the temperature",
             "device/client.py", "self.sampler.pick(answer.top_k[-1].logits, ids=answer.top_k[-1].ids)",
             "Sampler(SamplingParams(1.0, self.sampler.params.top_k, 1.0, 0)).pick(answer.top_k[-1].logits, ids=answer.top_k[-1].ids)",
             ("tests/device/test_client.py::test_escalated_sampling_follows_the_tiers_top_k_distribution",)),
    Mutation("ORT allocates a new present per call (no in-place cache)",
             "device/member.py", 'binding.bind_ortvalue_output(present, buffer)',
             'binding.bind_output(present, "cpu")',
             ("tests/device/test_member.py::test_decode_writes_the_shared_buffer_in_place",)),
    Mutation("learning rate decays linearly",
             "training/schedules.py",
             "return train.min_lr + 0.5 * (train.lr - train.min_lr) * (1 + math.cos(math.pi * progress))",
             "return train.lr - (train.lr - train.min_lr) * progress",
             ("tests/training/test_run.py::test_learning_rate_warms_up_then_decays_to_min_lr",)),
    Mutation("session ids from a counter",
             "cloud/engine/kv_pool.py", "secrets.token_urlsafe(16)", "f'{next(self._recency):022d}'",
             ("tests/cloud/test_service.py::test_authentication_and_session_ownership",)),
    Mutation("RESOURCE_EXHAUSTED read back as a bare TierError (the device fails, not backs off)",
             "flow/status.py", '(Exhausted, "RESOURCE_EXHAUSTED", "exhausted"),', '(Exhausted, "RESOURCE_EXHAUSTED", "tier"),',
             ("tests/cloud/test_service.py::test_the_client_reads_every_refusal_as_its_protocol_error",)),
    Mutation("an escalation sends more rows than the tier takes per request",
             "flow/escalation.py", "end = min(self.recorded, start + self.session.max_rows) if self.session.max_rows else self.recorded",
             "end = self.recorded",
             ("tests/cloud/test_service.py::test_rows_beyond_what_the_tier_takes_go_in_several_requests",)),
    Mutation("a device fails on Exhausted instead of going on locally",
             "flow/tier.py", "class Exhausted(TierUnavailable):", "class Exhausted(TierError):",
             ("tests/device/test_client.py::test_a_tier_at_capacity_is_an_outage_not_an_error",)),
    Mutation("an edge keys its sessions' rows by session id alone (another identity can drop them)",
             "cloud/edge.py", "key = (owner, session_id)", "key = session_id",
             ("tests/reliability/test_session_ownership.py",)),
    Mutation("edge answers without its cloud with exit 1's token instead of going offline",
             "cloud/edge.py", "                if return_all:\n                    raise", "                if False:\n                    raise",
             ("tests/cloud/test_edge.py::test_edge_without_its_cloud_still_answers_exit_mode_with_its_own_exit",)),
    Mutation("an identity at its cap evicts anyone's idle session, not its own",
             "cloud/engine/kv_pool.py",
             "            self._evict([s for s in self.sessions.values() if s.owner == owner],",
             "            self._evict(list(self.sessions.values()),",
             ("tests/reliability/test_session_limits.py::test_an_identity_at_its_cap_evicts_its_own_sessions_only",)),
    Mutation("a caller without a token is refused only after its message is parsed",
             "cloud/guard.py", "        if details.method.startswith(self.protected) and \\",
             "        if False and \\",
             ("tests/reliability/test_request_guard.py::test_a_caller_without_a_token_is_refused_before_its_message_is_read",)),
    Mutation("adaptive drafts ignore the round trip",
             "device/drafting.py", "        return settled / (drafts * self.device_step_s + self.round_trip_s)",
             "        return settled / (drafts * self.device_step_s + 1e-3)",
             ("tests/device/test_drafting.py::test_a_slow_link_gets_longer_drafts_than_a_fast_one",)),
    Mutation("a cancelled continuation stays queued in the engine",
             "cloud/engine/in_process.py",
             '            taken["abandoned"] = True\n', "",
             ("tests/reliability/test_cancellation.py",)),
    Mutation("a worker pool keeps the placement of evicted sessions",
             "cloud/engine/multiprocess.py", '        self._forget_ended(worker, answer.get("ended", []))\n', "",
             ("tests/reliability/test_session_limits.py::test_a_worker_pool_forgets_the_placement_of_evicted_and_expired_sessions",)),
]


def copy_tree(destination: Path) -> None:
    """The working tree as git sees it (tracked and untracked, not ignored), into `destination`."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        source = ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def run_mutation(mutation: Mutation, workdir: Path) -> tuple[bool, float, str]:
    """(its tests failed, seconds, the end of pytest's output)."""
    target = workdir / mutation.path
    original = target.read_text()
    if original.count(mutation.old) != 1:
        raise SystemExit(f"{mutation.name}: the text to replace occurs {original.count(mutation.old)} "
                         f"times in {mutation.path}; update the mutation")
    target.write_text(original.replace(mutation.old, mutation.new))
    began = time.perf_counter()
    try:
        failed = True
        output = []
        for test in mutation.tests:
            result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                     "--timeout", "300", test], cwd=workdir, capture_output=True, text=True)
            output.append(result.stdout[-600:])
            failed &= result.returncode == 1  # 1: tests failed (not 2..5: usage, collection errors)
        return failed, time.perf_counter() - began, "\n".join(output)
    finally:
        target.write_text(original)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("only", nargs="?", default="", help="run the mutations whose name contains this")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if args.only in m.name]
    survivors = []
    with tempfile.TemporaryDirectory(prefix="flow-mutations-") as tmp:
        workdir = Path(tmp)
        copy_tree(workdir)
        for mutation in chosen:
            caught, seconds, output = run_mutation(mutation, workdir)
            print(f"{'caught' if caught else 'SURVIVED':9s} {seconds:6.1f} s  {mutation.name}", flush=True)
            if not caught:
                survivors.append(mutation.name)
                print(output)
    print(f"{len(chosen) - len(survivors)} of {len(chosen)} mutations caught by their tests")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
