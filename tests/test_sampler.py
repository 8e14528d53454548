"""Sampler: greedy/truncation rules, sampled distributions, seeded reproducibility,
penalties against hand-computed values, logit_bias, min_tokens mask and raw logprobs.

Tests run on CPU, and also on CUDA when a GPU is present (the sampler is device-agnostic).
"""

import math

import pytest
import torch

from minke.runner.sampler import (
    Sampler, SamplingBatch, apply_penalties, apply_top_k_top_p_min_p, make_generator,
    token_counts,
)
from minke.sampling_params import SamplingParams

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def batch_of(params, device, outputs=None, prompts=None, generators=None, masks=None):
    n = len(params)
    return SamplingBatch.from_params(
        params, outputs or [[] for _ in range(n)], prompts or [[] for _ in range(n)],
        generators, masks, device)


def sample(logits, params, device, **kw):
    return Sampler()(logits.to(device), batch_of(params, device, **kw))


# Probabilities of a 5-token vocab, deliberately not sorted by token id.
PROBS5 = torch.tensor([0.06, 0.5, 0.04, 0.3, 0.1])
LOGITS5 = PROBS5.log()


def chi_square(tokens, expected_probs):
    """Pearson statistic of sampled tokens [N] against expected probs [V] (zeros skipped)."""
    n = tokens.numel()
    counts = torch.bincount(tokens.cpu(), minlength=expected_probs.numel()).double()
    expected = expected_probs.double() * n
    keep = expected > 0
    assert counts[~keep].sum() == 0, f"sampled a truncated token: counts {counts.tolist()}"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


# ------------------------------------------------------------------------------ batch build

def test_from_params_builds_tensors():
    params = [SamplingParams(temperature=0.5, top_p=0.9, top_k=-1, min_p=0.1, logprobs=3,
                             presence_penalty=0.2, frequency_penalty=-0.3,
                             repetition_penalty=1.5, logit_bias={2: 1.0}),
              SamplingParams(temperature=0.0, top_k=4)]
    b = batch_of(params, "cpu")
    assert b.temperature.dtype == torch.float32 and b.top_k.dtype == torch.long
    torch.testing.assert_close(b.temperature, torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(b.top_p, torch.tensor([0.9, 1.0]))
    assert b.top_k.tolist() == [0, 4]
    torch.testing.assert_close(b.min_p, torch.tensor([0.1, 0.0]))
    torch.testing.assert_close(b.presence_penalty, torch.tensor([0.2, 0.0]))
    torch.testing.assert_close(b.frequency_penalty, torch.tensor([-0.3, 0.0]))
    torch.testing.assert_close(b.repetition_penalty, torch.tensor([1.5, 1.0]))
    assert b.num_logprobs == [3, None] and b.logit_bias == [{2: 1.0}, None]
    assert b.generators == [None, None] and b.min_tokens_mask == [[], []]
    # top_k of the greedy row doesn't count: only random rows are truncated.
    assert b.flags.any_random and b.flags.any_top_k_top_p and b.flags.any_min_p
    assert b.flags.any_repetition and b.flags.any_freq_presence
    # Flags computed from tensors (direct construction) agree with from_params'.
    direct = SamplingBatch(**{k: getattr(b, k) for k in b.__dataclass_fields__ if k != "flags"})
    assert direct.flags == b.flags


@pytest.mark.parametrize("shared", [True, False])
def test_from_params_shared_and_distinct_objects(shared):
    """Rows sharing one SamplingParams object (the offline case) and rows with their own give the same batch;
    flags, taken on the host in float32, agree with _summarise on the tensors also at float32 rounding edges."""
    kinds = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_p=0.999999999),
             SamplingParams(temperature=9.9999999e-6, min_p=0.05), SamplingParams(temperature=1.0, top_k=3,
                                                                                   repetition_penalty=1.1)]
    for k in range(len(kinds)):
        one = kinds[k]
        params = [one] * 5 if shared else [one.clone() for _ in range(5)]
        params = params + kinds[: k]  # mixes of distinct objects
        b = batch_of(params, "cpu")
        rows = torch.tensor([[p.temperature, p.top_p, p.min_p, p.presence_penalty, p.frequency_penalty,
                              p.repetition_penalty] for p in params], dtype=torch.float32)
        got = torch.stack([b.temperature, b.top_p, b.min_p, b.presence_penalty, b.frequency_penalty,
                           b.repetition_penalty], dim=1)
        assert torch.equal(got, rows)
        assert b.top_k.tolist() == [p.top_k for p in params]
        direct = SamplingBatch(**{f: getattr(b, f) for f in b.__dataclass_fields__ if f != "flags"})
        assert direct.flags == b.flags


