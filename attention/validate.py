"""Input checks shared by the nodes (pure torch): finite numbers, ranges, masks.

Every check raises AttentionControlError with the input's name first and the fix last
("<input>: <what is wrong>; <the fix>"), so a bad value never reaches sampling, where a NaN
would switch an effect off or fill the image with NaN without a word.
"""
from __future__ import annotations

import math

import torch

from .core import AttentionControlError


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def check_finite(name: str, value, fix: str = "give a finite number"):
    """A number or a tensor without NaN / inf. Returns the value."""
    if torch.is_tensor(value):
        if value.is_floating_point() or value.is_complex():
            bad = ~torch.isfinite(value)
            if bool(bad.any()):
                n_nan = int(torch.isnan(value).sum())
                raise AttentionControlError(
                    f"{name}: {int(bad.sum())} of {value.numel()} values are not finite ({n_nan} NaN, "
                    f"{int(bad.sum()) - n_nan} infinite); {fix}")
        return value
    if isinstance(value, bool):
        return value
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise AttentionControlError(f"{name}: {value!r} is not a number; {fix}") from None
    if not math.isfinite(f):
        raise AttentionControlError(f"{name}: {value} is not a finite number; {fix}")
    return value


def check_range(name: str, value, lo=None, hi=None, fix: str | None = None):
    """A finite number in [lo, hi] (either bound may be None). Returns the value."""
    span = f"[{_fmt(lo) if lo is not None else '-inf'}, {_fmt(hi) if hi is not None else 'inf'}]"
    fix = fix or f"use a value in {span}"
    check_finite(name, value, fix)
    if lo is not None and value < lo:
        raise AttentionControlError(f"{name}: {_fmt(value)} is below the minimum {_fmt(lo)}; {fix}")
    if hi is not None and value > hi:
        raise AttentionControlError(f"{name}: {_fmt(value)} is above the maximum {_fmt(hi)}; {fix}")
    return value


def parse_number(name: str, text: str, what: str, form: str) -> float:
    """A finite float from the text of a 'word: value' item; the error shows the item's form."""
    try:
        f = float(text)
    except (TypeError, ValueError):
        raise AttentionControlError(f"{name}: '{what}' is not of the form {form}") from None
    if not math.isfinite(f):
        raise AttentionControlError(f"{name}: '{what}' has a value that is not finite; write it as {form} "
                                    "with a finite number")
    return f


def check_mask(name: str, mask, where: str = "", single: bool = False, nonempty: bool = False,
               threshold: float = 0.0, fix_empty: str = "paint the region or disconnect the mask") -> torch.Tensor | None:
    """A MASK input as a float (N, H, W) batch, checked: a tensor of 2 or more dimensions, finite
    values (a NaN mask would become an empty or a full one), one mask when `single`, and some
    value above `threshold` when `nonempty`. None passes through."""
    if mask is None:
        return None
    at = f"{name}: {where}" if where else name
    if not torch.is_tensor(mask) or mask.ndim < 2:
        shape = tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__
        raise AttentionControlError(f"{at}: expected a MASK (H, W) or a batch (N, H, W), got {shape}; "
                                    "connect a MASK output")
    m = mask.reshape(-1, *mask.shape[-2:]).float()
    if m.shape[0] == 0 or m.shape[-1] == 0 or m.shape[-2] == 0:
        raise AttentionControlError(f"{at}: the mask is empty (shape {tuple(mask.shape)}); connect a MASK "
                                    "with pixels")
    check_finite(at, m, "the mask has NaN or infinite pixels; fix or replace the node that makes it "
                        "(e.g. a division by zero upstream)")
    if single and m.shape[0] != 1:
        raise AttentionControlError(f"{at}: got a batch of {m.shape[0]} masks where one mask is expected; "
                                    "pick one mask of the batch (or chain one node per mask)")
    if nonempty:
        for i in range(m.shape[0]):
            if float(m[i].max()) <= threshold:
                which = f"mask {i + 1} of the batch" if m.shape[0] > 1 else "the mask"
                limit = f" (no value above {_fmt(threshold)})" if threshold > 0 else " (all zero)"
                raise AttentionControlError(f"{at}: {which} covers nothing{limit}; {fix_empty}")
    return m
