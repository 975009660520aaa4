"""Training throughput: dense vs vanilla MoE vs AsyMoE vs transformers' MixtralForCausalLM, in activated TFLOP/s.

Each model trains under FSDP2 (`fully_shard` per decoder layer, then the root) in a one-process
group on one device, with AdamW (fused where torch has the kernel, as training picks it), on
synthetic LLaVA-shaped batches: per sample `--image-tokens` image positions followed by
`--text-tokens` text positions (the last `--answer-tokens` of them are answers; image + prompt
positions are evidence). What is timed and what is not:

- dense, vanilla MoE and AsyMoE run `VisionLanguageModel.forward` with `image_features` given: random
  projected image features are spliced at the placeholders, so the LM, its MoE blocks and the
  token metadata (vision / evidence / answer masks) are exercised exactly as in training (routing
  statistics off, as on a step that logs nothing); the
  vision encoder and projector are bypassed (frozen, not run), because they are identical for
  every VLM and absent from Mixtral. The rows compare language models.
- Mixtral runs on `inputs_embeds` of the same length (it has no vision path); its expert width is
  chosen so that its activated parameters per token match AsyMoE's (reported per row).
- Each model runs in its own subprocess, so peak memory (CUDA max allocated, or the process's peak
  RSS on CPU) belongs to that model alone. Step time is the median after warm-up; `--rounds`
  runs every model that many times, interleaved, and reports the median round.
- The models differ in size, so tokens/s alone would make a larger model look slower for being
  larger. The comparison is in activated TFLOP/s = tokens/s × (6·N_act + 12·L·d·S + F_evd) (PaLM,
  appendix B), N_act = activated non-embedding parameters per token averaged over image and text
  positions, F_evd the evidence experts' own attentions (`evidence_attention_flops`; 0 for
  models without them), and its ratio to dense: how fast each model runs the compute a token
  activates.
  MFU divides it by `--peak-tflops` (default: 989 for an H100's dense bf16); on CPU no peak is
  assumed. `--experts-backend` sets `model.moe.experts_backend` of the VLMs (default auto).

    python benchmarks/train_throughput.py            # GPU preset (~0.4-1.1B params), bf16
    python benchmarks/train_throughput.py --small    # the same comparison, tiny sizes, CPU, fp32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from machine import cpu_model

RESULTS = Path(__file__).resolve().parent / "results" / "train_throughput.md"
REPO = Path(__file__).resolve().parents[1]
MODELS = ("dense", "vanilla_moe", "asymoe", "mixtral")
DETAILS = {
    "dense": "plain FFN",
    "vanilla_moe": "vanilla_moe.yaml: 4 experts, one router, top-2, every other layer",
    "asymoe": "asymoe.yaml: 1 vision + 2 Lorentz shared + 1 evidence, top-2, every other layer",
}

# hidden, intermediate, layers, heads, kv heads, vocab; micro-batch; steps
PRESETS = {
    "gpu": dict(
        hidden=896,
        intermediate=4864,
        layers=24,
        heads=14,
        kv_heads=2,
        vocab=32000,
        batch=8,
        warmup=3,
        steps=10,
        image_tokens=576,
        text_tokens=512,
        answer_tokens=64,
    ),
    "small": dict(
        hidden=128,
        intermediate=512,
        layers=4,
        heads=4,
        kv_heads=4,
        vocab=1000,
        batch=1,
        warmup=3,
        steps=10,
        image_tokens=576,
        text_tokens=512,
        answer_tokens=64,
    ),
}
IMAGE_TOKEN_ID = 4


# ---------------------------------------------------------------------------------------------
# Models


def vlm_config(kind: str, p: dict, image_size: int, experts_backend: str = "auto"):
    """dense.yaml / asymoe.yaml at the preset's sizes; a thin frozen ResNet yields image_tokens positions."""
    from asymoe import config as config_lib

    channels = "[8,8,8,8]"
    overrides = [
        f"model.language.hidden_size={p['hidden']}",
        f"model.language.intermediate_size={p['intermediate']}",
        f"model.language.num_layers={p['layers']}",
        f"model.language.num_heads={p['heads']}",
        f"model.language.num_kv_heads={p['kv_heads']}",
        f"model.language.max_position_embeddings={p['image_tokens'] + p['text_tokens']}",
        f"model.vision.model_kwargs.channels={channels}",
        f"model.vision.image_size={image_size}",
        "model.vision.freeze=true",
        f"model.moe.evidence.heads={p['heads']}",
        f"model.moe.experts_backend={experts_backend}",
    ]
    return config_lib.load(REPO / "experiments" / f"{kind}.yaml", overrides)


