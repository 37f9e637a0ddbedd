"""Tokenizer loading (tokenizer.json + tokenizer_config.json, or a GGUF file), special tokens and chat templates.

Wraps `tokenizers.Tokenizer` directly so the engine does not need `transformers`; the behaviour follows
transformers 5 (`TokenizersBackend` + `apply_chat_template`), which the tests use as the reference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jinja2
from tokenizers import AddedToken
from tokenizers import Tokenizer as _HFTokenizer

from tokenmill.engine.chat_template import (
    TemplateBudgetExceeded,
    TemplateRaised,
    iterates_content,
    make_template_env,
    normalize_messages,
    plain_json,
    render_bounded,
)
from tokenmill.errors import InvalidRequestError, ModelLoadError
from tokenmill.input_checks import check_json_value
from tokenmill.models.gguf import is_gguf_path

_MAX_COMPILED_TEMPLATES = 16
# Named special tokens, in the order transformers lists them in `all_special_tokens`.
_NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_content(value: Any) -> str | None:
    """A special token in tokenizer_config may be a string or an AddedToken dict with "content"."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _added_token(value: Any, special: bool = True) -> AddedToken:
    content = _token_content(value)
    assert content is not None
    if isinstance(value, Mapping):
        return AddedToken(
            content,
            single_word=bool(value.get("single_word", False)),
            lstrip=bool(value.get("lstrip", False)),
            rstrip=bool(value.get("rstrip", False)),
            normalized=bool(value.get("normalized", not special)),
            special=bool(value.get("special", special)),
        )
    return AddedToken(content, special=special, normalized=False)


class RenderedChat(NamedTuple):
    """A conversation rendered by the chat template: its text and that text's token ids."""

    text: str
    token_ids: list[int]

    def prompt(self) -> dict[str, Any]:
        """The engine's prompt input: the text travels along for the output and the thinking tags."""
        return {"prompt": self.text, "prompt_token_ids": list(self.token_ids)}


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: cannot read JSON ({e})") from e


