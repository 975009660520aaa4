"""Config schema and validation of the intent task (`task: intent`, the `intent:` section).

The schema is plain dataclasses merged by the framework's config loader (which enforces each
``Literal`` choice); `validate_intent` holds the cross-field rules and is called from the
framework's validation when `task == intent`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from asymoe.errors import ConfigError

# mintrec: `season episode clip text label`, key S05_E16_329;
# mintrec2: `Dialogue_id Utterance_id Text Label ...`, key dia{d}_utt{u}, out-of-scope label UNK.
DataFormat = Literal["mintrec", "mintrec2"]
Distance = Literal["cosine", "euclidean"]
# Which other label's description is the triplet negative: random | hardest (closest to the sample).
NegativeMining = Literal["random", "hardest"]
# triplet: max(0, d(a, p) - d(a, n) + margin); infonce: cross-entropy over all descriptions.
AlignLoss = Literal["triplet", "infonce"]


@dataclass
class TextEncoderConfig:
    """A Hugging Face encoder from a local directory, or a small BERT built from these sizes."""

    pretrained_path: str | None = None
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    max_position_embeddings: int = 64
    dropout: float = 0.1
    initializer_range: float = 0.02


@dataclass
class AnchorConfig:
    """Anchor-based multimodal embedding (our reading of A-MESS): K anchors over video + audio."""

    enabled: bool = True
    num_anchors: int = 4
    heads: int = 4
    # Initial value of the learnable gain g in slot_i = e(slot token) + g * anchor_i.
    init_gain: float = 0.1


@dataclass
class SemanticSyncConfig:
    """Semantic synchronisation: align the fused sample embedding with its label's description."""

    enabled: bool = True
    # lambda in L = CE + lambda * L_align.
    weight: float = 0.5
    loss: AlignLoss = "triplet"
    margin: float = 0.2
    distance: Distance = "cosine"
    negative: NegativeMining = "random"
    temperature: float = 0.1


@dataclass
class SyntheticConfig:
    """The embedded default data set (written in the MIntRec release format on first use)."""

    seed: int = 0
    # Root of the generated sets (one folder per parameter hash); None = $XDG_CACHE_HOME/asymoe/intent
    # (default ~/.cache/asymoe/intent).
    cache_dir: str | None = None
    train_per_label: int = 60
    dev_per_label: int = 15
    test_per_label: int = 20
    video_dim: int = 16
    audio_dim: int = 24
    # Sequence lengths are drawn uniformly from [max_len // 3, max_len].
    video_max_len: int = 32
    audio_max_len: int = 64


@dataclass
class IntentDataConfig:
    format: DataFormat = "mintrec"
    # Release folder with train.tsv / dev.tsv / test.tsv; None = generate the synthetic set.
    root: str | None = None
    video_features: str = "video_data/video_feats.pkl"
    audio_features: str = "audio_data/audio_feats.pkl"
    # Label descriptions, `label<TAB>description` per line in label order; None = the shipped file.
    labels_file: str | None = None
    # Zero-padded / truncated lengths (MIntRec: text 30, video 230, audio 480; MIntRec 2.0: 50, 180, 400).
    text_max_length: int = 30
    video_max_length: int = 230
    audio_max_length: int = 480
    batch_size: int = 32
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class IntentConfig:
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    use_video: bool = True
    use_audio: bool = True
    semantic_sync: SemanticSyncConfig = field(default_factory=SemanticSyncConfig)
    data: IntentDataConfig = field(default_factory=IntentDataConfig)
    classifier_dropout: float = 0.1
    # MIntRec 2.0: a test utterance whose highest softmax probability is below this is out-of-scope.
    ood_threshold: float = 0.5


def validate_intent(intent: IntentConfig, where: str) -> None:
    """Cross-field rules of the `intent:` section; raises ConfigError naming the key."""

    def positive(value, key: str) -> None:
        if not value > 0:
            raise ConfigError(f"{where}: intent.{key} must be > 0, got {value}")

    data, encoder, anchors, sync = intent.data, intent.text_encoder, intent.anchors, intent.semantic_sync
    for key in ("text_max_length", "video_max_length", "audio_max_length", "batch_size"):
        positive(getattr(data, key), f"data.{key}")
    for key in ("train_per_label", "dev_per_label", "test_per_label", "video_dim", "audio_dim"):
        positive(getattr(data.synthetic, key), f"data.synthetic.{key}")
    for key in ("video_max_len", "audio_max_len"):
        if getattr(data.synthetic, key) < 3:
            raise ConfigError(f"{where}: intent.data.synthetic.{key} must be >= 3, got {getattr(data.synthetic, key)}")
    if data.text_max_length < 3:
        raise ConfigError(f"{where}: intent.data.text_max_length must be >= 3 (CLS, one token, SEP)")
    for key in ("root", "labels_file", "text_encoder"):
        value = encoder.pretrained_path if key == "text_encoder" else getattr(data, key)
        name = "text_encoder.pretrained_path" if key == "text_encoder" else f"data.{key}"
        if value is not None and not Path(value).expanduser().exists():
            raise ConfigError(f"{where}: intent.{name}: path does not exist: {value}")
    positive(sync.temperature, "semantic_sync.temperature")
    if sync.weight < 0 or sync.margin < 0:
        raise ConfigError(f"{where}: intent.semantic_sync.weight and margin must be >= 0")
    if not 0.0 <= intent.ood_threshold <= 1.0:
        raise ConfigError(f"{where}: intent.ood_threshold must be in [0, 1], got {intent.ood_threshold}")
    if anchors.enabled:
        positive(anchors.num_anchors, "anchors.num_anchors")
        if not (intent.use_video or intent.use_audio):
            raise ConfigError(
                f"{where}: intent.anchors.enabled needs a non-text modality (intent.use_video or intent.use_audio); "
                "set intent.anchors.enabled=false for the text-only model"
            )
    if encoder.pretrained_path is None:
        _validate_scratch_encoder(intent, where)


def _validate_scratch_encoder(intent: IntentConfig, where: str) -> None:
    encoder, anchors = intent.text_encoder, intent.anchors
    if encoder.hidden_size % encoder.num_heads:
        raise ConfigError(
            f"{where}: intent.text_encoder.num_heads={encoder.num_heads} must divide hidden_size={encoder.hidden_size}"
        )
    if anchors.enabled and encoder.hidden_size % anchors.heads:
        raise ConfigError(
            f"{where}: intent.anchors.heads={anchors.heads} must divide "
            f"intent.text_encoder.hidden_size={encoder.hidden_size}"
        )
    slots = anchors.num_anchors if anchors.enabled else 0
    needed = intent.data.text_max_length + slots
    if encoder.max_position_embeddings < needed:
        raise ConfigError(
            f"{where}: intent.text_encoder.max_position_embeddings={encoder.max_position_embeddings} is below "
            f"intent.data.text_max_length + anchor slots = {needed}"
        )
