"""`flow calibrate`: pick the exit-mode threshold that reaches a target agreement with the full model.

On held-out text, teacher-forced, the family gives for each position the member's logits and the
full model's. In `exit` mode a position is settled by the member when its confidence passes τ and
by the full model otherwise, so the output agrees with the full model everywhere except at
accepted positions where the member's top-1 differs. For each policy this module sorts positions
by confidence and takes the lowest τ (the most tokens on the device) whose agreement still
reaches the target. The result goes to `members/<k>/calibration.json`, which `DeviceClient`
reads when no threshold is given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flow.confidence import POLICIES, ExitPolicy
from flow.errors import DataError
from flow.fsutil import atomic_file


@dataclass
class PolicyCalibration:
    threshold: float
    device_share: float  # fraction of positions the member settles at this threshold
    agreement: float  # fraction of positions whose token equals the full model's
    curve: list[dict[str, float]]  # (threshold, device_share, agreement) at evenly spaced shares


def choose_threshold(scores: np.ndarray, member_agrees: np.ndarray, target: float,
                     curve_points: int = 21) -> PolicyCalibration:
    """The lowest threshold whose exit-mode agreement with the full model is >= target.

    `scores` (n,): member confidence per position (larger = surer); `member_agrees` (n,): the
    member's top-1 equals the full model's there. The returned curve samples the whole
    trade-off at `curve_points` evenly spaced device shares.
    """
    n = len(scores)
    order = np.argsort(-scores, kind="stable")
    # accepting the k most confident positions costs their disagreements
    errors = np.concatenate([[0], np.cumsum(~member_agrees[order])])  # (n+1,)
    agreement = 1.0 - errors / n
    # a threshold accepts all positions with score >= it: only cut between distinct scores
    sorted_scores = scores[order]
    cuts = [0] + [k for k in range(1, n + 1) if k == n or sorted_scores[k] < sorted_scores[k - 1]]
    best = max((k for k in cuts if agreement[k] >= target), default=0)
    threshold = float(sorted_scores[best - 1]) if best else float(np.nextafter(sorted_scores[0], np.inf))
    curve = []
    for share in np.linspace(0, 1, curve_points):
        k = min(cuts, key=lambda c: abs(c - share * n))
        curve.append({"threshold": float(sorted_scores[k - 1]) if k else None,  # None: accept none
                      "device_share": k / n, "agreement": float(agreement[k])})
    return PolicyCalibration(threshold, best / n, float(agreement[best]), curve)


@dataclass
class TeacherForced:
    """One member on held-out windows, teacher-forced, against the full model."""

    scores: dict[str, np.ndarray]  # policy -> (n,) confidence per position (larger = surer)
    agrees: np.ndarray  # (n,) bool: the member's top-1 is the full model's
    nll: np.ndarray  # (m,) negative log-likelihood of each next token in the text (nats)


def teacher_forced(family, exits: list[int], tokens: np.ndarray, window: int, max_tokens: int
                   ) -> dict[int, TeacherForced]:
    """Each member in `exits` (the full model's included, for its loss) on windows of `tokens`:
    confidence under every policy, agreement with the full model, and held-out loss. One forward
    of the family per window serves every exit."""
    import torch
    from tqdm import tqdm

    last = family.config.last_exit
    usable = min(len(tokens) // window, max(1, max_tokens // window))
    if usable == 0:
        raise DataError(f"the held-out text has {len(tokens)} tokens, fewer than one window of "
                        f"{window}; use a smaller --window")
    wanted = sorted(set(exits) | {last})
    scores = {k: {policy: [] for policy in POLICIES} for k in wanted}
    agrees: dict[int, list] = {k: [] for k in wanted}
    nll: dict[int, list] = {k: [] for k in wanted}
    with torch.no_grad():
        for i in tqdm(range(usable), desc="teacher-forced", unit="window"):
            ids = torch.from_numpy(np.asarray(tokens[i * window:(i + 1) * window], dtype=np.int64))
            outputs = dict(zip(wanted, family.model(ids[None], exits=wanted), strict=True))
            full_top1 = outputs[last][0].argmax(-1)
            for k, logits in outputs.items():
                logits = logits[0].float()  # (window, vocab)
                member = logits.numpy()
                for policy in POLICIES:
                    scores[k][policy].append(ExitPolicy(policy).scores(member))
                agrees[k].append((logits.argmax(-1) == full_top1).numpy())
                nll[k].append(torch.nn.functional.cross_entropy(logits[:-1], ids[1:],
                                                                reduction="none").numpy())
    return {k: TeacherForced({p: np.concatenate(v) for p, v in scores[k].items()},
                             np.concatenate(agrees[k]), np.concatenate(nll[k]))
            for k in exits}


def calibrate(family_dir: Path | str, exit: int, tokens: np.ndarray, target: float,
              window: int = 256, max_tokens: int = 32768) -> dict:
    """Calibrate member `exit` of the family at `family_dir`; writes and returns calibration.json."""
    from flow.artifact import calibration_path
    from flow.family import Family

    if not 0 < target <= 1:
        raise DataError(f"--target is an agreement in (0, 1], got {target}")
    family = Family.load(family_dir)
    family.config.check_exit(exit)
    if exit == family.config.last_exit:
        raise DataError(f"member {exit} is the full model: it always agrees with itself")
    window = min(window, family.config.max_seq_len)
    measured = teacher_forced(family, [exit], tokens, window, max_tokens)[exit]
    scores, agrees = measured.scores, measured.agrees
    result = {"exit": exit, "family_hash": family.family_hash(), "target": target,
              "positions": int(len(agrees)), "member_top1_agreement": float(agrees.mean()),
              "thresholds": {}, "policies": {}}
    for policy in POLICIES:
        chosen = choose_threshold(scores[policy], agrees, target)
        result["thresholds"][policy] = chosen.threshold
        result["policies"][policy] = {"device_share": chosen.device_share,
                                      "agreement": chosen.agreement, "curve": chosen.curve}
    path = calibration_path(family_dir, exit)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    result["path"] = str(path)
    return result
