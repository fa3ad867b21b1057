"""What int8 costs a device member: agreement with fp32, not allclose.

For each exported member of a family, feeds windows of held-out text (teacher-forced) to the fp32
and int8 ONNX members under ONNX Runtime and reports:

- top-1 agreement: the share of positions where both pick the same next token;
- exit-decision agreement: the share where both make the same accept/escalate decision under each
  policy at its threshold (the member's calibration.json, else the SDK default);
- file sizes.

    python bench/int8_cost.py --family runs/demo/family --data runs/demo/corpus
    python bench/int8_cost.py --family runs/smollm2/family --data runs/smollm2/tokens --name int8_cost_smollm2
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from common import write_json

from device.member import MemberSession
from flow.artifact import calibration_path, member_path, read_manifest
from flow.confidence import DEFAULT_THRESHOLDS, POLICIES, ExitPolicy
from flow.data.tokens import open_tokens


def thresholds(family_dir, exit: int, family_hash: str) -> dict[str, float]:
    path = calibration_path(family_dir, exit)
    chosen = dict(DEFAULT_THRESHOLDS)
    if path.is_file():
        calibration = json.loads(path.read_text())
        if calibration.get("family_hash") == family_hash:
            chosen.update(calibration["thresholds"])
    return chosen


def member_cost(family_dir, exit: int, family_hash: str, tokens: np.ndarray, window: int,
                windows: int, threads: int, last: bool) -> dict:
    fp32 = MemberSession(member_path(family_dir, exit), intra_op_threads=threads, max_seq_len=window)
    int8 = MemberSession(member_path(family_dir, exit, int8=True), intra_op_threads=threads,
                         max_seq_len=window)
    taus = thresholds(family_dir, exit, family_hash)
    same_top1, same_decision = [], {p: [] for p in POLICIES}
    for i in range(windows):
        ids = tokens[i * window:(i + 1) * window].astype(np.int64).tolist()
        a, b = fp32.run(ids, 0).logits, int8.run(ids, 0).logits
        same_top1.append(a.argmax(-1) == b.argmax(-1))
        for policy in POLICIES:
            rule = ExitPolicy(policy, taus[policy])
            same_decision[policy].append(rule.accepts(a) == rule.accepts(b))
    return {
        "exit": exit, "positions": windows * window,
        "top1_agreement": float(np.concatenate(same_top1).mean()),
        # the last member is the full model: it never escalates, so it has no decision to agree on
        "exit_decision_agreement": None if last else
        {p: float(np.concatenate(v).mean()) for p, v in same_decision.items()},
        "thresholds": None if last else taus,
        "fp32_mb": round(member_path(family_dir, exit).stat().st_size / 2**20, 1),
        "int8_mb": round(member_path(family_dir, exit, int8=True).stat().st_size / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", required=True, help="family directory with exported members")
    parser.add_argument("--data", required=True, help="tokenized corpus directory (held-out split)")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="int8_cost", help="results file name under bench/results "
                                                            "(default: %(default)s)")
    args = parser.parse_args()
    manifest = read_manifest(args.family, weights=False)
    tokens = open_tokens(args.data, "heldout")
    windows = min(args.windows, len(tokens) // args.window)
    exits = [k for k in range(manifest.config.num_exits)
             if member_path(args.family, k, int8=True).is_file()]
    last = manifest.config.last_exit
    results = [member_cost(args.family, k, manifest.family_hash, tokens, args.window, windows,
                           args.threads, k == last) for k in exits]
    print(f"{'member':>6} {'top-1':>7} " + " ".join(f"{p:>9}" for p in POLICIES) + "   fp32 MB  int8 MB")
    for r in results:
        agreement = r["exit_decision_agreement"]
        decisions = " ".join(f"{agreement[p]:9.3f}" if agreement else f"{'-':>9}" for p in POLICIES)
        print(f"{r['exit']:>6} {r['top1_agreement']:7.3f} {decisions}   {r['fp32_mb']:7.1f}  {r['int8_mb']:7.1f}")
    print(f"wrote {write_json(args.name, {'args': vars(args), 'members': results})}")


if __name__ == "__main__":
    main()