def test_batch_and_logits_shape_errors():
    with pytest.raises(ValueError, match="generators"):
        batch_of([SamplingParams()] * 2, "cpu", generators=[None])
    with pytest.raises(ValueError, match="3 rows"):
        Sampler()(torch.zeros(3, 5), batch_of([SamplingParams()] * 2, "cpu"))
    with pytest.raises(ValueError, match="vocab"):
        Sampler()(torch.zeros(5), batch_of([SamplingParams()], "cpu"))


# -------------------------------------------------------------------------- greedy & filters

def test_greedy_is_argmax(device):
    torch.manual_seed(0)
    logits = torch.randn(16, 100)
    out = sample(logits, [SamplingParams(temperature=0.0)] * 16, device)
    assert out.token_ids.device.type == device
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()


@pytest.mark.parametrize("rows", [3, 40])  # CUDA: the two-pass argmax (<= 32 rows) and the one-pass one
def test_greedy_on_bf16_logits_is_the_fp32_argmax_ties_included(device, rows):
    """An all-greedy batch takes argmax over the model's bf16 logits without the fp32 copy: the same tokens as the
    fp32 argmax, including rows whose maximum appears several times (bf16's coarse values tie often)."""
    torch.manual_seed(4)
    logits = (torch.randn(rows, 16 * 1024) * 4).to(torch.bfloat16)
    logits[0, 100] = logits[0, 9000] = logits[0, 16000] = 40.0  # three-way tie: the first one wins
    out = sample(logits, [SamplingParams(temperature=0.0)] * rows, device)
    assert out.token_ids.tolist() == logits.float().argmax(-1).tolist()
    assert out.token_ids[0].item() == 100 and out.logprobs is None and out.top_logprobs == [None] * rows


def test_greedy_rows_unaffected_by_random_rows(device):
    torch.manual_seed(1)
    logits = torch.randn(8, 50)
    params = [SamplingParams(temperature=0.0 if i % 2 == 0 else 1.5, top_p=0.9) for i in range(8)]
    out = sample(logits, params, device)
    assert out.token_ids[0::2].tolist() == logits[0::2].argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0, 100.0])
def test_top_k_1_is_argmax_at_any_temperature(device, temperature):
    torch.manual_seed(2)
    logits = torch.randn(64, 30)
    out = sample(logits, [SamplingParams(temperature=temperature, top_k=1)] * 64, device)
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()


def test_top_k_1_breaks_ties_like_argmax(device):
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    kept = apply_top_k_top_p_min_p(logits.clone().to(device), top_k=torch.tensor([1], device=device))
    assert torch.isfinite(kept).tolist() == [[False, True, False, False]]


def test_tiny_top_p_keeps_only_the_max(device):
    torch.manual_seed(3)
    logits = torch.randn(64, 30)
    out = sample(logits, [SamplingParams(temperature=2.0, top_p=1e-6)] * 64, device)
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()


