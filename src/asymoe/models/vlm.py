"""VisionLanguageModel: timm encoder -> projector -> spliced into a causal LM with MoE layers.

The prompt holds one placeholder token per visual token (the data pipeline expands `<image>`);
their embeddings are replaced by the projected image features. The model owns the MoEState and
sets the token metadata (vision / evidence / answer / attention masks) before every LM forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from asymoe.config import ModelConfig
from asymoe.layout import MODALITIES, eligible_groups
from asymoe.models.language import build_language_model, install_moe
from asymoe.models.moe import MoEBlock, MoEState, TokenMeta
from asymoe.models.projector import build_projector
from asymoe.models.vision import VisionEncoder


@dataclass
class VLMOutput:
    logits: torch.Tensor  # (batch, seq, vocab)
    lm_loss: torch.Tensor | None
    aux_loss: torch.Tensor | None


class VisionLanguageModel(nn.Module):
    def __init__(self, config: ModelConfig, vocab_size: int, image_token_id: int):
        super().__init__()
        self.config = config
        self.image_token_id = image_token_id
        self.vision = VisionEncoder(config.vision)
        self.lm = build_language_model(config.language, vocab_size)
        hidden_size = self.lm.config.hidden_size
        self.projector = build_projector(config.projector.kind, self.vision.out_dim, hidden_size)
        self.moe_state = MoEState()
        self.moe_layer_indices = install_moe(self.lm, config.moe, self.moe_state) if config.moe.enabled else []

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_tokens

    def moe_blocks(self) -> list[MoEBlock]:
        return [m for m in self.modules() if isinstance(m, MoEBlock)]

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projector(self.vision(pixel_values))  # (images, image_tokens, d)

    def _absent_images_term(self, device: torch.device) -> torch.Tensor:
        """A zero that depends on every encoder and projector parameter, for batches without images.

        Under DDP/FSDP each rank must run the same modules: FSDP all-gathers a module's shards in
        its forward, DDP expects a gradient for every parameter. A text-only batch therefore still
        runs the encoder and projector, on a zero-size batch: no cost, no BatchNorm statistics
        update (an empty batch leaves running mean/var unchanged), and exact-zero gradients.
        """
        size = self.vision.image_size
        empty = torch.zeros(0, 3, size, size, device=device)
        return 0.0 * self.encode_images(empty).sum()

    def embed(
        self, input_ids: torch.Tensor, image_features: torch.Tensor | None, image_index: torch.Tensor
    ) -> torch.Tensor:
        """Token embeddings with each sample's image features at its placeholder positions."""
        embeds = self.lm.get_input_embeddings()(input_ids)  # (batch, seq, d)
        vision_mask = input_ids == self.image_token_id
        if image_features is None:
            assert not vision_mask.any(), "image placeholders present but no images given"
            return embeds
        per_sample = image_features[image_index.clamp(min=0)]  # (batch, image_tokens, d)
        rank = (vision_mask.long().cumsum(dim=1) - 1).clamp(min=0, max=per_sample.shape[1] - 1)  # (batch, seq)
        spliced = torch.gather(per_sample, 1, rank.unsqueeze(-1).expand(-1, -1, per_sample.shape[-1]))
        return torch.where(vision_mask.unsqueeze(-1), spliced.to(embeds.dtype), embeds)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        evidence_mask: torch.Tensor,
        answer_mask: torch.Tensor,
        image_index: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> VLMOutput:
        if image_features is None and pixel_values is not None:
            image_features = self.encode_images(pixel_values)
        absent_images_term = None
        if image_features is None and self.training and torch.is_grad_enabled():
            absent_images_term = self._absent_images_term(input_ids.device)
        vision_mask = input_ids == self.image_token_id
        placeholders = vision_mask.sum(dim=1)
        expected = torch.where(image_index >= 0, self.num_image_tokens, 0)
        if not torch.equal(placeholders, expected):
            raise ValueError(
                f"each sample with an image needs exactly {self.num_image_tokens} image placeholder tokens; "
                f"got {placeholders.tolist()}"
            )
        embeds = self.embed(input_ids, image_features, image_index)
        if absent_images_term is not None:
            embeds = embeds + absent_images_term.to(embeds.dtype)
        self.moe_state.set(TokenMeta(vision_mask, attention_mask, evidence_mask, answer_mask))
        logits = self.lm(inputs_embeds=embeds, attention_mask=attention_mask.long(), use_cache=False).logits
        lm_loss = None
        if labels is not None:
            lm_loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return VLMOutput(logits=logits, lm_loss=lm_loss, aux_loss=self.moe_state.total_aux_loss())

    def answer_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits a decoder may pick from: the image placeholder is input-only."""
        logits = logits.clone()
        logits[..., self.image_token_id] = float("-inf")
        return logits

    @torch.no_grad()
    def teacher_forced_exact_match(
        self, logits: torch.Tensor, labels: torch.Tensor, prompt_lengths: torch.Tensor, max_new_tokens: int
    ) -> torch.Tensor:
        """(batch,) bool: greedy decoding of `max_new_tokens` would reproduce the last answer exactly.

        logits (batch, seq, vocab) from a teacher-forced forward of prompt + reference answer;
        labels mark the reference answer (and its EOS). Position p predicts token p + 1.
        """
        predicted = self.answer_logits(logits[:, :-1]).argmax(dim=-1)  # (batch, seq - 1)
        target = labels[:, 1:]
        positions = torch.arange(target.shape[1], device=target.device).unsqueeze(0)
        start = (prompt_lengths - 1).unsqueeze(1)
        window = (positions >= start) & (positions < start + max_new_tokens)
        answer = (positions >= start) & (target != -100)  # the last answer and its EOS
        agrees = ((predicted == target) | ~(window & answer)).all(dim=1)
        # An answer longer than the decoding budget cannot be reproduced (EOS may be cut).
        fits = (answer.sum(dim=1) - 1) <= max_new_tokens
        return agrees & fits

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        prompt_lengths: torch.Tensor,
        evidence_mask: torch.Tensor,
        image_index: torch.Tensor,
        pixel_values: torch.Tensor | None,
        max_new_tokens: int,
        eos_token_id: int,
        pad_token_id: int,
    ) -> torch.Tensor:
        """Greedy decoding of right-padded prompts, one sequence per question.

        Causal attention makes a position's logits independent of what follows it, so each sample
        extends in place after its own prompt. evidence_mask marks evidence among the prompt
        positions; a position at or after a sample's prompt length (what it generates) is never
        evidence. Returns (batch, max_new_tokens), pad after EOS.
        """
        batch = input_ids.shape[0]
        image_features = self.encode_images(pixel_values) if pixel_values is not None else None
        width = int(prompt_lengths.max()) + max_new_tokens
        ids = torch.full((batch, width), pad_token_id, dtype=torch.long, device=input_ids.device)
        ids[:, : input_ids.shape[1]] = input_ids[:, :width]
        evidence = torch.zeros_like(ids, dtype=torch.bool)
        evidence[:, : evidence_mask.shape[1]] = evidence_mask[:, :width].bool()
        positions = torch.arange(width, device=ids.device)
        # Only prompt positions can be evidence: what the model generates never is.
        evidence &= positions.unsqueeze(0) < prompt_lengths.unsqueeze(1)
        generated = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=ids.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=ids.device)
        rows = torch.arange(batch, device=ids.device)
        for step in range(max_new_tokens):
            length = prompt_lengths + step
            span = int(length.max())
            attention = positions[:span].unsqueeze(0) < length.unsqueeze(1)
            answer = attention & (positions[:span].unsqueeze(0) >= prompt_lengths.unsqueeze(1))
            out = self(
                input_ids=ids[:, :span],
                attention_mask=attention,
                evidence_mask=evidence[:, :span] & attention,
                answer_mask=answer,
                image_index=image_index,
                image_features=image_features,
            )
            next_token = self.answer_logits(out.logits[rows, length - 1]).argmax(dim=-1)  # (batch,)
            next_token = torch.where(finished, torch.full_like(next_token, pad_token_id), next_token)
            generated[:, step] = next_token
            ids[rows, length.clamp(max=width - 1)] = next_token
            finished |= next_token == eos_token_id
            if finished.all():
                break
        return generated

    # -----------------------------------------------------------------------------------------
    # Parameter accounting

    def parameter_table(self) -> dict[str, int]:
        """Total parameters and parameters activated per vision / language token.

        Activated = every non-expert parameter (vision encoder and projector counted for vision
        tokens only) + in each MoE layer the top-k largest experts eligible for the modality + the
        parameters an eligible group runs for every token whatever the routing (the evidence
        cross-attention and routing-bias weight). LTDR tail tokens use more experts; their
        measured count is logged during training.
        """
        vision = _count(self.vision)
        projector = _count(self.projector)
        lm_total = _count(self.lm)
        blocks = self.moe_blocks()
        expert_params = sum(_count(group) for block in blocks for group in block.groups.values())
        activated = {
            modality: sum(_activated_in_block(block, self.config.moe.routing, modality) for block in blocks)
            for modality in MODALITIES
        }
        lm_shared = lm_total - expert_params
        return {
            "total": vision + projector + lm_total,
            "vision_encoder": vision,
            "projector": projector,
            "language_model": lm_total,
            "experts": expert_params,
            "activated_per_vision_token": vision + projector + lm_shared + activated["vision"],
            "activated_per_language_token": lm_shared + activated["language"],
        }


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _activated_in_block(block: MoEBlock, routing, modality: str) -> int:
    """Expert-group parameters one token of `modality` activates in `block` (top-k largest experts)."""
    names = [g for g in eligible_groups(routing.mode, modality) if g in block.groups]
    sizes = sorted(
        (block.groups[g].expert_parameter_count() for g in names for _ in range(block.groups[g].num_experts)),
        reverse=True,
    )
    always_active = sum(block.groups[g].always_active_parameter_count() for g in names)
    return sum(sizes[: routing.top_k]) + always_active


def group_parameters(model: VisionLanguageModel) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Parameters by optimiser group: vision, projector, router, lm."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"vision": [], "projector": [], "router": [], "lm": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("vision."):
            groups["vision"].append((name, param))
        elif name.startswith("projector."):
            groups["projector"].append((name, param))
        elif ".routers." in name:
            groups["router"].append((name, param))
        else:
            groups["lm"].append((name, param))
    return groups


__all__ = ["VisionLanguageModel", "VLMOutput", "group_parameters"]
