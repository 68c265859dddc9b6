"""Pictures of an attention pattern: which keys each query attends to (``dilated-compiler draw``).

One panel per set of heads that share a pattern, queries on y (top to bottom), keys on x:

* grouped: one panel per branch (its group of heads);
* all: one panel per distinct head pattern (heads whose offsets ``h % r_i`` agree for every branch), showing the
  union of the branches, each branch in its own colour; or, with ``per_branch``, one panel per (branch, offset).

The masks come straight from :func:`dilated_compiler.reference.allowed_pairs` and
:func:`~dilated_compiler.reference.head_branches`, so the picture shows the reference semantics. Rendering uses
matplotlib's Agg canvas directly (no pyplot, no global backend switch).

The picture is N x N, so N is limited to :data:`MAX_SEQ_LEN`. Larger N is shown block-averaged: each image cell
covers b x b (query, key) pairs; a cell with any attended pair is shaded at least lightly, denser cells darker.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import torch

from .reference import allowed_pairs, head_branches
from .spec import AttentionSpec, load_spec

__all__ = ["Panel", "panels", "draw_pattern", "figure_size_px", "MAX_SEQ_LEN", "MAX_PANELS", "DrawError"]

MAX_SEQ_LEN = 4096
MAX_PANELS = 32
_MAX_CELLS = 256      # image cells per panel side (below the axes' pixel size); larger N is block-averaged
_COLS = 4             # panels per row at most
# Geometry in inches: each panel is a square axes with room above (its 3-line title) and below (tick labels,
# axis label).
_AXES_IN = 2.6
_ABOVE_IN = 0.6
_BELOW_IN = 0.5
_WGAP_IN = 0.55
_LEFT_IN = 0.75
_RIGHT_IN = 0.25
_LEGEND_IN = 0.3      # per line of legend entries
_TITLE_IN = 0.55      # figure title (two lines)
_DPI = 110


class DrawError(ValueError):
    """A picture that cannot be drawn (too large, no heads, ...)."""


@dataclasses.dataclass(frozen=True)
class Panel:
    """One panel: the heads it stands for and the (branch index, w, r, offset) it draws (their union)."""

    title: str
    heads: tuple[int, ...]
    branches: tuple[tuple[int, int, int, int], ...]

    def masks(self, n: int, causal: bool) -> list[tuple[int, torch.Tensor]]:
        """(branch index, (n, n) bool mask) for each branch of the panel."""
        return [(i, allowed_pairs(n, w, r, o, causal)) for (i, w, r, o) in self.branches]

    def union(self, n: int, causal: bool) -> torch.Tensor:
        result = torch.zeros(n, n, dtype=torch.bool)
        for _, m in self.masks(n, causal):
            result |= m
        return result


def _fmt_heads(heads) -> str:
    """0,1,2,3 -> '0-3'; 1,9,17 -> '1, 9, 17'; long lists shortened."""
    heads = sorted(heads)
    runs, start = [], None
    for i, h in enumerate(heads):
        if start is None:
            start = h
        if i + 1 == len(heads) or heads[i + 1] != h + 1:
            runs.append(f"{start}" if start == h else f"{start}-{h}")
            start = None
    text = ", ".join(runs)
    if len(text) > 28:
        text = ", ".join(runs[:4]) + f", ... ({len(heads)} heads)"
    return text


def panels(spec: AttentionSpec, heads: int, per_branch: bool = False) -> list[Panel]:
    """The panels for ``spec`` with ``heads`` heads (see the module docstring)."""
    spec = load_spec(spec)
    G = spec.num_branches
    if heads < 1:
        raise DrawError(f"heads must be >= 1; got {heads}")
    per_head = head_branches(spec, heads)  # raises for grouped with heads < branches
    result = []
    if spec.head_assignment == "grouped":
        start = 0
        for i, b in enumerate(spec.branches):
            size = heads // G + (1 if i < heads % G else 0)
            hs = tuple(range(start, start + size))
            start += size
            (w, r, o), = per_head[hs[0]]
            result.append(Panel(f"branch {i}: w={w} r={r} offset={o}\nheads {_fmt_heads(hs)}", hs,
                                ((i, w, r, o),)))
        return result
    if per_branch:
        for i, b in enumerate(spec.branches):
            for o in range(b.dilation):
                hs = tuple(h for h in range(heads) if per_head[h][i][2] == o)
                if hs:
                    result.append(Panel(f"branch {i}: w={b.segment_length} r={b.dilation} offset={o}\n"
                                        f"heads {_fmt_heads(hs)}", hs, ((i, b.segment_length, b.dilation, o),)))
        return result
    groups: dict[tuple[int, ...], list[int]] = {}
    for h in range(heads):
        groups.setdefault(tuple(o for (_, _, o) in per_head[h]), []).append(h)
    for offsets, hs in groups.items():
        branches = tuple((i, b.segment_length, b.dilation, o) for i, (b, o) in enumerate(zip(spec.branches, offsets)))
        result.append(Panel(f"heads {_fmt_heads(hs)}\noffsets {'/'.join(map(str, offsets))} (branch 0..{G - 1})",
                            tuple(hs), branches))
    return result


def _layout(n_panels: int, legend_rows: int) -> dict:
    """Figure geometry in inches: fixed sizes per panel so that text never overlaps and the pixel size is known."""
    cols = min(_COLS, n_panels)
    rows = math.ceil(n_panels / cols)
    width = max(_LEFT_IN + cols * _AXES_IN + (cols - 1) * _WGAP_IN + _RIGHT_IN, 5.0)
    height = (_TITLE_IN + rows * (_ABOVE_IN + _AXES_IN + _BELOW_IN) + legend_rows * _LEGEND_IN)
    return dict(cols=cols, rows=rows, width=width, height=height)


def _legend_rows(num_branches: int) -> int:
    return math.ceil(num_branches / 3)


def figure_size_px(n_panels: int, num_branches: int, dpi: int = _DPI) -> tuple[int, int]:
    """(width, height) in pixels of the picture :func:`draw_pattern` writes for this many panels and branches."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    lay = _layout(n_panels, _legend_rows(num_branches))
    fig = Figure(figsize=(lay["width"], lay["height"]), dpi=dpi)
    return FigureCanvasAgg(fig).get_width_height()


