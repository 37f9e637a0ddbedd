"""Tokenizer loading, encode/decode and chat templates, compared with transformers' AutoTokenizer."""

from __future__ import annotations

import json
import random
import shutil
from datetime import datetime
from pathlib import Path

import pytest

from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.errors import InvalidRequestError, ModelLoadError
from tokenmill.tools.tiny_tokenizer import build_tiny_sentencepiece_tokenizer, build_tiny_tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "def f(x):\n    return x * 2\n\n\tprint('tab')",
    "Größe, naïve café — 東京 😀🎉 Ελληνικά, русский текст.",
    "<|im_start|>user\nhi<|im_end|>",
    "<s>[INST] hello [/INST] </s>",
    "émoji 👩‍👩‍👧 and 中文字符 mixed with ascii",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 東京 😀?"},
    ],
    [{"role": "user", "content": "  spaces  \n\n"}, {"role": "assistant", "content": "ok"}],
]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tok")
    build_tiny_tokenizer(root / "bytelevel")
    build_tiny_sentencepiece_tokenizer(root / "sp")
    return {"bytelevel": root / "bytelevel", "sp": root / "sp"}


@pytest.fixture(scope="module", params=["bytelevel", "sp"])
def pair(request: pytest.FixtureRequest, dirs: dict[str, Path]) -> tuple[Tokenizer, object]:
    path = dirs[request.param]
    return Tokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path)


def _variant(src: Path, dst: Path, config_edit=None, tokenizer_edit=None) -> Path:
    """Copy a tokenizer folder and edit its config / tokenizer.json."""
    shutil.copytree(src, dst)
    if config_edit is not None:
        cfg = json.loads((dst / "tokenizer_config.json").read_text())
        config_edit(cfg)
        (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    if tokenizer_edit is not None:
        tj = json.loads((dst / "tokenizer.json").read_text())
        tokenizer_edit(tj)
        (dst / "tokenizer.json").write_text(json.dumps(tj))
    return dst


# ---- encode / decode / special tokens ---------------------------------------------------------------------


def test_encode_matches_transformers(pair) -> None:
    ours, ref = pair
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False), text


def test_decode_matches_transformers(pair) -> None:
    ours, ref = pair
    rng = random.Random(0)
    for text in TEXTS:
        ids = ours.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    for _ in range(50):  # arbitrary id sequences, including invalid byte sequences and specials
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 30))]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


def test_special_tokens_match_transformers(pair) -> None:
    ours, ref = pair
    assert ours.vocab_size == len(ref)
    assert ours.bos_token_id == ref.bos_token_id
    assert ours.eos_token_id == ref.eos_token_id
    assert ours.pad_token_id == ref.pad_token_id
    assert ours.all_special_ids == ref.all_special_ids
    assert ours.special_tokens_map == ref.special_tokens_map
    ids = list(range(0, ours.vocab_size, 7))
    assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
    for token in ref.convert_ids_to_tokens(ids):
        assert ours.token_to_id(token) == ref.convert_tokens_to_ids(token)
    assert ours.token_to_id("definitely-not-a-token-xyz") is None


def test_sentencepiece_tokenizer_uses_byte_fallback(dirs) -> None:
    tok = Tokenizer.from_pretrained(dirs["sp"])
    assert tok.bos_token_id == 1 and tok.encode("Hi")[0] == 1  # BOS from the post-processor
    assert len(tok.byte_fallback_ids) == 256
    ids = tok.encode("東", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids)[-3:] == ["<0xE6>", "<0x9D>", "<0xB1>"]
    assert Tokenizer.from_pretrained(dirs["bytelevel"]).byte_fallback_ids == frozenset()


def test_add_bos_token_follows_transformers_5(dirs, tmp_path) -> None:
    # transformers 5 drops add_bos_token/add_eos_token from tokenizer_config when tokenizer.json exists:
    # the post-processor alone decides. Check both directions against it.
    def no_post_processor(tj: dict) -> None:
        tj["post_processor"] = None

    def bos_off_eos_on(cfg: dict) -> None:
        cfg["add_bos_token"], cfg["add_eos_token"] = False, True

    for name, kw in [("nopp", {"tokenizer_edit": no_post_processor}), ("flags", {"config_edit": bos_off_eos_on})]:
        path = _variant(dirs["sp"], tmp_path / name, **kw)
        ours, ref = Tokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path)
        for text in TEXTS:
            assert ours.encode(text) == ref.encode(text)


