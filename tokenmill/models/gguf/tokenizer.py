"""A `tokenizers.Tokenizer` rebuilt from GGUF metadata, plus the special tokens and chat template beside it.

Two vocabularies (`tokenizer.ggml.model`):
- "gpt2": byte-level BPE, tokens + merges; the text is split by the pre-tokenizer regex its merges were
  learned with (`tokenizer.ggml.pre`), GPT-2's when the file names none this table knows.
- "llama": sentencepiece-style BPE over `▁`-joined words with `<0xNN>` byte fallback; merges from the file,
  or recovered from the token scores (a higher score merges first).
Token types: control tokens become special added tokens, user-defined ones plain added tokens, so both are
matched whole. BOS/EOS are added by the post-processor as `tokenizer.ggml.add_bos_token` says. The result
follows transformers' GGUF tokenizer (the tests' reference), which the engine's Tokenizer wraps as is.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from tokenmill.models.gguf.reader import GGUFFile

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
_SPACE = "\u2581"  # sentencepiece's word marker
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = _QWEN2_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
# tokenizer.ggml.pre -> the split regex of that pre-tokenizer (llama.cpp's names).
_PRE_SPLITS = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}
_NAMED = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
          "pad_token": "padding_token_id"}


class GGUFTokenizer(NamedTuple):
    backend: HFTokenizer
    config: dict[str, Any]  # tokenizer_config.json's special-token entries
    chat_template: str | dict[str, str] | None


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's spelling of bytes as printable characters: printable Latin-1 bytes stand for themselves, the
    others take the code points from 256 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    spelling = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in spelling:
            spelling[b] = chr(256 + extra)
            extra += 1
    return spelling


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary: every split of a token into two tokens, best score
    first (ties: longer left piece, then longer right piece, then vocabulary order)."""
    ids = {token: i for i, token in enumerate(tokens)}
    candidates: list[tuple[float, str, str]] = []
    for token, score in dict(zip(tokens, scores)).items():
        pairs = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in ids and token[k:] in ids]
        pairs.sort(key=lambda p: (ids[p[0]], ids[p[1]]))
        candidates.extend((float(score), left, right) for left, right in pairs)
    candidates.sort(key=lambda c: (c[0], len(c[1]), len(c[2])), reverse=True)  # stable: keeps vocab order
    return [(left, right) for _, left, right in candidates]


def _byte_level(meta: dict[str, Any], tokens: list[str]) -> HFTokenizer:
    spelling = byte_to_unicode()
    alphabet = set(spelling.values())
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    tok = HFTokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    split = _PRE_SPLITS.get(meta.get("tokenizer.ggml.pre", ""))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True) if split is None else \
        pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(meta: dict[str, Any], tokens: list[str]) -> HFTokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    if meta.get("tokenizer.ggml.merges"):
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    else:
        merges = merges_from_scores(tokens, list(meta.get("tokenizer.ggml.scores", [0.0] * len(tokens))))
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    tok = HFTokenizer(models.BPE(vocab, merges, unk_token=tokens[unk] if unk is not None else None,
                                 fuse_unk=True, byte_fallback=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="first" if prefix else "never",
                                                 split=False)
    steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


def _add_typed_tokens(tok: HFTokenizer, tokens: list[str], types: Any, byte_level: bool) -> None:
    """Control tokens -> special added tokens; user-defined -> plain added tokens (both matched whole).

    In a byte-level vocabulary a "control" token spelled outside the byte alphabet is a converter mislabel
    (adding it would grow the vocabulary past the model's), so it is left out, as transformers does."""
    alphabet = set(byte_to_unicode().values()) if byte_level else None
    types = list(types) if types is not None else []
    control = [AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, types)
               if kind == _CONTROL and (alphabet is None or set(t) <= alphabet)]
    if control:
        tok.add_special_tokens(control)
    user = [AddedToken(t, special=False, normalized=False) for t, kind in zip(tokens, types) if kind == _USER_DEFINED]
    if user:
        tok.add_tokens(user)


def _post_processor(tok: HFTokenizer, tokens: list[str], meta: dict[str, Any], default_bos: bool) -> None:
    def special(flag: str, key: str, default: bool) -> list[tuple[str, int]]:
        token_id = meta.get(f"tokenizer.ggml.{key}")
        on = bool(meta.get(f"tokenizer.ggml.{flag}", default))
        return [(tokens[token_id], int(token_id))] if on and token_id is not None else []

    bos, eos = special("add_bos_token", "bos_token_id", default_bos), special("add_eos_token", "eos_token_id", False)
    single = [f"{t}:0" for t, _ in bos] + ["$A:0"] + [f"{t}:0" for t, _ in eos]
    pair = single + [f"{t}:1" for t, _ in bos] + ["$B:1"] + [f"{t}:1" for t, _ in eos]
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=list({*bos, *eos}))


def _chat_template(meta: dict[str, Any]) -> str | dict[str, str] | None:
    """The default template, with llama.cpp's named ones (`tokenizer.chat_template.<name>`) beside it."""
    default = meta.get("tokenizer.chat_template")
    names = meta.get("tokenizer.chat_templates") or []
    named = {n: meta[f"tokenizer.chat_template.{n}"] for n in names if f"tokenizer.chat_template.{n}" in meta}
    if not named:
        return default
    return ({"default": default} if default is not None else {}) | named


def has_tokenizer(gguf: GGUFFile) -> bool:
    return "tokenizer.ggml.model" in gguf.metadata and "tokenizer.ggml.tokens" in gguf.metadata


def gguf_tokenizer(gguf: GGUFFile) -> GGUFTokenizer:
    meta = gguf.metadata
    kind = meta.get("tokenizer.ggml.model")
    if not has_tokenizer(gguf):
        raise gguf.error("has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens missing)")
    if kind not in ("gpt2", "llama"):
        raise gguf.error(f"tokenizer type {kind!r} is not supported (supported: gpt2, llama)")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    for key in _NAMED.values():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is not None and not 0 <= int(token_id) < len(tokens):
            raise gguf.error(f"tokenizer.ggml.{key} = {token_id} is outside the vocabulary of {len(tokens)} tokens")
    byte_level = kind == "gpt2"
    tok = _byte_level(meta, tokens) if byte_level else _sentencepiece(meta, tokens)
    _add_typed_tokens(tok, tokens, meta.get("tokenizer.ggml.token_type"), byte_level)
    _post_processor(tok, tokens, meta, default_bos=not byte_level)  # llama.cpp adds BOS to sentencepiece ones
    config = {name: tokens[meta[f"tokenizer.ggml.{key}"]] for name, key in _NAMED.items()
              if meta.get(f"tokenizer.ggml.{key}") is not None}
    return GGUFTokenizer(tok, config, _chat_template(meta))
