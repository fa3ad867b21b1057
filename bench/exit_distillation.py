"""Exit tuning of SmolLM2-135M-Instruct: CE against self-distillation, exit heads trained or frozen.

Each variant tunes the exits of the imported family (configs/smollm2.yaml: frozen backbone, exits
after layers 9 and 19) on the same number of tokens of the stdlib corpus, then every resulting
family — and the family as imported, untuned — is judged on held-out code (third-party package
sources, the corpus's `heldout` split, in SmolLM2's tokens), teacher-forced:

- agreement: share of positions where an exit's top-1 token is the full model's top-1;
- held-out CE of each exit (and of the full model, for scale);
- member size: parameters of member k, and with its head tied to the embedding — possible when
  the head was frozen, since an import of a tied-embedding model starts every head as the
  embedding.

Variants: `ce` (α = 0) and `distill` (α = 0.5, τ = 2), each with the exit heads trained or frozen
(`train.freeze_exit_heads`). A variant whose family already exists is not retrained (--retrain).

    python bench/exit_distillation.py            # after the three preparation commands in configs/smollm2.yaml

Writes bench/results/exit_distillation.{json,png}.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import yaml
from common import REPO, save_figure, write_json

VARIANTS = {  # name -> (exit_loss overrides, train overrides)
    "ce": ({"distill_alpha": 0.0}, {"freeze_exit_heads": False}),
    "distill": ({"distill_alpha": 0.5, "distill_temperature": 2.0}, {"freeze_exit_heads": False}),
    "ce, head frozen": ({"distill_alpha": 0.0}, {"freeze_exit_heads": True}),
    "distill, head frozen": ({"distill_alpha": 0.5, "distill_temperature": 2.0}, {"freeze_exit_heads": True}),
}


def variant_config(base: dict, name: str, steps: int, work: Path) -> Path:
    exit_loss, train = VARIANTS[name]
    slug = name.replace(", ", "-").replace(" ", "-")
    config = {**base, "exit_loss": {**base.get("exit_loss", {}), **exit_loss},
              "train": {**base["train"], **train, "steps": steps},
              "eval": {"interval": steps, "batches": 2},
              "checkpoint": {"dir": str(work / slug / "checkpoints"), "interval": steps},
              "output": str(work / slug / "family")}
    path = work / slug / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def evaluate(family, windows, batch: int = 4) -> dict:
    """Teacher-forced agreement with the last exit and CE per exit, over `windows` (N, T + 1)."""
    import torch
    import torch.nn.functional as F

    last = family.config.last_exit
    agree = [0] * (last + 1)
    nll = [0.0] * (last + 1)
    count = 0
    with torch.no_grad():
        for start in range(0, len(windows), batch):
            chunk = windows[start:start + batch]
            ids, labels = chunk[:, :-1], chunk[:, 1:]
            logits = family.model(ids)  # one (B, T, vocab) per exit, one backbone pass
            full_top1 = logits[last].argmax(-1)
            for k, z in enumerate(logits):
                agree[k] += int((z.argmax(-1) == full_top1).sum())
                nll[k] += float(F.cross_entropy(z.reshape(-1, z.shape[-1]), labels.reshape(-1), reduction="sum"))
            count += labels.numel()
    config = family.config
    return {"exits": [{
        "exit_layer": config.exits[k],
        "agreement": agree[k] / count,
        "heldout_ce": nll[k] / count,
        "member_parameters": config.member_parameters(k),
        "member_parameters_head_tied": config.member_parameters(k, head_is_embedding=True),
    } for k in range(last + 1)], "tokens": count}


def heads_equal_embedding(family) -> list[bool]:
    import torch

    embedding = family.model.embed.weight
    return [bool(torch.equal(branch.head.weight, embedding)) for branch in family.model.exits]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs/smollm2.yaml")
    parser.add_argument("--tokens-budget", type=int, default=None,
                        help="training tokens per variant (default: the config's steps)")
    parser.add_argument("--eval-windows", type=int, default=32, help="held-out windows of seq_len tokens")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--work", type=Path, default=REPO / "runs/bench/exit_distillation")
    parser.add_argument("--retrain", action="store_true")
    args = parser.parse_args()

    import torch

    from flow import Family
    from flow.data.tokens import open_tokens
    from training.data import WindowSampler
    from training.launch import train

    base = yaml.safe_load(args.config.read_text())
    seq_len, global_batch = base["train"]["seq_len"], base["train"]["global_batch_size"]
    steps = args.tokens_budget // (seq_len * global_batch) if args.tokens_budget else base["train"]["steps"]
    imported = Path(base["init"]["path"])
    tokens = Path(base["data"]["tokens"])
    family_tokenizer = imported / "tokenizer.json"
    sampler = WindowSampler(open_tokens(tokens, "heldout", family_tokenizer), seq_len, seed=0)
    windows = torch.from_numpy(sampler.windows(0, args.eval_windows))

    start = Family.load(imported)
    results = {"as imported": {**evaluate(start, windows), "train_seconds": 0.0,
                               "heads_equal_embedding": heads_equal_embedding(start)}}
    exits = list(start.config.exits[:-1])
    del start
    print(f"as imported: {results['as imported']['exits']}", flush=True)
    for name in args.variants:
        config_path = variant_config(base, name, steps, args.work)
        out = Path(yaml.safe_load(config_path.read_text())["output"])
        started = time.perf_counter()
        if args.retrain or not (out / "family.json").is_file():
            train(config_path)
        family = Family.load(out)
        results[name] = {**evaluate(family, windows), "train_seconds": round(time.perf_counter() - started, 1),
                         "heads_equal_embedding": heads_equal_embedding(family)}
        print(f"{name}: {results[name]['exits']}", flush=True)

    write_json("exit_distillation", {
        "model": f"SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized), exits after layers {exits}",
        "config": str(args.config), "train_tokens": steps * seq_len * global_batch, "steps": steps,
        "eval": {"split": "heldout", "windows": args.eval_windows, "seq_len": seq_len},
        "results": results})
    plot(results)
    for name, row in results.items():
        cells = "  ".join(f"e{x['exit_layer']}: agree {x['agreement']:.3f} CE {x['heldout_ce']:.3f}" for x in row["exits"])
        print(f"{name:22s} {cells}")


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (agree, ce) = plt.subplots(1, 2, figsize=(11, 4))
    for name, row in results.items():
        early = row["exits"][:-1]
        sizes = [(x["member_parameters_head_tied"] if "head frozen" in name else x["member_parameters"]) / 1e6
                 for x in early]
        agree.plot(sizes, [x["agreement"] for x in early], "o-", label=name)
        ce.plot(sizes, [x["heldout_ce"] for x in early], "o-", label=name)
    full = next(iter(results.values()))["exits"][-1]
    ce.axhline(full["heldout_ce"], color="grey", linestyle=":", label="full model")
    agree.set(xlabel="member parameters (M; head tied where frozen)", ylabel="top-1 agreement with full model")
    ce.set(xlabel="member parameters (M; head tied where frozen)", ylabel="held-out CE (nats/token)")
    agree.legend(fontsize=8)
    ce.legend(fontsize=8)
    figure.suptitle("SmolLM2-135M exit tuning: exits after layers 9 and 19, held-out code")
    save_figure(figure, "exit_distillation")


if __name__ == "__main__":
    main()