def test_config_special_tokens_are_added_when_missing(dirs, tmp_path) -> None:
    def edit(cfg: dict) -> None:
        cfg["pad_token"] = "<|new_pad|>"
        cfg["additional_special_tokens"] = ["<|extra|>"]

    path = _variant(dirs["bytelevel"], tmp_path / "added", config_edit=edit)
    ours, ref = Tokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path)
    assert ours.vocab_size == len(ref)
    assert ours.pad_token_id == ref.pad_token_id is not None
    assert ours.all_special_ids == ref.all_special_ids
    text = "a <|new_pad|> b <|extra|> c"
    assert ours.encode(text) == ref.encode(text)
    assert ours.decode(ours.encode(text)) == ref.decode(ref.encode(text), skip_special_tokens=True)


def test_named_special_token_is_marked_special(dirs, tmp_path) -> None:
    # eos_token names an added token that tokenizer.json does not mark special: transformers marks it special.
    def add_plain_token(tj: dict) -> None:
        tj["added_tokens"].append({"id": len(tj["model"]["vocab"]), "content": "<|eot|>", "single_word": False,
                                   "lstrip": False, "rstrip": False, "normalized": False, "special": False})

    path = _variant(dirs["bytelevel"], tmp_path / "eot", config_edit=lambda c: c.update(eos_token="<|eot|>"),
                    tokenizer_edit=add_plain_token)
    ours, ref = Tokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path)
    ids = ref.encode("hi <|eot|> there")
    assert ours.encode("hi <|eot|> there") == ids and ours.eos_token_id == ref.eos_token_id
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True) == "hi  there"
    assert ours.is_skipped_special(ours.eos_token_id)


def test_load_errors_name_the_file(dirs, tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_pretrained(bad)
    badcfg = _variant(dirs["bytelevel"], tmp_path / "badcfg")
    (badcfg / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ModelLoadError, match="tokenizer_config.json"):
        Tokenizer.from_pretrained(badcfg)


# ---- chat templates ---------------------------------------------------------------------------------------


def test_chat_template_matches_transformers(pair) -> None:
    ours, ref = pair
    for conv in CONVERSATIONS:
        if ours.bos_token == "<s>" and len(conv) == 3:
            continue  # Llama-2 template: user/assistant must alternate starting with user (checked below)
        for gen in (True, False):
            expected = ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(conv, add_generation_prompt=gen) == expected


def test_rendered_chat_ids_match_transformers_without_a_second_bos(pair) -> None:
    ours, ref = pair
    conv = CONVERSATIONS[0]
    chat = ours.render_chat(conv)
    assert chat.text == ours.apply_chat_template(conv)
    assert chat.token_ids == ref.apply_chat_template(conv, add_generation_prompt=True)["input_ids"]
    assert chat.prompt() == {"prompt": chat.text, "prompt_token_ids": chat.token_ids}


def test_content_part_lists_are_flattened_for_string_templates(pair) -> None:
    ours, ref = pair
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}]
    flat = [{"role": "user", "content": "Hello\nthere"}]
    assert ours.apply_chat_template(parts) == ref.apply_chat_template(flat, tokenize=False, add_generation_prompt=True)
    with pytest.raises(InvalidRequestError, match=r"content\[0\]"):
        ours.apply_chat_template([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


def test_raise_exception_becomes_invalid_request(dirs) -> None:
    ours = Tokenizer.from_pretrained(dirs["sp"])
    ref = transformers.AutoTokenizer.from_pretrained(dirs["sp"])
    bad = [{"role": "assistant", "content": "I speak first"}, {"role": "user", "content": "hi"}]
    with pytest.raises(Exception, match="alternate"):
        ref.apply_chat_template(bad, tokenize=False)
    with pytest.raises(InvalidRequestError, match="alternate") as info:
        ours.apply_chat_template(bad)
    assert info.value.field == "messages"


TOOL_TEMPLATE = (
    "{{ bos_token }}Today is {{ strftime_now('%Y-%m-%d') }}.\n"
    "{% if tools %}Tools:\n{% for tool in tools %}{{ tool | tojson(indent=2) }}\n{% endfor %}{% endif %}"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% else %}{{ message['role'] }}:{% for part in message['content'] %} [{{ part['text'] }}]{% endfor %}\n"
    "{% endif %}{% if message.tool_calls is defined %}{{ message.tool_calls | tojson }}\n{% endif %}"
    "{% endfor %}{% if enable_thinking is defined and not enable_thinking %}<no-think>{% endif %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def test_strftime_tojson_tools_and_content_parts_match_transformers(dirs, tmp_path) -> None:
    path = _variant(dirs["bytelevel"], tmp_path / "tools", config_edit=lambda c: c.update(chat_template=TOOL_TEMPLATE))
    ours, ref = Tokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather <in> a city & more",
                                               "parameters": {"type": "object", "properties": {"city": {}}}}}]
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Weather in 東京?"}, {"type": "text", "text": "Now"}]},
        {"role": "assistant", "content": None,
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "東京"}}}]},
        {"role": "tool", "content": "sunny"},
    ]
    expected = ref.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True,
                                       enable_thinking=False)
    got = ours.apply_chat_template(messages, tools=tools, enable_thinking=False)
    assert got == expected
    assert datetime.now().strftime("%Y-%m-%d") in got and "東京" in got and "<in> a city & more" in got