def test_filter_masks_exact_sets(device):
    # PROBS5 = [0.06, 0.5, 0.04, 0.3, 0.1]: by rank, tokens 1, 3, 4, 0, 2.
    logits = LOGITS5.repeat(5, 1).to(device)
    out = apply_top_k_top_p_min_p(
        logits.clone(),
        top_k=torch.tensor([3, 0, 0, 0, 2], device=device),
        top_p=torch.tensor([1.0, 0.75, 0.85, 1.0, 0.95], device=device),
        min_p=torch.tensor([0.0, 0.0, 0.0, 0.5, 0.0], device=device))
    kept = torch.isfinite(out).cpu()
    assert kept.tolist() == [
        [False, True, False, True, True],    # top_k=3
        [False, True, False, True, False],   # top_p=0.75: 0.5 + 0.3 reaches it
        [False, True, False, True, True],    # top_p=0.85: needs 0.5 + 0.3 + 0.1
        [False, True, False, True, False],   # min_p=0.5: threshold 0.5 * max prob = 0.25
        [False, True, False, True, False],   # top_k=2 then top_p=0.95 (no further cut)
    ]
    # Kept logits are untouched.
    torch.testing.assert_close(out.cpu()[kept], logits.cpu()[kept])


def test_filters_off_leave_logits_unchanged(device):
    torch.manual_seed(4)
    logits = torch.randn(4, 1000, device=device) * 5
    out = apply_top_k_top_p_min_p(logits.clone(), torch.zeros(4, dtype=torch.long, device=device),
                                  torch.ones(4, device=device), torch.zeros(4, device=device))
    assert torch.equal(out, logits)


# ---------------------------------------------------------------------- sampled distributions

N_SAMPLES = 20_000
# 4 degrees of freedom: P(chi2 > 30) ~ 5e-6, so a correct sampler essentially never fails,
# while a wrong temperature or truncation gives statistics in the hundreds or more.
CHI2_LIMIT = 30.0


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_distribution_matches_softmax(device, temperature):
    torch.manual_seed(10)
    out = sample(LOGITS5.repeat(N_SAMPLES, 1), [SamplingParams(temperature=temperature)] * N_SAMPLES,
                 device)
    expected = torch.softmax(LOGITS5 / temperature, dim=-1)
    assert chi_square(out.token_ids, expected) < CHI2_LIMIT


@pytest.mark.parametrize("kwargs, kept", [
    (dict(top_k=3), [1, 3, 4]),
    (dict(top_p=0.75), [1, 3]),
    (dict(top_p=0.85), [1, 3, 4]),
    (dict(min_p=0.5), [1, 3]),          # relative to the max prob 0.5, not absolute
    (dict(top_k=4, top_p=0.9), [1, 3, 4]),
    (dict(top_k=3, temperature=2.0), [1, 3, 4]),
])
def test_truncated_distribution_is_renormalised(device, kwargs, kept):
    torch.manual_seed(11)
    params = SamplingParams(**kwargs)
    out = sample(LOGITS5.repeat(N_SAMPLES, 1), [params] * N_SAMPLES, device)
    expected = torch.zeros(5)
    expected[kept] = torch.softmax(LOGITS5 / params.temperature, dim=-1)[kept]
    expected /= expected.sum()
    assert chi_square(out.token_ids, expected) < CHI2_LIMIT


def test_wrong_distribution_would_fail_the_check():
    # Guards the statistic itself: temperature 1 samples are far from softmax(logits / 2).
    torch.manual_seed(12)
    out = sample(LOGITS5.repeat(N_SAMPLES, 1), [SamplingParams()] * N_SAMPLES, "cpu")
    assert chi_square(out.token_ids, torch.softmax(LOGITS5 / 2, dim=-1)) > 10 * CHI2_LIMIT


# ------------------------------------------------------------------------ seeded reproducibility

def _seeded_run_alone(row_logits, params, seed, steps, device):
    gen = make_generator(seed, device)
    return [sample(row_logits[None], [params], device, generators=[gen]).token_ids.item()
            for _ in range(steps)]


