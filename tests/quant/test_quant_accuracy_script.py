"""benchmarks/quant_accuracy.py runs end to end on a tiny model in --fake-quant mode and reports sane figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks.quant_accuracy import run
from tests.checkpoints import make_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_accuracy_script_on_a_tiny_model(tmp_path: Path, capsys) -> None:
    model = make_checkpoint("llama", tmp_path / "model")
    out = tmp_path / "acc.json"
    rows = run(["--model", str(model), "--configs", "int8:rtn", "w2:rtn:32", "w2:gptq:32", "--fake-quant",
                "--work-dir", str(tmp_path / "work"), "--window", "64", "--max-tokens", "512", "--samples", "8",
                "--calib-window", "64", "--dtype", "float32", "--json", str(out), "--quiet"])
    table = capsys.readouterr().out
    assert "int8:rtn" in table and "vs float32" in table  # relative to the unquantized run in the same dtype
    assert table.count("row: ") == 4  # each row printed as it is measured, before the table
    saved = json.loads(out.read_text())
    assert [r["config"] for r in saved["rows"]] == ["float32", "int8:rtn", "w2:rtn:32", "w2:gptq:32"]
    assert saved["tokens"] == {"english": 512, "code": 512}
    by_config = {r.config: r for r in rows}
    for name in ("english", "code"):
        assert math.isfinite(by_config["float32"].perplexity[name])
        assert abs(by_config["int8:rtn"].relative[name]) < 0.02  # int8 barely moves a model
        # A random-weight model has no accuracy to lose, but 2-bit moves its perplexity more than int8 does.
        assert abs(by_config["w2:rtn:32"].relative[name]) > abs(by_config["int8:rtn"].relative[name])
    assert (tmp_path / "work" / "w2-gptq-32" / "model.safetensors").is_file()
    # Quantizing is timed in wall and CPU seconds (the summary's time budget is checked against them).
    assert all(r.quantize_seconds > 0 and r.quantize_cpu_seconds > 0 for r in rows[1:])
    assert saved["rows"][3]["quantize_cpu_seconds"] == rows[3].quantize_cpu_seconds
    # A second run reuses the quantized folders instead of making them again.
    again = run(["--model", str(model), "--configs", "int8:rtn", "--fake-quant", "--work-dir", str(tmp_path / "work"),
                 "--window", "64", "--max-tokens", "512", "--dtype", "float32", "--quiet"])
    assert again[1].quantize_seconds is None and again[1].quantize_cpu_seconds is None and again[1].perplexity == by_config["int8:rtn"].perplexity


def test_perplexity_from_prompt_logprobs_equals_transformers(tmp_path: Path) -> None:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from benchmarks.quant_accuracy import perplexity
    from tokenmill import LLM

    model = make_checkpoint("llama", tmp_path / "model")
    windows = [torch.randint(8, 512, (40,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(3)]
    ours = perplexity(LLM(model=str(model), dtype="float32", compile=False, max_model_len=64), windows)
    reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        ids = torch.tensor(windows)
        logits = reference(ids).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert ours == pytest.approx(math.exp(nll.item()), rel=1e-4)
