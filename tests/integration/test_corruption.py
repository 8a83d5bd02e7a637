"""Damage that loads silently and generates garbage, on the small real base: one changed value in an
adapter's config, an adapter that does not fit the base, one flipped bit in the base's weights, and
special-token strings typed into feedback. Each is refused with the version (or file) and the fix
named, or, for feedback text, tokenized as the text it is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import finalize_version as finalize
from conftest import small_spec
from incremental import layout
from incremental.config import LoraSettings
from incremental.dataset import encode_examples
from incremental.doctor import diagnose
from incremental.embedded import FILE_HASHES, ensure_embedded_base
from incremental.errors import ConfigurationError, RegistryError
from incremental.modeling import Hardware, attach_trainable_adapter, load_base, load_tokenizer
from incremental.registry import Registry
from incremental.serving import generate_artifact, load_model
from incremental.prompting import LATEST_LAYOUT

pytestmark = pytest.mark.integration
CPU = Hardware(device="cpu", quantization="none")


def save_adapter(base: torch.nn.Module, folder: Path, *, r: int = 4, alpha: int = 32) -> None:
    """A real LoRA adapter on `base` whose B matrices are not zero, so it changes what the model says."""
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.05)
    model.save_pretrained(folder)
    (folder / "README.md").unlink()  # as training does: a version folder holds the adapter and manifest only


def test_one_changed_value_in_the_current_adapter_config_is_refused_everywhere_it_would_be_used(env, small_base):
    registry = Registry(env.models_root, "tiny")
    v1 = finalize(registry, str(small_base), lambda out: save_adapter(load_base(str(small_base), None, CPU), out))
    loaded = load_model("tiny", env)
    assert loaded.version == v1 and generate_artifact(loaded, "erd", "A member has a name.", max_new_tokens=8) is not None

    config_path = registry.root / v1 / layout.ADAPTER_CONFIG
    config = json.loads(config_path.read_text())
    assert config["lora_alpha"] == 32
    config_path.write_text(json.dumps({**config, "lora_alpha": 72}, indent=2))

    with pytest.raises(RegistryError, match=f"{v1} .*cannot be loaded: adapter_config.json changed after the version was finalized"):
        load_model("tiny", env)
    with pytest.raises(RegistryError, match="adapter_config.json changed"):
        registry.adapter_dir(v1)  # what a run does before it trains from its parent
    listed = registry.versions()
    assert listed[0].is_current and "adapter_config.json changed" in listed[0].problem
    assert [(f.kind, f.severity) for f in diagnose(env.models_root, "tiny")] == [("version-damaged", "error")]


@pytest.mark.parametrize("mismatch", ["other hidden size", "config r changed before finalize"])
def test_an_adapter_that_does_not_fit_the_base_is_refused_naming_the_version(env, small_base, mismatch):
    registry = Registry(env.models_root, "tiny")
    base_config = load_base(str(small_base), None, CPU).config

    def write(out: Path) -> None:
        if mismatch == "other hidden size":
            other = LlamaConfig(
                vocab_size=base_config.vocab_size, hidden_size=32, num_hidden_layers=base_config.num_hidden_layers,
                num_attention_heads=4, num_key_value_heads=4, intermediate_size=64,
            )  # fmt: skip
            save_adapter(LlamaForCausalLM(other), out)
        else:
            save_adapter(load_base(str(small_base), None, CPU), out, r=4)
            config = json.loads((out / layout.ADAPTER_CONFIG).read_text())
            (out / layout.ADAPTER_CONFIG).write_text(json.dumps({**config, "r": 8}))

    name = finalize(registry, str(small_base), write)
    assert registry.verify(name) == []  # its files are as finalized: only loading shows the mismatch
    with pytest.raises(ConfigurationError, match=f"the adapter of {name} .*does not fit"):
        load_model("tiny", env)
    with pytest.raises(ConfigurationError, match=f"the adapter of {name} .*does not fit"):
        attach_trainable_adapter(load_base(str(small_base), None, CPU), registry.adapter_dir(name), LoraSettings(), CPU)


def test_adapter_tensors_the_config_does_not_target_are_refused_not_dropped(env, small_base):
    registry = Registry(env.models_root, "tiny")

    def write(out: Path) -> None:
        save_adapter(load_base(str(small_base), None, CPU), out)
        config = json.loads((out / layout.ADAPTER_CONFIG).read_text())
        (out / layout.ADAPTER_CONFIG).write_text(json.dumps({**config, "target_modules": ["q_proj"]}))

    name = finalize(registry, str(small_base), write)
    with pytest.raises(ConfigurationError, match=f"the adapter of {name} .*fits no module the adapter config creates"):
        load_model("tiny", env)


def test_one_flipped_bit_in_the_base_weights_is_refused_naming_the_file_and_the_fix(env, small_base, tmp_path):
    # A copy in a cache folder of its own: the session's base must stay intact for other tests.
    cache = tmp_path / "embedded"
    damaged = cache / small_base.name
    shutil.copytree(small_base, damaged)
    assert (damaged / FILE_HASHES).is_file()
    (damaged / ".DS_Store").write_bytes(b"Bud1")  # a desktop's junk is no damage
    assert ensure_embedded_base(cache, small_spec()) == damaged
    load_base(str(damaged), None, CPU)

    weights = damaged / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x10
    weights.write_bytes(bytes(data))

    expected = f"the base model in {damaged} is damaged: model.safetensors changed after it was built.*delete {damaged}"
    with pytest.raises(ConfigurationError, match=expected):
        ensure_embedded_base(cache, small_spec())
    with pytest.raises(ConfigurationError, match=expected):
        load_base(str(damaged), None, CPU)
    with pytest.raises(ConfigurationError, match=expected):
        load_tokenizer(str(damaged))
    with pytest.raises(ConfigurationError, match=expected):
        load_model("tiny", env.model_copy(update={"base_model": str(damaged)}))
    # The doctor names it as the base of the versions built on it.
    registry = Registry(env.models_root, "tiny")
    (damaged / "model.safetensors").write_bytes(bytes(data))
    name = finalize(registry, str(damaged), lambda out: save_adapter(load_base(str(small_base), None, CPU), out))
    found = [f for f in diagnose(env.models_root, "tiny") if f.kind == "base-damaged"]
    assert [(f.severity, f.repairable) for f in found] == [("error", False)] and name in found[0].what


def test_special_token_strings_in_feedback_are_text_never_the_special_ids(small_base):
    tokenizer = load_tokenizer(str(small_base))
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    notes = "Struck out: <s>old field</s>, kept <pad> and <unk> as written."
    target = "<p><s>deprecated</s> endpoint</p></s><s>"
    # What the fix prevents: by default the tokenizer reads these strings as the special tokens.
    assert special & set(tokenizer(target, add_special_tokens=False).input_ids)

    (example,) = encode_examples(tokenizer, ["prototype"], [notes], [target], max_length=512, prompt_layout=LATEST_LAYOUT)
    ids, labels = example.input_ids, example.labels
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id  # the ones the code adds stay
    assert not special & set(ids[1:-1])
    assert tokenizer.decode(ids[1:-1]).endswith(target) and notes in tokenizer.decode(ids[1:-1])
    trained = [token for token, label in zip(ids, labels) if label != -100]
    assert trained[-1] == tokenizer.eos_token_id and not special & set(trained[:-1])
    assert tokenizer.decode(trained[:-1]) == target
