"""`asymoe export RUN_DIR OUT`: a trained run as files other tools read.

OUT always receives
- `asymoe/`: config.yaml, model.safetensors (the whole VisionLanguageModel state) and the tokenizer,
  which `load_run` reads back;
- `vision_encoder.safetensors`, `projector.safetensors` and `vision.json` (timm model name and
  kwargs, preprocessing, feature layer, prefix tokens): the image side, which no transformers LM class holds.
and, when the language model maps exactly onto a transformers model, a transformers-loadable
directory at OUT itself (config.json, model.safetensors, tokenizer files; AutoModelForCausalLM /
AutoTokenizer):
- a dense run (model.moe.enabled=false): the LM as its own family;
- an MoE run that is a Mixtral: a Llama/Mistral LM, MoE at every layer, routing.mode=shared, plain
  FFN experts of one width, no LTDR tail rule. Its experts are concatenated in global order
  (vision, shared, language) and the `all` router becomes Mixtral's gate.
Any other MoE run (per-modality routers, hyperbolic or evidence experts, partial MoE layers) has no
transformers counterpart: the LM part is refused with a one-line error after the files above are written.
The exported LM is reloaded and its logits compared with the run's before the command succeeds.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM, PreTrainedModel

from asymoe import config as config_lib
from asymoe.config import Config
from asymoe.data.tokenizer import HFTokenizer, Tokenizer, WordTokenizer
from asymoe.errors import ConfigError
from asymoe.files import METRICS_FILE
from asymoe.models.experts import FFNExperts
from asymoe.models.language import decoder_layers
from asymoe.models.moe import TokenMeta
from asymoe.models.vlm import VisionLanguageModel

STATE_DIR = "asymoe"
MIXTRAL_SOURCES = ("llama", "mistral")


@dataclass
class LoadedRun:
    config: Config
    model: VisionLanguageModel
    tokenizer: Tokenizer
    checkpoint: Path | None


def run_checkpoint(run_dir: Path) -> Path:
    """The run's best checkpoint (metrics.json) or else checkpoints/last.ckpt."""
    metrics = run_dir / METRICS_FILE
    if metrics.is_file():
        best = json.loads(metrics.read_text()).get("best_checkpoint")
        if best and Path(best).exists():
            return Path(best)
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.exists():
        raise ConfigError(f"{run_dir}: no checkpoint (looked for {METRICS_FILE}'s best_checkpoint and {last})")
    return last


