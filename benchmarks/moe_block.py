"""One MoE block, forward + backward: asymoe's expert backends vs dense SwiGLU vs transformers' Mixtral.

Per shape (tokens, d, ffn, experts, k), interleaved in one process: each repetition runs every
contestant once, in turn, so that load from other jobs on a shared machine spreads over all of
them; the figure is the median over repetitions after warm-up.

Contestants
- `dense`: a SwiGLU FFN of width k·ffn (fused gate/up weight), the same activated FLOPs;
- `asymoe/<backend>`: `MoEBlock` with one Euclidean FFN group of E experts, one router, top-k
  (vanilla MoE), `model.moe.experts_backend=<backend>`; router, top-k and balance loss included,
  routing statistics off (as on a step that logs nothing);
- `mixtral/<impl>`: transformers' `MixtralSparseMoeBlock` with `config._experts_implementation`
  = eager | grouped_mm | batched_mm (batched_mm copies two weight matrices per assignment and is
  skipped where that copy exceeds `--max-copy-gib`), with the asymoe experts' weights;
- group kinds at the same shape: a Lorentz and a Poincaré hyperbolic group and an evidence group
  against a Euclidean group with the same experts, each with the eager and the `auto` backend.

Allocator. The process first has glibc keep freed memory (`machine.keep_freed_memory`; off with
`--default-allocator`): by default the routed blocks page-fault on fresh mappings in every
repetition (dense does not), and blocks of 32 MiB or more always do.

FLOPs. Activated FLOPs = 3 × (forward FLOPs) for forward + backward; a gated FFN expert costs
2·3·d·ffn per assignment (T·k assignments), so dense and MoE rows count the same FLOPs and the
router is overhead. Hyperbolic experts count the same 3·d·ffn multiply-adds (their time columns
add 2·ffn + d). An evidence expert adds its evidence branch, 2·ffn·2d + d·ffn, and each token the
shared cross-attention projections 4·d² and the two causal attentions over its sample
(S/2 keys on average, S·d multiply-adds each). Tokens are laid out as samples of `--seq`
positions (the first `--image-tokens` are image tokens, the last 64 answers; image + prompt
positions are evidence).

    python benchmarks/moe_block.py                     # CPU shapes, fp32, 2 threads
    python benchmarks/moe_block.py --device cuda       # GPU shapes, bf16 (needs CUDA)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from machine import cpu_model, keep_freed_memory

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {
    "cpu": [(4096, 256, 512, 4, 2), (4096, 256, 128, 16, 4)],
    "cuda": [(16384, 2048, 5632, 4, 2), (16384, 2048, 1408, 64, 6), (8192, 512, 1024, 16, 2)],
}
ASYMOE_BACKENDS = ("eager", "grouped_mm", "padded", "segment", "auto")
MIXTRAL_IMPLS = ("eager", "grouped_mm", "batched_mm")
KINDS = ("euclidean", "lorentz", "poincare", "evidence")


def token_meta(num_tokens: int, seq: int, image_tokens: int, device):
    from asymoe.models.moe import TokenMeta

    batch = num_tokens // seq
    assert batch * seq == num_tokens, "--seq must divide the token count"
    vision = torch.zeros(batch, seq, dtype=torch.bool, device=device)
    vision[:, :image_tokens] = True
    answer = torch.zeros_like(vision)
    answer[:, seq - 64 :] = True
    valid = torch.ones_like(vision)
    return TokenMeta(vision_mask=vision, attention_mask=valid, evidence_mask=valid & ~answer, answer_mask=answer)


def asymoe_block(kind: str, backend: str, shape, state, seed: int = 0):
    """A one-group MoEBlock: shared mode, one router over E experts of the given kind."""
    from asymoe.config.schema import EvidenceConfig, GroupConfig, GroupsConfig, MoEConfig, RoutingConfig
    from asymoe.models.factory import make_group
    from asymoe.models.moe import MoEBlock

    _, d, ffn, experts, k = shape
    geometry = kind if kind in ("lorentz", "poincare") else "euclidean"
    group = GroupConfig(num_experts=experts, kind="evidence" if kind == "evidence" else "ffn", geometry=geometry)
    empty = GroupConfig(num_experts=0)
    name = "language" if kind == "evidence" else "shared"
    groups = GroupsConfig(**{g: (group if g == name else empty) for g in ("vision", "shared", "language")})
    config = MoEConfig(
        groups=groups,
        routing=RoutingConfig(mode="shared", top_k=k, balance_coef={"all": 0.01}),
        evidence=EvidenceConfig(heads=max(1, d // 64)),
        experts_backend=backend,
    )
    torch.manual_seed(seed)
    built = make_group(name, config, d, ffn, "silu")
    return MoEBlock(0, d, {name: built}, config, state)


def mixtral_block(impl: str, shape, source):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    _, d, ffn, experts, k = shape
    config = MixtralConfig(hidden_size=d, intermediate_size=ffn, num_local_experts=experts, num_experts_per_tok=k)
    config._experts_implementation = impl
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        block.experts.gate_up_proj.copy_(source.groups["shared"].gate_up_proj)
        block.experts.down_proj.copy_(source.groups["shared"].down_proj)
        block.gate.weight.copy_(source.routers["all"].weight)
    return block


class DenseSwiGLU(torch.nn.Module):
    """A dense gated FFN of width `width` (fused gate/up projection, as the experts)."""

    def __init__(self, d: int, width: int):
        super().__init__()
        self.gate_up_proj = torch.nn.Parameter(torch.randn(2 * width, d) * d**-0.5)
        self.down_proj = torch.nn.Parameter(torch.randn(d, width) * width**-0.5)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        from asymoe.models.experts import gated_ffn

        return gated_ffn(hidden, self.gate_up_proj, self.down_proj, torch.nn.functional.silu)


def block_flops(kind: str, shape, seq: int) -> float:
    """Activated FLOPs of forward + backward (module docstring)."""
    tokens, d, ffn, _, k = shape
    macs = tokens * k * 3 * d * ffn
    if kind == "evidence":
        macs += tokens * k * 5 * d * ffn + tokens * (4 * d * d + 2 * seq * d)
    return 3 * 2 * macs


def timed(module, hidden, grad, device) -> float:
    module.zero_grad(set_to_none=True)
    hidden.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = module(hidden)
    out.backward(grad)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def resolved_auto(block, kind: str, shape, device, dtype) -> str | None:
    """The timed contestant that an `auto` block runs as on this device (its group's resolved
    kernel), or None when that kernel is not a contestant of its own."""
    (kernel,) = block._kernels(torch.empty(0, shape[1], device=device, dtype=dtype)).values()
    if kind == "euclidean":
        return f"asymoe/{kernel}"
    return f"{kind}/eager" if kernel == "eager" else None


def contestants(shape, state, args, device, dtype) -> dict[str, tuple[torch.nn.Module, str]]:
    """name -> (module, FLOP kind)."""
    tokens, d, ffn, experts, k = shape
    out: dict[str, tuple[torch.nn.Module, str]] = {"dense": (DenseSwiGLU(d, k * ffn), "euclidean")}
    for backend in ASYMOE_BACKENDS:
        out[f"asymoe/{backend}"] = (asymoe_block("euclidean", backend, shape, state), "euclidean")
    source = out["asymoe/eager"][0]
    for impl in MIXTRAL_IMPLS:
        copy_gib = tokens * k * 3 * d * ffn * torch.tensor([], dtype=dtype).element_size() / 2**30
        if impl == "batched_mm" and copy_gib > args.max_copy_gib:
            print(f"skip mixtral/batched_mm at {shape}: its weight copies need {copy_gib:.1f} GiB", file=sys.stderr)
            continue
        out[f"mixtral/{impl}"] = (mixtral_block(impl, shape, source), "euclidean")
    if not args.skip_kinds:
        for kind in KINDS[1:]:
            for backend in ("eager", "auto"):
                out[f"{kind}/{backend}"] = (asymoe_block(kind, backend, shape, state), kind)
    return {name: (module.to(device=device, dtype=dtype), kind) for name, (module, kind) in out.items()}


def measure_shape(shape, args, device, dtype) -> dict:
    """Rows per contestant. An `auto` contestant that runs as another contestant (`resolved_auto`)
    is not timed again: its row is that contestant's, marked `same_as` (timing one code path twice
    only showed the machine's noise: 131 and 142 ms for grouped_mm and auto on 2026-12-01)."""
    from asymoe.models.moe import MoEState

    tokens, d = shape[0], shape[1]
    state = MoEState()
    state.statistics = False
    state.set(token_meta(tokens, args.seq, args.image_tokens, device))
    entries = contestants(shape, state, args, device, dtype)
    same_as = {}
    for name, (module, kind) in entries.items():
        alias = resolved_auto(module, kind, shape, device, dtype) if name.endswith("/auto") else None
        if alias in entries:
            same_as[name] = alias
    timed_entries = {name: entry for name, entry in entries.items() if name not in same_as}
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens // args.seq, args.seq, d, generator=generator).to(device, dtype).requires_grad_()
    grad = torch.randn(hidden.shape, generator=generator).to(device, dtype)
    times: dict[str, list[float]] = {name: [] for name in timed_entries}
    for repetition in range(args.warmup + args.repeats):
        for name, (module, _) in timed_entries.items():
            seconds = timed(module, hidden, grad, device)
            if repetition >= args.warmup:
                times[name].append(seconds)
    rows = {}
    for name, (_, kind) in timed_entries.items():
        median = statistics.median(times[name])
        flops = block_flops(kind, shape, args.seq)
        rows[name] = {
            "median_s": median,
            "min_s": min(times[name]),
            "max_s": max(times[name]),
            "tflops": flops / median / 1e12,
        }
    for name, alias in same_as.items():
        rows[name] = dict(rows[alias], same_as=alias)
    return {name: rows[name] for name in entries}