def build_vlm(kind: str, p: dict, experts_backend: str):
    from asymoe.models.vlm import VisionLanguageModel

    side = int(round(p["image_tokens"] ** 0.5))
    assert side * side == p["image_tokens"], "image_tokens must be a square (a feature map)"
    cfg = vlm_config(kind, p, 32 * side, experts_backend)  # ResNet stride 32
    model = VisionLanguageModel(cfg.model, p["vocab"], IMAGE_TOKEN_ID)
    model.vision.requires_grad_(False)
    model.projector.requires_grad_(False)
    assert model.num_image_tokens == p["image_tokens"]
    return model


def vlm_activated(model, p: dict) -> float:
    """Activated non-embedding LM parameters per token, averaged over image and text positions."""
    table = model.parameter_table()
    embedding = model.lm.get_input_embeddings().weight.numel()
    bypassed = table["vision_encoder"] + table["projector"]
    per_vision = table["activated_per_vision_token"] - bypassed - embedding
    per_language = table["activated_per_language_token"] - embedding
    return (p["image_tokens"] * per_vision + p["text_tokens"] * per_language) / (p["image_tokens"] + p["text_tokens"])


def evidence_attention_flops(model, p: dict) -> float:
    """Training FLOPs per token (averaged over positions) of the evidence experts' attentions.

    Each MoE block with an evidence group runs, for every position that can reach the group (the
    text positions in modality routing, every position in shared routing), one multi-head
    cross-attention over the sample and, with the routing bias, one single-head attention of
    width d: each 12·d·S per query, the PaLM count of the LM's own attention term.
    """
    from asymoe.models.evidence import EvidenceExperts

    seq = p["image_tokens"] + p["text_tokens"]
    routed = {"all": seq, "vision": p["image_tokens"], "language": p["text_tokens"]}  # TokenMeta.router_tokens
    total = 0.0
    for block in model.moe_blocks():
        for name, group in block.groups.items():
            if not isinstance(group, EvidenceExperts):
                continue
            queries = sum(routed[router] for router in block.group_routers[name])
            attentions = 2 if group.route_bias else 1
            total += attentions * 12 * p["hidden"] * seq * queries / seq  # 12·d·S per query, averaged over S
    return total


def mixtral_config(p: dict, expert_width: int):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=p["vocab"],
        hidden_size=p["hidden"],
        intermediate_size=expert_width,
        num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"],
        num_key_value_heads=p["kv_heads"],
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=p["image_tokens"] + p["text_tokens"],
        tie_word_embeddings=False,
    )


def mixtral_activated(config) -> float:
    """Non-embedding parameters minus the experts a token does not use (top-k of E, every layer)."""
    d, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = d // config.num_attention_heads
    attention = d * head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    per_layer = attention + 2 * d + d * config.num_local_experts + config.num_experts_per_tok * 3 * d * f
    return layers * per_layer + d + d * config.vocab_size


def mixtral_matching(p: dict, target: float):
    """Mixtral (4 experts, top-2, MoE in every layer) whose activated parameters match `target`."""
    low = mixtral_activated(mixtral_config(p, 1))
    per_unit = mixtral_activated(mixtral_config(p, 2)) - low
    width = max(16, 16 * round((1 + (target - low) / per_unit) / 16))  # grouped GEMMs want 16-byte strides
    return mixtral_config(p, width)


