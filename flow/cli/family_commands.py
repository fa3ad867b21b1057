"""`flow new`, `flow info`, `flow import-hf`, `flow export-hf`: make, inspect and convert families."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flow.config import PRESETS
from flow.member_format import AUTO, KV_CACHE_CHOICES
from flow.pretrained import PRETRAINED

DTYPES = ("float32", "bfloat16", "float16")


def register(subcommands: argparse._SubParsersAction) -> None:
    new = subcommands.add_parser(
        "new", help="create a randomly initialised family from a preset",
        description="Create a randomly initialised family (the starting point of `flow train`, "
                    "and of tests).")
    new.add_argument("out", type=Path, help="family directory to write")
    new.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                     help="architecture preset (default tiny): " + "; ".join(
                         f"{name}: {p['num_layers']} layers, hidden {p['hidden_size']}, exits after "
                         f"{', '.join(map(str, p['exits']))}" for name, p in sorted(PRESETS.items())))
    new.add_argument("--tokenizer", type=Path, default=None,
                     help="tokenizer.json to ship with the family; sets vocab_size to its size")
    new.add_argument("--exits", type=int, nargs="+", default=None,
                     help="exit layers (0-indexed); the last layer is always added")
    new.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    new.add_argument("--dtype", choices=DTYPES, default="float32", help="weight dtype (default float32)")
    new.add_argument("--force", action="store_true", help="replace OUT if it exists")
    new.set_defaults(handler=run_new)

    info = subcommands.add_parser(
        "info", help="show a family's architecture, exits, members and hash",
        description="Verify a family directory and describe it: architecture, exits, parameters "
                    "per member, hash, tokenizer, provenance and exported device members.")
    info.add_argument("family", type=Path, help="family directory")
    info.add_argument("--json", action="store_true", help="print family.json plus member sizes as JSON")
    info.set_defaults(handler=run_info)

    import_hf = subcommands.add_parser(
        "import-hf", help="turn a Qwen3/Llama checkpoint (Hugging Face or GGUF) into a family",
        description="Import a Hugging Face Qwen3 or Llama directory (config.json + safetensors; "
                    "model_type picks the architecture), a llama.cpp GGUF file (--gguf; "
                    "quantized weights are dequantized to float32, the tokenizer is built from "
                    "the file), or an installed pretrained model (--pretrained). Each exit "
                    "branch starts as a copy of block e+1, the final norm and the LM head.")
    import_hf.add_argument("src", type=Path, nargs="?", default=None,
                           help="Hugging Face Qwen3 or Llama directory (or use --gguf / --pretrained)")
    import_hf.add_argument("out", type=Path, help="family directory to write")
    import_hf.add_argument("--gguf", type=Path, default=None, metavar="FILE",
                           help="import this GGUF file (Llama or Qwen3) instead of a directory")
    import_hf.add_argument("--pretrained", choices=sorted(PRETRAINED), default=None,
                           help="import an installed pretrained model (its file's SHA-256 is checked)")
    import_hf.add_argument("--exits", type=int, nargs="+", required=True,
                           help="exit layers (0-indexed); the last layer is always added")
    import_hf.add_argument("--dtype", choices=DTYPES, default=None,
                           help="convert the weights (default: keep the checkpoint's dtype; GGUF: "
                                "float32)")
    import_hf.add_argument("--force", action="store_true", help="replace OUT if it exists")
    import_hf.set_defaults(handler=run_import_hf)

    export_hf = subcommands.add_parser(
        "export-hf", help="write one member as a standard Hugging Face Qwen3/Llama directory",
        description="Write member K (embedding, blocks 0..e_K, exit branch K) as a plain "
                    "checkpoint of the family's architecture (Qwen3ForCausalLM or "
                    "LlamaForCausalLM) with e_K + 2 layers (the last member: all layers).")
    export_hf.add_argument("family", type=Path, help="family directory")
    export_hf.add_argument("out", type=Path, help="directory to write")
    export_hf.add_argument("--exit", type=int, required=True, help="member index K (0 = shallowest)")
    export_hf.add_argument("--force", action="store_true", help="replace OUT if it exists")
    export_hf.set_defaults(handler=run_export_hf)

    register_export_onnx(subcommands)
    register_calibrate(subcommands)


def register_export_onnx(subcommands: argparse._SubParsersAction) -> None:
    export_onnx = subcommands.add_parser(
        "export-onnx", help="export members as ONNX graphs for devices (ONNX Runtime)",
        description="Export member K (default: every member) as FAMILY/members/<K>/device.onnx: "
                    "embedding, blocks 0..e_K and exit branch K in one graph, KV cache as explicit "
                    "inputs/outputs, the family hash in its metadata.")
    export_onnx.add_argument("family", type=Path, help="family directory")
    export_onnx.add_argument("--exit", type=int, action="append", default=None,
                             help="member to export (repeatable; default all)")
    export_onnx.add_argument("--int8", action="store_true",
                             help="also write device.int8.onnx (dynamic int8 MatMuls, per channel)")
    export_onnx.add_argument("--kv-cache", choices=KV_CACHE_CHOICES, default=AUTO,
                             help="KV cache layout: 'shared' = ONNX Runtime GroupQueryAttention on a "
                                  "buffer bound as both past and present (no copy per token; needs "
                                  "head_dim %% 8 == 0); 'concat' = standard ONNX ops only, for other "
                                  "runtimes (copies the past every call); 'auto' (default) = shared "
                                  "where possible")
    export_onnx.set_defaults(handler=run_export_onnx)


def register_calibrate(subcommands: argparse._SubParsersAction) -> None:
    calibrate = subcommands.add_parser(
        "calibrate", help="choose member K's exit-mode threshold for a target agreement",
        description="Run the family teacher-forced on held-out text and, for each confidence "
                    "policy (max_prob, margin, entropy), pick the threshold that settles the most "
                    "tokens on member K while the exit-mode output still agrees with the full "
                    "model on at least --target of the positions. Writes "
                    "FAMILY/members/<K>/calibration.json, which the device SDK uses by default.")
    calibrate.add_argument("family", type=Path, help="family directory")
    calibrate.add_argument("--exit", type=int, required=True, help="member index K")
    calibrate.add_argument("--data", type=Path, required=True,
                           help="tokenized corpus directory (`flow tokenize`) holding held-out text")
    calibrate.add_argument("--split", default="heldout", help="token split to use (default heldout)")
    calibrate.add_argument("--target", type=float, default=0.95,
                           help="agreement with the full model to reach (default 0.95)")
    calibrate.add_argument("--tokens", type=int, default=32768,
                           help="held-out positions to evaluate at most (default 32768)")
    calibrate.add_argument("--window", type=int, default=256, help="context window (default 256)")
    calibrate.set_defaults(handler=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> None:
    from flow.artifact import TOKENIZER_FILE
    from flow.calibration import calibrate
    from flow.data.tokens import open_tokens

    tokens = open_tokens(args.data, args.split, args.family / TOKENIZER_FILE)
    result = calibrate(args.family, args.exit, tokens, args.target, args.window, args.tokens)
    print(f"member {args.exit}: top-1 agrees with the full model at "
          f"{result['member_top1_agreement']:.1%} of {result['positions']} held-out positions")
    for policy, threshold in result["thresholds"].items():
        stats = result["policies"][policy]
        print(f"  {policy:9s} threshold {threshold:+.4f}: {stats['device_share']:.1%} of tokens on "
              f"the device, agreement {stats['agreement']:.1%}")
    print(f"wrote {result['path']}")


def run_export_onnx(args: argparse.Namespace) -> None:
    from flow.onnx_export import export_family_members

    for path in export_family_members(args.family, args.exit, int8=args.int8,
                                      kv_cache=args.kv_cache):
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB)")


def _torch_dtype(name: str | None):
    import torch

    return None if name is None else getattr(torch, name)


def run_new(args: argparse.Namespace) -> None:
    from flow.config import preset, with_final_exit
    from flow.data.tokenizer import load_tokenizer
    from flow.family import Family

    overrides = {}
    if args.tokenizer is not None:
        overrides["vocab_size"] = load_tokenizer(args.tokenizer).get_vocab_size(with_added_tokens=True)
    if args.exits is not None:
        overrides["exits"] = with_final_exit(args.exits, preset(args.preset).num_layers)
    config = preset(args.preset, **overrides)
    family = Family.random(config, seed=args.seed, dtype=_torch_dtype(args.dtype), tokenizer=args.tokenizer)
    manifest = family.save(args.out, overwrite=args.force)
    print(f"wrote {args.out}: {describe_exits(config)}, hash {manifest.family_hash[:16]}")


def run_import_hf(args: argparse.Namespace) -> None:
    from flow.errors import ConfigError
    from flow.family import Family
    from flow.pretrained import pretrained_file

    sources = [given for given in (args.src, args.gguf, args.pretrained) if given is not None]
    if len(sources) != 1:
        raise ConfigError("give exactly one source: a Hugging Face directory SRC, --gguf FILE or "
                          "--pretrained NAME")
    dtype = _torch_dtype(args.dtype)
    if args.src is not None:
        family = Family.from_hf(args.src, exits=args.exits, dtype=dtype)
    else:
        path = args.gguf if args.gguf is not None else pretrained_file(args.pretrained)
        family = Family.from_gguf(path, exits=args.exits, dtype=dtype)
    manifest = family.save(args.out, overwrite=args.force)
    print(f"wrote {args.out}: {family.config.architecture}, {describe_exits(family.config)}, "
          f"hash {manifest.family_hash[:16]}")


def run_export_hf(args: argparse.Namespace) -> None:
    from flow.family import Family

    family = Family.load(args.family)
    family.config.check_exit(args.exit)
    path = family.export_hf(args.out, exit=args.exit, overwrite=args.force)
    print(f"wrote {path}: member {args.exit} as a {family.config.arch.hf_class} with "
          f"{family.config.member_num_layers(args.exit)} layers")


def run_info(args: argparse.Namespace) -> None:
    from flow.artifact import MEMBERS_DIR, WEIGHTS_FILE, heads_equal_to_embedding, read_manifest

    # A device's copy of a family carries family.json, tokenizer.json and its members only.
    device_copy = (args.family / "family.json").is_file() and not (args.family / WEIGHTS_FILE).is_file()
    manifest = read_manifest(args.family, verify=not device_copy, weights=not device_copy)
    config = manifest.config
    tied = ([None] * config.num_exits if device_copy
            else heads_equal_to_embedding(args.family / WEIGHTS_FILE, config.num_exits))
    members = [{"exit": k, "exit_layer": layer, "layers": config.member_num_layers(k),
                "parameters": config.member_parameters(k, bool(tied[k])), "head_is_embedding": tied[k],
                "device_parts": sorted(p.name for p in (args.family / MEMBERS_DIR / str(k)).glob("*.onnx")),
                "sha256": manifest.members.get(str(k), {})}
               for k, layer in enumerate(config.exits)]
    if args.json:
        print(json.dumps({**manifest.to_dict(), "family_hash": manifest.family_hash,
                          "members": members}, indent=2))
        return
    c = config
    print(f"family     {args.family}")
    print(f"hash       {manifest.family_hash}")
    print(f"backbone   {c.architecture}, {c.num_layers} layers, hidden {c.hidden_size}, "
          f"MLP {c.intermediate_size}, "
          f"heads {c.num_heads} (kv {c.num_kv_heads}) x {c.head_dim}, vocab {c.vocab_size}, "
          f"context {c.max_seq_len}, {manifest.weights_dtype}")
    print(f"parameters {c.total_parameters():,} stored" + (
        f" (not in this copy: a device copy, without {WEIGHTS_FILE})" if device_copy else ""))
    tokenizer = manifest.tokenizer.name if manifest.tokenizer else "none"
    print(f"tokenizer  {tokenizer}")
    print(f"provenance {describe_provenance(manifest.provenance)}")
    print("members    exit  after layer  layers   parameters  device parts")
    for m in members:
        parts = ", ".join(f"{part} (sha256 {m['sha256'][part][:12]}…)" if part in m["sha256"]
                          else f"{part} (no recorded hash)" for part in m["device_parts"]) or "-"
        print(f"           {m['exit']:4d}  {m['exit_layer']:11d}  {m['layers']:6d}  "
              f"{m['parameters']:11,d}  {parts}")
    if device_copy:
        print(f"           (parameters count each head as its own tensor: whether a head is the "
              f"embedding is read from {WEIGHTS_FILE}, not in this copy)")
    elif any(tied):
        print(f"           (members {', '.join(str(k) for k, same in enumerate(tied) if same)}: the "
              f"head equals the embedding, one tensor in the device graph, counted once)")


def describe_provenance(provenance: dict) -> str:
    """One line: where the weights came from and, for trained families, how far they got."""
    parts = [str(provenance.get("source", "unknown"))]
    for key in ("seed", "path", "steps"):
        if key in provenance:
            parts.append(f"{key} {provenance[key]}")
    val_loss = provenance.get("metrics", {}).get("val_loss")
    if val_loss:
        parts.append("val loss " + " ".join(f"e{k}={loss:.3f}" for k, loss in enumerate(val_loss)))
    return ", ".join(parts) + " (flow info --json for all)"


def describe_exits(config) -> str:
    return f"{config.num_layers} layers, exits after layers {list(config.exits)}"
