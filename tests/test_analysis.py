"""asymoe.analysis: measurements on hand-made tensors, attention capture parity, image sensitivity, the CLI."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from asymoe import config as config_lib
from asymoe.analysis import conditions, measures
from asymoe.analysis.capture import capture
from asymoe.analysis.cells import analysis_scalars
from asymoe.analysis.run import Analysis, AnalysisOptions, load_for_analysis
from asymoe.cli import main
from asymoe.config import ConfigError
from asymoe.models.moe import MoEBlock
from conftest import TINY

# -- measurements on hand-made tensors --------------------------------------------------------------


def test_grounding_ratio_weights_rows_by_routing_weight():
    # One sample, 3 positions: 0 = BOS (memory), 1 = question token (evidence), 2 = answer (memory).
    head0 = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.6, 0.2]])
    head1 = torch.tensor([[1.0, 0.0, 0.0], [0.1, 0.9, 0.0], [0.4, 0.2, 0.4]])
    attention = torch.stack([head0, head1]).unsqueeze(0)  # (1, 2, 3, 3)
    evidence = torch.tensor([[False, True, False]])
    a_evd, a_mem = measures.evidence_memory_mass(attention, evidence)
    torch.testing.assert_close(a_evd, torch.tensor([[0.0, 0.7, 0.4]]))
    torch.testing.assert_close(a_mem, torch.tensor([[1.0, 0.3, 0.6]]))
    # Expert 0 gets rows 1 (weight 1) and 2 (weight 0.5); expert 1 row 2 (0.5); expert 2 nothing.
    weights = measures.dense_routing_weights(
        torch.tensor([[0, 1], [0, 1], [0, 1]]),
        torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, 0.5]]),
        torch.tensor([[False, False], [True, False], [True, True]]),
        num_experts=3,
    )
    torch.testing.assert_close(weights, torch.tensor([[0.0, 0, 0], [1.0, 0, 0], [0.5, 0.5, 0]]))
    ratio = measures.grounding_ratio(measures.grounding_sums(weights, a_evd.reshape(-1), a_mem.reshape(-1)))
    expected_evd = (1.0 * 0.7 + 0.5 * 0.4) / 1.5
    assert ratio["F"][0] == pytest.approx(expected_evd)
    assert ratio["A_mem"][0] == pytest.approx((0.3 + 0.5 * 0.6) / 1.5)
    assert ratio["F"][1] == pytest.approx(0.4)
    assert ratio["F"][2] is None and ratio["weight"][2] == 0.0


def test_evidence_dependence_ratio_from_counts():
    weights = torch.tensor([[0.6, 0.4, 0.0], [0.0, 0.7, 0.3], [0.5, 0.0, 0.5], [0.0, 0.0, 0.0]])
    eligible = torch.tensor([[True] * 3] * 3 + [[False, False, True]])
    counts = measures.activation_counts(weights, eligible)
    torch.testing.assert_close(counts, torch.tensor([[2.0, 2, 2], [3, 3, 4]], dtype=torch.float64))
    memory = torch.tensor([[1.0, 2, 3], [3, 3, 4]], dtype=torch.float64)
    result = measures.evidence_dependence(counts, memory)
    assert result["f_evd"] == pytest.approx([2 / 3, 2 / 3, 0.5])
    assert result["R"] == pytest.approx([(2 / 3 - 1 / 3) / 1.0, 0.0, (0.5 - 0.75) / 1.25])


def test_entropy_per_row_and_context_dilution_slope():
    uniform3 = torch.full((3,), 1 / 3)
    rows = torch.stack([torch.tensor([1.0, 0, 0]), torch.tensor([0.5, 0.5, 0]), uniform3])
    attention = torch.stack([rows, rows.flip(-1)]).unsqueeze(0)  # heads see the same entropies
    entropy = measures.row_entropy(attention)
    torch.testing.assert_close(entropy, torch.tensor([[0.0, math.log(2), math.log(3)]]))
    vision_rows = torch.tensor([[False, True, True]])
    sums = measures.entropy_sums(entropy, vision_rows)
    assert measures.mean_of(sums) == pytest.approx((math.log(2) + math.log(3)) / 2)
    assert measures.mean_of(measures.entropy_sums(entropy, torch.zeros_like(vision_rows))) is None
    assert measures.least_squares_slope([0, 1, 2, 3], [1.0, 1.5, 2.0, 2.5]) == pytest.approx(0.5)
    assert measures.least_squares_slope([0, 1, 2], [2.0, None, 0.0]) == pytest.approx(-1.0)
    assert measures.least_squares_slope([0, 1], [1.0, None]) is None


# -- a tiny trained run, shared by the tests below -------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from asymoe.training.run import fit

    run_dir = tmp_path_factory.mktemp("analysis") / "run"
    cfg = config_lib.load("asymoe", TINY + [f"output_dir={run_dir}", "trainer.max_steps=4"])
    metrics = fit(cfg)
    return run_dir, metrics


@pytest.fixture(scope="module")
def loaded(tiny_run):
    run_dir, _ = tiny_run
    module, datamodule, _, split = load_for_analysis(run_dir, AnalysisOptions(), [])
    assert split == "test" and set(datamodule.samples) == {"test"}  # only the analysed split is loaded
    return module, datamodule


def _batch(loaded, size: int = 12) -> dict:
    module, datamodule = loaded
    analysis = Analysis(module, datamodule, "test", AnalysisOptions(limit=size))
    from asymoe.data.records import make_collate

    return make_collate(analysis.samples, analysis.store, module.tokenizer.pad_id, split="test")(list(range(size)))


@torch.no_grad()
def test_captured_attention_equals_an_eager_forward_and_training_forward_is_unchanged(loaded):
    module, _ = loaded
    model = module.model
    batch = _batch(loaded)
    before = module._forward(batch).logits
    assert model.lm.config._attn_implementation == "sdpa"
    with capture(model) as captured:
        captured_logits = module._forward(batch).logits
    records = model.moe_state.records
    assert model.lm.config._attn_implementation == "sdpa"
    assert all("_route" not in vars(block) for block in model.moe_blocks())
    torch.testing.assert_close(module._forward(batch).logits, before, rtol=0, atol=0)
    torch.testing.assert_close(captured_logits, before, rtol=1e-5, atol=1e-5)

    reference = copy.deepcopy(model)
    reference.lm.set_attn_implementation("eager")
    embeds = reference.embed(batch["input_ids"], reference.encode_images(batch["pixel_values"]), batch["image_index"])
    reference.moe_state.set(model.moe_state.meta)
    eager = reference.lm(inputs_embeds=embeds, attention_mask=batch["attention_mask"].long(), output_attentions=True)
    assert len(eager.attentions) == len(captured.attention) == model.lm.config.num_hidden_layers
    for layer, probabilities in enumerate(eager.attentions):
        torch.testing.assert_close(captured.attention[layer], probabilities, rtol=0, atol=1e-6)
    # The captured routing is what the block recorded: the same share per expert.
    block: MoEBlock = model.moe_blocks()[0]
    routing = captured.routing[block.layer_index]
    language = block.eligible_language
    tokens = model.moe_state.meta.language.reshape(-1)
    chosen = routing.expert_index[tokens][routing.slot_mask[tokens]]
    counts = torch.stack([(chosen == e).sum() for e in language]).float()
    torch.testing.assert_close(counts / counts.sum(), records[block.layer_index].expert_share["language"].float())


def test_question_shuffle_and_swap_partners(loaded):
    module, datamodule = loaded
    batch = _batch(loaded)
    image_id = module.model.image_token_id
    shuffled = conditions.shuffled_question(batch, image_id, torch.Generator().manual_seed(0))["input_ids"]
    question = batch["evidence_mask"] & (batch["input_ids"] != image_id)
    assert torch.equal(shuffled[~question], batch["input_ids"][~question])
    for row in range(shuffled.shape[0]):
        assert sorted(shuffled[row][question[row]].tolist()) == sorted(batch["input_ids"][row][question[row]].tolist())
    assert not torch.equal(shuffled, batch["input_ids"])
    samples = datamodule.samples["test"][:200]
    partners = conditions.swap_partners(samples, image_id, seed=0)
    assert sum(p is not None for p in partners) > 50
    for sample, partner in zip(samples, partners):
        if partner is not None:
            other = samples[partner]
            assert conditions.question_key(other, image_id) == conditions.question_key(sample, image_id)
            assert other.image_key != sample.image_key and other.answer_text != sample.answer_text


def _sensitivity(module, datamodule) -> dict:
    from asymoe.analysis.results import sensitivity_section

    analysis = Analysis(module, datamodule, "test", AnalysisOptions(limit=64, batch_size=64))
    return sensitivity_section(analysis.run().outcomes)


def test_image_sensitivity_is_zero_without_an_image_pathway(loaded):
    module, datamodule = loaded
    intact = _sensitivity(module, datamodule)
    assert intact["swappable"] > 5 and intact["changed"] > 0
    cut = copy.deepcopy(module)
    with torch.no_grad():
        for param in cut.model.projector.parameters():
            param.zero_()
    severed = _sensitivity(cut, datamodule)
    assert severed["swappable"] == intact["swappable"]
    assert severed["changed"] == 0.0
    assert severed["accuracy_blank"] == severed["accuracy"]


# -- the command ----------------------------------------------------------------------------------

DOCUMENTED_KEYS = {
    "run_dir", "checkpoint", "split", "questions", "seconds", "moe_layers", "experts", "entropy", "grounding",
    "evidence_dependence", "specialisation", "image_sensitivity", "evidence_experts", "scalars",
}  # fmt: skip


def test_analyze_command_writes_the_documented_files(tiny_run, capsys):
    run_dir, metrics = tiny_run
    limit = 24  # the run's own test split (data.limit_test), so the accuracies must agree
    assert main(["analyze", str(run_dir), f"limit={limit}", "batch_size=24"]) == 0
    result = json.loads((run_dir / "analysis" / "analysis.json").read_text())
    assert set(result) == DOCUMENTED_KEYS
    assert result["questions"] == limit and result["split"] == "test" and result["moe_layers"] == [1]
    assert result["experts"] == ["vision0", "shared0", "shared1", "language0"]
    assert result["scalars"]["analysis/accuracy"] == pytest.approx(metrics["test/accuracy"])
    assert set(result["entropy"]) == {"layers", "vision", "language", "vision_slope", "language_slope"}
    grounding = result["grounding"]["1"]
    assert 0 < grounding["language0"]["F"] < 1 and grounding["language0"]["F"] == pytest.approx(
        grounding["language0"]["A_evd"]
    )
    shares = result["specialisation"]["part"]["1"]["answer"]
    assert sum(shares[e] for e in result["experts"]) == pytest.approx(1.0)
    assert shares["vision0"] == 0.0  # language tokens never reach the vision-intra expert
    gates = result["evidence_experts"]["1"]
    assert sum(gates["alpha"]["language0"]["histogram"]) == gates["alpha"]["language0"]["count"]
    for name in ("entropy", "grounding", "evidence_dependence", "specialisation", "image_sensitivity"):
        assert (run_dir / "analysis" / f"{name}.png").is_file()
    assert list((run_dir / "analysis" / "tb").glob("events.out.tfevents.*"))
    assert "analysis/grounding/language" in (run_dir / "analysis" / "analysis.md").read_text()
    assert analysis_scalars(run_dir) == result["scalars"]
    assert "analysis/image_changed" in capsys.readouterr().out


def test_analyze_refuses_bad_options(tiny_run, capsys):
    run_dir, _ = tiny_run
    assert main(["analyze", str(run_dir), "split=nope"]) == 2
    assert "split='nope'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="limit"):
        AnalysisOptions.parse(["limit=-3"])
    assert main(["analyze", str(run_dir.parent / "missing")]) == 2


def test_grid_summary_gains_the_cells_analysis_scalars(tmp_path):
    from asymoe.grid.report import load_rows

    spec = {"name": "g", "metric": "test/accuracy", "cells": [{"group": "g", "name": "c0", "switches": {}}]}
    (tmp_path / "grid.json").write_text(json.dumps(spec))
    cell = tmp_path / "cells" / "c0"
    (cell / "analysis").mkdir(parents=True)
    (cell / "metrics.json").write_text(json.dumps({"test/accuracy": 0.5}))
    scalars = {"analysis/image_changed": 0.25, "analysis/grounding/language": 0.75, "stray": 1.0}
    (cell / "analysis" / "analysis.json").write_text(json.dumps({"scalars": scalars}))
    _, rows = load_rows(tmp_path)
    expected = {"test/accuracy": 0.5, "analysis/image_changed": 0.25, "analysis/grounding/language": 0.75}
    assert rows[0].metrics == [expected]
