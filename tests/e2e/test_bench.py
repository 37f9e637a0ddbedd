"""The bench recipes run end to end and report consistent counts (correctness, not speed)."""

from __future__ import annotations

import json

import pytest
import torch

from tokenmill.bench.recipes import run_latency, run_throughput
from tokenmill.cli import main
from tokenmill.config import CacheConfig, EngineConfig
from tokenmill.engine.engine import LLMEngine
from tokenmill.tools.tiny_checkpoint import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), max_position_embeddings=512))


@pytest.mark.parametrize("batch_size", [1, 3])
def test_latency_recipe_reports_the_bandwidth_ceiling(tiny_path, batch_size):
    from tokenmill.bench.roofline import kv_bytes_per_sequence, weight_bytes_per_step

    engine = LLMEngine(EngineConfig(model=tiny_path, dtype="float32"))
    result = run_latency(engine, input_len=16, output_len=8, batch_size=batch_size, runs=2)
    assert len(result.runs_tok_per_s) == 2 and result.tok_per_s > 0
    assert result.bandwidth_kind == "read" and result.bandwidth_gb_per_s > 0
    kv_bytes = kv_bytes_per_sequence(engine.model, 16 + 8 // 2, torch.float32)  # mid-output context
    assert result.bytes_per_step == weight_bytes_per_step(engine.model, batch_size) + batch_size * kv_bytes
    ceiling = batch_size * result.bandwidth_gb_per_s * 1e9 / result.bytes_per_step
    assert result.ceiling_tok_per_s == pytest.approx(ceiling)
    assert result.pct_of_ceiling == pytest.approx(100 * result.tok_per_s / result.ceiling_tok_per_s)
    assert result.achieved_gb_per_s == pytest.approx(result.bytes_per_step * result.tok_per_s / batch_size / 1e9)
    assert not engine.has_unfinished_requests()


def test_throughput_recipe_counts_tokens_and_preemptions(tiny_path):
    # 40 blocks x 16 = 640 slots, less than 12 requests need at once: preemption is counted.
    engine = LLMEngine(EngineConfig(model=tiny_path, dtype="float32", max_model_len=512, cache=CacheConfig(num_kv_blocks=40)))
    result = run_throughput(engine, num_requests=12, min_len=20, max_len=80, seed=1)
    assert result.num_requests == 12
    assert result.total_tokens > result.output_tokens >= 12 * 20
    assert result.peak_kv_blocks_used <= 40
    assert result.num_preemptions > 0
    assert engine.kv_manager.num_used_blocks == 0


def _printed_rows(text: str) -> dict[str, str]:
    """The printed table's rows: two-space indent, name, two or more spaces, value."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("  ") and "  " in line.strip():
            name, value = line.strip().split("  ", 1)
            rows[name] = value.strip()
    return rows


def _number(value: str) -> float:
    return float(value.replace(",", "").rstrip("x"))


def test_bench_command_with_random_weights_from_a_config(tiny_path, tmp_path, capsys):
    out = tmp_path / "result.json"
    code = main(["bench", "latency", "--model-config", f"{tiny_path}/config.json", "--dtype", "float32",
                 "--input-len", "8", "--output-len", "4", "--runs", "1", "--device", "cpu", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    result = report["result"]
    assert report["recipe"] == "latency" and result["output_len"] == 4
    assert result["pct_of_ceiling"] == pytest.approx(100 * result["tok_per_s"] / result["ceiling_tok_per_s"])
    rows = _printed_rows(capsys.readouterr().out)
    assert _number(rows["ceiling tok/s"]) == pytest.approx(result["ceiling_tok_per_s"], rel=1e-3)
    assert _number(rows["% of ceiling"]) == pytest.approx(result["pct_of_ceiling"], rel=1e-3, abs=1e-3)
    assert not any(key.startswith("sol") for key in result)
    assert rows["cuda graphs"] == "no" and report["cuda_graph_sizes"] == []  # a CPU run captures none


def test_transformers_peer_runs_at_the_same_batch_size(tiny_path, tmp_path, capsys):
    out = tmp_path / "peer.json"
    code = main(["bench", "latency", "--model", tiny_path, "--dtype", "float32", "--input-len", "8",
                 "--output-len", "5", "--batch-size", "3", "--runs", "1", "--device", "cpu",
                 "--peer", "transformers", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    peer = report["peer_transformers"]
    assert (peer["batch_size"], peer["input_len"], peer["output_len"]) == (3, 8, 5)
    assert peer["tok_per_s"] > 0 and len(peer["runs_tok_per_s"]) == 1
    assert peer["tokenmill_over_transformers"] == pytest.approx(report["result"]["tok_per_s"] / peer["tok_per_s"])
    rows = _printed_rows(capsys.readouterr().out)
    assert _number(rows["tokenmill / transformers"]) == pytest.approx(peer["tokenmill_over_transformers"], abs=0.01)


def test_structured_compare_interleaves_pairs_and_reports_overhead(tiny_path, tmp_path):
    pytest.importorskip("llguidance")
    out = tmp_path / "compare.json"
    code = main(["bench", "latency", "--model", tiny_path, "--dtype", "float32", "--input-len", "8",
                 "--output-len", "6", "--batch-size", "3", "--structured", "compare", "--pairs", "3",
                 "--device", "cpu", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())["result"]
    assert result["pairs"] == 3 and len(result["pair_overheads_pct"]) == 3
    assert result["temperature"] == 1.0
    assert result["none_tok_per_s"] > 0 and result["json_tok_per_s"] > 0


def test_structured_compare_needs_the_latency_recipe(tiny_path):
    with pytest.raises(SystemExit, match="latency recipe only"):
        main(["bench", "throughput", "--model", tiny_path, "--structured", "compare"])


def test_prompts_cut_from_files_are_windows_of_their_tokens(tiny_path, tmp_path):
    import random

    from tokenmill.bench.prompts import text_prompts

    engine = LLMEngine(EngineConfig(model=tiny_path, dtype="float32"))
    source = "def add(a, b):\n    return a + b\n\n\nclass Point:\n    x: int = 0\n    y: int = 0\n"
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "a.py").write_text(source)
    (tmp_path / "code" / "notes.txt").write_text("not python")
    make = text_prompts(engine.tokenizer, [str(tmp_path / "code")])
    ids = engine.tokenizer.encode(source, add_special_tokens=False)
    rng = random.Random(0)
    for _ in range(5):
        window = make(rng, 6)
        assert len(window) == 6 and any(ids[i:i + 6] == window for i in range(len(ids) - 5))
    with pytest.raises(ValueError, match="--input-len 999"):
        make(rng, 999)
    result = run_latency(engine, input_len=8, output_len=4, runs=1, prompts=make)
    assert result.tok_per_s > 0 and not engine.has_unfinished_requests()


def test_speculative_compare_runs_every_method_on_the_same_prompts(tiny_path, tmp_path, capsys):
    out = tmp_path / "spec.json"
    code = main(["bench", "latency", "--model", tiny_path, "--dtype", "float32", "--input-len", "12",
                 "--output-len", "10", "--batch-size", "2", "--runs", "2", "--device", "cpu", "--num-kv-blocks", "64",
                 "--speculative-compare", "ngram,draft", "--draft-model", tiny_path, "--no-speculative-adaptive",
                 "--draft-confidence-threshold", "0",
                 "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())["result"]
    methods = {m["method"]: m for m in result["methods"]}
    assert list(methods) == ["none", "ngram", "draft"]
    assert methods["none"]["speedup"] == pytest.approx(1.0)
    assert all(len(m["round_speedups"]) == 2 and m["tok_per_s"] > 0 for m in methods.values())
    assert methods["draft"]["acceptance_rate"] == 1.0  # the target as its own draft
    assert methods["draft"]["draft_step_ms"] == {} and methods["none"]["target_step_ms"] == {}  # not adaptive
    assert "speculative compare" in capsys.readouterr().out


def test_speculative_compare_rejects_unknown_methods(tiny_path):
    with pytest.raises(SystemExit, match="--speculative-compare takes methods from ngram, draft, ngram\\+draft"):
        main(["bench", "latency", "--model", tiny_path, "--speculative-compare", "ngram,medusa"])


def test_speculative_compare_on_random_weights_of_a_shape(tiny_path, tmp_path, capsys):
    out = tmp_path / "shape.json"
    code = main(["bench", "latency", "--model-config", f"{tiny_path}/config.json", "--dtype", "float32",
                 "--input-len", "8", "--output-len", "6", "--runs", "1", "--device", "cpu", "--num-kv-blocks", "32",
                 "--speculative-compare", "ngram", "--json", str(out)])
    assert code == 0
    assert [m["method"] for m in json.loads(out.read_text())["result"]["methods"]] == ["none", "ngram"]
    capsys.readouterr()
    assert main(["bench", "latency", "--model-config", f"{tiny_path}/config.json", "--speculative-compare", "draft"]) == 2
    assert "error: draft_model: speculative_method 'draft' needs a draft_model checkpoint" in capsys.readouterr().err
