"""`tokenmill quantize` reads a GGUF file too: the folder it writes has a config and tokenizer of its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.gguf_files import make_gguf
from tests.quant.test_quantize_cli import logits_of
from tokenmill.cli import main
from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.quant.codes import QuantSpec
from tokenmill.tools.dequantized_copy import write_dequantized_copy

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_quantize_a_gguf_file_into_a_complete_folder(tmp_path: Path) -> None:
    gguf = make_gguf("llama", tmp_path / "src")
    out = tmp_path / "q"
    assert main(["quantize", str(gguf), "--method", "int8", "--algo", "gptq", "--samples", "8", "--window", "48",
                 "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert QuantSpec.from_config(config["quantization_config"]) == QuantSpec("int8")
    text = "def f(x):\n    return x + 1\n"
    assert Tokenizer.from_pretrained(out).encode(text) == Tokenizer.from_gguf(gguf).encode(text)
    twin = write_dequantized_copy(out, tmp_path / "twin")
    reference, quantized = logits_of(tmp_path / "src" / "hf"), logits_of(twin)
    assert ((quantized - reference).norm() / reference.norm()).item() < 0.05
    assert not torch.equal(quantized, reference)
