"""The CPU peer harness: llama.cpp's output read back (canned from real runs) and the medians / ratios table."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.cpu_peers import gguf_files
from benchmarks.peer_commands import (
    OutputError,
    llamacpp_command,
    parse_batched_bench,
    parse_llama_bench,
    parse_llamacpp,
    parse_tokenmill,
)
from benchmarks.peer_report import Run, raw_table, summarize, summary_table

# Captured from this llama.cpp build on SmolLM2-135M BF16, 2 threads:
#   llama-bench -m smollm2-bf16.gguf -p 0 -n 16 -d 16 -t 2 -r 1 -o json
LLAMA_BENCH_JSON = """[
  {
    "build_commit": "unknown",
    "build_number": 0,
    "cpu_info": "Intel(R) Xeon(R) Processor",
    "gpu_info": "",
    "backends": "CPU",
    "model_filename": "/work/models/smollm2-bf16.gguf",
    "model_type": "llama 256M BF16",
    "model_size": 269100288,
    "model_n_params": 134515008,
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 2,
    "cpu_mask": "0x0",
    "cpu_strict": false,
    "poll": 50,
    "type_k": "f16",
    "type_v": "f16",
    "n_gpu_layers": -1,
    "n_cpu_moe": 0,
    "split_mode": "layer",
    "main_gpu": 0,
    "no_kv_offload": false,
    "flash_attn": -1,
    "devices": "auto",
    "tensor_split": "0.00",
    "tensor_buft_overrides": "none",
    "load_mode": "auto",
    "lazy_mode": "auto",
    "embeddings": false,
    "no_op_offload": 0,
    "no_host": false,
    "repack": true,
    "fit_target": 0,
    "fit_min_ctx": 0,
    "n_prompt": 0,
    "n_gen": 16,
    "n_depth": 16,
    "test_time": "2026-12-01T01:30:52Z",
    "avg_ns": 240113923,
    "stddev_ns": 0,
    "avg_ts": 66.635036,
    "stddev_ts": 0.000000,
    "samples_ns": [ 240113923 ],
    "samples_ts": [ 66.635 ]
  }
]
"""

#   llama-batched-bench -m smollm2-bf16.gguf -npp 16 -ntg 16 -npl 1,4 -t 2 -c 8192 --output-format jsonl
BATCHED_BENCH_JSONL = """{"n_kv_max": 8192, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 0, "n_gpu_layers": -1, "n_threads": 2, "n_threads_batch": 2, "pp": 16, "tg": 16, "pl": 1, "n_kv": 32, "t_pp": 0.048492, "speed_pp": 329.951324, "t_tg": 0.246438, "speed_tg": 64.925056, "t": 0.294930, "speed": 108.500328}
{"n_kv_max": 8192, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 0, "n_gpu_layers": -1, "n_threads": 2, "n_threads_batch": 2, "pp": 16, "tg": 16, "pl": 4, "n_kv": 128, "t_pp": 0.113680, "speed_pp": 562.983826, "t_tg": 0.501708, "speed_tg": 127.564247, "t": 0.615388, "speed": 207.998871}

