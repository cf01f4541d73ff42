"""Streaming tool-call parser cost: a `write` call with a long string argument (4, 16
and 64 KB by default) fed one character at a time, per format, in CPU seconds of this
process (less disturbed by other load than wall time), timed in 1,024-character
slices, each slice's best of ``--repeat`` runs summed. Linear-time streaming keeps
the largest size's time near (size ratio)x the smallest's; the check allows 1.25
times that by default (20x for 64 vs 4 KB, the issue's bound) and exits 1 naming the
formats over it.

    .venv/bin/python benchmarks/tool_parsers.py [--formats hermes,qwen3_coder]
    .venv/bin/python benchmarks/tool_parsers.py --sizes 2,8 --bound 8  # CI, under 20 s

The short form's 8x for 4x the size sits halfway (geometrically) between linear (4x)
and quadratic (16x) cost, so noise of up to 2x either way cannot flip the verdict: on
a shared 2-core machine linear formats measured 3.0-6.4x there, the formerly
quadratic pythonic ones 13.6x and 17.5x. 2 KB is long enough (2,000+ feeds) that a
parser's fixed cost does not hide its growth.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

from exo_tools.tools import FORMATS, StreamingToolParser, render_assistant_tool_calls

DEFAULT_SIZES_KB = (4, 16, 64)
# Allowed cost ratio, as a multiple of the size ratio: linear cost is 1x plus noise.
SLACK = 1.25
SLICE = 1024  # characters timed together
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "write",
            "parameters": {
                "type": "object",
                "properties": {"filePath": {"type": "string"}, "content": {"type": "string"}},
                "required": ["filePath", "content"],
            },
        },
    }
]


def call_text(fmt: str, size: int) -> str:
    """A ``write`` call whose ``content`` is ``size`` characters, as ``fmt`` spells it."""
    content = ('line of text with a "quote" and a tab\t\n' * (size // 40 + 1))[:size]
    call = {"function": {"name": "write", "arguments": {"filePath": "a.txt", "content": content}}}
    return render_assistant_tool_calls([call], fmt)


def slice_seconds(fmt: str, size: int) -> list[float]:
    """CPU seconds per ``SLICE`` characters of a ``size``-character call fed one
    character at a time (the last slice includes ``finish``)."""
    text = call_text(fmt, size)
    parser = StreamingToolParser(TOOLS, fmt, in_reasoning=False)
    out: list[float] = []
    # As timeit does: a collection at a random point is noise, not the parser's cost.
    gc.collect()
    gc.disable()
    try:
        for a in range(0, len(text), SLICE):
            start = time.process_time()
            for ch in text[a : a + SLICE]:
                parser.feed(ch)
            if a + SLICE >= len(text):
                parser.finish()
            out.append(time.process_time() - start)
    finally:
        gc.enable()
    return out


def best_seconds(runs: list[list[float]]) -> float:
    """The sum over slices of each slice's best run: a burst of load elsewhere spoils
    a few slices of one run, not the estimate."""
    return sum(min(times) for times in zip(*runs, strict=True))


def cost_ratio(fmt: str, sizes_kb: tuple[int, ...], repeat: int = 1) -> tuple[list[float], float]:
    """Per-size CPU seconds (``best_seconds`` of ``repeat`` runs) and the largest
    size's time over the smallest's. Runs alternate between sizes after a warm-up, so
    load elsewhere slows every size alike instead of skewing the ratio."""
    slice_seconds(fmt, 1024)
    runs: list[list[list[float]]] = [[] for _ in sizes_kb]
    for _ in range(repeat):
        for k, kb in enumerate(sizes_kb):
            runs[k].append(slice_seconds(fmt, kb * 1024))
    best = [best_seconds(r) for r in runs]
    return best, best[-1] / best[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument(
        "--sizes",
        default=",".join(map(str, DEFAULT_SIZES_KB)),
        help="argument sizes in KB, comma-separated, ascending (default: 4,16,64)",
    )
    ap.add_argument(
        "--repeat", type=int, default=3, help="runs per size; the best counts (default: 3)"
    )
    ap.add_argument(
        "--bound",
        type=float,
        help=f"largest cost ratio allowed (default: {SLACK:g} x the size ratio)",
    )
    args = ap.parse_args()
    sizes = tuple(int(s) for s in args.sizes.split(","))
    if len(sizes) < 2 or list(sizes) != sorted(set(sizes)):
        ap.error("--sizes needs at least two ascending sizes")
    bound = args.bound or SLACK * sizes[-1] / sizes[0]
    ratio_name = f"{sizes[-1]}/{sizes[0]}"
    print(
        f"{'format':<18}"
        + "".join(f"{f'{kb} KB (s)':>12}" for kb in sizes)
        + f"{ratio_name:>8}{'us/char':>9}"
    )
    over: list[str] = []
    for fmt in args.formats.split(","):
        times, ratio = cost_ratio(fmt, sizes, args.repeat)
        per_char = times[-1] / (sizes[-1] * 1024) * 1e6
        flag = ""
        if ratio > bound:
            over.append(fmt)
            flag = f"  > {bound:g}x"
        print(
            f"{fmt:<18}"
            + "".join(f"{t:>12.3f}" for t in times)
            + f"{ratio:>7.1f}x{per_char:>9.1f}{flag}",
            flush=True,
        )
    if over:
        print(f"over {bound:g}x ({ratio_name} KB): {', '.join(over)}")
        return 1
    print(f"all within {bound:g}x ({ratio_name} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
