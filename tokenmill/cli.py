"""`tokenmill generate | chat | serve | models | make-tiny | bench | train | distill | research` — the command line."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from dataclasses import asdict, replace

from tokenmill.engine_args import EngineArgs
from tokenmill.errors import TokenmillError


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--presence-penalty", type=float, default=0.0)
    parser.add_argument("--frequency-penalty", type=float, default=0.0)
    parser.add_argument("--sample-seed", type=int, default=None, help="per-request seed")
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true")


def _make_llm(args: argparse.Namespace, interactive: bool = False):  # -> LLM; imported late so `--help` is instant
    from tokenmill.llm import LLM

    engine_args = EngineArgs.from_cli_args(args)
    if interactive and engine_args.compile is None:
        # A one-shot generate or a chat produces a few hundred tokens: compiling (a minute or more on CPU)
        # costs more than it saves there; serve and bench keep the engine's own choice. --compile forces it.
        engine_args = replace(engine_args, compile=False)
    return LLM(show_progress=True, **asdict(engine_args))


def _sampling_params(args: argparse.Namespace):
    from tokenmill.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.sample_seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )


def _stream(llm, prompt, params) -> tuple[str, int, float]:
    """Print the text as it is generated; return (text, tokens generated, seconds)."""
    start = time.perf_counter()
    pieces: list[str] = []
    num_tokens = 0
    for output in llm.stream(prompt, params):  # deltas: each output holds only the new text and ids
        for completion in output.outputs:
            sys.stdout.write(completion.text)
            sys.stdout.flush()
            pieces.append(completion.text)
            num_tokens += len(completion.token_ids)
    return "".join(pieces), num_tokens, time.perf_counter() - start


def cmd_generate(args: argparse.Namespace) -> None:
    llm = _make_llm(args, interactive=True)
    params = _sampling_params(args)
    if args.chat:  # the prompt is one user message, rendered by the model's chat template; print the reply
        prompt = llm.get_tokenizer().render_chat([{"role": "user", "content": args.prompt}],
                                                 add_generation_prompt=True).prompt()
    else:
        prompt = args.prompt
        sys.stdout.write(prompt)
    _, num_tokens, seconds = _stream(llm, prompt, params)
    print()
    print(f"[{num_tokens} tokens in {seconds:.2f} s, {num_tokens / max(seconds, 1e-9):.1f} tok/s]", file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> None:
    llm = _make_llm(args, interactive=True)
    params = _sampling_params(args)
    tokenizer = llm.get_tokenizer()
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print("Chat with the model; an empty line or Ctrl-D ends.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        prompt = tokenizer.render_chat(messages, add_generation_prompt=True).prompt()
        reply, num_tokens, seconds = _stream(llm, prompt, params)
        print()
        print(f"[{num_tokens} tokens, {num_tokens / max(seconds, 1e-9):.1f} tok/s]", file=sys.stderr)
        # The reply joins the history, so the next turn reuses the conversation's cached prefix.
        messages.append({"role": "assistant", "content": reply})


def cmd_models(args: argparse.Namespace) -> None:
    from tokenmill.model_catalog import catalog_rows

    rows = catalog_rows()
    width = max(len(name) for name, _, _ in rows)
    for name, where, description in rows:
        print(f"{name:<{width}}  {description}\n{'':<{width}}  {where}")


def cmd_make_tiny(args: argparse.Namespace) -> None:
    from tokenmill.tools.tiny_checkpoint import make_tiny_checkpoint

    path = make_tiny_checkpoint(args.out, num_layers=args.layers, hidden_size=args.hidden_size, seed=args.seed)
    print(f"wrote a random-weight tiny Llama checkpoint to {path}")


def cmd_quantize(args: argparse.Namespace) -> None:
    from tokenmill.tools.quantize_model import QuantizeOptions, quantize_checkpoint

    sizes = {k: v for k, v in (("samples", args.samples), ("window", args.window)) if v is not None}
    options = QuantizeOptions(method=args.method, algo=args.algo, group_size=args.group_size,
                              zero_point=args.zero_point, calibration=args.calibration, **sizes)
    quantize_checkpoint(args.model, args.out, options)


def cmd_serve(args: argparse.Namespace) -> None:
    """OpenAI-compatible HTTP server; SIGINT/SIGTERM drain in-flight requests for --drain-timeout, then abort."""
    import uvicorn

    from tokenmill.model_catalog import served_name
    from tokenmill.engine.async_engine import AsyncLLMEngine
    from tokenmill.server.app import build_app
    from tokenmill.server.http_protocol import DrainingServer, uvicorn_config

    from tokenmill.server.auth import check_api_keys, load_api_keys_file

    from tokenmill.server.responses_store import ResponseStore

    try:  # every key checked (and the file read), and the stored responses' bounds, before the model loads
        api_keys = check_api_keys((args.api_key or []) + (load_api_keys_file(args.api_keys_file)
                                                          if args.api_keys_file is not None else []))
        ResponseStore(args.responses_max_stored, args.responses_max_bytes, args.responses_ttl)
    except ValueError as e:
        raise SystemExit(f"tokenmill serve: {e}") from None
    served_model_name = args.served_model_name or served_name(args.model)
    llm = _make_llm(args)
    engine = AsyncLLMEngine(llm.engine, max_queue=args.max_queue)
    app = build_app(
        engine,
        served_model_name=served_model_name,
        api_keys=api_keys,
        prefix_cache_scope=args.prefix_cache_scope,
        max_body_bytes=args.max_body_bytes,
        default_thinking_budget=args.thinking_token_budget,
        reasoning_parser=args.reasoning_parser,
        tool_call_parser=args.tool_call_parser,
        drain_timeout_s=args.drain_timeout,
        trust_request_chat_template=args.trust_request_chat_template,
        metrics_public=args.metrics_public,
        allowed_hosts=args.allowed_hosts,
        responses_max_stored=args.responses_max_stored,
        responses_max_bytes=args.responses_max_bytes,
        responses_ttl_s=args.responses_ttl,
        lora_runtime_updating=args.enable_lora_runtime_updating,
    )
    # uvicorn handles the signals. The engine drains first (up to --drain-timeout, then aborts the rest,
    # whose streams end with a final "abort" event); uvicorn then waits for those responses to complete.
    config = uvicorn_config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=STREAM_CLOSE_GRACE_S,
                            timeout_headers=args.timeout_headers, timeout_keep_alive=args.timeout_keep_alive)
    # After its graceful shutdown uvicorn re-raises the signal it caught; for SIGTERM that re-raise
    # lands here and ends the process with status 0 instead of dying by the signal.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    DrainingServer(config, drain=lambda: engine.shutdown(args.drain_timeout)).run()


# After the engine's drain, the time uvicorn gives the aborted streams to send their final events.
STREAM_CLOSE_GRACE_S = 5.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description="tokenmill: fast LLM inference you can read")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate from a prompt, streaming to the terminal")
    EngineArgs.add_cli_args(gen)
    _add_sampling_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true",
                     help="send the prompt as a user message through the chat template and print the reply")
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat with the checkpoint's chat template")
    EngineArgs.add_cli_args(chat)
    _add_sampling_args(chat)
    chat.add_argument("--system", default=None, help="system message")
    chat.set_defaults(func=cmd_chat)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    EngineArgs.add_cli_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", action="append", default=None,
                       help="require 'Authorization: Bearer KEY' on /v1/* and /metrics (an empty key is an error); "
                       "repeat for several keys, each its own prefix-cache tenant")
    serve.add_argument("--api-keys-file", default=None,
                       help="file of accepted API keys, one per line ('#' comments and blank lines ignored)")
    serve.add_argument("--prefix-cache-scope", default="per-key", choices=["global", "per-key", "per-request"],
                       help="who shares prefix-cache hits: everyone (global), one API key (per-key; global without "
                       "keys), or nobody (per-request); a request's cache_salt narrows it (docs/security.md)")
    serve.add_argument("--metrics-public", action="store_true", help="serve /metrics without the API key")
    serve.add_argument("--allowed-hosts", type=lambda v: [h.strip() for h in v.split(",") if h.strip()],
                       default=None, help="comma-separated Host header values to accept (e.g. api.example.com,"
                       "*.example.com); others get HTTP 400 (default: any)")
    serve.add_argument("--trust-request-chat-template", action="store_true",
                       help="let requests send their own chat template (chat_template_kwargs.chat_template)")
    serve.add_argument("--timeout-headers", type=float, default=10.0,
                       help="seconds a connection may take to send a request's headers before it is closed")
    serve.add_argument("--timeout-keep-alive", type=int, default=5, help="seconds an idle connection is kept open")
    serve.add_argument("--served-model-name", default=None,
                       help="the model name clients send (default: the --model folder's name)")
    serve.add_argument("--enable-lora-runtime-updating", action="store_true",
                       help="answer POST /v1/load_lora_adapter and /v1/unload_lora_adapter (needs --enable-lora; "
                       "clients then name adapter folders on this machine's disk)")
    serve.add_argument("--max-queue", type=int, default=None, help="waiting requests beyond this get HTTP 503")
    serve.add_argument("--max-body-bytes", type=int, default=4 << 20, help="larger request bodies get HTTP 413")
    serve.add_argument("--thinking-token-budget", type=int, default=None,
                       help="default hard budget of thinking tokens per request (a request's own value wins)")
    serve.add_argument("--reasoning-parser", default="auto", choices=["auto", "think", "none"],
                       help="split <think>...</think> into reasoning_content; auto: when the tokenizer has both tags")
    serve.add_argument("--tool-call-parser", default=None, choices=["hermes", "llama3_json", "mistral"],
                       help="format of the model's tool calls (default: guessed from the chat template)")
    serve.add_argument("--responses-max-stored", type=int, default=1000,
                       help="stored responses (/v1/responses, for previous_response_id and GET) kept in memory; "
                       "the oldest go first")
    serve.add_argument("--responses-max-bytes", type=int, default=64 << 20,
                       help="bytes of stored responses (their conversations included) kept in memory")
    serve.add_argument("--responses-ttl", type=float, default=3600.0, help="seconds a stored response is kept")
    serve.add_argument("--drain-timeout", type=float, default=10.0, help="seconds to finish requests on shutdown")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(func=cmd_serve)

    models = sub.add_parser("models", help="the models known by a short name (--model NAME), and where they are")
    models.set_defaults(func=cmd_models)

    tiny = sub.add_parser("make-tiny", help="write a tiny random-weight checkpoint (nothing is downloaded)")
    tiny.add_argument("out", help="output folder")
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--hidden-size", type=int, default=128)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_make_tiny)

    quantize = sub.add_parser("quantize", help="write a quantized checkpoint folder (int8, int4, w2, fp8)")
    quantize.add_argument("model", help="checkpoint folder or GGUF file")
    quantize.add_argument("--method", required=True, help="int8 | int4 | w2 | fp8")
    quantize.add_argument("--algo", default=None,
                          help="rtn | gptq | awq | fit (the 2-bit alternating fit; default for w2, else rtn)")
    quantize.add_argument("--group-size", type=int, default=None,
                          help="input columns per scale (default: int4 128, w2 64, int8/fp8 per channel)")
    quantize.add_argument("--zero-point", action="store_true", help="int4 with a zero-point per group (w2 always)")
    quantize.add_argument("--calibration", nargs="+", default=None, metavar="FILE",
                          help="text files to calibrate GPTQ/AWQ on (default: stdlib docstrings and code)")
    quantize.add_argument("--samples", type=int, default=None, help="calibration windows (default 64)")
    quantize.add_argument("--window", type=int, default=None, help="tokens per calibration window (default 128)")
    quantize.add_argument("--out", required=True, help="output folder")
    quantize.set_defaults(func=cmd_quantize)

    from tokenmill.bench.cli import add_bench_parser

    add_bench_parser(sub)
    _add_training_parsers(sub)
    _add_research_parser(sub)
    return parser


TRAINING_INSTALL_HINT = "install it with pip install 'tokenmill[train]'"
RESEARCH_INSTALL_HINT = "install it with pip install 'tokenmill[research]'"


def _add_missing_package_stub(sub: argparse._SubParsersAction, command: str, package: str, hint: str) -> None:
    """A command whose package is not importable: it explains what to install instead of a traceback."""
    # No option prefix: every argument (--data, --help, ...) is swallowed, so the hint is what prints.
    stub = sub.add_parser(command, help=f"(needs the {package} package: {hint})", prefix_chars="\0", add_help=False)
    stub.add_argument("args", nargs="*")

    def missing(args: argparse.Namespace) -> None:
        raise TokenmillError(f"`tokenmill {command}` needs the package {package}, which is not importable here; "
                             f"{hint}")

    stub.set_defaults(func=missing)


def _add_training_parsers(sub: argparse._SubParsersAction) -> None:
    """`train` and `distill` come from the separate tokenmill_train package (it imports only argparse here).

    The engine never needs it, so a missing package leaves every other command working."""
    try:
        from tokenmill_train import add_distill_parser, add_train_parser
    except ModuleNotFoundError as exc:
        if exc.name != "tokenmill_train":
            raise  # the package is there but broken: that traceback is the useful message
        for name in ("train", "distill"):
            _add_missing_package_stub(sub, name, "tokenmill_train", TRAINING_INSTALL_HINT)
        return
    add_train_parser(sub)
    add_distill_parser(sub)


def _add_research_parser(sub: argparse._SubParsersAction) -> None:
    """`research` comes from the separate tokenmill_research package, like `train` from tokenmill_train."""
    try:
        from tokenmill_research import add_research_parser
    except ModuleNotFoundError as exc:
        if exc.name != "tokenmill_research":
            raise
        _add_missing_package_stub(sub, "research", "tokenmill_research", RESEARCH_INSTALL_HINT)
        return
    add_research_parser(sub)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except TokenmillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
