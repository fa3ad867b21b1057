"""`flow train` and `flow convert`, registered into the `flow` command line as a plugin.

The `flow` CLI lives in `flow/`, which must not import `training/`; it discovers this module
through the `flow.commands` entry point instead. Nothing heavy is imported until a command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subcommands: argparse._SubParsersAction) -> None:
    train = subcommands.add_parser(
        "train", help="train a family with megatron-core (tensor x pipeline x data parallel)",
        description="Train every exit of a family at once with megatron-core. The config (YAML or "
                    "TOML; see training/config.py and configs/) sets the model, data, parallel "
                    "sizes, schedule and checkpoints. Rerunning a command resumes from the newest "
                    "checkpoint. At the end the checkpoint is converted into a family directory.",
        epilog="Across several nodes: run `flow train --config FILE --prepare-only` once, then "
               "`torchrun --nnodes N --nproc-per-node G ... -m training.trainer RUN_DIR` on each node, "
               "then `flow convert RUN_DIR FAMILY`.")
    train.add_argument("--config", type=Path, required=True, help="YAML or TOML run config")
    train.add_argument("--stop-after", type=int, default=None,
                       help="save and stop after this step (resume later with the same command)")
    train.add_argument("--prepare-only", action="store_true",
                       help="validate the config and write the run directory, start nothing")
    train.set_defaults(handler=run_train)

    convert = subcommands.add_parser(
        "convert", help="convert a megatron-core checkpoint into a family directory",
        description="Load a `flow train` checkpoint of any TP x PP layout into one process and "
                    "write it as a family artifact. A checkpoint is code: torch's checkpoint "
                    "reader unpickles its .metadata, so a crafted one runs whatever it says. "
                    "flow train records the SHA-256 of every file it writes, and convert refuses "
                    "a checkpoint whose files differ unless --trust-checkpoint is given.")
    convert.add_argument("checkpoint", type=Path, help="run directory (newest checkpoint) or iter_* directory")
    convert.add_argument("family", type=Path, help="family directory to write")
    convert.add_argument("--force", action="store_true", help="replace FAMILY if it exists")
    convert.add_argument("--trust-checkpoint", action="store_true",
                         help="load a checkpoint flow train did not record (from an older flow, or "
                              "edited): only one whose source you trust, since loading runs its "
                              "pickled metadata")
    convert.set_defaults(handler=run_convert)


def run_train(args: argparse.Namespace) -> None:
    from training import launch

    if args.prepare_only:
        plan = launch.prepare(args.config)
        print(f"prepared {plan.run_dir}: {plan.config.parallel.world_size} ranks, "
              f"{plan.train_tokens:,} training tokens")
        return
    family = launch.train(args.config, stop_after=args.stop_after)
    print(f"wrote family {family}" if family else f"stopped after step {args.stop_after}; "
          f"rerun the same command to continue")


def run_convert(args: argparse.Namespace) -> None:
    from training.export import checkpoint_to_family

    manifest = checkpoint_to_family(args.checkpoint, args.family, overwrite=args.force,
                                    trust=args.trust_checkpoint)
    print(f"wrote {args.family}: hash {manifest.family_hash[:16]}, "
          f"{manifest.provenance.get('steps')} steps")
