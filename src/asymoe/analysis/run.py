"""`asymoe analyze RUN_DIR [key=value ...]`: load a trained run, measure it on a split, write analysis/.

Per batch of the split (in evaluation order, grouped by image) the model runs four times:
1. real image and question, teacher-forced over the reference answer, with attention and routing
   captured (`capture`): entropies, grounding, f_evd, routing shares, evidence gates; greedy answers;
2. blank image: greedy answers (accuracy with a blank image);
3. blank image and shuffled question, routing only: f_mem;
4. each question with its swap partner's image: greedy answers (image sensitivity).
Answers are decoded as evaluation does (`VLMModule`: the teacher-forced shortcut, greedy decoding
for the rest), so `analysis/accuracy` equals the run's own accuracy on the same questions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from asymoe import config as config_lib
from asymoe.analysis import conditions
from asymoe.analysis.capture import capture
from asymoe.analysis.cells import ANALYSIS_DIR
from asymoe.analysis.results import build_results
from asymoe.analysis.tally import AnalysisTally, expert_columns, expert_names
from asymoe.config import ConfigError
from asymoe.data.datamodule import VQADataModule
from asymoe.data.records import ImageGroupedBatchSampler, make_collate
from asymoe.data.tokenizer import WordTokenizer
from asymoe.export import run_checkpoint
from asymoe.training.checkpoints import load_full_checkpoint
from asymoe.training.module import VLMModule

NO_FAMILY = "all"


@dataclass
class AnalysisOptions:
    """The analysis's own keys on the command line; every other key=value overrides the run's config."""

    ckpt: str | None = None  # default: the run's best checkpoint, else last.ckpt
    split: str | None = None  # default: the first test split
    limit: int | None = 2000  # questions (the split's first ones); null = all
    batch_size: int | None = None  # default: data.eval_batch_size
    device: str = "auto"  # auto = cuda when available
    seed: int = 0  # swap partners and question shuffles

    @classmethod
    def parse(cls, items: list[str]) -> tuple[AnalysisOptions, list[str]]:
        names = {f.name for f in fields(cls)}
        options, rest = cls(), []
        for item in items:
            key, _, value = item.partition("=")
            if key not in names:
                rest.append(item)
                continue
            if key in ("limit", "batch_size", "seed"):
                parsed = None if value in ("null", "none", "") else _positive_int(key, value)
            else:
                parsed = value or None
            options = replace(options, **{key: parsed})
        return options, rest


def _positive_int(key: str, value: str) -> int:
    if not value.isdigit() or (key != "seed" and int(value) == 0):
        raise ConfigError(f"{key}={value!r}: expected a positive integer (or null)")
    return int(value)


def load_for_analysis(run_dir: Path, options: AnalysisOptions, overrides: list[str]):
    """(module with the checkpoint's weights, encoded datamodule, checkpoint path, the split to analyse)."""
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    # The analysis chooses its own questions: the run's own split caps do not apply.
    cfg = config_lib.load(run_dir / "config.yaml", ["data.limit_val=null", "data.limit_test=null", *overrides])
    if cfg.task != "vqa":
        raise ConfigError(f"{run_dir}: asymoe analyze measures vision-language runs; this run's task is '{cfg.task}'")
    datamodule = VQADataModule(cfg)
    names = datamodule.split_names()
    split = options.split or next((name for name in names if name.startswith("test")), "val")
    if split not in names:
        raise ConfigError(f"split={split!r}: not a split of this run's data (valid: {', '.join(names)})")
    # Only the analysed split is loaded (and train, when the run directory holds no tokenizer).
    has_tokenizer = cfg.model.language.pretrained_path or (run_dir / WordTokenizer.FILENAME).is_file()
    tokenizer = datamodule.prepare(run_dir, only={split} if has_tokenizer else {split, "train"})
    module = VLMModule(cfg, tokenizer)
    path = Path(options.ckpt) if options.ckpt else run_checkpoint(run_dir)
    if not path.exists():
        raise ConfigError(f"ckpt: checkpoint not found: {path}")
    try:
        module.load_state_dict(load_full_checkpoint(path)["state_dict"])
    except RuntimeError as error:
        raise ConfigError(f"ckpt: {path} does not match the model of {run_dir / 'config.yaml'} ({error})") from None
    datamodule.encode(module.model.num_image_tokens)
    return module.eval(), datamodule, path, split


def _device(option: str) -> torch.device:
    if option == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(option)


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class Analysis:
    """One analysis of one split: batches in, `AnalysisTally` filled."""

    def __init__(self, module: VLMModule, datamodule: VQADataModule, split: str, options: AnalysisOptions):
        self.module, self.model = module, module.model
        self.split = split
        samples = datamodule.samples[split]
        self.samples = samples[: options.limit] if options.limit else samples
        self.store = datamodule.stores[split]
        self.batch_size = options.batch_size or datamodule.data.eval_batch_size
        self.partners = conditions.swap_partners(self.samples, self.model.image_token_id, options.seed)
        self.generator = torch.Generator().manual_seed(options.seed)
        self.tally = AnalysisTally(self.model.moe_blocks())
        self.device = next(self.model.parameters()).device

    def batches(self) -> list[list[int]]:
        keys = [s.image_key for s in self.samples]
        sampler = ImageGroupedBatchSampler(
            keys, images_per_batch=len(keys) + 1, shuffle=False, max_samples_per_batch=self.batch_size
        )
        return list(sampler)

    def _answers(self, batch: dict) -> list[str]:
        return self.module._predictions(batch, self.module._forward(batch).logits)

    @torch.no_grad()
    def run(self) -> AnalysisTally:
        pad = self.module.tokenizer.pad_id
        collate = make_collate(self.samples, self.store, pad, split=self.split)
        swapped = [
            sample if partner is None else replace(sample, image_key=self.samples[partner].image_key)
            for sample, partner in zip(self.samples, self.partners)
        ]
        collate_swapped = make_collate(swapped, self.store, pad, split=self.split)
        for indices in self.batches():
            self._analyse(indices, _to(collate(indices), self.device), collate_swapped)
        return self.tally

    def _analyse(self, indices: list[int], batch: dict, collate_swapped) -> None:
        """The four conditions of the module docstring on one batch."""
        families = [t or NO_FAMILY for t in batch["question_types"]]
        with capture(self.model) as captured:
            logits = self.module._forward(batch).logits
        self.tally.add_real(captured, self.model.moe_state.meta, families)
        real = self.module._predictions(batch, logits)
        blanked = conditions.blank_images(batch)
        blank = self._answers(blanked)
        with capture(self.model, attention=False) as captured:
            self.module._forward(conditions.shuffled_question(blanked, self.model.image_token_id, self.generator))
        self.tally.add_memory(captured, self.model.moe_state.meta)
        swap_rows = [row for row, i in enumerate(indices) if self.partners[i] is not None]
        other: list[str | None] = [None] * len(indices)
        partner_answers: list[str | None] = [None] * len(indices)
        if swap_rows:
            swap_batch = _to(collate_swapped([indices[row] for row in swap_rows]), self.device)
            for row, answer in zip(swap_rows, self._answers(swap_batch)):
                other[row] = answer
                partner_answers[row] = self.samples[self.partners[indices[row]]].answer_text
        self.tally.add_answers(families, batch["answers"], real, blank, other, partner_answers)


def analyze(run_dir: str | Path, items: list[str] | None = None) -> dict:
    """Analyse a run; write RUN_DIR/analysis/ (analysis.json, analysis.md, PNGs, tb/); return the results."""
    from asymoe.analysis.report import write_analysis

    started = time.time()
    run_dir = Path(run_dir)
    options, overrides = AnalysisOptions.parse(list(items or []))
    module, datamodule, checkpoint, split = load_for_analysis(run_dir, options, overrides)
    module.to(_device(options.device))
    analysis = Analysis(module, datamodule, split, options)
    tally = analysis.run()
    model = module.model
    blocks = model.moe_blocks()
    # Every MoE layer is built with the same groups, so the first block names the experts of all.
    experts = expert_names(blocks[0]) if blocks else []
    groups = expert_columns(blocks[0]) if blocks else {}
    layers = list(range(model.lm.config.num_hidden_layers))
    result = {
        "run_dir": str(run_dir),
        "checkpoint": str(checkpoint),
        "split": split,
        "questions": len(analysis.samples),
        "moe_layers": [block.layer_index for block in blocks],
        "experts": experts,
        **build_results(tally, layers, experts, groups),
    }
    result["seconds"] = time.time() - started
    write_analysis(run_dir / ANALYSIS_DIR, result)
    return result
