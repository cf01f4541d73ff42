"""Streaming tool-call parser cost: a `write` call with a 4, 16 and 64 KB string argument
fed one character at a time, per format. Linear-time streaming keeps the 64 KB time
near 16x the 4 KB time (the bound checked here is 20x).

    .venv/bin/python benchmarks/tool_parsers.py [--formats hermes,qwen3_coder]
"""

from __future__ import annotations

import argparse
import time

from exo_tools.tools import FORMATS, StreamingToolParser, render_assistant_tool_calls

SIZES_KB = (4, 16, 64)
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


def parse_seconds(fmt: str, size: int) -> float:
    content = ('line of text with a "quote" and a tab\t\n' * (size // 40 + 1))[:size]
    call = {"function": {"name": "write", "arguments": {"filePath": "a.txt", "content": content}}}
    text = render_assistant_tool_calls([call], fmt)
    parser = StreamingToolParser(TOOLS, fmt, in_reasoning=False)
    start = time.perf_counter()
    for ch in text:
        parser.feed(ch)
    parser.finish()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default=",".join(FORMATS))
    args = ap.parse_args()
    print(f"{'format':<18}" + "".join(f"{f'{kb} KB (s)':>12}" for kb in SIZES_KB) + f"{'64/4':>8}")
    for fmt in args.formats.split(","):
        times = [parse_seconds(fmt, kb * 1024) for kb in SIZES_KB]
        ratio = times[-1] / times[0]
        flag = "" if ratio <= 20 else "  > 20x"
        print(f"{fmt:<18}" + "".join(f"{t:>12.3f}" for t in times) + f"{ratio:>7.1f}x{flag}")


if __name__ == "__main__":
    main()