# ---------------------------------------------------------------------------------------------
# Report


def shape_name(shape) -> str:
    return "tokens={} d={} ffn={} E={} k={}".format(*shape)


def best_mixtral(rows: dict) -> str | None:
    names = [name for name in rows if name.startswith("mixtral/")]
    return max(names, key=lambda name: rows[name]["tflops"]) if names else None


def targets(results: dict, device: str) -> list[tuple[str, float | None, float, str]]:
    """(target, measured, threshold, met/not met) for the issue's block targets on this device."""
    shapes = list(results)
    coarse = results[shapes[0]]
    dense_bars = (1.0, 0.85) if device == "cpu" else (0.85, 0.60)
    out = [
        (
            f"coarse block ≥ {dense_bars[0]}× dense",
            coarse["asymoe/auto"]["tflops"] / coarse["dense"]["tflops"],
            dense_bars[0],
        )
    ]
    if len(shapes) > 1:  # not with --shapes 1
        fine = results[shapes[1]]
        out.append(
            (
                f"fine-grained block ≥ {dense_bars[1]}× dense",
                fine["asymoe/auto"]["tflops"] / fine["dense"]["tflops"],
                dense_bars[1],
            )
        )
        best = best_mixtral(fine)
        if best:
            out.append(
                (
                    f"fine-grained block ≥ 1.3× transformers' best ({best})",
                    fine["asymoe/auto"]["tflops"] / fine[best]["tflops"],
                    1.3,
                )
            )
    for kind in KINDS[1:]:
        if f"{kind}/auto" in coarse:
            worst = max(1 - rows[f"{kind}/auto"]["tflops"] / rows["asymoe/auto"]["tflops"] for rows in results.values())
            out.append((f"{kind} overhead ≤ 15% (activated TFLOP/s vs Euclidean, worst shape)", worst, 0.15))
    return [
        (name, value, bar, "met" if (value <= bar if "overhead" in name else value >= bar) else "not met")
        for name, value, bar in out
    ]


