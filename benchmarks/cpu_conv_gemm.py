"""Convolutions on the CPU integer kernels, layer by layer: why each kernel tap is a tokens-major GEMM, and what a
W4A4 convolution of SD-1.5's shapes costs against the bf16 one it replaces.

* ``gemm``: ``torch._int_mm`` (oneDNN) on one 3x3 tap of a 1280-channel layer, ``W (1280, 1280) @ X (1280, n)``
  (channels-first: the positions are the columns) against ``X^T (n, 1280) @ W^T`` (tokens-major: the positions are
  the rows), for position counts ``n`` a deep layer sees (a 4x4 input's flat-shift tap covers 22 rows, an 8x8 one's
  78) and round ones beside them;
* ``ceiling``: the int8 GEMM alone (``torch._int_mm``, int32 sums) against the bfloat16 GEMM it replaces (``torch.mm``),
  both into preallocated outputs, on SD-1.5's linear shapes at latent 64 (tokens x in -> out) and one 3x3 tap of a
  deep layer: what the CPU's int8 instructions give before any quantizing or rescaling;
* ``layers``: SD-1.5-shaped 3x3 convolutions in bfloat16 (``F.conv2d`` through oneDNN) against the W4A4 integer
  layer (dynamic per-token inputs, round-to-nearest weights, bfloat16 in and out), with channels-first and
  channels-last inputs.

Figures are the least over ``--rounds`` rounds of the mean time of back-to-back calls for ~0.2 s, the candidates
taking turns; process CPU time at one thread, wall clock at more.

    python benchmarks/cpu_conv_gemm.py --threads 1 --output docs/results/cpu_conv_gemm.md
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402  (benchmarks/report.py)
from layer_overhead import frozen_layer  # noqa: E402

POSITIONS = [16, 22, 24, 32, 64, 78, 80, 286, 288]
LAYERS = [(1280, 1280, 4), (1280, 1280, 8), (2560, 1280, 8), (1280, 1280, 16), (640, 640, 16), (640, 640, 32),
          (320, 320, 32), (320, 320, 64)]  # (in, out, height = width): 3x3 convolutions of SD 1.5 at latents 32-64
# (tokens, in, out): SD 1.5's linear layers at latent 64, batch 1 (projections, feed-forward in and out, cross-attention
# keys/values over 77 text tokens), and one 3x3 tap of a 1280-channel layer over 8x8 pixels (78 flat-shift rows)
GEMMS = [(4096, 320, 320), (4096, 320, 2560), (4096, 1280, 320), (1024, 640, 640), (1024, 640, 5120),
         (1024, 2560, 640), (256, 1280, 1280), (77, 768, 320), (77, 768, 1280), (78, 1280, 1280)]


def best_ms(fns: list, rounds: int, clock) -> list[float]:
    for fn in fns:
        fn()
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            start, calls = clock(), 0
            while True:
                fn()
                calls += 1
                if clock() - start > 0.2:
                    break
            best[i] = min(best[i], (clock() - start) / calls)
    return [1e3 * t for t in best]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", help="also write the tables to this markdown file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    lines = [f"Command: `{report.command()}`", "",
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}, CPU capability "
             f"{torch.backends.cpu.get_cpu_capability()}; {args.threads} thread(s), {report.malloc_line()}, "
             f"{'process CPU time' if args.threads == 1 else 'wall clock'}; least over {args.rounds} rounds.", "",
             "## One int8 GEMM per tap: positions as columns or as rows", "",
             "| positions n | `W @ X` (channels-first) us | `X^T @ W^T` (tokens-major) us | channels-first / tokens-major |",
             "|---|---|---|---|"]
    torch.manual_seed(0)
    weight = torch.randint(-8, 8, (1280, 1280), dtype=torch.int8)
    for n in POSITIONS:
        x = torch.randint(-8, 8, (1280, n), dtype=torch.int8)
        xt = x.t().contiguous()
        first, tokens = best_ms([lambda: torch._int_mm(weight, x), lambda: torch._int_mm(xt, weight.t())],
                                args.rounds, clock)
        lines.append(f"| {n} | {1e3 * first:.0f} | {1e3 * tokens:.0f} | {first / tokens:.2f}x |")
        print(lines[-1], flush=True)
    lines += ["", "## The int8 GEMM alone against the bf16 GEMM", "",
              "| tokens x in -> out | bf16 `mm` us | int8 `_int_mm` us | bf16 / int8 |", "|---|---|---|---|"]
    for m, k, n in GEMMS:
        torch.manual_seed(0)
        xq, wq = torch.randint(-8, 8, (m, k), dtype=torch.int8), torch.randint(-8, 8, (n, k), dtype=torch.int8)
        xh, wh = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(n, k, dtype=torch.bfloat16)
        acc, out = torch.empty(m, n, dtype=torch.int32), torch.empty(m, n, dtype=torch.bfloat16)
        half, whole = best_ms([lambda: torch.mm(xh, wh.t(), out=out), lambda: torch._int_mm(xq, wq.t(), out=acc)],
                              args.rounds, clock)
        lines.append(f"| {m} x {k} -> {n} | {1e3 * half:.0f} | {1e3 * whole:.0f} | {half / whole:.2f}x |")
        print(lines[-1], flush=True)
    lines += ["", "## 3x3 convolutions of SD 1.5, bf16 against W4A4 (bfloat16 input, batch 1)", "",
              "| in -> out channels, input | bf16 ms | W4A4 ms | bf16 / W4A4 | bf16 channels-last ms | W4A4 "
              "channels-last ms | bf16 / W4A4, channels-last |", "|---|---|---|---|---|---|---|"]
    with torch.no_grad():
        for c_in, c_out, size in LAYERS:
            torch.manual_seed(0)
            module = nn.Conv2d(c_in, c_out, 3, padding=1)
            layer = frozen_layer(copy.deepcopy(module))
            layer.bias.data = layer.bias.data.bfloat16()  # as a torch_dtype=torch.bfloat16 load leaves it
            half = module.bfloat16()
            half_last = copy.deepcopy(half).to(memory_format=torch.channels_last)
            x = torch.randn(1, c_in, size, size, dtype=torch.bfloat16)
            x_last = x.contiguous(memory_format=torch.channels_last)
            a, b, c, d = best_ms([lambda: half(x), lambda: layer(x), lambda: half_last(x_last), lambda: layer(x_last)],
                                 args.rounds, clock)
            lines.append(f"| {c_in} -> {c_out}, {size}x{size} | {a:.2f} | {b:.2f} | {a / b:.2f}x | {c:.2f} | {d:.2f} "
                         f"| {c / d:.2f}x |")
            print(lines[-1], flush=True)
    report.emit("Convolutions on the CPU integer kernels, layer by layer", lines, args.output)


if __name__ == "__main__":
    main()