"""


def test_llama_bench_json_gives_the_generation_test_at_its_depth():
    figures = parse_llama_bench(LLAMA_BENCH_JSON, input_len=16, output_len=16)
    assert figures.tok_per_s == pytest.approx(66.635036)
    assert figures.extra["threads"] == 2 and figures.extra["samples_ts"] == [66.635]
    with pytest.raises(OutputError, match="n_gen 128, n_depth 128"):
        parse_llama_bench(LLAMA_BENCH_JSON, input_len=128, output_len=128)
    with pytest.raises(OutputError, match="no JSON list"):
        parse_llama_bench("[\n", input_len=16, output_len=16)  # what a failed model load leaves on stdout


def test_batched_bench_jsonl_gives_s_tg_of_the_batch_asked_for():
    four = parse_batched_bench(BATCHED_BENCH_JSONL, batch_size=4, input_len=16, output_len=16)
    assert four.tok_per_s == pytest.approx(127.564247) and four.extra["ttft_s"] == pytest.approx(0.113680)
    assert parse_batched_bench(BATCHED_BENCH_JSONL, 1, 16, 16).tok_per_s == pytest.approx(64.925056)
    with pytest.raises(OutputError, match="pl 8"):
        parse_batched_bench(BATCHED_BENCH_JSONL, batch_size=8, input_len=16, output_len=16)
    assert parse_llamacpp(BATCHED_BENCH_JSONL, 4, 16, 16).tok_per_s == four.tok_per_s


def test_llamacpp_commands_follow_the_recipe():
    one = llamacpp_command(Path("/bin"), "m.gguf", 1, 128, 128, 2)
    assert one == ["/bin/llama-bench", "-m", "m.gguf", "-p", "0", "-n", "128", "-d", "128", "-t", "2", "-r", "1",
                   "-o", "json"]
    eight = llamacpp_command(Path("/bin"), "m.gguf", 8, 128, 128, 2)
    assert eight == ["/bin/llama-batched-bench", "-m", "m.gguf", "-npp", "128", "-ntg", "128", "-npl", "8", "-t", "2",
                     "-c", "8192", "--output-format", "jsonl"]
    assert llamacpp_command(Path("/bin"), "m.gguf", 64, 128, 128, 2)[-3] == str(64 * 256)  # the context must hold all


def test_tokenmill_report_figures():
    report = {"device": "cpu (2 threads)", "result": {"tok_per_s": 20.0, "ttft_s": 0.1, "ceiling_tok_per_s": 80.0,
                                                      "pct_of_ceiling": 25.0, "bandwidth_gb_per_s": 25.0}}
    figures = parse_tokenmill(report)
    assert figures.tok_per_s == 20.0 and figures.extra["pct_of_ceiling"] == 25.0


def _runs() -> list[Run]:
    figures = {  # (dtype, batch) -> per round: tokenmill, llama.cpp, transformers
        ("bfloat16", 1): [(20.0, 80.0, 10.0), (30.0, 60.0, 15.0), (25.0, 100.0, 50.0)],
        ("float32", 8): [(40.0, 50.0, None), (44.0, 55.0, None), (10.0, 5.0, None)],
    }
    runs = []
    for (dtype, batch), rounds in figures.items():
        for index, values in enumerate(rounds):
            for system, value in zip(("tokenmill", "llama.cpp", "transformers"), values):
                if value is not None:
                    extra = {"pct_of_ceiling": value / 2} if system == "tokenmill" else {}
                    runs.append(Run(system, dtype, batch, index, value, extra))
    return runs


def test_summary_takes_medians_and_pairs_ratios_by_round():
    bf16, fp32 = summarize(_runs())
    assert (bf16.dtype, bf16.batch_size, bf16.rounds) == ("bfloat16", 1, 3)
    assert bf16.median_tok_per_s == {"tokenmill": 25.0, "llama.cpp": 80.0, "transformers": 15.0}
    assert bf16.ratios["llama.cpp"] == pytest.approx(0.25)  # rounds: 0.25, 0.5, 0.25
    assert bf16.ratios["transformers"] == pytest.approx(2.0)  # rounds: 2.0, 2.0, 0.5
    assert bf16.tokenmill_pct_of_ceiling == pytest.approx(12.5)
    assert fp32.ratios == {"llama.cpp": pytest.approx(44 / 55)} and "transformers" not in fp32.median_tok_per_s
    assert fp32.tokenmill_ceiling_tok_per_s is None


def test_tables_show_medians_ratios_and_every_round():
    table = summary_table(summarize(_runs())).splitlines()
    assert table[0].startswith("| dtype | batch | rounds | tokenmill tok/s | llama.cpp tok/s | transformers tok/s")
    assert table[2] == "| bfloat16 | 1 | 3 | 25.0 | 80.0 | 15.0 | 12 % | 0.25x | 2.00x |"
    assert table[3] == "| float32 | 8 | 3 | 40.0 | 50.0 | — | 20 % | 0.80x | — |"
    raw = raw_table(_runs()).splitlines()
    assert len(raw) == 2 + 6 and raw[4] == "| bfloat16 | 1 | 3 | 25.0 | 100.0 | 50.0 |"


def test_gguf_files_by_dtype(tmp_path):
    for suffix in ("bf16", "f32"):
        (tmp_path / f"m-{suffix}.gguf").write_text("")
    explicit = str(tmp_path / "m-f32.gguf")
    files = gguf_files([f"bfloat16={explicit}"], str(tmp_path / "m"), ["bfloat16", "float32"])
    assert files == {"bfloat16": explicit, "float32": str(tmp_path / "m-f32.gguf")}
    with pytest.raises(SystemExit, match="no file"):
        gguf_files([], str(tmp_path / "m"), ["float16"])
    with pytest.raises(SystemExit, match="DTYPE=PATH"):
        gguf_files(["bf16=x.gguf"], None, ["bfloat16"])