def test_template_sources_list_and_jinja_file(dirs, tmp_path) -> None:
    named = [{"name": "default", "template": "D{{ messages[0]['content'] }}"},
             {"name": "tool_use", "template": "T{{ tools | length }}{{ messages[0]['content'] }}"}]
    path = _variant(dirs["bytelevel"], tmp_path / "named", config_edit=lambda c: c.update(chat_template=named))
    ours, ref = Tokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path)
    msgs = [{"role": "user", "content": "x"}]
    assert ours.apply_chat_template(msgs) == ref.apply_chat_template(msgs, tokenize=False) == "Dx"
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert ours.apply_chat_template(msgs, tools=tools) == ref.apply_chat_template(msgs, tools=tools, tokenize=False)

    jinja = _variant(dirs["bytelevel"], tmp_path / "jinja")
    (jinja / "chat_template.jinja").write_text("J{{ eos_token }}{{ messages | length }}")
    ours, ref = Tokenizer.from_pretrained(jinja), transformers.AutoTokenizer.from_pretrained(jinja)
    assert ours.apply_chat_template(msgs) == ref.apply_chat_template(msgs, tokenize=False)
    assert ours.apply_chat_template(msgs).startswith("J<|end_of_text|>")


def test_template_errors_are_clear(dirs, tmp_path) -> None:
    none = _variant(dirs["bytelevel"], tmp_path / "none", config_edit=lambda c: c.pop("chat_template"))
    with pytest.raises(InvalidRequestError, match="no chat template"):
        Tokenizer.from_pretrained(none).apply_chat_template([{"role": "user", "content": "hi"}])
    tok = Tokenizer.from_pretrained(dirs["bytelevel"])
    with pytest.raises(InvalidRequestError, match="messages"):
        tok.apply_chat_template([])
    with pytest.raises(InvalidRequestError, match=r"messages\[0\]\.role"):
        tok.apply_chat_template([{"content": "no role"}])
    with pytest.raises(InvalidRequestError, match="syntax error"):
        tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{% for %}")
    with pytest.raises(InvalidRequestError, match="failed to render"):
        tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{{ messages[0]['content'] + 1 }}")
    # The sandbox blocks attribute escapes, and so does our namespace.
    with pytest.raises(InvalidRequestError):
        tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{{ ''.__class__.__mro__ }}")
    with pytest.raises(InvalidRequestError, match="unsafe"):
        tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{% set ns = namespace(_x=1) %}")


def test_generation_tag_and_loop_controls(dirs) -> None:
    tok = Tokenizer.from_pretrained(dirs["bytelevel"])
    ref = transformers.AutoTokenizer.from_pretrained(dirs["bytelevel"])
    template = ("{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}"
                "{% if m['role'] == 'assistant' %}{% generation %}<{{ m['content'] }}>{% endgeneration %}"
                "{% else %}{{ m['content'] }}{% endif %}{% endfor %}")
    conv = CONVERSATIONS[1]
    assert tok.apply_chat_template(conv, chat_template=template) == ref.apply_chat_template(
        conv, chat_template=template, tokenize=False, add_generation_prompt=True)
