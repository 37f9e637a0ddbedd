"""`tokenmill bench stream`: one long request streamed; its report, and the clear error when the context is short."""

from __future__ import annotations

import json

import pytest

from tokenmill.bench.stream import run_stream
from tokenmill.cli import main
from tokenmill.config import EngineConfig
from tokenmill.engine.engine import LLMEngine
from tokenmill.errors import InvalidRequestError
from tokenmill.tools.tiny_checkpoint import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), max_position_embeddings=256))


def test_stream_recipe_times_every_token_and_reports_both_windows(tiny_path, tmp_path, capsys):
    out = tmp_path / "stream.json"
    code = main(["bench", "stream", "--model", tiny_path, "--dtype", "float32", "--device", "cpu",
                 "--input-len", "8", "--output-len", "61", "--window", "20", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())["result"]
    assert (result["output_len"], result["window"]) == (61, 20)
    for key in ("first_ms_per_token_median", "last_ms_per_token_median", "first_ms_per_token_mean",
                "last_ms_per_token_mean"):
        assert result[key] > 0, key
    assert result["ratio_mean"] == pytest.approx(result["last_ms_per_token_mean"] / result["first_ms_per_token_mean"])
    assert 0 < result["ttft_s"] < result["total_s"]
    assert "ratio_median" in capsys.readouterr().out


def test_stream_recipe_names_max_model_len_when_the_context_is_too_short(tiny_path, capsys):
    # The default 2,000 tokens do not fit a 256-token context.
    assert main(["bench", "stream", "--model", tiny_path, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "max_model_len is 256" in err and "2128" in err


def test_stream_recipe_needs_two_windows_of_decode_tokens(tiny_path):
    engine = LLMEngine(EngineConfig(model=tiny_path, dtype="float32"))
    with pytest.raises(InvalidRequestError) as info:
        run_stream(engine, input_len=8, output_len=40, window=20)
    assert info.value.field == "--output-len"
    assert not engine.has_unfinished_requests()
