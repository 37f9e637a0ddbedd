"""tokenmill beside llama.cpp (and transformers) on CPU, interleaved rounds, medians and ratios (BENCHMARKS.md).

For each dtype and batch size, R rounds of: tokenmill, llama.cpp, transformers (A B C A B C ...), each a
fresh process with the same thread count, prompt length and output length. Prints a markdown table of
medians and tokenmill / peer ratios, each run's figures, and writes everything as JSON.

    PYTHONPATH=$PWD python benchmarks/cpu_peers.py --model /work/models/smollm2-135m --dtypes bfloat16 \\
        --batch-sizes 1 --gguf bfloat16=/work/models/smollm2-bf16.gguf --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a file: make `benchmarks` importable from the repository root
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.peer_commands import (  # noqa: E402
    Figures,
    llamacpp_command,
    parse_llamacpp,
    parse_tokenmill,
    parse_transformers,
    tokenmill_command,
    transformers_command,
)
from benchmarks.peer_report import Run, raw_table, summarize, summary_table  # noqa: E402

DTYPES = ("float32", "bfloat16", "float16")
# The file names `bash ../shared/peers/llamacpp.sh gguf HF_DIR PREFIX` writes, per dtype.
GGUF_SUFFIX = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
DEFAULT_BIN = Path(os.environ.get("TMPDIR", "/tmp")) / "llamacpp-peer" / "llama.cpp" / "build" / "bin"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Hugging Face checkpoint folder")
    parser.add_argument("--dtypes", default="bfloat16", help=f"comma-separated, from {', '.join(DTYPES)}")
    parser.add_argument("--batch-sizes", default="1", help="comma-separated, e.g. 1,8,32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llamacpp-bin", type=Path, default=DEFAULT_BIN,
                        help="folder with llama-bench and llama-batched-bench (default: where the peers script builds)")
    parser.add_argument("--gguf", action="append", default=[], metavar="DTYPE=PATH",
                        help="the GGUF file llama.cpp runs for a dtype (repeat per dtype)")
    parser.add_argument("--gguf-prefix", default=None, metavar="PREFIX",
                        help="PREFIX-{f32,bf16,f16}.gguf, as the peers script names them, for dtypes without --gguf")
    parser.add_argument("--no-llamacpp", action="store_true", help="leave llama.cpp out")
    parser.add_argument("--transformers", action="store_true", help="also run transformers generate")
    parser.add_argument("--tokenmill-args", default="", help='more flags for tokenmill bench, e.g. "--compile"')
    parser.add_argument("--python", default=sys.executable, help="the interpreter for tokenmill and transformers")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one run may take")
    parser.add_argument("--json", dest="json_path", type=Path,
                        default=Path(tempfile.gettempdir()) / "cpu_peers.json")
    return parser


def gguf_files(specs: list[str], prefix: str | None, dtypes: list[str]) -> dict[str, str]:
    """dtype -> GGUF path, from DTYPE=PATH pairs first, then PREFIX-<suffix>.gguf."""
    files: dict[str, str] = {}
    for spec in specs:
        dtype, sep, path = spec.partition("=")
        if not sep or dtype not in DTYPES or not path:
            raise SystemExit(f"error: --gguf takes DTYPE=PATH with DTYPE in {', '.join(DTYPES)}, got {spec!r}")
        files[dtype] = path
    for dtype in dtypes:
        if dtype not in files and prefix:
            files[dtype] = f"{prefix}-{GGUF_SUFFIX[dtype]}.gguf"
    for dtype, path in files.items():
        if not Path(path).is_file():
            raise SystemExit(f"error: GGUF for {dtype}: no file {path}")
    return files


def run_process(command: list[str], env: dict[str, str], timeout: float) -> str:
    """The command's stdout; a failure stops the comparison with the command and its stderr's tail."""
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise SystemExit(f"error: timed out after {timeout:.0f} s: {shlex.join(command)}") from exc
    if done.returncode != 0:
        raise SystemExit(f"error: exit {done.returncode}: {shlex.join(command)}\n{done.stderr[-2000:]}")
    return done.stdout


class Systems:
    """Runs one system once for a (dtype, batch size) and returns its figures."""

    def __init__(self, args: argparse.Namespace, ggufs: dict[str, str], workdir: Path) -> None:
        self.args = args
        self.ggufs = ggufs
        self.workdir = workdir
        # Torch reads these at start-up; llama.cpp gets -t. The same thread count for every system. The
        # tokenmill measured is the one beside this script, whatever checkout an installed package points at.
        path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        self.env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
                    "PYTHONPATH": path}

    def names(self, dtype: str) -> list[str]:
        names = ["tokenmill"]
        if not self.args.no_llamacpp and dtype in self.ggufs:
            names.append("llama.cpp")
        if self.args.transformers:
            names.append("transformers")
        return names

    def run(self, system: str, dtype: str, batch_size: int) -> Figures:
        a = self.args
        if system == "llama.cpp":
            command = llamacpp_command(a.llamacpp_bin, self.ggufs[dtype], batch_size, a.input_len, a.output_len,
                                       a.threads)
            return parse_llamacpp(run_process(command, self.env, a.timeout), batch_size, a.input_len, a.output_len)
        out = self.workdir / f"{system}.json"
        if system == "tokenmill":
            command = tokenmill_command(a.python, a.model, dtype, batch_size, a.input_len, a.output_len, out,
                                        shlex.split(a.tokenmill_args))
            run_process(command, self.env, a.timeout)
            return parse_tokenmill(json.loads(out.read_text()))
        command = transformers_command(a.python, a.model, dtype, batch_size, a.input_len, a.output_len, out)
        run_process(command, self.env, a.timeout)
        return parse_transformers(json.loads(out.read_text()))


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or any(d not in DTYPES for d in dtypes):
        raise SystemExit(f"error: --dtypes takes {', '.join(DTYPES)}, got {args.dtypes!r}")
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError as exc:
        raise SystemExit(f"error: --batch-sizes takes integers, got {args.batch_sizes!r}") from exc
    if not batch_sizes or min(batch_sizes) < 1 or args.rounds < 1:
        raise SystemExit("error: --batch-sizes and --rounds must be at least 1")
    ggufs = {} if args.no_llamacpp else gguf_files(args.gguf, args.gguf_prefix, dtypes)
    if not args.no_llamacpp:
        for dtype in dtypes:
            if dtype not in ggufs:
                print(f"note: no GGUF for {dtype} (--gguf {dtype}=PATH): llama.cpp is not run for it", file=sys.stderr)
        tools = ["llama-bench"] * (1 in batch_sizes) + ["llama-batched-bench"] * any(b > 1 for b in batch_sizes)
        missing = [t for t in tools if not (args.llamacpp_bin / t).is_file()]
        if ggufs and missing:
            raise SystemExit(f"error: {', '.join(missing)} not in {args.llamacpp_bin} (--llamacpp-bin; "
                             "`bash shared/peers/llamacpp.sh build` builds them)")

    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="cpu-peers-") as workdir:
        systems = Systems(args, ggufs, Path(workdir))
        for dtype in dtypes:
            for batch_size in batch_sizes:
                for round_index in range(args.rounds):
                    for name in systems.names(dtype):
                        figures = systems.run(name, dtype, batch_size)
                        runs.append(Run(name, dtype, batch_size, round_index, figures.tok_per_s, figures.extra))
                        print(f"round {round_index + 1}/{args.rounds}  {dtype}  batch {batch_size}  {name:<12} "
                              f"{figures.tok_per_s:,.1f} tok/s", file=sys.stderr, flush=True)
    summaries = summarize(runs)
    print(f"\n{args.model}: {args.input_len} prompt + {args.output_len} new tokens, {args.threads} threads, "
          f"decode tok/s of the whole batch, medians of {args.rounds} interleaved rounds\n")
    print(summary_table(summaries))
    print("\nEach round:\n")
    print(raw_table(runs))
    args.json_path.write_text(json.dumps({"settings": _settings(args, dtypes, batch_sizes, ggufs),
                                          "summary": [asdict(s) for s in summaries],
                                          "runs": [asdict(r) for r in runs]}, indent=2))
    print(f"\nwrote {args.json_path}")


def _settings(args: argparse.Namespace, dtypes: list[str], batch_sizes: list[int],
              ggufs: dict[str, str]) -> dict[str, Any]:
    return {"model": args.model, "dtypes": dtypes, "batch_sizes": batch_sizes, "rounds": args.rounds,
            "input_len": args.input_len, "output_len": args.output_len, "threads": args.threads,
            "gguf": ggufs, "llamacpp_bin": str(args.llamacpp_bin), "tokenmill_args": args.tokenmill_args,
            "transformers": args.transformers}


if __name__ == "__main__":
    main()
