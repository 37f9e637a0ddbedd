"""Quantization-aware training: the straight-through fake quantization, and the exported quantized model beats
round-to-nearest applied after plain training on the same tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer

from tests.training.test_train import TINY, cli, write_toy_corpus
from tokenmill.quant.codes import QuantSpec
from tokenmill.quant.weight_quantizer import WeightQuantizer
from tokenmill.tools.dequantized_copy import write_dequantized_copy
from tokenmill.tools.quantize_model import QuantizeOptions, quantize_checkpoint
from tokenmill_train.checkpoint_io import load_hf_model
from tokenmill_train.qat import fake_quantized

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 40
W2 = ["--qat", "w2", "--qat-group-size", "32"]


def test_fake_quantization_is_straight_through() -> None:
    weight = torch.randn(8, 64, requires_grad=True)
    quantizer = WeightQuantizer(QuantSpec("int4", 32, True))
    out = fake_quantized(weight, quantizer)
    assert torch.equal(out.detach(), quantizer.fake(weight.detach()))
    (out * torch.arange(64.0)).sum().backward()
    assert torch.equal(weight.grad, torch.arange(64.0).expand(8, 64))  # the gradient passes to w unchanged


def heldout_loss(folder: Path, text: str) -> float:
    """Next-token loss of a checkpoint folder's model on text, in rows of the tiny context."""
    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids[: 16 * 64]
    rows = torch.tensor(ids).reshape(-1, 64)
    model = load_hf_model(folder).eval()
    with torch.no_grad():
        logits = model(rows)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1)).item()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qat")
    corpus = write_toy_corpus(root / "corpus")
    common = ["--data", str(corpus), "--max-steps", str(STEPS), "--save-every", "0", *TINY]
    cli(["train", *common, "--out", str(root / "plain")])
    log = cli(["train", *common, "--out", str(root / "qat"), *W2])
    assert "linear layers fake-quantized" in log
    return {"root": root, "plain": root / "plain", "qat": root / "qat"}


def test_export_holds_exactly_the_weights_the_forward_used(runs: dict[str, Path]) -> None:
    quantized = runs["qat"] / "quantized"
    config = json.loads((quantized / "config.json").read_text())
    assert QuantSpec.from_config(config["quantization_config"]) == QuantSpec("w2", 32, True)
    summary = json.loads((runs["qat"] / "training_summary.json").read_text())
    assert summary["qat"]["dir"] == str(quantized)
    float_weights = load_file(runs["qat"] / "model.safetensors")
    twin = load_file(write_dequantized_copy(quantized, runs["root"] / "qat_twin") / "model.safetensors")
    quantizer = WeightQuantizer(QuantSpec("w2", 32, True))
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(twin[name], quantizer.fake(float_weights[name]))


def test_qat_export_beats_rtn_after_plain_training(runs: dict[str, Path]) -> None:
    text = "".join(p.read_text() for p in sorted((write_toy_corpus(runs["root"] / "eval", seed=7) / "pkg").glob("*.py")))
    plain_tokenizer = (runs["plain"] / "tokenizer.json").read_text()
    assert plain_tokenizer == (runs["qat"] / "tokenizer.json").read_text()  # same ids: the losses compare
    rtn_dir = runs["root"] / "plain_w2"
    quantize_checkpoint(runs["plain"], rtn_dir, QuantizeOptions("w2", "rtn", 32), log=lambda line: None)
    rtn_loss = heldout_loss(write_dequantized_copy(rtn_dir, runs["root"] / "plain_w2_twin"), text)
    qat_loss = heldout_loss(write_dequantized_copy(runs["qat"] / "quantized", runs["root"] / "qat_w2_twin"), text)
    float_loss = heldout_loss(runs["plain"], text)
    assert qat_loss < rtn_loss - 0.05, (float_loss, rtn_loss, qat_loss)
