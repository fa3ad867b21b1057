"""Numbers that must be right: wire codecs, confidence policies and the sampler.

Each expectation comes from an independent implementation where one exists (torch's bfloat16
and half casts, torch.softmax, torch.distributions.Categorical) rather than from the code under
test, so a wrong rounding rule or a wrong formula fails here.
"""

import math

import numpy as np
import pytest
import torch

from flow.codecs import CODECS, CodecError, EncodedRows, decode, encode
from flow.confidence import ExitPolicy, confidence
from flow.errors import ConfigError
from flow.sampling import Sampler, check_sampling
from flow.tier import SamplingParams


def bits_of(values: list[int]) -> np.ndarray:
    """float32 values with exactly these bit patterns, as one row."""
    return np.array([values], dtype=np.uint32).view(np.float32)


def torch_bf16_bits(rows: np.ndarray) -> np.ndarray:
    return torch.from_numpy(rows).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def wire_bf16_bits(rows: np.ndarray) -> np.ndarray:
    return np.frombuffer(encode(rows, "bf16").data, "<u2").reshape(rows.shape)


# ---- codecs -------------------------------------------------------------------------------------

# Hand-picked float32 bit patterns around bf16's rounding point (the low 16 bits).
ROUNDING_CASES = [
    0x3F808000,  # 1 + 2^-8 exactly halfway, even below -> stays 0x3F80
    0x3F818000,  # halfway, odd below -> rounds up to 0x3F82
    0x3F808001,  # just above halfway -> up
    0x3F807FFF,  # just below halfway -> down
    0xBF808000,  # negative halfway, even below -> stays 0xBF80
    0xBF818000,  # negative halfway, odd below -> 0xBF82 (away from zero in magnitude)
    0xBF80FFFF,  # negative, rounds up in magnitude
    0x7F7FFFFF,  # largest float32 -> rounds to +inf, as torch does
    0xFF7FFFFF,  # most negative float32 -> -inf
    0x7F800000, 0xFF800000,  # +-inf
    0x00000000, 0x80000000,  # +-0
    0x00000001, 0x80008000, 0x00018000,  # subnormals, halfway cases among them
    0x3FFFFFFF,  # mantissa all ones: the carry goes into the exponent (-> 2.0)
]


def test_bf16_matches_torch_on_hand_picked_rounding_cases():
    rows = bits_of(ROUNDING_CASES)
    np.testing.assert_array_equal(wire_bf16_bits(rows), torch_bf16_bits(rows))


def test_bf16_ties_round_to_even():
    # Spelled out, not only compared: halfway cases go to the even bf16 mantissa.
    got = wire_bf16_bits(bits_of([0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000]))[0]
    assert [hex(int(v)) for v in got] == ["0x3f80", "0x3f82", "0xbf80", "0xbf82"]


def test_bf16_matches_torch_on_random_values_of_every_magnitude():
    rng = np.random.default_rng(0)
    normal = rng.standard_normal((64, 257)).astype(np.float32) * 10.0 ** rng.integers(-30, 30, (64, 1))
    random_bits = rng.integers(0, 2**32, (64, 257), dtype=np.uint64).astype(np.uint32).view(np.float32)
    random_bits = np.where(np.isnan(random_bits), np.float32(1.0), random_bits)  # NaN: next test
    for rows in (normal.astype(np.float32), random_bits):
        np.testing.assert_array_equal(wire_bf16_bits(rows), torch_bf16_bits(rows))


def test_bf16_keeps_nan_a_nan_and_decodes_to_torchs_values():
    # NaN payload bits differ between torch's code paths, so compare NaN-ness, not bits;
    # the rounding carry must never turn a NaN into inf or zero.
    rows = bits_of([0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0x7FFFFFFF, 0xFF800001])
    assert np.isnan(decode(encode(rows, "bf16"))).all()
    values = np.random.default_rng(1).standard_normal((8, 33)).astype(np.float32)
    expected = torch.from_numpy(values).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(decode(encode(values, "bf16")), expected)


def test_fp16_matches_torch_and_numpy_half():
    rng = np.random.default_rng(2)
    rows = (rng.standard_normal((32, 129)) * 10.0 ** rng.integers(-8, 6, (32, 1))).astype(np.float32)
    rows[0, :6] = [65504.0, 65520.0, -70000.0, 2.0**-24, 2.0**-25, -0.0]  # max, overflow, subnormal
    wire = np.frombuffer(encode(rows, "fp16").data, "<u2").reshape(rows.shape)
    torch_bits = torch.from_numpy(rows).half().view(torch.int16).numpy().view(np.uint16)
    numpy_bits = rows.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(wire, torch_bits)
    np.testing.assert_array_equal(wire, numpy_bits)
    np.testing.assert_array_equal(decode(encode(rows, "fp16")), torch.from_numpy(rows).half().float().numpy())


