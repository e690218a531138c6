"""Where a quantized step's time goes, layer by layer, against bf16: every quantized layer of the SD-sized UNet timed
in place during whole steps, in the float model and in quantized variants, summed over the layers of one kind and
shape.

Each layer is timed by forward hooks around its call (the device synchronized before and after each layer on a GPU,
which there adds a wait per layer that eager steps do not have). Per layer the least time over ``--rounds`` steps
is kept, the variants taking turns each round; the step's own time beside it is the least whole step (hooks
included), and what the layers do not account for (the float attention, norms, activations, adds) is the difference.
Process CPU time at one CPU thread, wall clock otherwise. Variants are ``benchmarks/inference_speed.py``'s; the
first one is the baseline the ratios are taken against.

    python benchmarks/layer_speed.py --latent 64 --threads 2 --output docs/results/layer_speed_cpu.md
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import inference_speed as bench  # noqa: E402  (benchmarks/inference_speed.py)
import report  # noqa: E402

from diffusers_gac.quant.convert import quant_layers  # noqa: E402


def layer_kind(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        (kh, kw), (sh, _) = module.kernel_size, module.stride
        stride = f", stride {sh}" if sh != 1 else ""
        return f"conv {kh}x{kw} {module.in_channels} -> {module.out_channels}{stride}"
    return f"linear {module.in_features} -> {module.out_features}"


def timed_step(model: nn.Module, names: list[str], step, clock, sync) -> tuple[dict[str, float], float]:
    """One step of ``model`` with each named layer's call timed: (seconds per layer, seconds for the step)."""
    spent, handles = {}, []
    modules = dict(model.named_modules())
    for name in names:
        def before(module, args, name=name):
            sync()
            spent[name] = spent.get(name, 0.0) - clock()

        def after(module, args, out, name=name):
            sync()
            spent[name] += clock()

        handles += [modules[name].register_forward_pre_hook(before), modules[name].register_forward_hook(after)]
    try:
        start = clock()
        step()
        total = clock() - start
    finally:
        for handle in handles:
            handle.remove()
    return spent, total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=["bf16", "bf16_int_w4a4", "bf16_auto_w4a4"],
                        help="inference_speed.py variants; the first is the baseline")
    parser.add_argument("--sd-channels", type=int, nargs=4, default=list(bench.SD_CHANNELS))
    parser.add_argument("--cross-attention-dim", type=int, default=768)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.latent < 8 or args.batch < 1 or args.threads < 1:
        parser.error("--rounds, --batch and --threads must be at least 1, --latent at least 8")
    for name in args.variants:
        try:
            prefixes, _ = bench.split_variant(name)
        except ValueError:
            parser.error(f"unknown --variants {name!r}: a variant of benchmarks/inference_speed.py "
                         f"({', '.join(bench.VARIANTS)}, with the prefixes {', '.join(bench.PREFIXES)})")
        if {"compiled_", "graph_"} & set(prefixes):
            parser.error(f"--variants {name!r}: a compiled step or a replayed CUDA graph cannot be timed layer by "
                         "layer; time it with benchmarks/inference_speed.py")
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    clock = time.process_time if args.threads == 1 and not cuda else time.perf_counter
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fp32 = bench.sd_unet(tuple(args.sd_channels), args.cross_attention_dim).to(args.device)
    call = bench.model_inputs(fp32, args.latent, args.batch, device=args.device)
    models = {name: bench.build_variant(fp32, name, call) for name in args.variants}
    names = list(quant_layers(next((m for m in models.values() if quant_layers(m)), fp32)))
    if not names:
        parser.error("none of --variants has quantized layers to time")
    if any(not set(names) <= dict(model.named_modules()).keys() for model in models.values()):
        parser.error("--variants must have the same layers (fused_ variants have fused projections)")
    modules = dict(fp32.named_modules())
    kinds = {name: layer_kind(modules[name]) for name in names}
    steps = {name: bench.variant_forward(model, call, name) for name, model in models.items()}
    for step in steps.values():
        step()  # warm up (and "auto" times its paths on this size)
    best = {name: defaultdict(lambda: float("inf")) for name in models}
    best_step = dict.fromkeys(models, float("inf"))
    for _ in range(args.rounds):  # each step runs under torch.no_grad (inference_speed.forward_fn)
        for name, model in models.items():
            spent, total = timed_step(model, names, steps[name], clock, sync)
            for layer, seconds in spent.items():
                best[name][layer] = min(best[name][layer], seconds)
            best_step[name] = min(best_step[name], total)
    base = args.variants[0]
    groups: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    counts: dict[str, int] = defaultdict(int)
    for layer in names:
        counts[kinds[layer]] += 1
        for name in models:
            groups[kinds[layer]][name] += 1e3 * best[name][layer]
    header = " | ".join(f"{name} ms" for name in models)
    ratios = " | ".join(f"{base} / {name}" for name in args.variants[1:])
    lines = [f"Command: `{report.command()}`", "",
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; SD-sized UNet (random), latent {args.latent}, batch "
             f"{args.batch}, {args.device}, {args.threads} thread(s), {report.malloc_line()}, "
             f"{'process CPU time' if clock is time.process_time else 'wall clock'}; torch {torch.__version__}; per "
             f"layer the least over {args.rounds} steps, summed over the layers of a kind.", "",
             f"| layers | count | {header} | {ratios} |", "|---|---|" + "---|" * (2 * len(models) - 1)]

    def row(label: str, count: str, times: dict[str, float]) -> str:
        cells = " | ".join(f"{times[name]:.1f}" for name in models)
        return f"| {label} | {count} | {cells} | " + " | ".join(
            f"{times[base] / times[name]:.2f}x" for name in args.variants[1:]) + " |"

    for kind in sorted(groups, key=lambda k: -groups[k][base]):
        lines.append(row(kind, str(counts[kind]), groups[kind]))
    layers = {name: sum(g[name] for g in groups.values()) for name in models}
    steps_ms = {name: 1e3 * best_step[name] for name in models}
    lines += [row("**all quantized layers**", str(len(names)), layers),
              row("**the rest of the step**", "", {name: steps_ms[name] - layers[name] for name in models}),
              row("**whole step**", "", steps_ms)]
    report.emit(f"Layer by layer: the SD-sized UNet at latent {args.latent}", lines, args.output)


if __name__ == "__main__":
    main()
