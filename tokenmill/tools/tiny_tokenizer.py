"""Build a small byte-level BPE tokenizer with `tokenizers`, with nothing downloaded.

Used by tests and by `tokenmill make-tiny` to make self-contained checkpoints. The corpus is built in
(plus any text the caller passes), so the result is the same on every machine.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, IM_START, IM_END, "<think>", "</think>"]

# A ChatML template, the form Qwen and many fine-tunes use.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "Hello, world! How are you today? I am fine, thank you.",
    "import torch\nimport numpy as np\nx = torch.zeros(3, 4)\nprint(x.shape)\n",
    "for i in range(10):\n    print(i * i)\n",
    "Größe, naïve café, 東京, 😀 emoji, Ελληνικά, русский текст.",
    "class Request:\n    def __init__(self, prompt):\n        self.prompt = prompt\n",
    "Serving large language models fast needs paged attention and continuous batching.",
]


def build_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 512, extra_text: list[str] | None = None) -> Tokenizer:
    """Train a byte-level BPE tokenizer and write tokenizer.json + tokenizer_config.json to out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = _CORPUS * 4 + list(extra_text or [])
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": False,
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tokenizer


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """Ids of the special tokens, by name."""
    return {tok: tokenizer.token_to_id(tok) for tok in SPECIAL_TOKENS}


# --- A Llama-2 / Mistral style tokenizer: BPE over `▁`-joined words with byte fallback -------------------

SP_UNK = "<unk>"
SP_BOS = "<s>"
SP_EOS = "</s>"

# The Llama-2 chat template (as shipped by Meta), including its role-alternation check via raise_exception.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


def _ascii_latin(text: str) -> str:
    # Train only on Latin characters so Greek, Cyrillic, CJK and emoji must use the byte-fallback tokens.
    return "".join(ch for ch in text if ord(ch) < 0x250)


def _added_token_dict(content: str) -> dict[str, object]:
    # The serialized AddedToken form transformers writes (and needs "__type" to read back).
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False}


def build_tiny_sentencepiece_tokenizer(out_dir: str | Path, vocab_size: int = 600) -> Tokenizer:
    """Write a Llama-2 style tokenizer (byte-fallback BPE, `▁` word marker, `<0x00>`..`<0xFF>` tokens,
    `[INST]` chat template, BOS added by the post-processor and `add_bos_token: true`) to out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = metaspace
    n_reserved = 3 + 256
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - n_reserved, show_progress=False)
    trainer_tok.train_from_iterator([_ascii_latin(t) for t in _CORPUS * 4], trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]

    # Same id layout as Llama-2: <unk>, <s>, </s>, then the 256 byte tokens, then the learned pieces.
    vocab: dict[str, int] = {SP_UNK: 0, SP_BOS: 1, SP_EOS: 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=SP_UNK, fuse_unk=True, byte_fallback=True))
    tokenizer.pre_tokenizer = metaspace
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.add_special_tokens([SP_UNK, SP_BOS, SP_EOS])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{SP_BOS}:0 $A:0", pair=f"{SP_BOS}:0 $A:0 {SP_BOS}:1 $B:1", special_tokens=[(SP_BOS, 1)]
    )
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": _added_token_dict(SP_BOS),
        "eos_token": _added_token_dict(SP_EOS),
        "unk_token": _added_token_dict(SP_UNK),
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 4096,
        "chat_template": LLAMA2_CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tokenizer