def test_seeded_row_reproducible_whatever_the_batch(device):
    torch.manual_seed(20)
    vocab, steps = 64, 12
    row_logits = torch.randn(vocab) * 1.5
    params = SamplingParams(temperature=1.0, seed=1234)
    alone = _seeded_run_alone(row_logits, params, 1234, steps, device)

    gen = make_generator(1234, device)
    other_gen = make_generator(99, device)
    together = []
    for step in range(steps):
        batch_size = 2 + step % 4
        pos = step % batch_size               # the seeded row moves around the batch
        logits = torch.randn(batch_size, vocab) * 3
        logits[pos] = row_logits
        others = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_k=5),
                  SamplingParams(top_p=0.5, min_p=0.1, repetition_penalty=1.3),
                  SamplingParams(temperature=1.2)]
        rows = [others[i % len(others)] for i in range(batch_size)]
        rows[pos] = params
        gens = [other_gen if (i != pos and i % 2 == 1) else None for i in range(batch_size)]
        gens[pos] = gen
        out = sample(logits, rows, device, generators=gens,
                     outputs=[[1, 2]] * batch_size, prompts=[[3]] * batch_size)
        together.append(out.token_ids[pos].item())
        torch.rand(7)                          # unrelated use of the global RNG between steps

    assert together == alone
    assert len(set(alone)) > 1, "seeded row should still be random across steps"
    assert _seeded_run_alone(row_logits, params, 4321, steps, device) != alone


def test_generator_on_wrong_device_is_rejected():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU to have two device types")
    with pytest.raises(ValueError, match="make_generator"):
        sample(torch.zeros(1, 4), [SamplingParams()], "cuda",
               generators=[make_generator(0, "cpu")])


# ------------------------------------------------------------------------------- penalties

def test_token_counts():
    counts = token_counts([[2, 2, 4], [], [0]], 5, "cpu")
    assert counts.tolist() == [[0, 0, 2, 0, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]]
    with pytest.raises(ValueError, match="row 0"):
        token_counts([[5]], 5, "cpu")
    with pytest.raises(ValueError, match="row 2 .* got -1"):
        token_counts([[1], [], [2, -1]], 5, "cpu")


def test_token_rows_may_be_tensors(device):
    # An engine may cache prompts as device tensors; results must equal the list form.
    rows = [[2, 2, 4], [], [0, 4]]
    mixed = [torch.tensor([2, 2, 4], device=device), [], torch.tensor([0, 4], device=device)]
    assert torch.equal(token_counts(mixed, 5, device), token_counts(rows, 5, device))
    torch.manual_seed(42)
    logits = torch.randn(3, 5, device=device)
    pens = [torch.full((3,), v, device=device) for v in (0.3, 0.2, 1.7)]
    torch.testing.assert_close(apply_penalties(logits.clone(), mixed, rows, *pens),
                               apply_penalties(logits.clone(), rows, rows, *pens))
    with pytest.raises(ValueError, match="row 1 .* got 5"):
        token_counts([[1], torch.tensor([0, 5], device=device)], 5, device)


def test_penalties_match_hand_computed_values(device):
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0],
                           [2.0, -1.0, 0.5, -3.0, 1.0],
                           [2.0, -1.0, 0.5, -3.0, 1.0]], device=device)
    prompts = [[0, 3], [0, 3], [1]]
    outputs = [[2, 2, 4], [], [1, 1]]
    out = apply_penalties(
        logits.clone(), prompts, outputs,
        presence_penalty=torch.tensor([0.25, 0.25, -0.5], device=device),
        frequency_penalty=torch.tensor([0.5, 0.5, 0.0], device=device),
        repetition_penalty=torch.tensor([2.0, 1.0, 1.0], device=device))
    expected = torch.tensor([
        # repetition 2 on {0, 3} (prompt) and {2, 4} (output): 2/2, -3*2, 0.5/2, 1/2;
        # then token 2 (count 2): 0.25 - (0.5*2 + 0.25); token 4 (count 1): 0.5 - (0.5 + 0.25)
        [1.0, -1.0, -1.0, -6.0, -0.25],
        # no output yet: frequency/presence do nothing, repetition 1 does nothing
        [2.0, -1.0, 0.5, -3.0, 1.0],
        # negative presence penalty rewards token 1 once, whatever its count
        [2.0, -0.5, 0.5, -3.0, 1.0],
    ])
    torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=1e-6)


