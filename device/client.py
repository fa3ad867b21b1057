"""The device SDK: generate with a family member on ONNX Runtime, escalating to the next tier.

```python
from device import DeviceClient
client = DeviceClient("fam_dir", exit=0, cloud=tier, mode="exit", policy="max_prob", threshold=0.8)
for step in client.generate("def fib(n):", max_new_tokens=64):
    print(step.text, step.tier)
result = client.complete("def fib(n):", max_new_tokens=64)
```

Modes (DESIGN.md §4), per request:

- `local`: the member alone.
- `exit`: each next token comes from the member when its exit confidence passes the policy;
  otherwise the device sends the next tier every hand-off row `h_e` it has not had acknowledged
  (positions frontier..now: the catch-up of tokens it settled alone, plus the current one) and
  takes the tier's token. The tier's KV cache thus always covers every position it answers for,
  so its tokens are exactly the full model's.
- `speculative`: the member drafts `draft_tokens` greedy tokens (or, with "adaptive", as many
  as pay on this link: `device.drafting`); one request verifies all their rows; the longest
  agreeing prefix plus the tier's own next token is kept, and both sides roll back to it (the
  tier on the next request, `rollback=True`). Output = the full model's greedy output, one round
  trip per run of drafts.
- `cloud`: token ids go to the tier, which runs the whole model.
- `auto`: per request, `speculative` or `cloud`, whichever the client measured to be faster for
  the request's length on this link (`device.auto`).

When the tier cannot be reached the client keeps going with its own exit and marks those tokens
`offline`; the hand-off rows stay pending and are replayed on the next successful request (from
position 0 if the tier lost the session). `require_cloud=True` raises instead. Every token the user
has seen stays part of the sequence.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from device.auto import ModeChooser
from device.drafting import draft_policy, top_probability
from device.member import MemberSession
from device.text import TextStream
from flow.artifact import TOKENIZER_FILE, calibration_path, check_member_file, member_path, read_manifest
from flow.confidence import DEFAULT_POLICY, ExitPolicy
from flow.data.tokenizer import token_ids
from flow.errors import ConfigError, FlowError
from flow.escalation import Escalation
from flow.sampling import Sampler, check_sampling
from flow.tier import MODES, Answer, NextTier, SamplingParams, TierUnavailable

DEVICE = "device"
log = logging.getLogger("flow.device")


class CloudRequiredError(FlowError):
    """The next tier was unreachable and the client was told not to go on without it."""


@dataclass
class Step:
    """One generated token as `generate` yields it."""

    token: int
    text: str  # the text this token made final (may be "" mid-character or near a stop string)
    tier: str  # "device", or the name of the tier that settled the token ("cloud", ...)
    position: int
    offline: bool = False  # settled on the device because the next tier was unreachable


@dataclass
class Completion:
    """A whole generation, as `complete` returns it."""

    text: str
    tokens: list[int]
    tiers: list[str]
    offline: list[bool]
    finish_reason: str  # "stop" (EOS or a stop string), "length" (max tokens or context)
    prompt_tokens: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds
    bytes_sent: int = 0
    bytes_received: int = 0
    round_trips: int = 0
    drafts_accepted: int = 0  # speculative drafts the tier confirmed (they are tokens above)
    drafts_rejected: int = 0  # drafts the tier verified and replaced (never shown to the user)
    mode: str = ""  # the mode that ran (what `auto` chose; "local" after a cloud stream failed)
    token_times: list[float] = field(default_factory=list)  # seconds from the start, per token

    @property
    def device_share(self) -> float:
        """Fraction of the tokens the device settled (drafts the tier confirmed included)."""
        return self.tiers.count(DEVICE) / len(self.tiers) if self.tiers else 0.0


class DeviceClient:
    """A family member on this device, and optionally the tier after it.

    family_dir: the family directory (family.json, tokenizer.json and members/<exit>/ suffice).
    exit: which member runs here. cloud: "host:port" of the next tier's gRPC service (with
        `cloud_token` as its bearer token), or any `flow.tier.NextTier` (e.g.
        `flow.reference_tier.ReferenceTier` in process); None runs `local` only.
    mode: default mode of `generate` (local, exit, speculative, cloud).
    policy / threshold: exit-mode confidence; threshold None takes the member's
        `calibration.json` (written by `flow calibrate`) or a default per policy.
    draft_tokens: drafts per speculative round, or "adaptive" (sized from the measured round
        trip, device step and acceptance, re-estimated every round). codec: how h_e travels (fp32, fp16, bf16, int8).
    int8: run the int8 member. providers / intra_op_threads: ONNX Runtime settings.
    require_cloud: raise `CloudRequiredError` instead of continuing offline.
    retry_interval: seconds to wait after a failed request before trying the tier again.
    """

    def __init__(self, family_dir: Path | str, exit: int = 0, cloud: NextTier | str | None = None,
                 mode: str = "local", policy: str = DEFAULT_POLICY, threshold: float | None = None,
                 draft_tokens: int | str = 4, codec: str = "fp32", int8: bool = False,
                 providers: Sequence[str] | None = None, intra_op_threads: int | None = None,
                 require_cloud: bool = False, retry_interval: float = 2.0,
                 cloud_token: str | None = None):
        family_dir = Path(family_dir)
        self.manifest = read_manifest(family_dir, weights=False)
        self.config = self.manifest.config
        self.exit = self.config.check_exit(exit)
        if isinstance(cloud, str):
            from flow.tier_client import GrpcTier

            cloud = GrpcTier(cloud, token=cloud_token)
        self.tier = cloud
        self.mode = self._check_mode(mode)
        self.exit_policy = ExitPolicy(policy, threshold)
        if threshold is None:
            self.exit_policy = ExitPolicy(policy, self._calibrated_threshold(family_dir, policy))
        self.drafting = draft_policy(draft_tokens)
        self.mode_chooser = ModeChooser()  # auto mode's measurements of the lossless modes
        self.codec = codec
        self.require_cloud = require_cloud
        self.retry_interval = retry_interval
        path = member_path(family_dir, self.exit, int8)
        check_member_file(self.manifest, self.exit, path)
        self.member = MemberSession(path, providers=providers,
                                    intra_op_threads=intra_op_threads,
                                    family_hash=self.manifest.family_hash, exit=self.exit)
        self.max_seq_len = self.member.max_seq_len
        self.tokenizer = self._load_tokenizer(family_dir)
        # the tokens that end a generation, as the family declares them (family.json)
        stop_tokens = self.manifest.tokenizer.stop_tokens if self.manifest.tokenizer else ()
        self.stop_ids = frozenset(token_ids(self.tokenizer, stop_tokens))
        self._retry_at = 0.0  # monotonic time before which the tier is not tried again

    # ---- public API -------------------------------------------------------------------------

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 64, *,
                 mode: str | None = None, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] = (),
                 ignore_eos: bool = False) -> Generation:
        """A continuation of `prompt` (text, or token ids): iterate it for its `Step`s.

        Generation ends at `max_new_tokens`, the end of the context, one of the family's stop
        tokens (its end-of-text token(s); unless `ignore_eos`, as benchmarks want) or a stop string (its text is not returned). After
        the loop the `Generation` holds the finish reason, timings, bytes and round trips.
        """
        return Generation(self, self._encode(prompt), max_new_tokens,
                          self._check_mode(mode or self.mode),
                          check_sampling(SamplingParams(temperature, top_k, top_p, seed)), stop,
                          ignore_eos)

    def complete(self, prompt: str | Sequence[int], max_new_tokens: int = 64, **options) -> Completion:
        """Generate the whole continuation (options as `generate`); text, tokens, per-token
        tiers, timings, bytes on the wire and round trips."""
        run = self.generate(prompt, max_new_tokens, **options)
        steps = list(run)
        return Completion(
            text="".join(s.text for s in steps), tokens=[s.token for s in steps],
            tiers=run.tiers, offline=run.offline,
            finish_reason=run.finish_reason, prompt_tokens=run.prompt_length, timings=run.timings,
            bytes_sent=run.bytes_sent, bytes_received=run.bytes_received, round_trips=run.round_trips,
            drafts_accepted=run.drafts_accepted, drafts_rejected=run.drafts_rejected,
            mode=run.mode, token_times=run.token_times)

    # ---- helpers ----------------------------------------------------------------------------

    def _check_mode(self, mode: str) -> str:
        if mode not in MODES:
            raise ConfigError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if mode != "local" and self.tier is None:
            raise ConfigError(f"mode {mode!r} needs a next tier: pass cloud=...")
        if mode in ("exit", "speculative", "auto") and self.exit == self.config.last_exit:
            raise ConfigError(f"member {self.exit} is the full model; there is nothing after it "
                              f"to escalate to (use mode='local')")
        return mode

    @property
    def policy(self) -> str:
        return self.exit_policy.policy

    @property
    def threshold(self) -> float:
        return self.exit_policy.threshold

    def _calibrated_threshold(self, family_dir: Path, policy: str) -> float | None:
        """The member's `calibration.json` threshold for `policy`, if it calibrated these weights."""
        path = calibration_path(family_dir, self.exit)
        if not path.is_file():
            return None
        try:
            calibration = json.loads(path.read_text())
            recorded, thresholds = calibration["family_hash"], calibration["thresholds"]
            threshold = float(thresholds[policy]) if policy in thresholds else None
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{path} is not a calibration flow wrote ({err!r}); run "
                              f"`flow calibrate` again or delete it") from None
        if recorded != self.manifest.family_hash:  # a calibration of another model says nothing here
            log.warning("%s was made for another family (%s…, this one is %s…); using the %s "
                        "policy's default threshold. Run `flow calibrate` again.", path,
                        str(recorded)[:12], self.manifest.family_hash[:12], policy)
            return None
        return threshold

    def _load_tokenizer(self, family_dir: Path):
        path = family_dir / TOKENIZER_FILE
        if not path.is_file():
            return None
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(path))

    def _encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ConfigError("this family has no tokenizer.json; pass the prompt as token ids")
            ids = self.tokenizer.encode(prompt).ids
        else:
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise ConfigError(f"token ids {bad[:5]} are outside the vocabulary "
                                  f"0..{self.config.vocab_size - 1}")
        if not ids:
            raise ConfigError("the prompt is empty; give at least one token of context")
        if len(ids) >= self.max_seq_len:
            raise ConfigError(f"the prompt has {len(ids)} tokens; this member's context is "
                              f"{self.max_seq_len}, which leaves no room to generate. Shorten it.")
        return ids