# ---------------------------------------------------------------------------------------------
# One model, one process


class SplicedEmbedding(nn.Module):
    """Mixtral's token embedding with the batch's image features at the leading image positions.

    The same splice as the VLM's, done inside the model's forward so that FSDP2 has unsharded the
    embedding weight (outside the root forward it is a sharded DTensor).
    """

    def __init__(self, embedding: nn.Embedding, image_tokens: int):
        super().__init__()
        self.embedding = embedding
        self.image_tokens = image_tokens
        self.features: torch.Tensor | None = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        text = self.embedding(input_ids[:, self.image_tokens :])
        return torch.cat([self.features.to(text.dtype), text], dim=1)


def synthetic_batch(p: dict, hidden: int, device, generator) -> dict:
    batch, image, text, answer = p["batch"], p["image_tokens"], p["text_tokens"], p["answer_tokens"]
    seq = image + text
    ids = torch.randint(5, p["vocab"], (batch, seq), generator=generator)
    ids[:, :image] = IMAGE_TOKEN_ID
    attention = torch.ones(batch, seq, dtype=torch.bool)
    answer_mask = torch.zeros_like(attention)
    answer_mask[:, seq - answer :] = True
    labels = torch.full_like(ids, -100)
    labels[:, image:] = ids[:, image:]
    features = torch.randn(batch, image, hidden, generator=generator)
    tensors = dict(
        input_ids=ids,
        attention_mask=attention,
        evidence_mask=attention & ~answer_mask,
        answer_mask=answer_mask,
        image_index=torch.arange(batch),
        image_features=features,
        labels=labels,
    )
    return {k: v.to(device) for k, v in tensors.items()}


