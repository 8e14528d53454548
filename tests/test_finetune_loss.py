"""Chunked lm_head + cross-entropy (minke/train/loss.py): the loss and the gradients of the hidden states and the
head's weight equal the full-logits F.cross_entropy, ignored labels included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minke.train.loss import IGNORE_INDEX, chunked_cross_entropy

torch.set_num_threads(1)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("chunk", [3, 4, 1024])
def test_chunked_cross_entropy_equals_full_logits(chunk, fused):
    torch.manual_seed(0)
    h = torch.randn(10, 16)
    labels = torch.randint(0, 50, (10,))
    labels[[1, 2, 3, 7]] = IGNORE_INDEX  # chunk 3: one chunk [0:3) partly, [3:6) ...; chunk 4: mixed
    heads = [torch.nn.Linear(16, 50, bias=False) for _ in range(2)]
    heads[1].load_state_dict(heads[0].state_dict())
    h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    ours = chunked_cross_entropy(h1, heads[0], labels, chunk_tokens=chunk, force_fused=fused)
    ref = F.cross_entropy(heads[1](h2).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    (ours * 0.5).backward()
    (ref * 0.5).backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(heads[0].weight.grad, heads[1].weight.grad, rtol=1e-5, atol=1e-7)


def test_chunked_cross_entropy_all_ignored_chunk_and_bad_shapes():
    head = torch.nn.Linear(8, 20, bias=False)
    h = torch.randn(6, 8, requires_grad=True)
    labels = torch.full((6,), IGNORE_INDEX)
    labels[5] = 3
    loss = chunked_cross_entropy(h, head, labels, chunk_tokens=2)
    loss.backward()
    assert torch.isfinite(loss) and h.grad[:4].abs().max() == 0
    with pytest.raises(ValueError, match="labels"):
        chunked_cross_entropy(h, head, labels[:5])


def test_fused_chunks_take_the_linear_cross_entropy_node_for_plain_and_modules_to_save_heads():
    """The LinearCrossEntropy path (one node per chunk) is taken for a bias-free Linear and PEFT's
    modules_to_save copy of one; a head with a bias keeps the checkpointed chunks (same loss either way)."""
    from peft.utils.other import ModulesToSaveWrapper

    from minke.train.loss import _plain_head_weight

    lin = torch.nn.Linear(8, 20, bias=False)
    assert _plain_head_weight(lin) is lin.weight
    wrapped = ModulesToSaveWrapper(torch.nn.Linear(8, 20, bias=False), "default")
    wrapped.set_adapter("default")
    assert _plain_head_weight(wrapped) is wrapped.modules_to_save["default"].weight
    assert _plain_head_weight(torch.nn.Linear(8, 20)) is None
    h = torch.randn(5, 8, requires_grad=True)
    labels = torch.randint(0, 20, (5,))
    loss = chunked_cross_entropy(h, lin, labels, chunk_tokens=2, force_fused=True)
    assert "LinearCrossEntropy" in loss.grad_fn.next_functions[1][0].name()
