"""`asymoe predict RUN_DIR --image PATH --question TEXT` (or `--jsonl FILE`): answers and where they were routed.

The prompt is the training framing (`encode_record`) up to the answer; the image goes through the
encoder's own preprocessing. Decoding is greedy with the language model's KV cache: the prompt
runs once, then each step feeds one token. Evidence-priority experts attend over the layer's hidden
states at the evidence positions, which a KV cache does not hold, so a model with such experts (any
group with a `prepare` hook) decodes without the cache, re-running the sequence each step; both
give the same tokens. The routing summary comes from one forward over prompt + answer: per MoE
layer and router, the share of routing assignments each expert received.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from asymoe.data.datamodule import ImageStore
from asymoe.data.records import DataError, Record, encode_record
from asymoe.data.tokenizer import IMAGE_TOKEN
from asymoe.export import LoadedRun
from asymoe.models.experts import ExpertGroup
from asymoe.models.moe import TokenMeta
from asymoe.models.vlm import VisionLanguageModel


@dataclass
class Prompt:
    ids: torch.Tensor  # (1, prompt) long
    evidence: torch.Tensor  # (1, prompt) bool
    pixels: torch.Tensor | None  # (1, 3, H, W)


@dataclass
class Prediction:
    answer: str
    tokens: list[int]
    cached: bool
    routing: dict[int, dict[str, dict[str, float]]]  # layer -> router -> expert name -> share


def build_prompt(run: LoadedRun, question: str, image: str | Path | None) -> Prompt:
    """The prompt `encode_record` writes before an answer; the image (if any) preprocessed for the encoder."""
    user = f"{IMAGE_TOKEN}\n{question}" if image is not None else question
    # encode_record frames a whole exchange; the answer placeholder is cut off at prompt_length.
    record = Record(
        turns=[("user", user), ("assistant", "?")], image_key=None if image is None else "image", origin="predict"
    )
    encoded = encode_record(record, run.tokenizer, run.model.num_image_tokens)
    length = encoded.prompt_length
    pixels = None
    if image is not None:
        if not Path(image).is_file():
            raise DataError(f"--image: file not found: {image}")
        pixels = ImageStore({"image": str(image)}, run.model.vision.preprocessing)("image").unsqueeze(0)
    return Prompt(
        ids=torch.tensor([encoded.input_ids[:length]]),
        evidence=torch.tensor([encoded.evidence[:length]]),
        pixels=pixels,
    )


def cache_is_exact(model: VisionLanguageModel) -> bool:
    """True when no expert group looks at other positions (no `prepare` hook), so a KV cache is exact."""
    return all(
        type(group).prepare is ExpertGroup.prepare for block in model.moe_blocks() for group in block.groups.values()
    )


def _meta(ids: torch.Tensor, image_id: int, evidence: torch.Tensor, answer: torch.Tensor) -> TokenMeta:
    return TokenMeta(
        vision_mask=ids == image_id, attention_mask=torch.ones_like(answer), evidence_mask=evidence, answer_mask=answer
    )


@torch.no_grad()
def cached_greedy(model: VisionLanguageModel, prompt: Prompt, max_new_tokens: int, eos_id: int) -> list[int]:
    """Greedy decoding with the LM's KV cache: one prompt forward, then one token per step."""
    image_features = model.encode_images(prompt.pixels) if prompt.pixels is not None else None
    image_index = torch.tensor([0 if prompt.pixels is not None else -1])
    embeds = model.embed(prompt.ids, image_features, image_index)  # (1, prompt, d)
    model.moe_state.set(_meta(prompt.ids, model.image_token_id, prompt.evidence, torch.zeros_like(prompt.evidence)))
    out = model.lm(inputs_embeds=embeds, use_cache=True)
    tokens: list[int] = []
    for _ in range(max_new_tokens):
        token = model.answer_logits(out.logits[:, -1]).argmax(dim=-1)  # (1,)
        tokens.append(int(token))
        if tokens[-1] == eos_id:
            break
        step = token.view(1, 1)
        model.moe_state.set(
            _meta(
                step,
                model.image_token_id,
                torch.zeros_like(step, dtype=torch.bool),
                torch.ones_like(step, dtype=torch.bool),
            )
        )
        out = model.lm(inputs_embeds=model.lm.get_input_embeddings()(step), cache=out.cache, use_cache=True)
    return tokens