class Generation:
    """One request: iterate it for its `Step`s; then it holds the finish reason and statistics.

    Internally: the sequence, the device's cache and what the next tier holds.
    """

    def __init__(self, client: DeviceClient, prompt: list[int], max_new_tokens: int, mode: str,
                 sampling: SamplingParams, stop: Sequence[str], ignore_eos: bool = False):
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if mode == "speculative" and sampling.temperature > 0:
            raise ConfigError("speculative mode verifies greedy drafts; use temperature=0, or "
                              "mode='exit' to sample")
        if mode == "auto":
            mode = client.mode_chooser.choose(max_new_tokens, greedy=sampling.temperature == 0)
        self.client, self.mode = client, mode
        self.member = client.member
        self.tokens = list(prompt)
        self.prompt_length = len(prompt)
        self.max_new_tokens = max_new_tokens
        self.sampler = Sampler(sampling)
        self.text = TextStream(client.tokenizer, stop)
        self.computed = 0  # the member has computed positions 0..computed-1
        self.logits: np.ndarray | None = None  # the device's prediction for position `computed`
        # the hand-off rows by position and the next tier's session (None: local only)
        self.escalation = (Escalation(client.tier, client.manifest.family_hash, client.exit,
                                      client.codec, client.config.hidden_size, client.max_seq_len)
                           if client.tier is not None else None)
        self.finish_reason = "length"
        self.timings = {"device_s": 0.0, "tier_s": 0.0, "first_token_s": 0.0, "total_s": 0.0}
        self._cloud_bytes = [0, 0]  # cloud mode: token ids sent, received
        self._cloud_calls = 0  # cloud mode's streamed call counts as a round trip
        self._started = 0.0
        self.tiers: list[str] = []  # per emitted token: "device" or the tier that settled it
        self.token_times: list[float] = []  # per emitted token: seconds since the start
        self.offline: list[bool] = []  # per emitted token: settled alone, the tier unreachable
        self.cloud_failed = False  # cloud mode fell back to the device
        # speculative drafts the tier verified: kept, or replaced by its own token and dropped
        self.drafts_accepted = self.drafts_rejected = 0
        self.stop_ids = frozenset() if ignore_eos else client.stop_ids

    # ---- the device -------------------------------------------------------------------------

    def feed(self, tokens: list[int], start: int) -> None:
        began = time.perf_counter()
        out = self.member.run(tokens, start)
        self.timings["device_s"] += time.perf_counter() - began
        if self.escalation is not None:
            self.escalation.record(start, out.handoff)
        self.computed = start + len(tokens)
        self.logits = out.logits[-1]

    # ---- the next tier ----------------------------------------------------------------------

    def escalate(self, return_all: bool, top_k: int = 0) -> tuple[int, Answer] | None:
        """Send the pending rows to the next tier; (first position, answer), or None offline."""
        client = self.client
        if time.monotonic() < client._retry_at and not client.require_cloud:
            return None
        try:
            return self.escalation.send(return_all, top_k)
        except TierUnavailable as err:
            if client.require_cloud:
                raise CloudRequiredError(f"the next tier is unreachable ({err}) and "
                                         f"require_cloud=True") from err
            client._retry_at = time.monotonic() + client.retry_interval
            return None

    @property
    def round_trips(self) -> int:
        return (self.escalation.round_trips if self.escalation else 0) + self._cloud_calls

    @property
    def bytes_sent(self) -> int:
        return (self.escalation.bytes_sent if self.escalation else 0) + self._cloud_bytes[0]

    @property
    def bytes_received(self) -> int:
        return (self.escalation.bytes_received if self.escalation else 0) + self._cloud_bytes[1]

    # ---- the loop ---------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Step]:
        if self._started:
            raise RuntimeError("a Generation can be iterated once; call generate() again")
        self._started = time.perf_counter()
        try:
            if self.mode == "cloud":
                yield from self._cloud_steps()
            while not self.done:
                if self.computed < len(self.tokens):  # the prompt, or the tokens settled last round
                    self.feed(self.tokens[self.computed:], self.computed)
                if self.mode == "speculative":
                    yield from self._speculative_round()
                else:
                    yield from self._next_token()
        finally:
            self.timings["total_s"] = time.perf_counter() - self._started
            if self.escalation is not None:
                self.timings["tier_s"] += self.escalation.seconds
                self.escalation.close()
            if not any(self.offline):
                self.client.mode_chooser.observe(self.mode, self.timings["first_token_s"],
                                                 self.timings["total_s"], len(self.tiers))

    @property
    def done(self) -> bool:
        return (self.finish_reason == "stop" or len(self.tiers) >= self.max_new_tokens
                or len(self.tokens) >= self.client.max_seq_len)

    def emit(self, token: int, tier: str, offline: bool = False) -> Step | None:
        if self.done:
            return None
        now = time.perf_counter() - self._started
        if not self.tiers:
            self.timings["first_token_s"] = now
        self.token_times.append(now)
        self.tokens.append(token)
        self.tiers.append(tier)
        self.offline.append(offline)
        text = self.text.push(token)
        if token in self.stop_ids or self.text.stopped:
            self.finish_reason = "stop"
        if self.done:
            text += self.text.flush()  # the last token releases whatever was held back
        return Step(token, text, tier, len(self.tokens) - 1, offline)

    def _next_token(self) -> Iterator[Step]:
        """local and exit modes: one token, from the device or from the tier."""
        client = self.client
        if self.mode == "exit" and not client.exit_policy.accepts(self.logits):
            top_k = 0 if self.sampler.greedy else (self.sampler.params.top_k or 64)
            sent = self.escalate(return_all=False, top_k=top_k)
            if sent is not None:
                _, answer = sent
                token = (answer.tokens[-1] if self.sampler.greedy else
                         self.sampler.pick(answer.top_k[-1].logits, ids=answer.top_k[-1].ids))
                step = self.emit(token, answer.tier)
            else:
                step = self.emit(self.sampler.pick(self.logits), DEVICE, offline=True)
        else:
            step = self.emit(self.sampler.pick(self.logits), DEVICE, offline=self.cloud_failed)
        if step is not None:
            yield step

    def _speculative_round(self) -> Iterator[Step]:
        length, drafting = len(self.tokens), self.client.drafting
        budget = min(drafting.cap(), self.max_new_tokens - len(self.tiers),
                     self.client.max_seq_len - length)
        drafts: list[int] = []
        chance = 1.0  # the member's estimate that every draft so far is accepted
        began = time.perf_counter()
        while len(drafts) < budget:
            chance *= top_probability(self.logits)
            if drafts and not drafting.keep_drafting(chance):
                break
            drafts.append(int(np.argmax(self.logits)))
            if length + len(drafts) >= self.client.max_seq_len:
                break  # no slot to feed the last draft: verify what has rows
            self.feed(drafts[-1:], length + len(drafts) - 1)
            if drafts[-1] in self.stop_ids:
                break
        drafted = time.perf_counter()
        sent = self.escalate(return_all=True)
        if sent is None:  # offline: the drafts are the device's own greedy tokens
            for token in drafts:
                step = self.emit(token, DEVICE, offline=True)
                if step is not None:
                    yield step
            return
        start, answer = sent
        # answer.tokens[i] is the full model's next token after position start + i; the drafts
        # sit at positions length, length+1, ... and are predicted by rows length-1, length, ...
        verdicts = answer.tokens[length - 1 - start:]
        accepted = 0
        while accepted < len(drafts) and accepted < len(verdicts) - 1 and \
                drafts[accepted] == verdicts[accepted]:
            accepted += 1
        kept = length + accepted  # positions 0..kept-1 are right on both sides
        drafting.observe(len(drafts), accepted, drafted - began, time.perf_counter() - drafted)
        self.drafts_rejected += len(drafts) - accepted
        self.escalation.keep(kept)
        self.computed = min(self.computed, kept)
        for token in drafts[:accepted]:
            step = self.emit(token, DEVICE)
            if step is not None:  # None: a stop string or EOS ended the generation before it
                self.drafts_accepted += 1
                yield step
        step = self.emit(verdicts[accepted], answer.tier)
        if step is not None:
            yield step

    def _cloud_steps(self) -> Iterator[Step]:
        client = self.client
        began = time.perf_counter()
        try:
            stream = client.tier.generate(self.tokens, self.max_new_tokens, self.sampler.params,
                                          stop_ids=tuple(sorted(self.stop_ids)),
                                          family_hash=client.manifest.family_hash)
            self._cloud_bytes[0] += 4 * len(self.tokens)
            self._cloud_calls += 1
            for token in stream:
                self._cloud_bytes[1] += 4
                step = self.emit(token, client.tier.name)
                if step is not None:
                    yield step
                if self.done:
                    break
        except TierUnavailable as err:
            if client.require_cloud:
                raise CloudRequiredError(f"the next tier is unreachable ({err}) and "
                                         f"require_cloud=True") from err
            self.mode = "local"  # go on with the device's own exit from where the stream stopped
            self.cloud_failed = True
        finally:
            self.timings["tier_s"] += time.perf_counter() - began
