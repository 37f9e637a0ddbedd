"""The command line: make-tiny, generate (streams, ends with tok/s), chat (multi-turn), clear errors."""

from __future__ import annotations

import io
import re

import pytest

from tokenmill.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("cli") / "tiny")
    assert main(["make-tiny", path]) == 0
    return path


def test_generate_streams_the_completion_and_reports_speed(tiny, capsys):
    assert main(["generate", "--model", tiny, "--prompt", "def f(x):", "--max-tokens", "12", "--ignore-eos"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("def f(x):")
    assert re.search(r"\[12 tokens in [\d.]+ s, [\d.]+ tok/s\]", captured.err)
    assert "loading weights" in captured.err


def test_generate_is_greedy_and_repeatable_by_default(tiny, capsys):
    args = ["generate", "--model", tiny, "--prompt", "Hello", "--max-tokens", "8", "--ignore-eos"]
    main(args)
    first = capsys.readouterr().out
    main(args)
    assert capsys.readouterr().out == first


def test_chat_keeps_the_conversation(tiny, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\nand again\n\n"))
    assert main(["chat", "--model", tiny, "--max-tokens", "4", "--ignore-eos"]) == 0
    err = capsys.readouterr().err
    assert len(re.findall(r"\[4 tokens", err)) == 2


def test_bad_values_give_a_clear_error_and_exit_code(tiny, capsys):
    assert main(["generate", "--model", tiny, "--prompt", "x", "--top-p", "1.5"]) == 2
    assert "top_p" in capsys.readouterr().err
    assert main(["generate", "--model", tiny + "-missing", "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_generate_chat_sends_a_user_message_and_prints_the_reply(tiny, capsys):
    from tokenmill import LLM, SamplingParams

    assert main(["generate", "--model", tiny, "--chat", "--prompt", "Hello", "--max-tokens", "6", "--ignore-eos"]) == 0
    out = capsys.readouterr().out
    llm = LLM(model=tiny)
    prompt = llm.get_tokenizer().render_chat([{"role": "user", "content": "Hello"}], add_generation_prompt=True).prompt()
    reply = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))[0].outputs[0].text
    assert out == reply + "\n"
