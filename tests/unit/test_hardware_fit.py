"""A device or quantization that does not fit this machine or this base is refused before any model
loads, with a message that names the INCREMENTAL_* setting and the fix."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from incremental.errors import ConfigurationError
from incremental.modeling import Hardware, check_base_fits, load_base, resolve_base_for
from incremental.settings import Settings

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")


def settings(tmp_path: Path, **values) -> Settings:
    return Settings(_env_file=None, embedded_cache_dir=tmp_path / "embedded", **values)


@NO_CUDA
def test_cuda_without_a_gpu_names_the_device_setting(tmp_path):
    with pytest.raises(ConfigurationError, match="INCREMENTAL_DEVICE=cuda, but .*; set INCREMENTAL_DEVICE=cpu"):
        Hardware.from_settings(settings(tmp_path, device="cuda"))
    # A run refuses it at its first model stage, before the embedded base is built (that trains a model).
    with pytest.raises(ConfigurationError, match="INCREMENTAL_DEVICE"):
        resolve_base_for(settings(tmp_path, device="cuda"), None, None)
    assert not (tmp_path / "embedded").exists()
    with pytest.raises(ConfigurationError, match="INCREMENTAL_DEVICE"):
        load_base(str(tmp_path / "no-model-here"), None, Hardware(device="cuda", quantization="none"))


# Runs in a fresh interpreter where `import bitsandbytes` fails, as on a machine without it.
_WITHOUT_BITSANDBYTES = """
import sys
sys.modules["bitsandbytes"] = None
from incremental.errors import ConfigurationError
from incremental.modeling import Hardware
from incremental.settings import Settings

for quantization in ("none", "4bit"):
    try:
        Hardware.from_settings(Settings(_env_file=None, device="cpu", quantization=quantization))
        print(quantization, "accepted")
    except ConfigurationError as exc:
        print(quantization, "refused:", exc)
"""


def test_4bit_without_bitsandbytes_names_the_quantization_setting():
    done = subprocess.run([sys.executable, "-c", _WITHOUT_BITSANDBYTES], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "none accepted"
    assert lines[1].startswith("4bit refused: INCREMENTAL_QUANTIZATION=4bit")
    assert "bitsandbytes, which cannot be imported" in lines[1]
    assert "pip install 'bitsandbytes" in lines[1] and "set INCREMENTAL_QUANTIZATION=none" in lines[1]


def stored_base(folder: Path, quantization_config: dict | None) -> Path:
    """A base folder with only a config.json: loading weights from it would fail, so a refusal
    proves the check ran before any model loads."""
    extra = {} if quantization_config is None else {"quantization_config": quantization_config}
    LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, **extra).save_pretrained(folder)
    return folder


GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128}
BNB_4BIT = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
BNB_8BIT = {"quant_method": "bitsandbytes", "load_in_8bit": True}


@pytest.mark.parametrize(
    ("stored", "quantization", "message"),
    [
        (GPTQ, "4bit", "stored quantized as gptq, which INCREMENTAL_QUANTIZATION=4bit cannot load as asked; use the model's full-precision release"),
        (GPTQ, "none", "stored quantized as gptq, which INCREMENTAL_QUANTIZATION=none cannot load"),
        (BNB_8BIT, "4bit", "stored quantized as bitsandbytes 8-bit, which INCREMENTAL_QUANTIZATION=4bit"),
        (BNB_4BIT, "none", "bitsandbytes 4-bit, which INCREMENTAL_QUANTIZATION=none cannot load as asked; set INCREMENTAL_QUANTIZATION=4bit"),
    ],
    ids=["gptq-4bit", "gptq-none", "bnb8-4bit", "bnb4-none"],
)  # fmt: skip
def test_a_base_stored_quantized_otherwise_is_refused_before_loading(tmp_path, stored, quantization, message):
    folder = stored_base(tmp_path / "base", stored)
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        load_base(str(folder), None, Hardware(device="cpu", quantization=quantization))


@pytest.mark.parametrize(
    ("stored", "quantization"), [(None, "4bit"), (None, "none"), (BNB_4BIT, "4bit")], ids=["float-4bit", "float-none", "bnb4-4bit"]
)
def test_a_base_that_fits_passes(tmp_path, stored, quantization):
    check_base_fits(str(stored_base(tmp_path / "base", stored)), None, Hardware(device="cpu", quantization=quantization))


@pytest.mark.parametrize("share", ["1.01", "-0.01"])
def test_an_invented_name_share_outside_0_1_names_the_setting(monkeypatch, share):
    monkeypatch.setenv("INCREMENTAL_EMBEDDED_INVENTED_NAME_SHARE", share)
    with pytest.raises(ValueError, match="embedded_invented_name_share"):
        Settings(_env_file=None)


@pytest.mark.parametrize("share", ["0", "1"])
def test_an_invented_name_share_of_0_or_1_is_accepted(monkeypatch, share):
    monkeypatch.setenv("INCREMENTAL_EMBEDDED_INVENTED_NAME_SHARE", share)
    assert Settings(_env_file=None).embedded_invented_name_share == float(share)


def test_a_lineage_on_one_embedded_base_is_not_continued_on_another():
    """Switching INCREMENTAL_EMBEDDED_INVENTED_NAME_SHARE builds another base: a parent's adapter does not
    fit it, and the refusal names the setting rather than INCREMENTAL_BASE_MODEL."""
    from incremental.manifest import BaseModelRef
    from incremental.modeling import check_same_base

    parent = BaseModelRef(id="embedded", revision="9ba752df4664f96e")
    check_same_base(parent, BaseModelRef(id="embedded", revision="9ba752df4664f96e"), "v3_20261207_120000")
    with pytest.raises(ConfigurationError, match="INCREMENTAL_EMBEDDED_INVENTED_NAME_SHARE") as refused:
        check_same_base(parent, BaseModelRef(id="embedded", revision="f14088929daf99ca"), "v3_20261207_120000")
    assert "9ba752df4664f96e" in str(refused.value) and "f14088929daf99ca" in str(refused.value)