def markdown(results: dict, meta: dict, device: str) -> str:
    lines = [f"### {meta['device_name']} ({meta['dtype']})", ""]
    for name, rows in results.items():
        dense = rows["dense"]["tflops"]
        best = best_mixtral(rows)
        lines += [
            f"#### {name}",
            "",
            "| contestant | median (ms) | min–max (ms) | activated TFLOP/s | vs dense |"
            + (f" vs {best} |" if best else ""),
            "|---|---:|---:|---:|---:|" + ("---:|" if best else ""),
        ]
        for contestant, row in rows.items():
            cells = [
                contestant + (f" (= {row['same_as']})" if "same_as" in row else ""),
                f"{1e3 * row['median_s']:.1f}",
                f"{1e3 * row['min_s']:.1f}–{1e3 * row['max_s']:.1f}",
                f"{row['tflops']:.4f}",
                f"{row['tflops'] / dense:.2f}×",
            ]
            if best:
                cells.append(f"{row['tflops'] / rows[best]['tflops']:.2f}×")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "#### Group kinds against the Euclidean group (same experts, same backend)",
        "",
        "| shape | kind | backend | median (ms) | time vs Euclidean | activated TFLOP/s | TFLOP/s overhead |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for name, rows in results.items():
        for kind in KINDS[1:]:
            for backend in ("eager", "auto"):
                row, base = rows.get(f"{kind}/{backend}"), rows[f"asymoe/{backend}"]
                if row is None:
                    continue
                lines.append(
                    f"| {name} | {kind} | {backend} | {1e3 * row['median_s']:.1f} | "
                    f"{row['median_s'] / base['median_s']:.2f}× | {row['tflops']:.4f} | "
                    f"{100 * (1 - row['tflops'] / base['tflops']):.0f}% |"
                )
    lines += ["", "#### Targets", "", "| target | measured | threshold | |", "|---|---:|---:|---|"]
    for name, value, bar, verdict in targets(results, device):
        shown = (f"{100 * value:.0f}%", f"{100 * bar:.0f}%") if "overhead" in name else (f"{value:.2f}×", f"{bar}×")
        lines.append(f"| {name} | {shown[0]} | {shown[1]} | {verdict} |")
    lines += [
        "",
        f"- machine: {meta['machine']}",
        f"- load average (1/5/15 min) before: {meta['load_before']}, after: "
        f"{meta['load_after']} (other jobs shared the machine; contestants interleaved, medians)",
        f"- torch {meta['torch']}, transformers {meta['transformers']}, {meta['threads']} intra-op threads, "
        f"{meta['repeats']} timed repetitions after {meta['warmup']} warm-up, samples of {meta['seq']} positions",
        f"- host memory allocator: {meta.get('allocator', 'the default')}",
        f"- command: `{meta['command']}` ({meta['date']})",
        "",
    ]
    return "\n".join(lines)