def test_repetition_penalty_covers_prompt_and_output_only(device):
    logits = torch.tensor([[1.5, -0.5, 2.0, -2.0]], device=device)
    out = apply_penalties(logits.clone(), [[1]], [[2]], None, None,
                          torch.tensor([1.25], device=device))
    torch.testing.assert_close(out.cpu(), torch.tensor([[1.5, -0.625, 1.6, -2.0]]),
                               rtol=0, atol=1e-6)


def test_penalty_changes_greedy_choice(device):
    logits = torch.tensor([[3.0, 2.5, 0.0]])
    assert sample(logits, [SamplingParams(temperature=0)], device,
                  outputs=[[0]]).token_ids.item() == 0
    for p in (SamplingParams(temperature=0, frequency_penalty=1.0),
              SamplingParams(temperature=0, presence_penalty=1.0),
              SamplingParams(temperature=0, repetition_penalty=1.5)):
        assert sample(logits, [p], device, outputs=[[0]]).token_ids.item() == 1


# ---------------------------------------------------------------------- bias and min_tokens

def test_logit_bias(device):
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]] * 3)
    params = [SamplingParams(temperature=0, logit_bias={3: 10.0}),
              SamplingParams(temperature=0, logit_bias={0: -math.inf}),
              SamplingParams(temperature=0)]
    assert sample(logits, params, device).token_ids.tolist() == [3, 1, 0]


def test_logit_bias_ban_holds_when_sampling(device):
    torch.manual_seed(30)
    params = [SamplingParams(temperature=1.0, logit_bias={1: -math.inf, 3: -math.inf})] * 2000
    tokens = sample(LOGITS5.repeat(2000, 1), params, device).token_ids
    assert not torch.isin(tokens, torch.tensor([1, 3], device=device)).any()


def test_logit_bias_outside_vocab_is_rejected(device):
    with pytest.raises(ValueError, match="logit_bias.*token id 9"):
        sample(torch.zeros(1, 4), [SamplingParams(logit_bias={9: 1.0})], device)


def test_min_tokens_mask_forbids_eos(device):
    torch.manual_seed(31)
    eos = 1
    logits = LOGITS5.repeat(2001, 1)          # eos (token 1) is the most likely token
    params = [SamplingParams(temperature=0)] + [SamplingParams(temperature=1.0)] * 2000
    out = sample(logits, params, device, masks=[[eos]] * 2001)
    assert out.token_ids[0].item() == 3       # next best after eos
    assert not (out.token_ids == eos).any()
    # Without the mask eos is sampled often.
    assert (sample(logits, params, device).token_ids == eos).sum() > 800


def test_everything_banned_is_an_error(device):
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        sample(torch.zeros(2, 3), [SamplingParams()] * 2, device,
               masks=[[0], [0, 1, 2]])


# --------------------------------------------------------------------------------- logprobs

