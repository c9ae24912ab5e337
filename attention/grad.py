"""Gradients through a ComfyUI model whose weights are inference tensors (it loads and samples
under inference mode): used by layout guidance (gradient w.r.t. the latent) and null-text
inversion (gradient w.r.t. the negative embedding)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


# ComfyUI samples (and loads models) under inference mode, and autograd refuses to save an
# inference tensor for backward. Two ways around it:
# - "reference" (default, no copy): during the guidance forward a TorchFunctionMode routes linear
#   and conv2d calls whose weight is an inference tensor through autograd Functions that keep a
#   plain reference to the weight and compute only the input gradient; norm layers get a copy of
#   their (tiny) affine parameters per call;
# - "copy": the parameters of the blocks the guidance forward runs get a normal copy for the
#   duration of the guided steps (costs their size: ~90 % of an SD1.5 / SDXL UNet).

class _LinearRef(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.weight = weight
        out = F.linear(x, weight, bias)
        # a view (F.linear of a 3-D input may return one) could not be modified in place afterwards
        # (DiT blocks write into their projections' outputs): return it as a tensor of its own
        return out.clone() if out._is_view() else out

    @staticmethod
    def backward(ctx, g):
        return g.matmul(ctx.weight.to(g.dtype)), None, None


class _ConvRef(torch.autograd.Function):
    """conv2d / conv3d (`dims`) whose backward gives the input gradient alone."""
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, dims):
        ctx.weight, ctx.shape, ctx.cfg, ctx.dims = weight, x.shape, (stride, padding, dilation, groups), dims
        return (F.conv2d if dims == 2 else F.conv3d)(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g):
        grad_input = torch.nn.grad.conv2d_input if ctx.dims == 2 else torch.nn.grad.conv3d_input
        gx = grad_input(ctx.shape, ctx.weight.to(g.dtype), g, *ctx.cfg)
        return gx, None, None, None, None, None, None, None


def _arg(args, kwargs, i, name, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


def _copy_if_inference(t):
    return t.detach().clone() if (t is not None and t.is_inference()) else t


def _frozen(args, kwargs, slots):
    """args / kwargs with the tensors at `slots` ((index, name) pairs) detached: a weight loaded under
    inference mode that still has requires_grad (a plain nn.Parameter) would make autograd track a layer
    whose input needs no gradient and save the inference tensor for backward."""
    args = list(args)
    for i, name in slots:
        if len(args) > i and torch.is_tensor(args[i]):
            args[i] = args[i].detach()
        elif torch.is_tensor(kwargs.get(name)):
            kwargs[name] = kwargs[name].detach()
    return args, kwargs


class WeightReferences(TorchFunctionMode):
    """Lets autograd differentiate through layers whose weights are inference tensors without
    copying them (input gradients only; the weights get no gradient).

    `norm_input_copies`: norm layers (layer / group / RMS norm) get a copy of their input when it
    requires grad, so that a model that writes into its residual stream in place after normalising
    it (`img += ...` in the Flux / Chroma blocks) still differentiates: the norm's backward reads
    its own copy. Costs one residual-stream-sized tensor per norm of the guidance forward (where
    copying every saved activation would cost)."""

    def __init__(self, norm_input_copies: bool = False):
        super().__init__()
        self.norm_input_copies = norm_input_copies

    def _norm_input(self, args):
        if self.norm_input_copies and args and torch.is_tensor(args[0]) and args[0].requires_grad:
            args[0] = args[0].clone()
        return args

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w, b = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
            if w.is_inference() and torch.is_grad_enabled() and x.requires_grad:
                return _LinearRef.apply(x, w, b)
            if w.is_inference() and torch.is_grad_enabled():
                args, kwargs = _frozen(args, kwargs, ((1, "weight"), (2, "bias")))
        elif func is F.conv2d or func is F.conv3d:
            x, w = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight")
            padding = _arg(args, kwargs, 4, "padding", 0)
            if w.is_inference() and torch.is_grad_enabled() and x.requires_grad and not isinstance(padding, str):
                return _ConvRef.apply(x, w, _arg(args, kwargs, 2, "bias"), _arg(args, kwargs, 3, "stride", 1), padding,
                                      _arg(args, kwargs, 5, "dilation", 1), _arg(args, kwargs, 6, "groups", 1),
                                      2 if func is F.conv2d else 3)
            if w.is_inference() and torch.is_grad_enabled():
                args, kwargs = _frozen(args, kwargs, ((1, "weight"), (2, "bias")))
        elif func is getattr(F, "rms_norm", None):
            args = self._norm_input(list(args))     # (input, normalized_shape, weight, eps): DiT norms
            if len(args) > 2:
                args[2] = _copy_if_inference(args[2])
            elif "weight" in kwargs:
                kwargs["weight"] = _copy_if_inference(kwargs["weight"])
        elif func is F.group_norm or func is F.layer_norm:
            args = self._norm_input(list(args))     # (input, groups | shape, weight, bias, eps)
            for i, name in ((2, "weight"), (3, "bias")):
                if len(args) > i:
                    args[i] = _copy_if_inference(args[i])
                elif name in kwargs:
                    kwargs[name] = _copy_if_inference(kwargs[name])
        return func(*args, **kwargs)


@contextlib.contextmanager
def autograd_weights(modules):
    """Inference tensors (ComfyUI loads and samples under inference mode) cannot be saved for
    backward: give the parameters / buffers of `modules` that are inference tensors a normal
    copy for the duration of the block and put the originals back afterwards (same objects).
    Yields the number of bytes copied."""
    swapped = []
    try:
        with torch.inference_mode(False):
            for top in modules:
                for mod in top.modules():
                    for store in (mod._parameters, mod._buffers):
                        for name, t in list(store.items()):
                            if t is not None and t.is_inference():
                                c = t.detach().clone()
                                store[name] = torch.nn.Parameter(c, requires_grad=False) if store is mod._parameters else c
                                swapped.append((store, name, t))
        yield sum(t.numel() * t.element_size() for _, _, t in swapped)
    finally:
        for store, name, t in reversed(swapped):
            store[name] = t

