"""PEFT's LoRA Linear for training, as one autograd node: y = x W^T (+ bias) + s * (x A^T) B^T.

PEFT's `lora.Linear.forward` under bf16 autocast runs, per adapted projection x [M, K] -> [M, N]: the base GEMM,
x.to(fp32) (A's dtype) and autocast's cast back to bf16 (two [M, K] copies), the two rank-r GEMMs, `* scaling` and
`result + ...` on the [M, N] output (two more passes); its backward adds the casts' and the multiply's passes and
the add of the two [M, K] input grads. At V2-Lite's attention shapes (4 x 1024 tokens; q_proj, kv_a_proj_with_mqa,
kv_b_proj, o_proj) that is ~0.7 GB of elementwise traffic a layer forward, three times a step with gradient
checkpointing. Here:

  forward   xa = (x A^T) * s          [M, r]  (the scale on the thin tensor)
            y  = addmm(x W^T, xa, B^T)         (the adapter added in the GEMM's epilogue: no [M, N] pass)
  backward  g_xa = (gy B) * s         [M, r]
            gx = addmm(gy W, g_xa, A)          (both input grads in one tensor: no add)
            gA = g_xa^T x,  gB = gy^T xa       (in the compute dtype, then the parameters' fp32, as autocast's
                                                cast backward does)

Rounding: the adapter's product is added to the base GEMM's fp32 accumulator and rounded once (PEFT rounds the
base output, the adapter output and the scaled adapter output to bf16 and adds them): at least as accurate; equal
to PEFT's in fp32 to rounding (tests/test_lora_linear.py).

`fuse_lora_linears(model)` switches every PEFT `lora.Linear` whose base is a float nn.Linear to `FusedLoraLinear`
(a subclass: the same parameters, state-dict keys and PEFT save/load); its forward takes the fused path for one
active plain LoRA adapter (dropout allowed: the adapter reads dropout(x), the base x) and falls back to PEFT's own
forward for anything else (merged or disabled adapters, several adapters, DoRA and other variants, lora_bias,
mixed-batch adapter_names, quantized bases).
"""

from __future__ import annotations

import torch
from torch import nn


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class LoraLinearFn(torch.autograd.Function):
    """x [..., K], xd = dropout(x) or x itself, weight [N, K], bias [N] or None, a [r, K], b [N, r], scale float
    -> y [..., N] in the compute dtype (autocast's, else x's)."""

    @staticmethod
    def forward(ctx, x, xd, weight, bias, a, b, scale):
        dt = _compute_dtype(x)
        k, n = x.shape[-1], weight.shape[0]
        same = xd is x
        x2 = x.reshape(-1, k).to(dt)
        xd2 = x2 if same else xd.reshape(-1, k).to(dt)
        wc, ac, bc = weight.to(dt), a.to(dt), b.to(dt)
        xa = torch.mm(xd2, ac.t()) * scale  # [M, r]
        y = torch.mm(x2, wc.t()) if bias is None else torch.addmm(bias.to(dt), x2, wc.t())
        y = torch.addmm(y, xa, bc.t())
        # x: for A's grad when the adapter reads x itself, and for a trained base weight's grad
        ctx.save_for_backward(x2 if same or ctx.needs_input_grad[2] else None, None if same else xd2, wc, ac, bc, xa)
        ctx.same, ctx.scale, ctx.lead = same, scale, x.shape[:-1]
        ctx.dtypes = (x.dtype, xd.dtype, weight.dtype, None if bias is None else bias.dtype, a.dtype, b.dtype)
        return y.view(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, gy):
        x2, xd2, wc, ac, bc, xa = ctx.saved_tensors
        need_x, need_xd, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:6]
        dx, dxd, dw, dbias, da, db = ctx.dtypes
        lead = ctx.lead
        gy2 = gy.reshape(-1, gy.shape[-1]).to(wc.dtype)
        gx = gxd = gw = gbias = ga = gb = None
        g_xa = torch.mm(gy2, bc) * ctx.scale if (need_x or need_xd or need_a) else None  # [M, r]
        if ctx.same:
            if need_x:  # the base's and the adapter's input grads as one GEMM with an epilogue add
                gx = torch.addmm(torch.mm(gy2, wc), g_xa, ac).view(*lead, -1).to(dx)
        else:
            if need_x:
                gx = torch.mm(gy2, wc).view(*lead, -1).to(dx)
            if need_xd:
                gxd = torch.mm(g_xa, ac).view(*lead, -1).to(dxd)
        if need_a:
            ga = torch.mm(g_xa.t(), x2 if ctx.same else xd2).to(da)
        if need_b:
            gb = torch.mm(gy2.t(), xa).to(db)
        if need_w:
            gw = torch.mm(gy2.t(), x2).to(dw)
        if need_bias:
            gbias = gy2.sum(0, dtype=torch.float32).to(dbias)
        return gx, gxd, gw, gbias, ga, gb, None


def lora_linear(x, xd, weight, bias, a, b, scale: float) -> torch.Tensor:
    return LoraLinearFn.apply(x, xd, weight, bias, a, b, scale)


def lora_linear_reference(x, xd, weight, bias, a, b, scale: float) -> torch.Tensor:
    """Plain PyTorch, PEFT's formula: base(x) + B(A(xd)) * scale."""
    return nn.functional.linear(x, weight, bias) + nn.functional.linear(nn.functional.linear(xd, a), b) * scale


def _peft_linear_cls():
    from peft.tuners.lora.layer import Linear

    return Linear


def fused_lora_linear_cls():
    global _FUSED
    if _FUSED is None:
        base = _peft_linear_cls()

        class FusedLoraLinear(base):
            """PEFT's lora.Linear whose forward is one LoraLinearFn node where it can be (module docstring)."""

            def _fused_args(self, x, args, kwargs):
                if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
                    return None
                name = self.active_adapters[0]
                base_layer = self.base_layer
                if (name not in self.lora_A or name in self.lora_variant or self.use_dora.get(name)
                        or self.lora_B[name].bias is not None or not isinstance(base_layer, nn.Linear)
                        or not base_layer.weight.is_floating_point()):
                    return None
                a, b = self.lora_A[name].weight, self.lora_B[name].weight
                if not torch.is_autocast_enabled(x.device.type) and not (x.dtype == a.dtype == base_layer.weight.dtype):
                    return None  # PEFT runs the adapter in A's dtype and the base in its own: its forward
                drop = self.lora_dropout[name]
                xd = x if isinstance(drop, nn.Identity) else drop(x)
                return x, xd, base_layer.weight, base_layer.bias, a, b, self.scaling[name]

            def forward(self, x, *args, **kwargs):
                fused = self._fused_args(x, args, kwargs)
                if fused is None:
                    return super().forward(x, *args, **kwargs)
                return lora_linear(*fused)

        FusedLoraLinear.__qualname__ = FusedLoraLinear.__name__
        _FUSED = FusedLoraLinear
    return _FUSED


_FUSED = None


def fuse_lora_linears(model: nn.Module) -> int:
    """Switch PEFT's LoRA Linear modules (exactly that class, on a float nn.Linear base) to FusedLoraLinear in place.
    Returns the number switched. Training-side only; the state dict and PEFT's save/merge are unchanged."""
    peft_cls, fused = _peft_linear_cls(), fused_lora_linear_cls()
    n = 0
    for m in model.modules():
        if type(m) is peft_cls and isinstance(m.base_layer, nn.Linear) and m.base_layer.weight.is_floating_point():
            m.__class__ = fused
            n += 1
    return n