def test_fp32_round_trip_is_bit_exact():
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((5, 17)).astype(np.float32)
    rows[0, :5] = [np.inf, -np.inf, -0.0, np.finfo(np.float32).max, np.finfo(np.float32).smallest_subnormal]
    decoded = decode(encode(rows, "fp32"))
    assert decoded.dtype == np.float32 and decoded.shape == rows.shape
    np.testing.assert_array_equal(decoded.view(np.uint32), rows.view(np.uint32))


def test_int8_error_is_at_most_half_a_step_per_row():
    rng = np.random.default_rng(4)
    rows = rng.standard_normal((16, 300)).astype(np.float32) * rng.uniform(1e-3, 1e3, (16, 1)).astype(np.float32)
    encoded = encode(rows, "int8")
    scales = np.frombuffer(encoded.scales, "<f4")
    np.testing.assert_allclose(scales, np.abs(rows).max(axis=1) / 127, rtol=1e-6)
    error = np.abs(decode(encoded) - rows)
    assert (error <= scales[:, None] / 2 * (1 + 1e-5)).all(), (error / scales[:, None]).max()
    # the largest magnitude of each row is representable exactly (up to float32 rounding)
    peak = np.abs(rows).argmax(axis=1)
    np.testing.assert_allclose(decode(encoded)[np.arange(16), peak], rows[np.arange(16), peak], rtol=1e-6)


def test_int8_zero_rows_decode_to_exact_zeros():
    rows = np.zeros((3, 8), np.float32)
    rows[1] = np.linspace(-1, 1, 8)
    decoded = decode(encode(rows, "int8"))
    assert (decoded[0] == 0).all() and (decoded[2] == 0).all()
    assert np.isfinite(decoded).all()


@pytest.mark.parametrize(("codec", "data_bytes", "scale_bytes"),
                         [("fp32", 4, 0), ("fp16", 2, 0), ("bf16", 2, 0), ("int8", 1, 4)])
def test_payload_size_per_codec(codec, data_bytes, scale_bytes):
    rows, hidden = 7, 96
    encoded = encode(np.ones((rows, hidden), np.float32), codec)
    assert encoded.shape == (rows, hidden)
    assert len(encoded.data) == rows * hidden * data_bytes
    assert len(encoded.scales) == rows * scale_bytes
    assert encoded.num_bytes == rows * hidden * data_bytes + rows * scale_bytes


@pytest.mark.parametrize("codec", CODECS)
def test_zero_rows_round_trip(codec):
    decoded = decode(encode(np.zeros((0, 8), np.float32), codec))
    assert decoded.shape == (0, 8)


@pytest.mark.parametrize("codec", CODECS)
def test_payload_of_the_wrong_size_is_rejected(codec):
    good = encode(np.ones((2, 4), np.float32), codec)
    bad = EncodedRows(codec, good.shape, good.data[:-1], good.scales)
    with pytest.raises(CodecError, match=rf"{codec} payload of shape \(2, 4\) must be {len(good.data)} bytes, got {len(good.data) - 1}"):
        decode(bad)


def test_int8_payload_without_its_scales_is_rejected():
    good = encode(np.ones((3, 4), np.float32), "int8")
    with pytest.raises(CodecError, match=r"needs 3 float32 scales \(12 bytes\), got 0 bytes"):
        decode(EncodedRows("int8", good.shape, good.data))
    with pytest.raises(CodecError, match="got 8 bytes"):
        decode(EncodedRows("int8", good.shape, good.data, good.scales[:8]))


def test_unknown_codec_is_rejected_both_ways_with_the_choices():
    with pytest.raises(CodecError, match=r"unknown codec 'fp8'; choose one of fp32, fp16, bf16, int8"):
        encode(np.ones((1, 4), np.float32), "fp8")
    with pytest.raises(CodecError, match=r"unknown codec 'fp8'"):
        decode(EncodedRows("fp8", (1, 4), b"\0" * 4))


@pytest.mark.parametrize("shape", [(4,), (2, 2, 2), ()])
def test_rows_that_are_not_2d_are_rejected(shape):
    with pytest.raises(CodecError, match="must be 2-D"):
        encode(np.ones(shape, np.float32), "fp32")


