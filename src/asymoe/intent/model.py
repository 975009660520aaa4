"""Intent model: text encoder + anchor-based multimodal embedding + classifier (our reading of A-MESS).

Only the A-MESS abstract is public; this is our reading of its anchor-based multimodal embedding:

1. each non-text modality m (video, audio) is projected to the encoder width,
   M_m = LayerNorm(W_m x_m) + t_m, with t_m a learned modality-type embedding; (B, T_m, h)
2. K learnable anchors a_1..a_K cross-attend over the concatenated, padding-masked sequences,
   z = LayerNorm(a + CrossAttn(a, [M_video; M_audio])), z = LayerNorm(z + MLP(z)); (B, K, h)
3. the text input is `[CLS] [slot]*K text [SEP]`; the input embedding of slot k becomes
   e(slot) + g · z_k with a learnable scalar gain g (small at initialisation, so training starts
   from the text encoder's own behaviour);
4. the encoder's pooled output (BERT: tanh(W h_CLS)) is the fused sample embedding; a linear
   classifier on it gives the intent logits.

With anchors off there are no slots and no anchor parameters: the model is exactly the text
encoder's sequence classifier (the same computation as transformers' BertForSequenceClassification).
"""

from __future__ import annotations

import torch
from torch import nn

from asymoe.errors import ConfigError
from asymoe.intent.config import AnchorConfig, IntentConfig, TextEncoderConfig

MODALITIES = ("video", "audio")


def build_text_encoder(cfg: TextEncoderConfig, vocab_size: int, pad_id: int) -> nn.Module:
    """A local Hugging Face encoder (embeddings resized to the tokenizer) or a scratch BERT."""
    if cfg.pretrained_path is not None:
        from transformers import AutoModel

        try:
            encoder = AutoModel.from_pretrained(cfg.pretrained_path, local_files_only=True)
        except (OSError, ValueError) as error:
            raise ConfigError(
                f"intent.text_encoder.pretrained_path: cannot load an encoder from {cfg.pretrained_path} ({error})"
            ) from None
        if encoder.get_input_embeddings().num_embeddings < vocab_size:
            encoder.resize_token_embeddings(vocab_size)
        return encoder
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        initializer_range=cfg.initializer_range,
        pad_token_id=pad_id,
    )
    return BertModel(config)


class AnchorEmbedding(nn.Module):
    """K learnable anchors summarising the video / audio sequences (steps 1-2 of the module docstring)."""

    def __init__(self, cfg: AnchorConfig, hidden_size: int, modality_dims: dict[str, int]):
        super().__init__()
        if hidden_size % cfg.heads:
            raise ConfigError(f"intent.anchors.heads={cfg.heads} must divide the text encoder width {hidden_size}")
        self.modalities = tuple(modality_dims)
        self.anchors = nn.Parameter(torch.randn(cfg.num_anchors, hidden_size) * 0.02)
        self.projections = nn.ModuleDict(
            {
                name: nn.Sequential(nn.Linear(dim, hidden_size), nn.LayerNorm(hidden_size))
                for name, dim in modality_dims.items()
            }
        )
        self.modality_type = nn.Parameter(torch.zeros(len(self.modalities), hidden_size))
        self.attention = nn.MultiheadAttention(hidden_size, cfg.heads, batch_first=True)
        self.attention_norm = nn.LayerNorm(hidden_size)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, 2 * hidden_size), nn.GELU(), nn.Linear(2 * hidden_size, hidden_size)
        )
        self.mlp_norm = nn.LayerNorm(hidden_size)
        self.gain = nn.Parameter(torch.tensor(float(cfg.init_gain)))

    def forward(self, features: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> torch.Tensor:
        """features[m]: (B, T_m, D_m), masks[m]: (B, T_m) True at real frames -> gain-scaled (B, K, h)."""
        memory = torch.cat(
            [self.projections[m](features[m]) + self.modality_type[i] for i, m in enumerate(self.modalities)], dim=1
        )  # (B, sum T_m, h)
        valid = torch.cat([masks[m] for m in self.modalities], dim=1)  # (B, sum T_m)
        query = self.anchors.expand(memory.shape[0], -1, -1)  # (B, K, h)
        attended, _ = self.attention(query, memory, memory, key_padding_mask=~valid, need_weights=False)
        summary = self.attention_norm(query + attended)
        summary = self.mlp_norm(summary + self.mlp(summary))
        return self.gain * summary


class IntentModel(nn.Module):
    """Text encoder, optional anchor embedding over the enabled modalities, linear classifier."""

    def __init__(self, cfg: IntentConfig, vocab_size: int, pad_id: int, num_labels: int, modality_dims: dict[str, int]):
        super().__init__()
        self.encoder = build_text_encoder(cfg.text_encoder, vocab_size, pad_id)
        hidden = self.encoder.config.hidden_size
        self.anchor_embedding = AnchorEmbedding(cfg.anchors, hidden, modality_dims) if cfg.anchors.enabled else None
        self.num_slots = cfg.anchors.num_anchors if cfg.anchors.enabled else 0
        self.dropout = nn.Dropout(cfg.classifier_dropout)
        self.classifier = nn.Linear(hidden, num_labels)

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.anchor_embedding.modalities if self.anchor_embedding is not None else ()

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, slots: torch.Tensor | None = None):
        """(B, L) token ids -> (B, h) pooled embedding; `slots` (B, K, h) are added at positions 1..K."""
        embeddings = self.encoder.get_input_embeddings()(input_ids)  # (B, L, h)
        if slots is not None:
            start = torch.zeros_like(embeddings)
            start[:, 1 : 1 + slots.shape[1]] = slots
            embeddings = embeddings + start
        out = self.encoder(
            inputs_embeds=embeddings, attention_mask=attention_mask, token_type_ids=torch.zeros_like(input_ids)
        )
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (logits (B, num_labels), fused sample embedding (B, h))."""
        slots = None
        if self.anchor_embedding is not None:
            slots = self.anchor_embedding(
                {m: batch[m] for m in self.modalities}, {m: batch[f"{m}_mask"] for m in self.modalities}
            )
        pooled = self.encode(batch["input_ids"], batch["attention_mask"], slots)
        return self.classifier(self.dropout(pooled)), pooled

    def parameter_table(self) -> dict[str, int]:
        """Parameter counts: total and per component (every parameter is used by every sample)."""

        def count(module: nn.Module | None) -> int:
            return sum(p.numel() for p in module.parameters()) if module is not None else 0

        table = {"total": count(self), "text_encoder": count(self.encoder), "classifier": count(self.classifier)}
        table["anchors"] = count(self.anchor_embedding)
        for name in MODALITIES:
            projection = self.anchor_embedding.projections[name] if name in self.modalities else None
            table[f"{name}_projection"] = count(projection)
        return table