@torch.no_grad()
def uncached_greedy(model: VisionLanguageModel, prompt: Prompt, max_new_tokens: int, eos_id: int, pad_id: int):
    generated = model.generate(
        input_ids=prompt.ids,
        prompt_lengths=torch.tensor([prompt.ids.shape[1]]),
        evidence_mask=prompt.evidence,
        image_index=torch.tensor([0 if prompt.pixels is not None else -1]),
        pixel_values=prompt.pixels,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )[0].tolist()
    return generated[: generated.index(eos_id) + 1] if eos_id in generated else generated


def expert_names(block) -> dict[int, str]:
    """Global expert id -> `group index` (e.g. `shared1`)."""
    return {
        block.offsets[name] + i: f"{name}{i}" for name, group in block.groups.items() for i in range(group.num_experts)
    }


@torch.no_grad()
def routing_summary(model: VisionLanguageModel, prompt: Prompt, tokens: list[int]) -> dict:
    """Per MoE layer and router: each expert's share of the routing assignments over prompt + answer."""
    if not model.moe_blocks():
        return {}
    ids = torch.cat([prompt.ids, torch.tensor([tokens])], dim=1)
    answer = torch.zeros_like(ids, dtype=torch.bool)
    answer[:, prompt.ids.shape[1] :] = True
    evidence = torch.cat([prompt.evidence, torch.zeros(1, len(tokens), dtype=torch.bool)], dim=1)
    image_index = torch.tensor([0 if prompt.pixels is not None else -1])
    model(ids, torch.ones_like(answer), evidence, answer, image_index, pixel_values=prompt.pixels)
    summary = {}
    for block in model.moe_blocks():
        names = expert_names(block)
        record = model.moe_state.records[block.layer_index]
        summary[block.layer_index] = {
            router: {names[int(g)]: round(float(s), 4) for g, s in zip(getattr(block, f"eligible_{router}"), share)}
            for router, share in record.expert_share.items()
        }
    return summary


def predict(run: LoadedRun, question: str, image: str | Path | None, max_new_tokens: int = 32) -> Prediction:
    model, tokenizer = run.model.eval(), run.tokenizer
    prompt = build_prompt(run, question, image)
    cached = cache_is_exact(model)
    if cached:
        tokens = cached_greedy(model, prompt, max_new_tokens, tokenizer.eos_id)
    else:
        tokens = uncached_greedy(model, prompt, max_new_tokens, tokenizer.eos_id, tokenizer.pad_id)
    return Prediction(tokenizer.decode(tokens), tokens, cached, routing_summary(model, prompt, tokens))


def format_routing(routing: dict) -> list[str]:
    lines = []
    for layer, routers in routing.items():
        parts = [
            f"{router}: " + " ".join(f"{name} {100 * share:.0f}%" for name, share in shares.items())
            for router, shares in routers.items()
        ]
        lines.append(f"layer {layer}  " + " | ".join(parts))
    return lines


def _first(item: dict, keys: tuple[str, ...]):
    return next((item[key] for key in keys if key in item), None)


def predict_jsonl(run: LoadedRun, path: Path, max_new_tokens: int, image_root: Path | None = None):
    """Yield one result dict per line of `path`.

    A line holds the question (`question`, or `text` as in LLaVA/POPE question files), optionally
    `image` (relative to `image_root`, default the file's folder) and an id (`question_id`,
    `questionId` or `id`; default the line number). Results carry `question_id` and `answer`,
    which `asymoe evaluate` reads as predictions.
    """
    root = image_root if image_root is not None else path.parent
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            question = _first(item, ("question", "text")) if isinstance(item, dict) else None
        except json.JSONDecodeError:
            question = None
        if not isinstance(question, str):
            raise DataError(f"{path}:{number}: expected a JSON object with a 'question' (or 'text'), optional 'image'")
        image = item.get("image")
        prediction = predict(run, question, None if image is None else root / image, max_new_tokens)
        qid = _first(item, ("question_id", "questionId", "id"))
        yield {
            "question_id": number if qid is None else qid,
            "question": question,
            "answer": prediction.answer,
            "routing": prediction.routing,
        }