def test_logprobs_are_raw_log_softmax(device):
    torch.manual_seed(40)
    logits = torch.randn(6, 40) * 3
    params = [SamplingParams(temperature=0.5, top_k=5, logprobs=3, repetition_penalty=1.4,
                             presence_penalty=1.0, logit_bias={7: 5.0}),
              SamplingParams(temperature=0, logprobs=0),
              SamplingParams(temperature=2.0, top_p=0.5),
              SamplingParams(temperature=1.0, logprobs=20),
              SamplingParams(temperature=0, frequency_penalty=2.0, logprobs=1),
              SamplingParams(temperature=0.8, min_p=0.2, logprobs=5)]
    out = sample(logits, params, device, outputs=[[1, 2, 3]] * 6, prompts=[[4]] * 6)
    raw = torch.log_softmax(logits, dim=-1)
    assert out.logprobs.dtype == torch.float32 and out.logprobs.shape == (6,)
    expected = raw.gather(1, out.token_ids.cpu()[:, None]).squeeze(1)
    torch.testing.assert_close(out.logprobs.cpu(), expected, atol=1e-5, rtol=1e-5)

    assert out.top_logprobs[1] == [] and out.top_logprobs[2] is None
    for row, k in [(0, 3), (3, 20), (4, 1), (5, 5)]:
        top = out.top_logprobs[row]
        assert len(top) == k
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True)
        ref_vals, ref_ids = raw[row].topk(k)
        assert [t for t, _ in top] == ref_ids.tolist()
        torch.testing.assert_close(torch.tensor(values), ref_vals, atol=1e-5, rtol=1e-5)


def test_bf16_logits_give_float32_logprobs(device):
    torch.manual_seed(41)
    logits = (torch.randn(3, 32) * 2).to(torch.bfloat16)
    out = sample(logits, [SamplingParams(temperature=0, logprobs=2)] * 3, device)
    assert out.logprobs.dtype == torch.float32
    raw = torch.log_softmax(logits.float(), dim=-1)
    assert out.token_ids.tolist() == raw.argmax(-1).tolist()
    torch.testing.assert_close(out.logprobs.cpu(), raw.max(-1).values, atol=1e-5, rtol=1e-5)


def test_sampler_does_not_modify_input_logits(device):
    logits = torch.randn(2, 10, device=device)
    before = logits.clone()
    sample(logits, [SamplingParams(temperature=0.7, top_k=3, logit_bias={1: 2.0},
                                   repetition_penalty=2.0)] * 2, device,
           outputs=[[1], [2]], masks=[[0], [0]])
    assert torch.equal(logits, before)


def test_empty_batch():
    out = Sampler()(torch.zeros(0, 10), batch_of([], "cpu"))
    assert out.token_ids.shape == (0,) and out.top_logprobs == []


def test_no_logprobs_asked_none_computed_and_logits_untouched(device):
    """Rows without logprobs: no log-sum-exp pass (logprobs/ranks None), the caller's logits are never modified."""
    torch.manual_seed(42)
    logits = torch.randn(4, 50)
    keep = logits.clone()
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, seed=3),
              SamplingParams(temperature=0, repetition_penalty=1.3), SamplingParams(temperature=0)]
    out = sample(logits, params, device, outputs=[[1, 2]] * 4, prompts=[[3]] * 4)
    assert out.logprobs is None and out.ranks is None and out.top_logprobs == [None] * 4
    assert torch.equal(logits, keep)
    greedy = sample(logits, [SamplingParams(temperature=0)] * 4, device)
    assert greedy.token_ids.tolist() == logits.argmax(-1).tolist() and greedy.logprobs is None


def test_two_stage_argmax_equals_argmax_with_ties():
    """The sampler's two-pass greedy argmax (used on CUDA for small batches) picks argmax's index: the first
    maximum, also when the maximum repeats across and within chunks."""
    from minke.runner.sampler import _two_stage_argmax

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 8 * 1024, generator=g)
    x[1, [100, 5000, 7000]] = 9.0  # tie across chunks
    x[2, [2050, 2051]] = 9.0  # tie inside one chunk
    x[3] = 0.0  # all equal
    x[4, -1] = 9.0  # the last column
    assert torch.equal(_two_stage_argmax(x), x.argmax(dim=-1))
    assert _two_stage_argmax(x)[1].item() == 100 and _two_stage_argmax(x)[3].item() == 0
