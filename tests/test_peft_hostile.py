"""PEFT interop never imports silently wrong: refused options, hostile files, dropout in eval mode, exports that load
where a PEFT user loads them, provenance that travels, and the CLI with a backbone description."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from families import FAMILIES, VOCAB, _cfg
from pituning import AdapterConfig, ConfigError, ExpertModel, LoraConfig, PiTuningError, PrefixConfig, load_backbone
from pituning.bank import Expert, ExpertBank, TaskInfo
from pituning.cli import main

peft = pytest.importorskip("peft")


def _randomize(model: ExpertModel, name: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.expert_parameters(name).values():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def _randomize_peft(model: Any, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def _plain_adapter(path: Path, **options: Any) -> Path:
    """A trained-looking plain PEFT LoRA adapter of the tiny BERT, saved to ``path``."""
    model = peft.get_peft_model(
        FAMILIES["bert"].build().model, peft.LoraConfig(r=2, target_modules=["query", "value"], **options)
    )
    _randomize_peft(model)
    model.save_pretrained(path)
    return path


def _patch_config(adapter: Path, **changes: Any) -> Path:
    path = adapter / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))
    return adapter


def _import(bank: ExpertBank, adapter: Path, fam: str = "bert") -> Expert:
    return bank.import_peft(adapter, ExpertModel(FAMILIES[fam].build()), "imported", TaskInfo("t"))


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)


# ---------------------------------------------------------------------------------------------------------- item 7
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_base_changing_initialisations_are_refused(init: str, tmp_path: Path) -> None:
    base = FAMILIES["bert"].build().model
    model = peft.get_peft_model(
        base,
        peft.LoraConfig(r=2, target_modules=["query", "value"], init_lora_weights=init),  # changes base weights
    )
    model.save_pretrained(tmp_path / "adapter")
    bank = ExpertBank(tmp_path / "bank")
    with pytest.raises(ConfigError, match=f"init_lora_weights='{init}'.*path_initial_model_for_weight_conversion"):
        _import(bank, tmp_path / "adapter")
    assert len(bank) == 0


def test_a_pissa_adapter_converted_to_lora_imports_exactly(tmp_path: Path) -> None:
    family = FAMILIES["bert"]
    pissa = peft.get_peft_model(
        family.build().model.eval(), peft.LoraConfig(r=2, target_modules=["query", "value"], init_lora_weights="pissa")
    )
    pissa.peft_config["default"].init_lora_weights = True  # save the initial adapter as PEFT's docs show
    pissa.save_pretrained(tmp_path / "init")
    pissa.peft_config["default"].init_lora_weights = "pissa"
    _randomize_peft(pissa, 3)  # "training"
    pissa.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    reference = peft.PeftModel.from_pretrained(family.build().model.eval(), str(tmp_path / "converted"))
    bank = ExpertBank(tmp_path / "bank")
    _import(bank, tmp_path / "converted")
    model = ExpertModel(family.build()).eval()
    bank.load_into(model, "imported")
    inputs = family.inputs(torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (family.output(reference, inputs) - family.output(model, inputs)).abs().max().item()
        # the converted adapter on the original base reproduces the PiSSA model
        assert (family.output(pissa, inputs) - family.output(model, inputs)).abs().max().item() <= 1e-4
    assert diff <= 1e-5


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("alora_invocation_tokens", [5, 6]),
        ("use_dora", True),
        ("lora_bias", True),
        ("rank_pattern", {"query": 4}),
        ("alpha_pattern", {"query": 4}),
        ("target_parameters", ["feed_forward.experts.down_proj"]),
        ("trainable_token_indices", [1, 2]),
        ("megatron_config", {"tensor_model_parallel_size": 2}),
        ("layer_replication", [[0, 2], [1, 2]]),
        ("bias", "all"),
        ("bias", "lora_only"),
        ("use_qalora", True),
        ("init_lora_weights", "corda"),
        ("init_lora_weights", "loftq"),
        ("init_lora_weights", "lora_ga"),
        ("init_lora_weights", "mica"),
        ("some_future_option", {"on": True}),
    ],
)
def test_options_that_change_the_math_are_refused_by_name(option: str, value: Any, tmp_path: Path) -> None:
    adapter = _patch_config(_plain_adapter(tmp_path / "adapter"), **{option: value})
    bank = ExpertBank(tmp_path / "bank")
    with pytest.raises(ConfigError, match=option):
        _import(bank, adapter)
    assert len(bank) == 0


def test_a_trained_head_is_refused_and_an_unchanged_one_left_out(tmp_path: Path) -> None:
    def backbone() -> ExpertModel:
        torch.manual_seed(0)
        return ExpertModel(load_backbone(_cfg("bert"), task="sequence-classification"))

    reference = peft.get_peft_model(
        backbone().backbone.eval(), peft.LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS")
    )
    _randomize_peft(reference)
    reference.save_pretrained(tmp_path / "unchanged")  # the classifier is saved as it was
    bank = ExpertBank(tmp_path / "bank")
    expert = bank.import_peft(tmp_path / "unchanged", backbone(), "ok", TaskInfo("t"))
    assert all("query" in m for m in expert.modules)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "modules_to_save" in name:
                param.add_(1.0)  # "trained"
    reference.save_pretrained(tmp_path / "trained")
    with pytest.raises(ConfigError, match="a trained task head \\(modules_to_save\\)"):
        bank.import_peft(tmp_path / "trained", backbone(), "head", TaskInfo("t"))
    assert bank.names() == ["ok"]


def test_layers_to_transform_and_gaussian_init_import_exactly(tmp_path: Path) -> None:
    family = FAMILIES["bert"]
    reference = peft.get_peft_model(
        family.build().model.eval(),
        peft.LoraConfig(r=2, target_modules=["query", "value"], layers_to_transform=[1], init_lora_weights="gaussian"),
    )
    _randomize_peft(reference)
    reference.save_pretrained(tmp_path / "adapter")
    bank = ExpertBank(tmp_path / "bank")
    expert = _import(bank, tmp_path / "adapter")
    assert sorted(expert.modules) == ["encoder.layer.1.attention.self.query", "encoder.layer.1.attention.self.value"]
    model = ExpertModel(family.build()).eval()
    bank.load_into(model, "imported")
    inputs = family.inputs(torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (family.output(reference, inputs) - family.output(model, inputs)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(value: float, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    adapter = _plain_adapter(tmp_path / "adapter")
    path = adapter / "adapter_model.safetensors"
    weights = load_file(str(path))
    key = sorted(weights)[0]
    weights[key] = torch.full_like(weights[key], value)
    save_file(weights, str(path))
    bank = ExpertBank(tmp_path / "bank")
    with pytest.raises(ConfigError, match="adapter_model.safetensors.*non-finite"):
        _import(bank, adapter)
    assert len(bank) == 0


# ---------------------------------------------------------------------------------------------------------- item 8
def _write(path: Path, data: bytes | str) -> None:
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ("{not json", "adapter_config.json: the adapter config is not valid JSON"),
        (b"\xff\xfe\x00garbage", "adapter_config.json: the adapter config is not UTF-8"),
        ('[{"peft_type": "LORA"}]', "adapter_config.json: the adapter config must be a JSON object"),
        ('{"r": 2}', "adapter_config.json: 'peft_type' is missing"),
        ('{"peft_type": "LORA", "lora_alpha": 4}', "adapter_config.json: 'r' is missing"),
        ('{"peft_type": "LORA", "r": "8"}', "adapter_config.json: 'r' must be a positive integer"),
        ('{"peft_type": "LORA", "r": true}', "adapter_config.json: 'r' must be a positive integer"),
        ('{"peft_type": "LORA", "r": 2, "lora_alpha": "x"}', "adapter_config.json: 'lora_alpha' must be a number"),
        ('{"peft_type": "LORA", "r": 2, "lora_dropout": 2}', "adapter_config.json: lora_dropout must be in"),
        ('{"peft_type": "LORA", "r": 3}', "adapter_model.safetensors.*r=3"),
        ('{"peft_type": "PREFIX_TUNING", "num_layers": "2"}', "adapter_config.json: 'num_layers' must be"),
    ],
)
def test_hostile_adapter_configs(config: str | bytes, match: str, tmp_path: Path, no_unpickling: None) -> None:
    adapter = _plain_adapter(tmp_path / "adapter")
    _write(adapter / "adapter_config.json", config)
    bank = ExpertBank(tmp_path / "bank")
    with pytest.raises(ConfigError, match=match):
        _import(bank, adapter)
    assert len(bank) == 0


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        (b"garbage bytes, not a tensor file", "safetensors"),
        ((2**60).to_bytes(8, "little") + b"{}", "header claims 1152921504606846976 bytes"),
        (b"\x00" * 4, "too short"),
        ((40).to_bytes(8, "little") + b'{"x": {"dtype": "F32", "shape": [1]}}   ', "corrupted|not a readable"),
        ((8).to_bytes(8, "little") + b"[1,2,3] ", "does not start with a JSON object"),
    ],
)
def test_hostile_safetensors(weights: bytes, match: str, tmp_path: Path, no_unpickling: None) -> None:
    adapter = _plain_adapter(tmp_path / "adapter")
    _write(adapter / "adapter_model.safetensors", weights)
    bank = ExpertBank(tmp_path / "bank")
    with pytest.raises(ConfigError, match=f"adapter_model.safetensors.*({match})"):
        _import(bank, adapter)
    assert len(bank) == 0


@pytest.mark.parametrize("protocol", ["zip", 2, 4])
def test_a_renamed_pickle_is_never_unpickled(protocol: Any, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    adapter = _plain_adapter(tmp_path / "adapter")
    path = adapter / "adapter_model.safetensors"
    state = load_file(str(path))
    path.unlink()
    if protocol == "zip":
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state, protocol=protocol))
    (tmp_path / "pwned").unlink(missing_ok=True)
    bank = ExpertBank(tmp_path / "bank")
    with pytest.raises(ConfigError, match="adapter_model.safetensors is a pickle.*never unpickles"):
        _import(bank, adapter)
    assert len(bank) == 0


def test_missing_weights_name_the_pickle(tmp_path: Path) -> None:
    adapter = _plain_adapter(tmp_path / "adapter")
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(ConfigError, match="adapter_model.bin, a pickle, which is never read"):
        _import(ExpertBank(tmp_path / "bank"), adapter)


def test_weights_that_do_not_fit_the_backbone_name_the_directory(tmp_path: Path) -> None:
    from pituning import ExpertError

    adapter = _plain_adapter(tmp_path / "adapter")
    model = ExpertModel(load_backbone(_cfg("bert").__class__(**{**_cfg("bert").to_dict(), "hidden_size": 48})))
    with pytest.raises(ExpertError, match="adapter: the adapter does not fit this backbone"):
        ExpertBank(tmp_path / "bank").import_peft(adapter, model, "x", TaskInfo("t"))


def _prefix_export(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = ExpertModel(load_backbone(_cfg("llama"), task="causal-lm")).eval()
    model.add_expert("p", PrefixConfig(num_tokens=3))
    bank = ExpertBank(tmp_path / "src_bank")
    bank.add(Expert.from_model(model, "p", TaskInfo("t")))
    return bank.export_peft("p", tmp_path / "prefix", num_attention_heads=2)


@pytest.mark.parametrize(
    ("tensors", "match"),
    [
        ({"other": torch.zeros(3, 64)}, "no 'prompt_embeddings' tensor"),
        ({"prompt_embeddings": torch.zeros(3, 60)}, r"'prompt_embeddings' has shape \(3, 60\).*needs \(3, 64\)"),
        ({"prompt_embeddings": torch.zeros(4, 64)}, r"'prompt_embeddings' has shape \(4, 64\)"),
    ],
)
def test_hostile_prefix_adapters(tensors: dict[str, torch.Tensor], match: str, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    out = _prefix_export(tmp_path)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    fresh = ExpertModel(load_backbone(_cfg("llama"), task="causal-lm"))
    bank = ExpertBank(tmp_path / "bank")
    with pytest.raises(ConfigError, match=f"adapter_model.safetensors.*{match}"):
        bank.import_peft(out, fresh, "back", TaskInfo("t"))
    assert len(bank) == 0


def test_a_prefix_of_another_width_does_not_fit(tmp_path: Path) -> None:
    from pituning import ExpertError

    out = _prefix_export(tmp_path)
    _patch_config(out, token_dim=8)
    from safetensors.torch import save_file

    save_file({"prompt_embeddings": torch.zeros(3, 2 * 2 * 8)}, str(out / "adapter_model.safetensors"))
    fresh = ExpertModel(load_backbone(_cfg("llama"), task="causal-lm"))
    with pytest.raises(ExpertError, match="prefix: the adapter does not fit this backbone.*Shape mismatch"):
        ExpertBank(tmp_path / "bank").import_peft(out, fresh, "back", TaskInfo("t"))


def test_the_cli_reports_a_hostile_adapter_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = _plain_adapter(tmp_path / "adapter")
    _write(adapter / "adapter_config.json", "[1, 2]")
    code = main(
        ["bank", "import-peft", "--bank", str(tmp_path / "bank"), str(adapter), "--name", "x", "--backbone", "x"]
    )
    assert code == 2
    assert "adapter_config.json: the adapter config must be a JSON object" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------- item 9
def _twice(model: ExpertModel, fam: str = "bert") -> tuple[torch.Tensor, torch.Tensor]:
    family = FAMILIES[fam]
    inputs = family.inputs(torch.Generator().manual_seed(0))
    with torch.no_grad():
        return family.output(model, inputs), family.output(model, inputs)


@pytest.mark.parametrize("config", [LoraConfig(r=2, dropout=0.5), AdapterConfig(bottleneck=4, dropout=0.5)])
def test_experts_added_or_loaded_into_an_eval_model_run_without_dropout(config: Any, tmp_path: Path) -> None:
    model = ExpertModel(FAMILIES["bert"].build()).eval()
    model.add_expert("a", config)
    _randomize(model, "a", 0)
    first, second = _twice(model)
    assert torch.equal(first, second)
    state = model.expert_state_dict("a")
    model.remove_expert("a")
    model.load_expert("b", config, state)
    assert torch.equal(*_twice(model))
    bank = ExpertBank(tmp_path / "bank")
    bank.add(Expert.from_model(model, "b", TaskInfo("t")))
    fresh = ExpertModel(FAMILIES["bert"].build()).eval()
    bank.load_into(fresh, "b")
    assert torch.equal(*_twice(fresh))
    fresh.train()  # and dropout is back in train mode
    first, second = _twice(fresh)
    assert not torch.equal(first, second)


def test_an_expert_added_to_a_training_model_trains(tmp_path: Path) -> None:
    model = ExpertModel(FAMILIES["bert"].build()).train()
    model.add_expert("a", LoraConfig(r=2, dropout=0.5))
    assert all(m.training for n, m in model.named_modules() if "pi_lora" in n)


# ---------------------------------------------------------------------------------------------------------- item 10
def _saved(path: Path, cls_name: str, kind: str) -> Path:
    import transformers as T

    torch.manual_seed(0)
    getattr(T, cls_name)(_cfg(kind)).save_pretrained(path)
    return path


def _lora_bank(tmp_path: Path, base_dir: Path, task: str = "base", **lora: Any) -> tuple[ExpertModel, ExpertBank]:
    model = ExpertModel(load_backbone(str(base_dir), task=task)).eval()
    model.add_expert("e", LoraConfig(r=4, alpha=8, include_mlp=True, **lora))
    _randomize(model, "e", 0)
    bank = ExpertBank(tmp_path / "bank")
    bank.add(Expert.from_model(model, "e", TaskInfo("e"), provenance={"sources": ["x"]}))
    return model, bank


def _all_lora_b_loaded(peft_model: Any, expected: int) -> None:
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == expected
    assert all(bool(p.abs().sum() > 0) for p in lora_b)  # loaded, not PEFT's zero init


def test_a_base_model_expert_loads_into_a_sequence_classifier(tmp_path: Path) -> None:
    base_dir = _saved(tmp_path / "base", "BertForSequenceClassification", "bert")
    model, bank = _lora_bank(tmp_path, base_dir)  # trained on BertModel: paths encoder.layer...
    out = bank.export_peft("e", tmp_path / "peft", task_class="BertForSequenceClassification")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS"
    assert cfg["base_model_name_or_path"] == str(base_dir.resolve())
    assert all(t.startswith("bert.") for t in cfg["target_modules"])
    peft_model = peft.AutoPeftModelForSequenceClassification.from_pretrained(str(out)).eval()
    _all_lora_b_loaded(peft_model, len(model.expert_modules("e")))
    import transformers as T

    classifier = T.BertForSequenceClassification.from_pretrained(base_dir).eval().classifier
    inputs = FAMILIES["bert"].inputs(torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = classifier(model(**inputs).pooler_output)
        diff = (peft_model(**inputs).logits - expected).abs().max().item()
    assert diff <= 1e-5


def test_the_default_export_loads_where_the_expert_came_from(tmp_path: Path) -> None:
    base_dir = _saved(tmp_path / "base", "BertModel", "bert")
    model, bank = _lora_bank(tmp_path, base_dir)
    out = bank.export_peft("e", tmp_path / "peft")
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "FEATURE_EXTRACTION"
    peft_model = peft.AutoPeftModelForFeatureExtraction.from_pretrained(str(out)).eval()
    _all_lora_b_loaded(peft_model, len(model.expert_modules("e")))
    inputs = FAMILIES["bert"].inputs(torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (peft_model(**inputs).last_hidden_state - model(**inputs).last_hidden_state).abs().max().item()
    assert diff <= 1e-5


def test_a_sequence_classifier_expert_exports_as_seq_cls_by_default(tmp_path: Path) -> None:
    base_dir = _saved(tmp_path / "base", "BertForSequenceClassification", "bert")
    model, bank = _lora_bank(tmp_path, base_dir, task="sequence-classification")
    out = bank.export_peft("e", tmp_path / "peft")
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    peft_model = peft.AutoPeftModelForSequenceClassification.from_pretrained(str(out)).eval()
    _all_lora_b_loaded(peft_model, len(model.expert_modules("e")))
    inputs = FAMILIES["bert"].inputs(torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (peft_model(**inputs).logits - model(**inputs).logits).abs().max().item() <= 1e-5


def test_a_llama_base_expert_loads_as_a_causal_lm(tmp_path: Path) -> None:
    base_dir = _saved(tmp_path / "base", "LlamaForCausalLM", "llama")
    model, bank = _lora_bank(tmp_path, base_dir)
    out = bank.export_peft("e", tmp_path / "peft", task_type="CAUSAL_LM")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM"
    assert all(t.startswith("model.layers.") for t in cfg["target_modules"])
    peft_model = peft.AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    _all_lora_b_loaded(peft_model, len(model.expert_modules("e")))
    inputs = {"input_ids": torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))}
    with torch.no_grad():
        expected = peft_model.get_base_model().lm_head(model(**inputs).last_hidden_state)
        diff = (peft_model(**inputs).logits - expected).abs().max().item()
    assert diff <= 1e-5


def test_export_options_are_checked(tmp_path: Path) -> None:
    base_dir = _saved(tmp_path / "base", "BertModel", "bert")
    _, bank = _lora_bank(tmp_path, base_dir)
    with pytest.raises(ConfigError, match="task_type must be one of"):
        bank.export_peft("e", tmp_path / "a", task_type="CLASSIFY")
    with pytest.raises(ConfigError, match="not a transformers model class"):
        bank.export_peft("e", tmp_path / "b", task_class="NoSuchModel")
    with pytest.raises(ConfigError, match="do not all exist in ViTModel"):
        bank.export_peft("e", tmp_path / "c", task_class="ViTModel")


def test_a_config_built_backbone_exports_without_a_base_model(tmp_path: Path) -> None:
    model = ExpertModel(FAMILIES["bert"].build())
    model.add_expert("e", LoraConfig(r=2))
    bank = ExpertBank(tmp_path / "bank")
    bank.add(Expert.from_model(model, "e", TaskInfo("t")))
    out = bank.export_peft("e", tmp_path / "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] is None  # not the description "config:bert"
    with pytest.raises(ConfigError, match="must carry the task head.*base_model_name_or_path"):
        bank.export_peft("e", tmp_path / "peft2", task_class="BertForSequenceClassification")
    assert not (tmp_path / "peft2").exists()


def test_import_then_export_keeps_rslora_alpha_and_layers(tmp_path: Path) -> None:
    base_dir = _saved(tmp_path / "base", "LlamaForCausalLM", "llama")
    import transformers as T

    reference = peft.get_peft_model(
        T.LlamaForCausalLM.from_pretrained(base_dir).eval(),
        peft.LoraConfig(
            r=4,
            lora_alpha=8,
            use_rslora=True,
            target_modules=["q_proj", "v_proj"],
            layers_to_transform=[1],
            task_type="CAUSAL_LM",
        ),
    )
    _randomize_peft(reference)
    reference.save_pretrained(tmp_path / "adapter")
    bank = ExpertBank(tmp_path / "bank")
    bank.import_peft(tmp_path / "adapter", ExpertModel(load_backbone(str(base_dir))), "imp", TaskInfo("t"))
    out = bank.export_peft("imp", tmp_path / "again", task_type="CAUSAL_LM")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"], cfg["layers_to_transform"]) == (4, 8, True, [1])
    again = peft.AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    _all_lora_b_loaded(again, 2)
    inputs = {"input_ids": torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))}
    with torch.no_grad():
        assert (again(**inputs).logits - reference(**inputs).logits).abs().max().item() <= 1e-5


# ---------------------------------------------------------------------------------------------------------- item 11
def test_provenance_travels_with_the_export_and_back(tmp_path: Path) -> None:
    model = ExpertModel(FAMILIES["bert"].build()).eval()
    for i, name in enumerate(("a", "b")):
        model.add_expert(name, LoraConfig(r=2))
        _randomize(model, name, i)
    model.interpolate(["a", "b"])
    weights = model.interpolation_weights()
    model.collapse("ab")
    provenance = {"sources": ["a", "b"], "weights": weights, "similarities": {"a": 0.9, "b": 0.1}, "target": "t"}
    bank = ExpertBank(tmp_path / "bank")
    task = TaskInfo("tweets/t", label_names=["neg", "pos"], num_examples=32, shots=16)
    bank.add(Expert.from_model(model, "ab", task, metrics={"accuracy": 0.75}, provenance=provenance))
    out = bank.export_peft("ab", tmp_path / "peft")
    sidecar = json.loads((out / "pituning.json").read_text())
    assert sidecar["provenance"] == json.loads(json.dumps(provenance))
    assert sidecar["task"]["name"] == "tweets/t" and sidecar["task"]["label_names"] == ["neg", "pos"]
    card = (out / "README.md").read_text()
    assert "tweets/t" in card and '"sources"' in card and "library_name: peft" in card
    peft.PeftModel.from_pretrained(FAMILIES["bert"].build().model, str(out))  # PEFT ignores both files
    other = ExpertBank(tmp_path / "other")
    expert = other.import_peft(out, ExpertModel(FAMILIES["bert"].build()), "back", TaskInfo("t"))
    stored = other.get("back")
    for got in (expert, stored):
        assert got.provenance["sources"] == ["a", "b"]
        assert got.provenance["similarities"] == {"a": 0.9, "b": 0.1}
        assert got.provenance["pituning_export"]["task"]["name"] == "tweets/t"
        assert got.provenance["imported_from"] == str(out)
        assert got.metrics == {"accuracy": 0.75}


@pytest.mark.parametrize(
    ("sidecar", "match"),
    [
        ("{broken", "pituning.json: the pituning sidecar is not valid JSON"),
        ("[]", "pituning.json is not a pituning sidecar"),
        ('{"format": "pituning-expert", "schema": 99}', "pituning.json: schema 99"),
        ('{"format": "pituning-expert", "schema": 1, "provenance": [1]}', "'provenance' must be a JSON object"),
        ('{"format": "pituning-expert", "schema": 1, "metrics": {"acc": "high"}}', "metric 'acc'"),
    ],
)
def test_hostile_sidecars_are_refused(sidecar: str, match: str, tmp_path: Path) -> None:
    adapter = _plain_adapter(tmp_path / "adapter")
    _write(adapter / "pituning.json", sidecar)
    bank = ExpertBank(tmp_path / "bank")
    with pytest.raises(ConfigError, match=match):
        _import(bank, adapter)
    assert len(bank) == 0


# ---------------------------------------------------------------------------------------------------------- item 12
_BART_DESCRIPTION = {
    "family": "bart",
    "roles": {
        "blocks": r"(?:encoder|decoder)\.layers\.\d+",
        "query": r"(?:encoder|decoder)\.layers\.\d+\.(?:self_attn|encoder_attn)\.q_proj",
        "key": r"(?:encoder|decoder)\.layers\.\d+\.(?:self_attn|encoder_attn)\.k_proj",
        "value": r"(?:encoder|decoder)\.layers\.\d+\.(?:self_attn|encoder_attn)\.v_proj",
        "attn_out": r"(?:encoder|decoder)\.layers\.\d+\.(?:self_attn|encoder_attn)\.out_proj",
        "ffn_in": r"(?:encoder|decoder)\.layers\.\d+\.fc1",
        "ffn_out": r"(?:encoder|decoder)\.layers\.\d+\.fc2",
    },
}


@pytest.mark.parametrize("as_file", [False, True])
def test_cli_import_peft_takes_a_backbone_description(as_file: bool, tmp_path: Path) -> None:
    import transformers as T

    from pituning import BackboneDescription

    config = T.BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    T.BartModel(config).save_pretrained(tmp_path / "bart")
    reference = peft.get_peft_model(
        T.BartModel.from_pretrained(tmp_path / "bart").eval(),
        peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]),
    )
    _randomize_peft(reference)
    reference.save_pretrained(tmp_path / "adapter")
    description = json.dumps(_BART_DESCRIPTION)
    if as_file:
        (tmp_path / "bart.json").write_text(description)
        description = str(tmp_path / "bart.json")
    args = ["bank", "import-peft", "--bank", str(tmp_path / "bank"), str(tmp_path / "adapter"), "--name", "b"]
    assert main([*args, "--backbone", str(tmp_path / "bart")]) == 2  # no preset for BART
    assert main([*args, "--backbone", str(tmp_path / "bart"), "--backbone-description", description]) == 0
    model = ExpertModel(
        load_backbone(str(tmp_path / "bart"), description=BackboneDescription(**_BART_DESCRIPTION))  # type: ignore[arg-type]
    ).eval()
    ExpertBank(tmp_path / "bank").load_into(model, "b")
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (reference(input_ids=ids).last_hidden_state - model(input_ids=ids).last_hidden_state).abs().max()
    assert diff.item() <= 1e-5
    assert main([*args[:-2], "--name", "c", "--backbone", "x", "--backbone-description", "[1]"]) == 2


def test_cli_export_peft_takes_a_task_class(tmp_path: Path) -> None:
    base_dir = _saved(tmp_path / "base", "BertForSequenceClassification", "bert")
    _lora_bank(tmp_path, base_dir)
    out = tmp_path / "peft"
    args = ["bank", "export-peft", "--bank", str(tmp_path / "bank"), "e", str(out)]
    assert main([*args, "--task-class", "BertForSequenceClassification"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    assert main([*args[:-1], str(tmp_path / "x"), "--task-type", "NOPE"]) == 2


def test_errors_are_pituning_errors() -> None:
    assert issubclass(ConfigError, PiTuningError)