def test_rows_with_no_hidden_width_are_rejected():
    for codec in CODECS:
        with pytest.raises(CodecError, match="hidden > 0"):
            encode(np.ones((2, 0), np.float32), codec)
    with pytest.raises(CodecError, match="hidden > 0"):
        decode(EncodedRows("fp32", (2, 0), b""))


def test_codec_error_is_a_value_error():
    assert issubclass(CodecError, ValueError)


# ---- confidence policies --------------------------------------------------------------------------

def random_logits(seed: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((6, 50)) * rng.uniform(0.1, 20, (6, 1))
    logits[0] = 0.0  # uniform
    logits[1, 7] = 1e4  # one certain token (the others underflow to probability 0)
    return logits.astype(np.float32)


def test_max_prob_is_torch_softmax_top1():
    logits = random_logits()
    expected = torch.softmax(torch.from_numpy(logits).double(), dim=-1).max(dim=-1).values.numpy()
    np.testing.assert_allclose(confidence(logits, "max_prob"), expected, rtol=1e-12, atol=1e-15)
    assert confidence(logits, "max_prob")[0] == pytest.approx(1 / 50)


def test_margin_is_top1_minus_top2_probability():
    logits = random_logits()
    top2 = torch.softmax(torch.from_numpy(logits).double(), dim=-1).topk(2, dim=-1).values.numpy()
    np.testing.assert_allclose(confidence(logits, "margin"), top2[:, 0] - top2[:, 1], rtol=1e-12, atol=1e-15)
    assert confidence(logits, "margin")[0] == pytest.approx(0.0, abs=1e-15)


def test_margin_of_a_tied_top_is_zero():
    assert confidence(np.array([3.0, 1.0, 3.0]), "margin") == pytest.approx(0.0, abs=1e-15)


def test_entropy_score_is_minus_torch_categorical_entropy():
    logits = random_logits()
    entropy = torch.distributions.Categorical(logits=torch.from_numpy(logits).double()).entropy().numpy()
    np.testing.assert_allclose(confidence(logits, "entropy"), -entropy, rtol=1e-10, atol=1e-12)
    assert confidence(logits, "entropy")[0] == pytest.approx(-math.log(50))
    assert confidence(logits, "entropy")[1] == pytest.approx(0.0, abs=1e-12)


def test_scores_keep_the_leading_shape():
    logits = np.random.default_rng(6).standard_normal((2, 3, 11))
    for policy in ("max_prob", "margin", "entropy"):
        assert confidence(logits, policy).shape == (2, 3)


def test_unknown_policy_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown confidence policy 'top1'; choose one of max_prob, margin, entropy"):
        confidence(np.zeros(4), "top1")
    with pytest.raises(ConfigError, match="unknown confidence policy 'top1'"):
        ExitPolicy("top1", 0.5)


@pytest.mark.parametrize("threshold", [math.nan, math.inf, -math.inf])
def test_non_finite_threshold_is_a_config_error(threshold):
    with pytest.raises(ConfigError, match="max_prob threshold must be a finite number"):
        ExitPolicy("max_prob", threshold)


def test_any_finite_threshold_is_accepted_as_float_and_none_is_the_policys_default():
    assert ExitPolicy("entropy", -2).threshold == -2.0 and isinstance(ExitPolicy("entropy", -2).threshold, float)
    assert ExitPolicy("max_prob", 1.5).threshold == 1.5
    assert [ExitPolicy(p).threshold for p in ("max_prob", "margin", "entropy")] == [0.8, 0.5, -1.0]


def test_an_exit_policy_accepts_the_rows_whose_score_reaches_its_threshold():
    logits = np.log(np.array([[0.9, 0.05, 0.05], [0.5, 0.3, 0.2], [0.8, 0.1, 0.1]]))
    assert ExitPolicy("max_prob", 0.8).accepts(logits).tolist() == [True, False, True]
    assert ExitPolicy("margin", 0.3).accepts(logits).tolist() == [True, False, True]


# ---- sampler --------------------------------------------------------------------------------------

PROBS = np.array([0.5, 0.3, 0.15, 0.05])
LOGITS = np.log(PROBS)


def draw(params: SamplingParams, logits=LOGITS, count: int = 20000, ids=None) -> np.ndarray:
    sampler = Sampler(params)
    return np.array([sampler.pick(logits, ids=ids) for _ in range(count)])


def test_greedy_is_argmax():
    rng = np.random.default_rng(7)
    sampler = Sampler(SamplingParams(temperature=0.0))
    assert sampler.greedy
    for _ in range(50):
        logits = rng.standard_normal(100)
        assert sampler.pick(logits) == int(np.argmax(logits))


@pytest.mark.parametrize("temperature", [0.01, 1.0, 5.0, 100.0])
def test_top_k_1_is_argmax_at_any_temperature(temperature):
    rng = np.random.default_rng(8)
    sampler = Sampler(SamplingParams(temperature=temperature, top_k=1, seed=0))
    for _ in range(50):
        logits = rng.standard_normal(100)
        assert sampler.pick(logits) == int(np.argmax(logits))


def test_same_seed_same_sequence_other_seed_another():
    logits = np.random.default_rng(9).standard_normal(64)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=123)
    first, again = draw(params, logits, 200), draw(params, logits, 200)
    np.testing.assert_array_equal(first, again)
    other = draw(SamplingParams(temperature=1.0, top_p=0.9, seed=124), logits, 200)
    assert (first != other).any()