class Tokenizer:
    """A checkpoint's tokenizer: encode/decode, special tokens and its chat template."""

    def __init__(self, backend: _HFTokenizer, config: Mapping[str, Any] | None = None,
                 chat_template: str | dict[str, str] | None = None, name: str = "") -> None:
        self._tok = backend
        self.name = name
        config = dict(config or {})
        self._special: dict[str, str] = {}  # named special tokens (template variables), e.g. bos_token -> "<s>"
        for key in _NAMED_SPECIAL:
            if (content := _token_content(config.get(key))) is not None:
                self._special[key] = content
        extra = config.get("extra_special_tokens", config.get("additional_special_tokens")) or []
        extra_values: list[Any] = []
        if isinstance(extra, Mapping):  # model-specific named tokens, e.g. {"image_token": "<image>"}
            for key, value in extra.items():
                if (content := _token_content(value)) is not None:
                    self._special[key] = content
        elif isinstance(extra, list):
            extra_values = [v for v in extra if _token_content(v) is not None]

        # Like transformers: tokens from added_tokens_decoder and the special tokens are added when missing.
        added = self._tok.get_added_tokens_decoder().values()
        existing = {t.content for t in added}
        special_now = {t.content for t in added if t.special}
        decoder_cfg = config.get("added_tokens_decoder") or {}
        for _, value in sorted(decoder_cfg.items(), key=lambda kv: int(kv[0])):
            content = _token_content(value)
            if content is not None and content not in existing:
                special = bool(value.get("special", False)) if isinstance(value, Mapping) else False
                self._tok.add_tokens([_added_token(value, special=special)])
                existing.add(content)
        named_values = [config.get(k) for k in _NAMED_SPECIAL] + (
            list(extra.values()) if isinstance(extra, Mapping) else [])
        for value in named_values + extra_values:
            content = _token_content(value)
            if content is not None and content not in special_now:  # (re)marked special, as transformers does
                self._tok.add_special_tokens([_added_token(value, special=True)])
                special_now.add(content)

        self._special_order = [self._special[k] for k in self._special] + [
            c for v in extra_values if (c := _token_content(v)) is not None]
        self._chat_template = chat_template
        self._env = make_template_env()
        self._compiled: dict[str, tuple[jinja2.Template, bool]] = {}
        self._decoder_special_ids = frozenset(
            i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)
        self.byte_fallback_ids = self._find_byte_tokens()
        self._text_only: _HFTokenizer | None = None

    # ---- loading ---------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Tokenizer":
        """Load tokenizer.json, tokenizer_config.json and chat_template.jinja from a checkpoint folder, or the
        tokenizer a GGUF file's metadata describes."""
        if is_gguf_path(path):
            return cls.from_gguf(path)
        root = Path(path)
        tok_file = root / "tokenizer.json"
        if not tok_file.is_file():
            raise ModelLoadError(f"{tok_file}: tokenizer.json not found (tokenmill needs a fast tokenizer file)")
        try:
            backend = _HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust loader raises a plain Exception on bad JSON
            raise ModelLoadError(f"{tok_file}: cannot load tokenizer ({e})") from e
        cfg_file = root / "tokenizer_config.json"
        config = _load_json(cfg_file) if cfg_file.is_file() else {}
        if not isinstance(config, dict):
            raise ModelLoadError(f"{cfg_file}: expected a JSON object")

        # A separate chat_template.jinja takes priority over the config entry, as in transformers.
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            if not all(isinstance(t, Mapping) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
                       for t in template):
                raise ModelLoadError(f"{cfg_file}: chat_template list entries need string 'name' and 'template'")
            template = {t["name"]: t["template"] for t in template}
        elif template is not None and not isinstance(template, str):
            raise ModelLoadError(f"{cfg_file}: chat_template must be a string or a list of named templates")
        jinja_file = root / "chat_template.jinja"
        if jinja_file.is_file():
            try:
                template = jinja_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ModelLoadError(f"{jinja_file}: cannot read ({e})") from e
        try:
            return cls(backend, config, template, name=str(root))
        except (KeyError, TypeError, ValueError) as e:  # malformed special-token entries
            raise ModelLoadError(f"{cfg_file}: invalid special token entry ({e})") from e

    @classmethod
    def from_gguf(cls, path: str | Path) -> "Tokenizer":
        from tokenmill.models.gguf.reader import GGUFFile
        from tokenmill.models.gguf.tokenizer import gguf_tokenizer

        backend, config, template = gguf_tokenizer(GGUFFile(path))
        return cls(backend, config, template, name=str(path))

    def _find_byte_tokens(self) -> frozenset[int]:
        """Ids of `<0xNN>` tokens when the model uses byte fallback (sentencepiece-style)."""
        decoder = self._tok.decoder
        uses_bytes = bool(getattr(self._tok.model, "byte_fallback", False)) or (
            decoder is not None and b"ByteFallback" in decoder.__getstate__())
        if not uses_bytes:
            return frozenset()
        ids = set()
        for b in range(256):
            i = self._tok.token_to_id(f"<0x{b:02X}>")
            if i is not None:
                ids.add(i)
        return frozenset(ids)

    # ---- encode / decode -------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # The post-processor in tokenizer.json decides BOS/EOS. transformers 5 ignores add_bos_token /
        # add_eos_token from tokenizer_config whenever tokenizer.json exists, so we do too.
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_as_text(self, text: str) -> list[int]:
        """Encode with special-token strings split like any text: "<|im_end|>" written by a user stays data."""
        if self._text_only is None:  # a private copy: the flag is per tokenizer and others encode concurrently
            copy = _HFTokenizer.from_str(self._tok.to_str())
            copy.encode_special_tokens = True
            self._text_only = copy
        return self._text_only.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        return [self._tok.id_to_token(i) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def is_skipped_special(self, token_id: int) -> bool:
        """True when decode(skip_special_tokens=True) drops this id."""
        return token_id in self._decoder_special_ids

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (transformers' len(tokenizer))."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return dict(self._special)

    def _special_id(self, key: str) -> int | None:
        token = self._special.get(key)
        return None if token is None else self._tok.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        return self._special.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._special.get("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of the named and extra special tokens, in transformers' order, without duplicates."""
        out: list[int] = []
        for token in self._special_order:
            i = self._tok.token_to_id(token)
            if i is not None and i not in out:
                out.append(i)
        return out

    # ---- chat templates --------------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | dict[str, str] | None:
        return self._chat_template

    def _pick_template(self, chat_template: str | None, tools: Any) -> str:
        templates = self._chat_template
        if isinstance(templates, dict):
            if chat_template is not None:
                return templates.get(chat_template, chat_template)
            if tools is not None and "tool_use" in templates:
                return templates["tool_use"]
            if "default" in templates:
                return templates["default"]
            raise InvalidRequestError(
                "chat_template", f"the checkpoint has several chat templates {sorted(templates)} and no 'default'")
        if chat_template is not None:
            return chat_template
        if templates is None:
            raise InvalidRequestError(
                "messages", f"the checkpoint {self.name or '(in memory)'} has no chat template (no chat_template in "
                "tokenizer_config.json and no chat_template.jinja); use a completion prompt instead")
        return templates

    def _compile(self, source: str) -> tuple[jinja2.Template, bool]:
        if source not in self._compiled:
            if len(self._compiled) >= _MAX_COMPILED_TEMPLATES:  # request templates must not grow it forever
                self._compiled.pop(next(iter(self._compiled)))
            try:
                self._compiled[source] = (self._env.from_string(source), iterates_content(self._env, source))
            except jinja2.TemplateSyntaxError as e:
                raise InvalidRequestError("chat_template", f"the chat template has a syntax error: {e}") from e
        return self._compiled[source]

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None, chat_template: str | None = None,
                            **template_kwargs: Any) -> str:
        """Render messages to the prompt text, as `AutoTokenizer.apply_chat_template(..., tokenize=False)`."""
        # What the template writes into the prompt must be encodable (messages are checked as they are read).
        for field, value in (("tools", tools), ("chat_template", chat_template),
                             ("chat_template_kwargs", template_kwargs)):
            check_json_value(value, field)
        template, handles_parts = self._compile(self._pick_template(chat_template, tools))
        chat = normalize_messages(messages, keep_parts=handles_parts)
        variables = {**self._special, **plain_json(template_kwargs)}
        try:
            return render_bounded(template, {**variables, "messages": chat, "tools": plain_json(tools),
                                             "documents": None, "add_generation_prompt": add_generation_prompt})
        except TemplateBudgetExceeded as e:
            raise InvalidRequestError("chat_template", f"the chat template is over budget: {e}") from None
        except TemplateRaised as e:
            raise InvalidRequestError("messages", f"rejected by the chat template: {e}") from None
        except jinja2.exceptions.SecurityError as e:
            raise InvalidRequestError("messages", f"chat template blocked an unsafe operation: {e}") from None
        except Exception as e:  # a template bug or an input shape the template cannot handle
            raise InvalidRequestError("messages", f"chat template failed to render: {type(e).__name__}: {e}") from None

    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None, chat_template: str | None = None,
                    check_text: Callable[[str], None] | None = None,
                    encode: Callable[[str], list[int]] | None = None, **template_kwargs: Any) -> RenderedChat:
        """The chat prompt as text and token ids: how LLM.chat, `tokenmill chat` and the server render one.

        check_text sees the rendered text before it is tokenized (the server's byte limit); encode replaces
        the plain encoding (the server's, which keeps control tokens in user text as data)."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                        chat_template=chat_template, **template_kwargs)
        if check_text is not None:
            check_text(text)
        # The template already wrote BOS and friends; encoding must not add them a second time.
        if encode is not None:
            return RenderedChat(text, encode(text))
        return RenderedChat(text, self.encode(text, add_special_tokens=False))
