"""onnxruntime-genai runs the exported members: its greedy tokens are the device runtime's.

Every member of a tiny family with a tokenizer is exported by `export_family_members` (what
`flow export-onnx` runs), fp32 and int8, in both cache layouts: `shared` as a Qwen3 family and
`concat` as a Llama one, so both of genai's model types run as well. genai generates with its own
loop from the files written beside each member; the oracle is `flow generate --mode local`
(`DeviceClient.complete`) on the same graph and the same ONNX Runtime, so tokens must be equal.
"""

import json

import numpy as np
import onnx
import onnxruntime_genai as og
import pytest

from builders import sharpen_heads, tiny_config
from flow import Family
from flow.artifact import TOKENIZER_FILE, member_path, read_manifest
from flow.member_format import FLOAT32_FILE, GENAI_CONFIG_FILE, INT8_FILE, TOKENIZER_CONFIG_FILE, MemberInfo

NEW_TOKENS = 16
PROMPTS = ["def fib(n):\n    return", "import json\nx = json.loads(s)\nprint(",
           "    for item in sorted(heap):\n"]
LAYOUTS = {  # cache layout -> the architecture of the family exported with it
    "shared": dict(architecture="qwen3"),
    "concat": dict(architecture="llama", num_heads=6, rope_theta=100000.0, rms_norm_eps=1e-5),
}


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    from flow.data.corpus import stdlib_sources
    from flow.data.tokenizer import save_tokenizer, train_tokenizer

    names = {"stdlib/json/decoder.py", "stdlib/textwrap.py", "stdlib/heapq.py"}
    documents = [s.path.read_text() for s in stdlib_sources() if s.name in names]
    return save_tokenizer(train_tokenizer(documents, vocab_size=320),
                          tmp_path_factory.mktemp("tokenizer") / TOKENIZER_FILE)


@pytest.fixture(scope="module", params=list(LAYOUTS))
def exported(request, tokenizer_path, tmp_path_factory):
    """(family directory, family, kv_cache): 3 layers, exits after layers 0 and 2 (a member with
    an exit block, and the full model), every member exported fp32 and int8."""
    from flow.onnx_export import export_family_members

    kv_cache = request.param
    config = tiny_config(num_layers=3, exits=(0, 2), head_dim=16, max_seq_len=96, vocab_size=320,
                         **LAYOUTS[kv_cache])
    family = sharpen_heads(Family.random(config, seed=7, tokenizer=tokenizer_path))
    family_dir = tmp_path_factory.mktemp(f"genai-{kv_cache}") / "fam"
    family.save(family_dir)
    export_family_members(family_dir, int8=True, kv_cache=kv_cache)
    return family_dir, family, kv_cache


def genai_model(family_dir, exit: int, int8: bool):
    """genai's model of member `exit`'s directory; the int8 member through a config overlay."""
    config = og.Config(str(member_path(family_dir, exit).parent))
    if int8:
        config.overlay(json.dumps({"model": {"decoder": {"filename": INT8_FILE}}}))
    return og.Model(config)


def genai_greedy(model, prompts: list[list[int]], pad_id: int, stop_ids: list[int],
                 max_length: int | None = None) -> list[list[int]]:
    """Up to NEW_TOKENS greedy tokens per prompt from genai's own loop, each row ending at its
    first end token. Several prompts go as one batch, right-padded with `pad_id` as genai's own
    tokenizer pads a batch."""
    params = og.GeneratorParams(model)
    if max_length is not None:
        params.set_search_options(batch_size=len(prompts), max_length=max_length)
    generator = og.Generator(model, params)
    width = max(map(len, prompts))
    generator.append_tokens(np.array([p + [pad_id] * (width - len(p)) for p in prompts], np.int32))
    tokens: list[list[int]] = [[] for _ in prompts]
    while not generator.is_done() and max(map(len, tokens)) < NEW_TOKENS:
        generator.generate_next_token()
        for row, token in zip(tokens, generator.get_next_tokens(), strict=True):
            if not (row and row[-1] in stop_ids):
                row.append(int(token))
    return tokens