def test_frequencies_at_temperature_1_match_softmax():
    counts = np.bincount(draw(SamplingParams(temperature=1.0, seed=10)), minlength=4)
    np.testing.assert_allclose(counts / counts.sum(), PROBS, atol=0.015)


def test_temperature_sharpens_as_softmax_of_scaled_logits():
    expected = torch.softmax(torch.from_numpy(LOGITS) / 0.5, dim=-1).numpy()  # 0.5 -> p^2 / sum
    counts = np.bincount(draw(SamplingParams(temperature=0.5, seed=11)), minlength=4)
    np.testing.assert_allclose(counts / counts.sum(), expected, atol=0.015)


def test_top_k_2_never_draws_outside_the_top_two():
    logits = np.array([0.1, 2.0, -1.0, 1.9, 0.5])
    drawn = draw(SamplingParams(temperature=2.0, top_k=2, seed=12), logits, 5000)
    assert set(drawn.tolist()) == {1, 3}
    # renormalised over the two: softmax([2.0, 1.9] / 2)
    expected = torch.softmax(torch.tensor([2.0, 1.9]) / 2.0, dim=-1).numpy()
    assert (drawn == 1).mean() == pytest.approx(expected[0], abs=0.025)


def test_top_p_keeps_the_smallest_prefix_reaching_top_p():
    drawn = draw(SamplingParams(temperature=1.0, top_p=0.75, seed=13))
    assert set(drawn.tolist()) == {0, 1}  # 0.5 < 0.75 <= 0.5 + 0.3
    assert (drawn == 0).mean() == pytest.approx(0.5 / 0.8, abs=0.015)


def test_top_p_below_the_top_probability_keeps_only_the_top():
    drawn = draw(SamplingParams(temperature=1.0, top_p=0.4, seed=14), count=500)
    assert set(drawn.tolist()) == {0}


def test_top_p_over_a_shuffled_vocabulary_keeps_the_most_probable():
    order = np.array([2, 0, 3, 1])  # token 2 has p=0.5, 0 has 0.3, 3 has 0.15, 1 has 0.05
    logits = np.empty(4)
    logits[order] = LOGITS
    drawn = draw(SamplingParams(temperature=1.0, top_p=0.9, seed=15), logits, 5000)
    assert set(drawn.tolist()) == {2, 0, 3}


def test_sampling_a_truncated_distribution_returns_its_ids():
    ids = [901, 17, 4242, 5]
    drawn = draw(SamplingParams(temperature=1.0, seed=16), LOGITS, 5000, ids=ids)
    assert set(drawn.tolist()) == set(ids)
    assert (drawn == 901).mean() == pytest.approx(0.5, abs=0.03)
    assert Sampler(SamplingParams()).pick(LOGITS, ids=ids) == 901  # greedy maps through ids
    assert draw(SamplingParams(temperature=1.0, top_k=1, seed=0), LOGITS, 20, ids=ids).tolist() == [901] * 20


@pytest.mark.parametrize(("params", "message"), [
    (SamplingParams(temperature=-0.1), "temperature must be"),
    (SamplingParams(temperature=math.nan), "temperature must be"),
    (SamplingParams(temperature=math.inf), "temperature must be"),
    (SamplingParams(top_k=-1), "top_k must be"),
    (SamplingParams(top_k=2.5), "top_k must be"),
    (SamplingParams(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (SamplingParams(top_p=1.01), r"top_p must be in \(0, 1\]"),
    (SamplingParams(top_p=math.nan), r"top_p must be in \(0, 1\]"),
])
def test_bad_sampling_params_are_config_errors(params, message):
    with pytest.raises(ConfigError, match=message):
        check_sampling(params)
    with pytest.raises(ConfigError, match=message):
        Sampler(params)