def run_one(kind: str, p: dict, args) -> dict:
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    cuda = torch.cuda.is_available() and not args.small
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    torch.manual_seed(0)
    rss_before = resident_bytes()
    if kind == "mixtral":
        from transformers import MixtralForCausalLM

        target = json.loads(args.target)["activated"]
        config = mixtral_matching(p, target)
        model: nn.Module = MixtralForCausalLM(config)
        embedding = SplicedEmbedding(model.model.embed_tokens, p["image_tokens"])
        model.model.embed_tokens = embedding
        layers = list(model.model.layers)
        activated = mixtral_activated(config)
        extra_flops = 0.0
        total = sum(q.numel() for q in model.parameters())
        detail = f"4 experts of width {config.intermediate_size}, top-2, MoE in every layer"
    else:
        model = build_vlm(kind, p, args.experts_backend)
        # As on a training step that logs nothing (the module turns routing statistics on only
        # for the steps TensorBoard records).
        model.moe_state.statistics = False
        layers = list(model.lm.model.layers)
        activated = vlm_activated(model, p)
        extra_flops = evidence_attention_flops(model, p)
        total = sum(q.numel() for q in model.lm.parameters())
        detail = DETAILS[kind] + ("" if kind == "dense" else f", experts_backend={args.experts_backend}")
    model.to(device)
    dtype = torch.bfloat16 if cuda else None
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    from asymoe.training.module import fused_adamw

    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=fused_adamw(None, params))  # as training builds it
    generator = torch.Generator().manual_seed(0)
    batch = synthetic_batch(p, p["hidden"], device, generator)

    def step() -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        if kind == "mixtral":
            embedding.features = batch["image_features"]
            out = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"].long(),
                labels=batch["labels"],
                use_cache=False,
            )
            loss = out.loss + (out.aux_loss * 0.01 if getattr(out, "aux_loss", None) is not None else 0)
        else:
            out = model(**batch)
            loss = out.lm_loss + (out.aux_loss if out.aux_loss is not None else 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(p["warmup"]):
        step()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = [step() for _ in range(p["steps"])]
    seconds = statistics.median(times)
    tokens = p["batch"] * (p["image_tokens"] + p["text_tokens"])
    seq = p["image_tokens"] + p["text_tokens"]
    flops_per_token = 6 * activated + 12 * p["layers"] * p["hidden"] * seq + extra_flops
    peak_memory = (
        torch.cuda.max_memory_allocated()
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    )
    dist.destroy_process_group()
    return {
        "model": kind,
        "detail": detail,
        "total_lm_params": total,
        "activated": activated,
        "evidence_attention_flops": extra_flops,
        "step_s": seconds,
        "step_min_s": min(times),
        "step_max_s": max(times),
        "tokens_per_s": tokens / seconds,
        "tflops": tokens / seconds * flops_per_token / 1e12,
        "peak_memory_bytes": peak_memory,
        "memory_kind": "CUDA max allocated" if cuda else "process peak RSS minus the RSS before the model was built",
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
    }


# ---------------------------------------------------------------------------------------------
# Driver


def resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def one_round(args) -> list[dict]:
    """Every model once, in MODELS order, each in its own process."""
    rows = [child("dense", args), child("vanilla_moe", args), child("asymoe", args)]
    rows.append(child("mixtral", args, target={"activated": rows[2]["activated"]}))  # AsyMoE's size
    return rows


def merge_rounds(runs: list[dict]) -> dict:
    """One model's rounds: the median round (by step time) stands for it; the range spans all rounds.

    Rounds interleave the models (dense, MoE, AsyMoE, Mixtral, dense, ...), so that a slow spell
    of a shared machine falls on all of them rather than on whichever ran then.
    """
    ordered = sorted(runs, key=lambda run: run["step_s"])
    merged = dict(ordered[(len(ordered) - 1) // 2])
    merged["step_min_s"] = min(run["step_min_s"] for run in runs)
    merged["step_max_s"] = max(run["step_max_s"] for run in runs)
    merged["round_steps_s"] = [run["step_s"] for run in runs]
    return merged


def child(kind: str, args, target: dict | None = None) -> dict:
    command = [sys.executable, __file__, "--only", kind] + (["--small"] if args.small else [])
    command += ["--threads", str(args.threads), "--experts-backend", args.experts_backend]
    if target is not None:
        command += ["--target", json.dumps(target)]
    output = subprocess.run(command, check=True, capture_output=True, text=True, timeout=3600).stdout
    return json.loads(output.strip().splitlines()[-1])


def write_report(rows: list[dict], p: dict, args, load: tuple) -> str:
    peak = args.peak_tflops if rows[0]["device"] != "cpu" else None
    dense = next(r for r in rows if r["model"] == "dense")
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    title = "CPU, --small preset" if args.small else f"GPU ({rows[0]['device']})"
    lines = [
        f"### {title}",
        "",
        f"LM d={p['hidden']}, f={p['intermediate']}, {p['layers']} layers, {p['heads']} heads ({p['kv_heads']} KV), "
        f"vocab {p['vocab']}; batch {p['batch']} × ({p['image_tokens']} image + {p['text_tokens']} text tokens); "
        f"{'fp32' if rows[0]['device'] == 'cpu' else 'bf16 params (FSDP2 MixedPrecisionPolicy), fp32 reduce'}; "
        "FSDP2 fully_shard per decoder layer + root, 1 process; AdamW (fused, as `optim.fused: null` picks); "
        f"median of {p['steps']} steps after {p['warmup']} warm-up; the median of {args.rounds} interleaved "
        "rounds (each model once per round, in its own process).",
        "",
        "| model | LM params | activated / token (non-emb.) | step (s, median) | min–max (s) | tokens/s "
        "| tokens/s vs dense | peak memory (MiB) | activated TFLOP/s | vs dense | MFU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mfu = f"{100 * r['tflops'] / peak:.1f}%" if peak else "n/a (no CPU peak)"
        lines.append(
            f"| {r['model']} ({r['detail']}) | {r['total_lm_params'] / 1e6:.1f} M | {r['activated'] / 1e6:.1f} M | "
            f"{r['step_s']:.3f} | {r['step_min_s']:.3f}–{r['step_max_s']:.3f} | {r['tokens_per_s']:.0f} | "
            f"{r['tokens_per_s'] / dense['tokens_per_s']:.2f}× | {r['peak_memory_bytes'] / 2**20:.0f} | "
            f"{r['tflops']:.3f} | "
            f"{r['tflops'] / dense['tflops']:.2f}× | {mfu} |"
        )
    evidence = [
        f"{r['model']} {r['evidence_attention_flops'] / 1e6:.2f} MFLOP/token"
        for r in rows
        if r.get("evidence_attention_flops")
    ]
    lines += [
        "",
        "- activated FLOPs per token = 6·N_act + 12·L·d·S + the evidence experts' attentions (F_evd: "
        + (", ".join(evidence) if evidence else "none here")
        + ")",
        "- step time (s) of each round: "
        + "; ".join(f"{r['model']} " + ", ".join(f"{t:.3f}" for t in r["round_steps_s"]) for r in rows),
        f"- peak memory: {rows[0]['memory_kind']}, each model in its own process",
        f"- machine: {os.cpu_count()} CPU cores (nproc), {cpu_model()}, {platform.system()} {platform.machine()}"
        + ("" if rows[0]["device"] == "cpu" else f", {rows[0]['device']}"),
        f"- load average (1/5/15 min) before: {'/'.join(f'{v:.2f}' for v in load[0])}, after: "
        f"{'/'.join(f'{v:.2f}' for v in load[1])} (other jobs shared the machine when > 0)",
        f"- torch {torch.__version__}, transformers {_version('transformers')}, {args.threads} intra-op thread(s), "
        f"Python {platform.python_version()}",
        f"- command: `{command}`",
        "",
    ]
    return "\n".join(lines)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes on CPU (a few minutes)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="device peak for MFU (H100 SXM dense bf16)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads on CPU")
    parser.add_argument("--experts-backend", default="auto", help="model.moe.experts_backend of the VLMs")
    parser.add_argument("--output", type=Path, default=None, help="write the table here (default: print only)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the models (median round)")
    parser.add_argument("--only", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--target", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    p = PRESETS["small" if args.small else "gpu"]
    if args.only:
        print(json.dumps(run_one(args.only, p, args)))
        return
    if not args.small and not torch.cuda.is_available():
        raise SystemExit("the GPU preset needs CUDA; use --small on CPU")
    load_before = os.getloadavg()
    rounds = [one_round(args) for _ in range(args.rounds)]
    rows = [merge_rounds([r[i] for r in rounds]) for i in range(len(MODELS))]
    report = write_report(rows, p, args, (load_before, os.getloadavg()))
    print(report)
    if args.output is not None:
        write_section(args.output, "small" if args.small else "gpu", report)


HEADER = """# Training throughput: dense vs vanilla MoE vs AsyMoE vs Mixtral, activated TFLOP/s

Written by `benchmarks/train_throughput.py` (its docstring says what is timed: the language models
under FSDP2 on synthetic LLaVA-shaped batches, vision encoder bypassed). One section per preset;
a run replaces its own section.

"""
NOT_MEASURED = """### GPU

not measured (no GPU in the session that wrote this file); run
`python benchmarks/train_throughput.py --output benchmarks/results/train_throughput.md` on one.
"""


def write_section(path: Path, preset: str, report: str) -> None:
    """Replace this preset's section of the results file (created with a header if missing)."""
    sections = {"gpu": NOT_MEASURED, "small": "### CPU, --small preset\n\nnot measured yet\n"}
    if path.is_file():
        text = path.read_text()
        for name in sections:
            b, e = f"<!-- {name}: begin -->", f"<!-- {name}: end -->"
            if b in text and e in text:
                sections[name] = text[text.index(b) + len(b) : text.index(e)].strip("\n") + "\n"
    sections[preset] = report
    body = "".join(
        f"<!-- {name}: begin -->\n{sections[name].rstrip()}\n<!-- {name}: end -->\n\n" for name in ("gpu", "small")
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + body)


if __name__ == "__main__":
    main()