def test_each_member_directory_is_a_genai_model_of_that_member(exported):
    family_dir, family, kv_cache = exported
    manifest = read_manifest(family_dir, verify=False)
    stop_ids = family.stop_token_ids()
    for exit in range(family.config.num_exits):
        member_dir = member_path(family_dir, exit).parent
        info = MemberInfo.from_metadata(
            {p.key: p.value for p in onnx.load(member_dir / FLOAT32_FILE).metadata_props}, member_dir)
        config = json.loads((member_dir / GENAI_CONFIG_FILE).read_text())
        model, decoder, search = config["model"], config["model"]["decoder"], config["search"]
        assert model["type"] == family.config.architecture and model["context_length"] == info.max_seq_len
        assert model["eos_token_id"] == stop_ids and model["pad_token_id"] == stop_ids[0]
        assert decoder["filename"] == FLOAT32_FILE
        assert (decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"],
                decoder["hidden_size"]) == (info.num_cache_layers, info.num_kv_heads, info.head_dim,
                                            info.hidden_size)
        assert info.kv_cache == kv_cache and search["past_present_share_buffer"] == (kv_cache == "shared")
        assert search["max_length"] == info.max_seq_len and not search["do_sample"]
        assert (member_dir / TOKENIZER_FILE).read_text() == (family_dir / TOKENIZER_FILE).read_text()
        assert json.loads((member_dir / TOKENIZER_CONFIG_FILE).read_text())["pad_token"] == "<|endoftext|>"
        # family.json still records the ONNX files alone, and the device runtime checks them
        assert set(manifest.members[str(exit)]) == {FLOAT32_FILE, INT8_FILE}

        tokenizer = og.Tokenizer(genai_model(family_dir, exit, int8=False))
        assert list(tokenizer.eos_token_ids) == stop_ids
        for text in PROMPTS:
            ids = family.tokenizer.encode(text).ids
            assert list(tokenizer.encode(text)) == ids and tokenizer.decode(ids) == text


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_genai_generates_the_device_runtimes_tokens(exported, int8):
    """Catches: a genai config that misdescribes the member (layer count, head shape, cache
    layout, names), genai's masks or positions disagreeing with the graph's conventions (one
    prompt, and fp32 prompts as a right-padded batch), or the int8 overlay running the fp32 file."""
    from device import DeviceClient
    from device.member import MemberSession

    family_dir, family, kv_cache = exported
    prompts = [family.tokenizer.encode(text).ids for text in PROMPTS]
    stop_ids = family.stop_token_ids()
    for exit in range(family.config.num_exits):
        where = f"{kv_cache} member {exit} {'int8' if int8 else 'fp32'}"
        model = genai_model(family_dir, exit, int8)
        device = DeviceClient(family_dir, exit=exit, int8=int8)
        expected = [device.complete(p, max_new_tokens=NEW_TOKENS, ignore_eos=True).tokens
                    for p in prompts]
        # one prompt at a time, with genai_config.json's search options (a buffer of the context)
        runs = {"single": [genai_greedy(model, [p], stop_ids[0], stop_ids)[0] for p in prompts]}
        if not int8:  # int8 rows of a batch share each MatMul's dynamic activation scale, so a
            # batched row is not the device's batch of one; fp32 rows are independent
            runs["batch"] = genai_greedy(model, prompts, stop_ids[0], stop_ids,
                                         max_length=max(map(len, prompts)) + NEW_TOKENS)
        for run, generated in runs.items():
            for tokens, reference in zip(generated, expected, strict=True):
                assert tokens == reference[:len(tokens)], f"{where}, {run}: genai {tokens}, device {reference}"
                assert len(tokens) == NEW_TOKENS or tokens[-1] in stop_ids, f"{where}, {run}"

        # the prompt's last logits: genai ran exactly the file the device runs, not the other one
        generator = og.Generator(model, og.GeneratorParams(model))
        generator.append_tokens(prompts[0])
        logits = generator.get_logits().reshape(-1)
        for precision in (False, True):
            reference = MemberSession(member_path(family_dir, exit, precision)).run(prompts[0], 0).logits[-1]
            if precision == int8:
                np.testing.assert_allclose(logits, reference, atol=1e-5, err_msg=where)
            else:
                assert np.abs(logits - reference).max() > 1e-3, f"{where}: ran the other file"
