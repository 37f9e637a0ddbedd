"""`tokenmill quantize` writes a complete checkpoint folder in the canonical layout, whose dequantized twin
stays close to the float model; bad flags are refused with errors that name the flag."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.checkpoints import make_checkpoint
from tokenmill.attention.metadata import build_attention_metadata, forward_context
from tokenmill.cli import main
from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.models.loader import load_model
from tokenmill.quant.calibration import heldout_code_text
from tokenmill.quant.codes import QuantSpec
from tokenmill.tools.dequantized_copy import write_dequantized_copy
from tokenmill.worker.kv_cache_alloc import allocate_kv_caches

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return make_checkpoint("llama", tmp_path_factory.mktemp("llama"))


def logits_of(folder: Path) -> torch.Tensor:
    """Logits on held-out code: text like the calibration's (quantizing for random ids is not the goal)."""
    model, _ = load_model(folder, dtype=torch.float32)
    allocate_kv_caches(model.attention_layers(), 8, 16, torch.float32, torch.device("cpu"))
    ids = Tokenizer.from_pretrained(folder).encode(heldout_code_text()[:5000], add_special_tokens=False)[:128]
    metadata = build_attention_metadata([0], [len(ids)], [list(range(8))], 16, torch.device("cpu"))
    with torch.no_grad(), forward_context(metadata):
        return model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids))))


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


