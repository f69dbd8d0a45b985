"""Model resolution: the offline default, local folders, s3:// uploads, and clear errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import S3Server, s3_settings

from ray_app.models import ModelResolutionError, resolve_model
from ray_app.settings import load_settings
from ray_app.storage import open_store


def save_tiny_llama(folder: Path) -> Path:
    """A two-layer Llama built from a config (no download), with a tiny tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_local_folder_resolves_to_itself(tmp_path):
    folder = save_tiny_llama(tmp_path / "tiny")
    assert resolve_model(str(folder), load_settings(home=tmp_path)) == folder


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("/no/such/folder", "no such model folder"),
        ("gs://bucket/model", "accepted: None/'default'"),
        ("not a model", "accepted: None/'default'"),
        ("s3://only-a-bucket", "names a bucket, not a model folder"),
    ],
)
def test_unresolvable_reference_names_the_accepted_forms(tmp_path, ref, expected):
    with pytest.raises(ModelResolutionError, match=re.escape(expected)):
        resolve_model(ref, load_settings(home=tmp_path))


def test_folder_without_config_is_rejected(tmp_path):
    (tmp_path / "notamodel").mkdir()
    with pytest.raises(ModelResolutionError, match=r"no config\.json"):
        resolve_model(str(tmp_path / "notamodel"), load_settings(home=tmp_path))


def test_hub_id_offline_fails_with_a_clear_error(tmp_path):
    with pytest.raises(ModelResolutionError, match="cannot fetch hub model 'HuggingFaceTB/SmolLM2-135M-Instruct'"):
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", load_settings(home=tmp_path))


def test_s3_model_is_downloaded_once_and_loads(s3_server: S3Server, tmp_path):
    from transformers import AutoModelForCausalLM

    settings = s3_settings(s3_server, tmp_path / "home", bucket="models-test")
    store = open_store(settings=settings)
    store.ensure()
    store.upload_dir(save_tiny_llama(tmp_path / "tiny"), "tiny/v1", progress=False)

    first = resolve_model("s3://models-test/store/tiny/v1", settings)
    assert first == settings.model_cache_dir / "s3" / "models-test" / "store" / "tiny" / "v1"
    model = AutoModelForCausalLM.from_pretrained(first)
    assert model.config.num_hidden_layers == 2

    stamp = (first / "config.json").stat().st_mtime_ns
    assert resolve_model("s3://models-test/store/tiny/v1", settings) == first
    assert (first / "config.json").stat().st_mtime_ns == stamp  # cached, not fetched again


def test_missing_s3_model_says_there_is_no_complete_upload(s3_server: S3Server, tmp_path):
    settings = s3_settings(s3_server, tmp_path / "home", bucket="models-test")
    open_store(settings=settings).ensure()
    with pytest.raises(ModelResolutionError, match="no complete model folder"):
        resolve_model("s3://models-test/store/missing/v9", settings)


@pytest.mark.slow
def test_default_model_resolves_offline_and_answers_paris(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings = load_settings(home=tmp_path_factory.mktemp("default-model"))
    folder = resolve_model(None, settings)
    assert folder.name == "SmolLM2-135M-Instruct"
    assert (folder / "model.safetensors").is_file()
    assert resolve_model("default", settings) == folder

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert tokenizer.chat_template, "the chat template must survive the conversion"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_a_folder_with_only_pickle_weights_is_refused_unless_allowed(tmp_path):
    folder = save_tiny_llama(tmp_path / "tiny")
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not even read")
    with pytest.raises(ModelResolutionError, match=r"pickle weights \(pytorch_model.bin\).*LLMOPS_ALLOW_PICKLE"):
        resolve_model(str(folder), load_settings(home=tmp_path))
    assert resolve_model(str(folder), load_settings(home=tmp_path, allow_pickle_weights=True)) == folder
