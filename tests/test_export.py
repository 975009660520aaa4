"""Export round trips: transformers loads the exported LM and tokenizer and gives the run's logits.

Run directories are written by the test (config.yaml, tokenizer.json, checkpoints/last.ckpt with
perturbed weights, so that every expert differs and a wrong expert order would change the logits).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from asymoe import config as config_lib
from asymoe.data.records import Record, encode_record
from asymoe.data.tokenizer import HFTokenizer, WordTokenizer
from asymoe.errors import ConfigError
from asymoe.export import export, lm_logits, load_run
from asymoe.models.vlm import VisionLanguageModel
from conftest import TINY

TEXTS = ["what color is the circle ?", "blue", "is there a red square ?", "yes", "no", "what shape is it ?"]
MIXTRAL = [
    "model.moe.layers=all",
    "model.moe.routing.mode=shared",
    "model.moe.groups.vision.num_experts=1",
    "model.moe.groups.shared.num_experts=2",
    "model.moe.groups.language.num_experts=1",
]


def make_run(run_dir, overrides: list[str]):
    cfg = config_lib.load(None, TINY + [f"output_dir={run_dir}"] + overrides)
    tokenizer = WordTokenizer.build(TEXTS)
    torch.manual_seed(0)
    model = VisionLanguageModel(cfg.model, tokenizer.vocab_size, tokenizer.image_id)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    (run_dir / "checkpoints").mkdir(parents=True)
    config_lib.save(cfg, run_dir / "config.yaml")
    tokenizer.save(run_dir)
    state = {f"model.{key}": value for key, value in model.state_dict().items()}
    torch.save({"state_dict": state}, run_dir / "checkpoints" / "last.ckpt")
    return model.eval(), tokenizer


def round_trip(out, model: VisionLanguageModel, tokenizer: WordTokenizer) -> None:
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([hf_tok.encode("what color is the circle ?", add_special_tokens=False)])
    assert ids[0].tolist() == tokenizer.encode("What color is the circle?")
    run = load_run(out / "asymoe")
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, lm_logits(run, ids), atol=1e-5, rtol=1e-5)
        reference = model(ids, torch.ones_like(ids), torch.ones_like(ids), torch.zeros_like(ids), torch.tensor([-1]))
    torch.testing.assert_close(exported(ids).logits, reference.logits, atol=1e-5, rtol=1e-5)


def test_dense_run_exports_as_its_own_family(tmp_path):
    model, tokenizer = make_run(tmp_path / "run", ["model.moe.enabled=false"])
    result = export(tmp_path / "run", tmp_path / "out")
    assert result["family"] == "llama" and result["max_logit_difference"] < 1e-5
    round_trip(tmp_path / "out", model, tokenizer)
    for name in ("vision_encoder.safetensors", "projector.safetensors", "vision.json", "model.safetensors"):
        assert (tmp_path / "out" / name).is_file()


def test_shared_mode_moe_run_exports_as_mixtral(tmp_path):
    model, tokenizer = make_run(tmp_path / "run", MIXTRAL)
    result = export(tmp_path / "run", tmp_path / "out")
    assert result["family"] == "mixtral"
    round_trip(tmp_path / "out", model, tokenizer)


def test_modality_routed_run_is_refused_but_its_state_is_saved(tmp_path):
    model, _ = make_run(tmp_path / "run", ["model.moe.layers=all"])
    with pytest.raises(ConfigError, match=r"not a Mixtral \(routing.mode='modality' has one router per modality"):
        export(tmp_path / "run", tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()
    reloaded = load_run(tmp_path / "out" / "asymoe").model
    for key, value in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value)


def test_scratch_tokenizer_as_hf_tokenizer_with_its_chat_template(tmp_path):
    tokenizer = WordTokenizer.build(TEXTS)
    hf_tok = tokenizer.to_hf()
    for text in TEXTS + ["What's <image> there, BLUE?"]:
        assert hf_tok.encode(text, add_special_tokens=False) == tokenizer.encode(text)
    hf_tok.save_pretrained(tmp_path / "tok")
    # The exported chat template frames a conversation exactly as the training pipeline does.
    loaded = HFTokenizer(tmp_path / "tok")
    record = Record(turns=[("user", "is there a red square ?"), ("assistant", "yes")], image_key=None, origin="t:0")
    messages = [{"role": "user", "content": "is there a red square ?"}, {"role": "assistant", "content": "yes"}]
    templated = loaded.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert encode_record(record, loaded, 0).input_ids == list(templated)
    assert encode_record(record, loaded, 0).input_ids == encode_record(record, tokenizer, 0).input_ids


def test_chatml_template_framing_from_the_tokenizer(tmp_path):
    hf_tok = WordTokenizer.build(TEXTS).to_hf()
    hf_tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<image>"]})
    # Qwen2-style ChatML: a default system turn, a newline after every end-of-turn token.
    hf_tok.chat_template = (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    hf_tok.save_pretrained(tmp_path / "chatml")
    loaded = HFTokenizer(tmp_path / "chatml")
    raw = loaded.tokenizer
    assert loaded.user_ids == raw.encode("<|im_start|>user\n", add_special_tokens=False)
    assert loaded.assistant_ids == raw.encode("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    assert loaded.eos_id == raw.convert_tokens_to_ids("<|im_end|>")
    # Without a template: the documented plain framing.
    hf_tok.chat_template = None
    hf_tok.save_pretrained(tmp_path / "plain")
    plain = HFTokenizer(tmp_path / "plain")
    assert plain.user_ids == plain.tokenizer.encode("USER:", add_special_tokens=False)
    assert plain.eos_id == plain.tokenizer.eos_token_id


def test_cli_export_refusal_is_one_line(tmp_path, capsys):
    from asymoe.cli import main

    make_run(tmp_path / "run", ["model.moe.groups.language.kind=evidence"])
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("asymoe: error: export: wrote the asymoe state") and "\n" not in error
    assert (tmp_path / "out" / "asymoe" / "model.safetensors").is_file()