def write(results: dict, meta: dict, device: str) -> None:
    """Replace this device's section in moe_block.{json,md}; the other device's stays."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path, md_path = RESULTS / "moe_block.json", RESULTS / "moe_block.md"
    data = json.loads(json_path.read_text()) if json_path.is_file() else {}
    data[device] = {"meta": meta, "results": results, "markdown": markdown(results, meta, device)}
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    sections = []
    for name in ("cpu", "cuda"):
        if name in data:
            sections.append(data[name]["markdown"])
        else:
            sections.append(
                f"### {name.upper()}\n\nnot measured (no such device in the session that wrote this file); "
                f"run `python benchmarks/moe_block.py --device {name}` on one.\n"
            )
    header = (
        "# One MoE block, forward + backward\n\nWritten by `benchmarks/moe_block.py` (its docstring says "
        "what is timed and how FLOPs are counted). One section per device; a run replaces its own.\n\n"
    )
    md_path.write_text(header + "\n".join(sections))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024, help="positions per sample")
    parser.add_argument("--image-tokens", type=int, default=576)
    parser.add_argument("--max-copy-gib", type=float, default=2.0, help="skip mixtral/batched_mm above this")
    parser.add_argument("--skip-kinds", action="store_true", help="Euclidean groups only")
    parser.add_argument("--shapes", type=int, default=None, help="only the first N shapes")
    parser.add_argument(
        "--default-allocator", action="store_true", help="leave glibc's malloc as is (machine.keep_freed_memory)"
    )
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--render", action="store_true", help="rewrite the markdown from the JSON, measure nothing")
    args = parser.parse_args()
    if args.render:
        data = json.loads((RESULTS / "moe_block.json").read_text())
        for device, entry in data.items():
            write(entry["results"], entry["meta"], device)
        return
    torch.set_num_threads(args.threads)
    allocator = "the platform's default" if args.default_allocator else keep_freed_memory()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs CUDA")
    device = torch.device(args.device)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    load_before = os.getloadavg()
    results = {}
    for shape in SHAPES[args.device][: args.shapes]:
        results[shape_name(shape)] = measure_shape(shape, args, device, dtype)
        print(shape_name(shape), json.dumps({k: round(v["tflops"], 4) for k, v in results[shape_name(shape)].items()}))
    from importlib.metadata import version

    meta = {
        "device_name": "CPU" if args.device == "cpu" else torch.cuda.get_device_name(0),
        "dtype": str(dtype).removeprefix("torch."),
        "machine": f"{os.cpu_count()} CPU cores (nproc), {cpu_model()}, {platform.system()} {platform.machine()}",
        "load_before": "/".join(f"{v:.2f}" for v in load_before),
        "load_after": "/".join(f"{v:.2f}" for v in os.getloadavg()),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "threads": args.threads,
        "allocator": allocator,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "seq": args.seq,
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    report = markdown(results, meta, args.device)
    print(report)
    if not args.no_write:
        write(results, meta, args.device)


if __name__ == "__main__":
    main()