@pytest.mark.parametrize(("flags", "spec", "max_rel_err"), [
    (["--method", "int8"], QuantSpec("int8"), 0.05),
    (["--method", "int8", "--algo", "gptq"], QuantSpec("int8"), 0.05),
    (["--method", "int4", "--group-size", "32", "--algo", "gptq"], QuantSpec("int4", 32), 0.4),
    (["--method", "int4", "--group-size", "32", "--zero-point", "--algo", "awq"], QuantSpec("int4", 32, True), 0.4),
    (["--method", "w2", "--group-size", "32"], QuantSpec("w2", 32, True), 1.5),
    (["--method", "fp8"], QuantSpec("fp8"), 0.15),
])
def test_quantize_writes_a_canonical_folder(llama: Path, tmp_path: Path, capsys, flags: list[str], spec: QuantSpec,
                                            max_rel_err: float) -> None:
    out = tmp_path / "q"
    assert main(["quantize", str(llama), *flags, "--samples", "8", "--window", "48", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "MB ->" in printed
    if "--algo" in flags and flags[flags.index("--algo") + 1] in ("gptq", "awq"):
        assert "calibration (8 windows)" in printed
    config = json.loads((out / "config.json").read_text())
    assert QuantSpec.from_config(config["quantization_config"]) == spec
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "tokenizer.json",
                                               "tokenizer_config.json", "generation_config.json"}
    tensors = read_tensors(out)
    source = read_tensors(llama)
    for layer in range(2):
        for linear in LINEARS:
            name = f"model.layers.{layer}.{linear}"
            rows, width = source[f"{name}.weight"].shape
            assert f"{name}.weight" not in tensors
            assert tensors[f"{name}.qweight"].shape == spec.qweight_shape(rows, width)
            assert tensors[f"{name}.qweight"].dtype == spec.qweight_dtype()
            assert tensors[f"{name}.scales"].shape == (rows, spec.groups(width))
            assert tensors[f"{name}.scales"].dtype == torch.float32
            assert (f"{name}.qzeros" in tensors) == (spec.method in ("int4", "w2"))
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.0.input_layernorm.weight"):
        assert tensors[name].dtype == torch.float32 and tensors[name].shape == source[name].shape
    # The quantized model (its dequantized twin) computes nearly what the float model does.
    reference = logits_of(llama)
    quantized = logits_of(write_dequantized_copy(out, tmp_path / "float_twin"))
    error = ((quantized - reference).norm() / reference.norm()).item()
    assert 0 < error < max_rel_err, error


@pytest.mark.parametrize("method", ["int4", "w2"])
def test_gptq_output_is_closer_to_the_float_model_than_rtn(llama: Path, tmp_path: Path, method: str) -> None:
    reference = logits_of(llama)
    errors = {}
    for algo in ("rtn", "gptq"):
        out = tmp_path / algo
        main(["quantize", str(llama), "--method", method, "--group-size", "32", "--algo", algo, "--samples", "32",
              "--window", "64", "--out", str(out)])
        logits = logits_of(write_dequantized_copy(out, tmp_path / f"{algo}_twin"))
        errors[algo] = ((logits - reference).norm() / reference.norm()).item()
    assert errors["gptq"] < errors["rtn"]


def test_the_source_folder_is_never_overwritten(llama: Path, capsys) -> None:
    assert main(["quantize", str(llama), "--method", "int8", "--out", str(llama)]) == 2
    assert f"out: {llama} is the source checkpoint" in capsys.readouterr().err
    assert (llama / "model.safetensors").is_file() and "quantization_config" not in (llama / "config.json").read_text()


@pytest.mark.parametrize(("flags", "message"), [
    (["--method", "nf4"], "method: unknown method 'nf4'"),
    (["--method", "int4", "--algo", "smoothquant"], "algo: unknown algorithm 'smoothquant'"),
    (["--method", "int4", "--group-size", "48"], "group size 48 does not divide the layer width 64"),
    (["--method", "int4", "--group-size", "12"], "multiple of 8, got 12"),
    (["--method", "fp8", "--algo", "awq"], "fp8 is per-channel round-to-nearest or GPTQ, got 'awq'"),
    (["--method", "int4", "--algo", "fit"], "the alternating fit needs group-wise codes with a zero-point"),
    (["--method", "int4", "--group-size", "32", "--algo", "gptq", "--calibration", "/nonexistent.txt"],
     "calibration: /nonexistent.txt: no such file"),
    (["--method", "int4", "--group-size", "32", "--algo", "gptq", "--samples", "0"], "samples: must be at least 1"),
])
def test_bad_flags_are_refused_with_a_clear_error(llama: Path, tmp_path: Path, capsys, flags: list[str],
                                                  message: str) -> None:
    assert main(["quantize", str(llama), *flags, "--out", str(tmp_path / "q")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "q" / "model.safetensors").exists()


@pytest.mark.parametrize("family", ["qwen3", "phi3", "gemma3", "qwen3_moe"])  # q/k norms, fused checkpoint
def test_other_families_quantize_and_load(family: str, tmp_path: Path) -> None:  # tensors, Gemma norms, experts
    source = make_checkpoint(family, tmp_path / "src")
    out = tmp_path / "q"
    assert main(["quantize", str(source), "--method", "int8", "--algo", "awq", "--samples", "8", "--window", "48",
                 "--out", str(out)]) == 0
    reference = logits_of(source)
    quantized = logits_of(write_dequantized_copy(out, tmp_path / "twin"))
    assert 0 < ((quantized - reference).norm() / reference.norm()).item() < 0.05


@pytest.mark.parametrize("flags", [["--method", "int4", "--group-size", "32", "--algo", "gptq"],
                                   ["--method", "w2", "--group-size", "32"],  # fractional zero-points
                                   ["--method", "int8", "--algo", "awq"], ["--method", "fp8"]])
def test_the_engine_loader_reads_the_folder_as_its_dequantized_twin(llama: Path, tmp_path: Path,
                                                                    flags: list[str]) -> None:
    """The loader's own reading of tokenmill checkpoints (models/quantized_checkpoint.py, dequantizing for a float
    model) agrees with the twin this tool's tests measure."""
    out = tmp_path / "q"
    assert main(["quantize", str(llama), *flags, "--samples", "8", "--window", "48", "--out", str(out)]) == 0
    assert torch.equal(logits_of(out), logits_of(write_dequantized_copy(out, tmp_path / "twin")))
