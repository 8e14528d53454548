"""The one-pass prompt-logprob kernel (kernels/prompt_logprobs.py) against its torch reference, and the runner's
Triton path of prompt_logprobs against the full-matrix log_softmax. Runs on CPU through Triton's interpreter
(TRITON_INTERPRET=1, set by tests/conftest.py); on a CUDA machine the compiled kernel."""

import pytest
import torch

import minke.kernels.prompt_logprobs as _kmod
from conftest import kernel_test_setup
from minke.kernels.prompt_logprobs import row_logprobs, row_logprobs_ref
from minke.runner.prompt_logprobs import prompt_logprobs, prompt_logprobs_reference

DEVICE, INTERPRET, needs_triton = kernel_test_setup(_kmod._row_logprobs_kernel)


def rows(p: int, v: int, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(p, v, generator=g) * 4).to(dtype)
    targets = torch.randint(0, v, (p,), generator=g)
    return logits.to(DEVICE), targets.to(DEVICE)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("v,block", [(500, 128), (1000, 4096), (256, 64)])  # several blocks, a ragged one, one
def test_kernel_equals_the_reference(dtype, v, block):
    logits, targets = rows(37, v, dtype)
    targets[0] = logits[0].float().argmax()  # the best token: rank 1
    got = row_logprobs(logits, targets, top1=True, block_v=block)
    ref = row_logprobs_ref(logits, targets, top1=True)
    torch.testing.assert_close(got[0], ref[0])  # logprobs
    assert torch.equal(got[1], ref[1]) and got[1][0] == 1  # ranks: exact (the same fp32 comparisons)
    torch.testing.assert_close(got[2], ref[2])  # logsumexp
    assert torch.equal(got[3], ref[3])  # the top token
    torch.testing.assert_close(got[4], ref[4])
    lp, ranks, lse, ids, top = row_logprobs(logits, targets, top1=False, block_v=block)
    assert ids is None and top is None and torch.equal(ranks, ref[1])


@needs_triton
def test_ties_and_extreme_logits():
    v = 300
    logits = torch.zeros(4, v)
    logits[0, [7, 150, 299]] = 5.0  # a three-way tie for the best: the first index, each tied token rank 1
    logits[1] = -1e4
    logits[1, 42] = 0.0  # one token holds all the mass
    logits[2, :] = float("-inf")
    logits[2, 3:5] = 1.0  # most of the row -inf
    logits[3] = torch.arange(v, dtype=torch.float32)  # the target is the worst
    targets = torch.tensor([150, 42, 4, 0])
    lp, ranks, lse, ids, top = row_logprobs(logits.to(DEVICE), targets.to(DEVICE), top1=True, block_v=128)
    ref = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(lp.cpu(), ref.gather(1, targets[:, None]).squeeze(1))
    assert ranks.tolist() == [1, 1, 1, v] and ids.squeeze(1).tolist() == [7, 42, 3, v - 1]
    torch.testing.assert_close(top.squeeze(1).cpu(), ref.max(dim=-1).values)


@needs_triton
@pytest.mark.parametrize("k", [0, 1, 4])
def test_triton_prompt_logprobs_equal_the_full_matrix(k):
    logits, targets = rows(21, 700, torch.bfloat16, seed=3)
    got = prompt_logprobs(logits, targets, k, rows_per_slice=8, impl="triton")
    ref = prompt_logprobs_reference(logits, targets, k)
    torch.testing.assert_close(got.logprobs, ref.logprobs)
    assert torch.equal(got.ranks, ref.ranks) and torch.equal(got.top_ids, ref.top_ids)
    torch.testing.assert_close(got.top_logprobs, ref.top_logprobs)
    assert got.top_ids.shape == (21, k) and got.top_ids.dtype == torch.long


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="logits must be"):
        row_logprobs_ref(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), top1=False)
    with pytest.raises(ValueError, match="targets must be int64"):
        row_logprobs_ref(torch.zeros(3, 4), torch.zeros(3, dtype=torch.int32), top1=False)
    with pytest.raises(ValueError, match="impl must be"):
        prompt_logprobs(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), 1, impl="cuda")