def load_tokenizer(directory: Path) -> Tokenizer:
    if (directory / WordTokenizer.FILENAME).is_file():
        return WordTokenizer.load(directory)
    if (directory / "tokenizer").is_dir():
        return HFTokenizer(directory / "tokenizer")
    raise ConfigError(f"{directory}: no tokenizer ({WordTokenizer.FILENAME} or tokenizer/)")


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None) -> LoadedRun:
    """A trained run (`asymoe fit` output) or an export's `asymoe/` folder, in eval mode on CPU."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    cfg = config_lib.load(run_dir / "config.yaml")
    tokenizer = load_tokenizer(run_dir)
    model = VisionLanguageModel(cfg.model, tokenizer.vocab_size, tokenizer.image_id)
    if (run_dir / "model.safetensors").is_file() and checkpoint is None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(run_dir / "model.safetensors")))
        return LoadedRun(cfg, model.eval(), tokenizer, None)
    from asymoe.training.checkpoints import load_full_checkpoint

    path = Path(checkpoint) if checkpoint is not None else run_checkpoint(run_dir)
    state = load_full_checkpoint(path)["state_dict"]
    model_state = {key.removeprefix("model."): value for key, value in state.items() if key.startswith("model.")}
    try:
        model.load_state_dict(model_state)
    except RuntimeError as error:
        raise ConfigError(f"{path} does not match the model of {run_dir / 'config.yaml'} ({error})") from None
    return LoadedRun(cfg, model.eval(), tokenizer, path)


def hf_tokenizer(tokenizer: Tokenizer):
    return tokenizer.to_hf() if isinstance(tokenizer, WordTokenizer) else tokenizer.tokenizer


def save_asymoe_state(run: LoadedRun, out: Path) -> None:
    state_dir = out / STATE_DIR
    state_dir.mkdir(parents=True, exist_ok=True)
    config_lib.save(run.config, state_dir / "config.yaml")
    run.tokenizer.save(state_dir)
    model = run.model
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(state_dir / "model.safetensors"))
    for name, module in (("vision_encoder", model.vision), ("projector", model.projector)):
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(out / f"{name}.safetensors"))
    vision = run.config.model.vision
    description = {
        "timm_model": vision.model_name,
        "model_kwargs": dict(vision.model_kwargs),
        "preprocessing": asdict(model.vision.preprocessing),
        "select_layer": vision.select_layer,
        "keep_prefix_tokens": vision.keep_prefix_tokens,
        "num_image_tokens": model.num_image_tokens,
        "projector": run.config.model.projector.kind,
        "image_token_id": model.image_token_id,
    }
    (out / "vision.json").write_text(json.dumps(description, indent=2))


def mixtral_refusal(run: LoadedRun) -> str | None:
    """Why this MoE run is not a Mixtral (None: it is one)."""
    moe, lm = run.config.model.moe, run.model.lm
    blocks = run.model.moe_blocks()
    if lm.config.model_type not in MIXTRAL_SOURCES or getattr(lm.config, "attention_bias", False):
        return f"its '{lm.config.model_type}' LM is not a Llama/Mistral without attention biases"
    if len(blocks) != len(decoder_layers(lm)):
        return f"MoE sits at {len(blocks)} of {len(decoder_layers(lm))} layers (Mixtral: every layer)"
    if moe.routing.mode != "shared":
        return "routing.mode='modality' has one router per modality (Mixtral: one router over every expert)"
    if moe.routing.vision_tail.enabled:
        return "the LTDR tail rule routes some tokens to top-a experts (Mixtral: always top-k)"
    groups = [group for block in blocks for group in block.groups.values()]
    if any(type(group) is not FFNExperts for group in groups):
        return "it has hyperbolic or evidence-priority experts (Mixtral: plain gated FFN experts)"
    if len({group.intermediate_size for group in groups}) != 1:
        return "its expert groups have different widths (Mixtral: one width)"
    return None


def to_mixtral(run: LoadedRun) -> MixtralForCausalLM:
    lm, moe = run.model.lm, run.config.model.moe
    blocks = run.model.moe_blocks()
    keys = set(MixtralConfig().to_dict()) - {"model_type", "architectures", "transformers_version"}
    settings = {k: v for k, v in lm.config.to_dict().items() if k in keys}
    settings.update(
        intermediate_size=next(iter(blocks[0].groups.values())).intermediate_size,
        num_local_experts=blocks[0].num_experts,
        num_experts_per_tok=moe.routing.top_k,
        router_jitter_noise=0.0,
    )
    mixtral = MixtralForCausalLM(MixtralConfig(**settings))
    state = {k: v for k, v in lm.state_dict().items() if ".mlp." not in k}
    for index, block in enumerate(blocks):
        assert block.layer_index == index
        prefix = f"model.layers.{index}.mlp"
        groups = list(block.groups.values())  # ModuleDict order: vision, shared, language = global order
        state[f"{prefix}.experts.gate_up_proj"] = torch.cat([g.gate_up_proj for g in groups])
        state[f"{prefix}.experts.down_proj"] = torch.cat([g.down_proj for g in groups])
        state[f"{prefix}.gate.weight"] = block.routers["all"].weight
    mixtral.load_state_dict(state, strict=True)
    return mixtral


def lm_logits(run: LoadedRun, ids: torch.Tensor) -> torch.Tensor:
    """The run's LM on text tokens only (no image), as the exported LM sees them."""
    mask = torch.ones_like(ids, dtype=torch.bool)
    run.model.moe_state.set(TokenMeta(torch.zeros_like(mask), mask, mask, torch.zeros_like(mask)))
    return run.model.lm(input_ids=ids, use_cache=False).logits


@torch.no_grad()
def verify_export(run: LoadedRun, out: Path) -> float:
    """Max |logit difference| between the exported LM (reloaded by transformers) and the run's."""
    exported = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, run.tokenizer.vocab_size, (2, 12), generator=generator)
    difference = (exported(ids).logits - lm_logits(run, ids)).abs().max().item()
    if difference > 1e-4:
        raise RuntimeError(f"exported LM differs from the run's by {difference:.2e} in the logits")
    return difference


def export(run_dir: str | Path, out: str | Path, checkpoint: str | Path | None = None) -> dict:
    """Write the export (see module docstring); returns what was written and the verified logit difference."""
    run = load_run(run_dir, checkpoint)
    out = Path(out)
    save_asymoe_state(run, out)
    if run.config.model.moe.enabled:
        reason = mixtral_refusal(run)
        if reason is not None:
            raise ConfigError(
                f"export: wrote the asymoe state and encoder/projector weights to {out}, but not a transformers LM: "
                f"this MoE run is not a Mixtral ({reason})"
            )
        lm: PreTrainedModel = to_mixtral(run)
    else:
        lm = run.model.lm
    tokenizer = run.tokenizer
    lm.config.pad_token_id, lm.config.bos_token_id, lm.config.eos_token_id = (
        tokenizer.pad_id,
        tokenizer.bos_id,
        tokenizer.eos_id,
    )
    lm.save_pretrained(out, safe_serialization=True)
    hf_tokenizer(run.tokenizer).save_pretrained(out)
    difference = verify_export(run, out)
    return {"out": str(out), "family": lm.config.model_type, "max_logit_difference": difference}