def _cells(mask: torch.Tensor, cells: int) -> torch.Tensor:
    """Block-average an (n, n) bool mask to at most (cells, cells) shading values in [0, 1]: 0 where no pair is
    attended, else 0.35 + 0.65 * (fraction attended) so that sparse blocks stay visible."""
    n = mask.shape[0]
    b = max(1, math.ceil(n / cells))
    if b == 1:
        return mask.float()
    m = -(-n // b)
    padded = torch.zeros(m * b, m * b, dtype=torch.float32)
    padded[:n, :n] = mask.float()
    frac = padded.reshape(m, b, m, b).mean(dim=(1, 3))
    return torch.where(frac > 0, 0.35 + 0.65 * frac, torch.zeros_like(frac))


def scaled(spec: AttentionSpec, factor: int) -> AttentionSpec:
    """A copy of ``spec`` with every segment length divided by ``factor`` (dilations and offsets unchanged), to
    look at the structure of a pattern whose segments are too long to draw. Each segment length must be a
    multiple of ``factor`` and stay >= its dilation."""
    spec = load_spec(spec)
    if factor == 1:
        return spec
    problems = []
    for i, b in enumerate(spec.branches):
        if b.segment_length % factor or b.segment_length // factor < b.dilation:
            problems.append(f"branches[{i}]: segment_length {b.segment_length} / {factor} must be a whole number "
                            f">= dilation {b.dilation}")
    if problems:
        raise DrawError(f"cannot scale down by {factor}: " + "; ".join(problems))
    branches = tuple(dataclasses.replace(b, segment_length=b.segment_length // factor) for b in spec.branches)
    return dataclasses.replace(spec, branches=branches)


def _check_out(out) -> None:
    """``out`` must name a file whose suffix is an image format matplotlib writes (it would otherwise add ".png"
    to a name without one, and write beside a folder given as ``out``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    path = Path(out)
    if path.is_dir():
        raise DrawError(f"out {str(out)!r} is a folder; give a file name such as pattern.png")
    formats = FigureCanvasAgg.get_supported_filetypes()
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in formats:
        raise DrawError(f"out {str(out)!r} needs a suffix naming an image format; "
                        f"allowed: {', '.join('.' + f for f in sorted(formats))}")


def draw_pattern(spec, seq_len: int, out: "str | os.PathLike", heads: int | None = None, per_branch: bool = False,
                 dpi: int = _DPI, scale: int = 1) -> dict:
    """Draw ``spec`` at sequence length ``seq_len`` into ``out`` (format from its suffix, e.g. .png).

    heads: default one head per branch in grouped mode, 8 (or the number of branches, if larger) in all mode.
    scale: draw :func:`scaled` (spec, scale) instead, said so in the title.
    Returns {"panels": count, "size": (width, height) in pixels, "path": str}.
    """
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise DrawError(f"scale must be an integer >= 1; got {scale!r}")
    spec = scaled(load_spec(spec), scale)
    if not isinstance(seq_len, int) or seq_len < 1:
        raise DrawError(f"seq_len must be an integer >= 1; got {seq_len!r}")
    if seq_len > MAX_SEQ_LEN:
        raise DrawError(f"seq_len {seq_len} is too large to draw (the picture is N x N); use at most {MAX_SEQ_LEN}")
    _check_out(out)
    G = spec.num_branches
    if heads is None:
        heads = G if spec.head_assignment == "grouped" else max(8, G)
    if spec.head_assignment == "grouped" and heads < G:
        raise DrawError(f"grouped mode needs heads >= number of branches; got heads={heads}, branches={G}")
    ps = panels(spec, heads, per_branch)
    if len(ps) > MAX_PANELS:
        raise DrawError(f"this would draw {len(ps)} panels (more than {MAX_PANELS}); use fewer heads")

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    import matplotlib

    legend_rows = _legend_rows(G)
    lay = _layout(len(ps), legend_rows)
    cols, rows, width, height = lay["cols"], lay["rows"], lay["width"], lay["height"]
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    # Fixed margins (no tight bbox) so that the picture's size is exactly figure_size_px(...).
    fig.subplots_adjust(left=_LEFT_IN / width, right=(_LEFT_IN + cols * _AXES_IN + (cols - 1) * _WGAP_IN) / width,
                        top=1 - (_TITLE_IN + _ABOVE_IN) / height,
                        bottom=(legend_rows * _LEGEND_IN + _BELOW_IN) / height,
                        wspace=_WGAP_IN / _AXES_IN, hspace=(_ABOVE_IN + _BELOW_IN) / _AXES_IN)
    colors = [matplotlib.colors.to_rgb(c) for c in matplotlib.colormaps["tab10"].colors]
    color_of = {i: torch.tensor(colors[i % len(colors)]) for i in range(G)}
    n = seq_len
    for idx, p in enumerate(ps):
        ax = fig.add_subplot(rows, cols, idx + 1)
        # Each cell takes the colour of the shortest-range branch that attends in it, and a shade from the
        # union (blending colours would invent colours no branch has).
        masks = sorted(p.masks(n, spec.causal), key=lambda im: spec.branches[im[0]].segment_length)
        union = torch.zeros(n, n, dtype=torch.bool)
        for _, m in masks:
            union |= m
        shade = _cells(union, _MAX_CELLS)[..., None]
        color = torch.ones(*shade.shape[:2], 3)
        for i, m in reversed(masks):  # longest first, so the shortest-range branch is written last
            present = _cells(m, _MAX_CELLS) > 0
            color[present] = color_of[i]
        img = (1 - shade) + color * shade
        ax.imshow(img.numpy(), extent=(0, n, n, 0), interpolation="nearest")
        frac = union.float().mean().item()
        ax.set_title(f"{p.title}\n{frac:.2%} of (query, key) pairs", fontsize=8)
        ax.set_xlabel("key position", fontsize=8)
        if idx % cols == 0:
            ax.set_ylabel("query position", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlim(0, n)
        ax.set_ylim(n, 0)
    mode = spec.head_assignment + (", causal" if spec.causal else "")
    label = spec.name or spec.key
    if scale > 1:
        label += f" scaled down {scale}x (segment lengths / {scale})"
    b = math.ceil(n / _MAX_CELLS)
    note = "" if b == 1 else f"\none image cell = {b}x{b} (query, key) pairs; darker = more of them attended"
    fig.suptitle(f"{label}: {mode}; N={n}, H={heads}{note}", fontsize=10, y=1 - 0.08 / height, va="top")
    handles = [Patch(color=colors[i % len(colors)],
                     label=f"branch {i}: w={b.segment_length}, r={b.dilation}") for i, b in enumerate(spec.branches)]
    fig.legend(handles=handles, loc="lower center", ncol=min(3, G), fontsize=8, frameon=False)
    fig.savefig(out, dpi=dpi)
    return {"panels": len(ps), "size": figure_size_px(len(ps), G, dpi), "path": str(out)}
