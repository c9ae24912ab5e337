"""Layer selection text for DiT models (issue 17): which transformer blocks a controller acts on.

Terms, comma-separated, any of them selects a block (OR):
- `all`: every block;
- a block type: `double`, `single` (Flux, Flux.2, Chroma), `double` (Qwen-Image), `joint` (SD3),
  `block` (Wan), `layer`, `context_refiner`, `noise_refiner` (Lumina 2 / Z-Image); `refiner` is
  both refiners;
- `type:i` or `type:i-j`: blocks i to j (inclusive) of that type, e.g. `double:0-9`;
- `a-b` with 0 <= a <= b <= 1 written with a decimal point (`0.5-1.0`, `0-0.5`): a fraction of the
  depth, over the main blocks in forward order (refiners excluded): block k of n is in when its
  centre (k + 0.5) / n lies in [a, b) (or [a, 1] when b = 1), so `0-0.5` and `0.5-1.0` split the
  blocks into two halves that do not overlap.

`parse` checks the syntax alone (widget validation); `select` checks the text against one model's
blocks and, where it matches nothing, lists what the model has. Pure python: no ComfyUI import.
"""
from __future__ import annotations

from dataclasses import dataclass

from .core import AttentionControlError

BLOCK_TYPES = ("double", "single", "joint", "block", "layer", "context_refiner", "noise_refiner")
REFINERS = ("context_refiner", "noise_refiner")
_HELP = ("use all, a block type (double, single, joint, block, layer, refiner), type:i-j such as double:0-9, "
         "or a depth fraction such as 0.5-1.0 (comma-separated)")


def _number(s: str) -> float | None:
    try:
        v = float(s)
    except ValueError:
        return None
    return v if v == v and abs(v) != float("inf") else None


@dataclass(frozen=True)
class DitLayerSelector:
    """A parsed selection: `everything`, block types, (type, first, last) ranges, depth fractions."""
    everything: bool = False
    types: frozenset = frozenset()
    ranges: tuple = ()
    fractions: tuple = ()
    text: str = "all"

    @classmethod
    def parse(cls, text: str, input_name: str = "layers") -> "DitLayerSelector":
        everything, types, ranges, fractions = False, set(), [], []

        def bad(term, why=""):
            return AttentionControlError(f"{input_name}: '{term}' is not a layer term{why}; {_HELP}")

        for raw in (text or "all").replace(";", ",").split(","):
            t = raw.strip().lower()
            if not t:
                continue
            if t == "all":
                everything = True
            elif t == "refiner":
                types.update(REFINERS)
            elif t in BLOCK_TYPES:
                types.add(t)
            elif ":" in t:
                name, _, span = (p.strip() for p in t.partition(":"))
                if name not in BLOCK_TYPES and name != "refiner":
                    raise bad(raw.strip(), f" (unknown block type '{name}')")
                lo, sep, hi = (p.strip() for p in span.partition("-"))
                hi = hi if sep else lo
                if not (lo.isdigit() and hi.isdigit()):
                    raise bad(raw.strip(), " (block indices are whole numbers: double:0-9)")
                if int(lo) > int(hi):
                    raise bad(raw.strip(), f" (the range {lo}-{hi} is empty; write the smaller index first)")
                for n in (REFINERS if name == "refiner" else (name,)):
                    ranges.append((n, int(lo), int(hi)))
            elif "-" in t and "." in t:
                lo, _, hi = (p.strip() for p in t.partition("-"))
                a, b = _number(lo), _number(hi)
                if a is None or b is None:
                    raise bad(raw.strip())
                if not (0.0 <= a <= b <= 1.0):
                    raise bad(raw.strip(), " (a depth fraction a-b needs 0 <= a <= b <= 1)")
                fractions.append((a, b))
            else:
                raise bad(raw.strip())
        if not (everything or types or ranges or fractions):
            everything = True
        return cls(everything, frozenset(types), tuple(ranges), tuple(fractions), text or "all")

    def matches(self, block_type: str, block_index: int, depth: tuple[int, int] | None) -> bool:
        """depth: (k, n), the block's place among the model's n main blocks, None for refiners."""
        if self.everything or block_type in self.types:
            return True
        if any(block_type == t and lo <= block_index <= hi for t, lo, hi in self.ranges):
            return True
        if depth is not None:
            k, n = depth
            centre = (k + 0.5) / n
            return any(a <= centre and (centre < b or b == 1.0) for a, b in self.fractions)
        return False

    def select(self, blocks, input_name: str = "layers") -> list[tuple[str, int]]:
        """The selected (block_type, block_index) of a model's blocks (forward order, duplicates
        ignored); an error that lists the model's blocks when nothing matches."""
        order = list(dict.fromkeys((str(t), int(i)) for t, i in blocks))
        main = [b for b in order if b[0] not in REFINERS]
        place = {b: (k, len(main)) for k, b in enumerate(main)}
        out = [b for b in order if self.matches(b[0], b[1], place.get(b))]
        if not out:
            raise AttentionControlError(
                f"{input_name}: '{self.text}' matches no block of this model, which has {describe_blocks(order)}; "
                f"{_HELP}")
        return out


def describe_blocks(blocks) -> str:
    """'double:0-18, single:0-37' for a model's (block_type, block_index) list."""
    by_type: dict[str, list[int]] = {}
    for t, i in blocks:
        by_type.setdefault(t, []).append(i)
    parts = []
    for t, idx in by_type.items():
        idx = sorted(set(idx))
        span = f"{idx[0]}-{idx[-1]}" if len(idx) > 1 else f"{idx[0]}"
        parts.append(f"{t}:{span}" + ("" if idx == list(range(idx[0], idx[-1] + 1)) else " (with gaps)"))
    return ", ".join(parts) if parts else "no attention blocks"


def check_layer_text(text: str, input_name: str = "layers") -> None:
    """Widget-time check of a layers text that may go to a UNet or a DiT model (the model is not
    known in validate_inputs): it must parse in one of the two syntaxes; the error gives both."""
    from .core import LayerSelector
    try:
        LayerSelector.parse(text, input_name)
        return
    except AttentionControlError as unet_err:
        try:
            DitLayerSelector.parse(text, input_name)
            return
        except AttentionControlError as dit_err:
            raise AttentionControlError(f"{unet_err} (UNet models), or {str(dit_err).split('; ', 1)[-1]} "
                                        "(DiT models)") from None
