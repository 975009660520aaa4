"""Forward+backward time of one MoEBlock whose shared group is hyperbolic vs Euclidean.

Every configuration has the same shapes (one shared group of E experts, top-k, width f); only the
group class differs. Iterations are interleaved across configurations so that a busy machine
slows them all alike; the median per configuration is reported, with the ratio to Euclidean.

    python benchmarks/hyperbolic_cost.py            # writes benchmarks/results/hyperbolic_cost.md
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from asymoe.config import GeometryLossConfig, MoEConfig, RoutingConfig
from asymoe.models.experts import ExpertGroup, FFNExperts
from asymoe.models.hyperbolic import HyperbolicExperts
from asymoe.models.moe import MoEBlock, MoEState, TokenMeta
from machine import cpu_model

RESULTS = Path(__file__).resolve().parent / "results" / "hyperbolic_cost.md"


def build_group(kind: str, args: argparse.Namespace) -> ExpertGroup:
    if kind == "euclidean":
        return FFNExperts(args.experts, args.hidden, args.width, "silu")
    geometry, _, losses = kind.partition("+")
    weight = 0.1 if losses else 0.0
    return HyperbolicExperts(
        num_experts=args.experts,
        hidden_size=args.hidden,
        intermediate_size=args.width,
        activation="silu",
        geometry=geometry,
        curvature=1.0,
        learn_curvature=True,
        geometry_loss=GeometryLossConfig(align_weight=weight, order_weight=weight),
        has_evidence_group=False,
    )


def make_meta(batch: int, seq: int, vision: int) -> TokenMeta:
    vision_mask = torch.zeros(batch, seq, dtype=torch.bool)
    vision_mask[:, :vision] = True
    attention_mask = torch.ones(batch, seq, dtype=torch.bool)
    answer_mask = torch.zeros(batch, seq, dtype=torch.bool)
    answer_mask[:, -4:] = True
    return TokenMeta(vision_mask, attention_mask, attention_mask & ~answer_mask, answer_mask)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--vision", type=int, default=256, help="vision positions per sample")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads; 1 by default: on a shared small machine a second thread that another job "
        "deschedules stalls every parallel region, which would measure the machine, not the experts",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    kinds = ["euclidean", "lorentz", "poincare", "lorentz+losses", "poincare+losses"]
    config = MoEConfig(routing=RoutingConfig(mode="modality", top_k=args.top_k))
    meta = make_meta(args.batch, args.seq, args.vision)
    hidden = torch.randn(args.batch, args.seq, args.hidden)
    blocks: dict[str, tuple[MoEBlock, MoEState]] = {}
    for kind in kinds:
        state = MoEState()
        blocks[kind] = (MoEBlock(0, args.hidden, {"shared": build_group(kind, args)}, config, state), state)

    def step(kind: str) -> float:
        block, state = blocks[kind]
        block.zero_grad(set_to_none=True)
        inputs = hidden.clone().requires_grad_(True)
        start = time.perf_counter()
        state.set(meta)
        out = block(inputs)
        loss = out.square().mean()
        aux = state.total_aux_loss()
        if aux is not None:
            loss = loss + aux
        loss.backward()
        return time.perf_counter() - start

    load_before = os.getloadavg()
    for _ in range(args.warmup):
        for kind in kinds:
            step(kind)
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(args.repeats):
        for kind in kinds:
            times[kind].append(step(kind))
    load_after = os.getloadavg()

    median_ms = {kind: 1e3 * statistics.median(values) for kind, values in times.items()}
    spread_ms = {kind: (1e3 * min(values), 1e3 * max(values)) for kind, values in times.items()}
    tokens = args.batch * args.seq
    command = "python " + " ".join(shlex.quote(arg) for arg in sys.argv)
    lines = [
        "# Hyperbolic shared experts: forward+backward cost of one MoEBlock",
        "",
        f"One MoEBlock, one shared group of {args.experts} experts, top-{args.top_k}, d={args.hidden}, "
        f"f={args.width}, {tokens} tokens ({args.batch}×{args.seq}, {args.vision} vision positions per sample), "
        "float32, eager dispatch. `+losses`: geometry losses on (align and order weight 0.1). "
        f"Median of {args.repeats} interleaved iterations after {args.warmup} warm-up rounds.",
        "",
        "| shared group | forward+backward (ms, median) | min–max (ms) | ratio to Euclidean |",
        "|---|---:|---:|---:|",
    ]
    for kind in kinds:
        low, high = spread_ms[kind]
        ratio = median_ms[kind] / median_ms["euclidean"]
        lines.append(f"| {kind} | {median_ms[kind]:.1f} | {low:.1f}–{high:.1f} | {ratio:.2f}× |")
    lines += [
        "",
        f"- machine: {os.cpu_count()} CPU cores (nproc), {cpu_model()}, {platform.system()} {platform.machine()}",
        f"- load average (1/5/15 min) before: {'/'.join(f'{v:.2f}' for v in load_before)}, "
        f"after: {'/'.join(f'{v:.2f}' for v in load_after)} (other jobs shared the machine when > 0)",
        f"- torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, Python {platform.python_version()}",
        f"- command: `{command}`",
        "",
    ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
