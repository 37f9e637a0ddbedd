"""The one prepared device check: `python -m tokenmill.bench.device_check --out DIR [--dry-run]`.

Made for the rare, short loans of a GPU (one H200, about 15 minutes, 8 of them for this check): in one run
it checks the Triton kernels against their torch twins at full shapes, greedy parity of the device with the
CPU, the latency and throughput recipes on the Llama-3-8B and Qwen3-0.6B shapes (random weights) as a
share of the bandwidth ceiling it measures itself, and the 8B start-up time. Every section is timed and
guarded (an error or its time limit is recorded and the next section runs), the whole run has a budget,
results are written to DIR/device_check.json after every section, and a short table is printed last.
`--dry-run` runs the same code on the CPU with tiny shapes, in seconds (tests/gpu/test_device_check.py).
It imports only PyTorch, Triton, numpy, safetensors, tokenizers and jinja2: what that machine has.
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from tokenmill.bench import device_sections as sections

# What the device machine lacks: the check must not need any of it.
FORBIDDEN_MODULES = ("transformers", "fastapi", "uvicorn", "pydantic", "llguidance", "openai")
DEFAULT_BUDGET_S = 450.0  # of the 8 minutes: leaves room for interpreter start, imports and the copy back


class SectionTimeout(Exception):
    pass


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise SectionTimeout in this (main) thread after `seconds`; a GPU call in flight finishes first."""
    def expire(signum: int, frame: Any) -> None:
        raise SectionTimeout(f"over its limit of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# (name, function, the most seconds it may take). The limits add up to the default budget, so a slow
# section cannot starve the ones after it; each shape's engine lives from its startup to its throughput
# section, because the next engine's memory profile needs the GPU free.
Section = tuple[str, Callable[[sections.Context], dict[str, Any]], float]
BIG, SMALL = "llama-3-8b", "qwen3-0.6b"
SECTIONS: list[Section] = [
    ("kernels", sections.kernels, 75),
    ("bandwidth", sections.bandwidth, 15),
    ("parity", sections.parity, 45),
    (f"startup {BIG}", lambda ctx: sections.startup(ctx, BIG), 60),
    (f"latency {BIG}", lambda ctx: sections.latency(ctx, BIG), 50),
    (f"throughput {BIG}", lambda ctx: sections.throughput(ctx, BIG), 100),
    (f"startup {SMALL}", lambda ctx: sections.startup(ctx, SMALL), 30),
    (f"latency {SMALL}", lambda ctx: sections.latency(ctx, SMALL), 30),
    (f"throughput {SMALL}", lambda ctx: sections.throughput(ctx, SMALL), 45),
]


def run_check(out: Path, dry_run: bool, skip: set[str], budget_s: float) -> dict[str, Any]:
    started = time.perf_counter()
    device = torch.device("cpu" if dry_run else "cuda")
    plan = sections.Plan.for_run(dry_run)
    ctx = sections.Context(plan, device, sections.new_workdir())
    report: dict[str, Any] = {"dry_run": dry_run, "device": _device_name(device), "torch": torch.__version__,
                              "python": platform.python_version(), "budget_s": budget_s, "sections": {}}
    out.mkdir(parents=True, exist_ok=True)
    for name, function, limit in SECTIONS:
        if name.startswith("startup"):  # the previous shape is done: free the GPU for this one's profile
            for shape in list(ctx.engines):
                sections.release_engine(ctx, shape)
        if name in skip or name.split()[0] in skip:
            report["sections"][name] = {"status": "skipped", "reason": "--skip"}
            continue
        left = budget_s - (time.perf_counter() - started)
        if left < 5:
            report["sections"][name] = {"status": "skipped", "reason": f"the budget of {budget_s:.0f} s is spent"}
            continue
        report["sections"][name] = _run_section(function, ctx, min(limit, left))
        _write(out, report)
    for shape in list(ctx.engines):
        sections.release_engine(ctx, shape)
    report["seconds"] = time.perf_counter() - started
    report["forbidden_modules_imported"] = sorted(m for m in FORBIDDEN_MODULES if m in sys.modules)
    _write(out, report)
    return report


def _run_section(function: Callable[[sections.Context], dict[str, Any]], ctx: sections.Context,
                 limit: float) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        with time_limit(limit):
            result = function(ctx)
        status = "ok" if result.pop("ok", True) else "failed"
        outcome = {"status": status, **result}
    except SectionTimeout as error:
        outcome = {"status": "timeout", "error": str(error)}
    except Exception as error:
        outcome = {"status": "error", "error": f"{type(error).__name__}: {error}",
                   "traceback": traceback.format_exc(limit=-8)}
    outcome["seconds"] = time.perf_counter() - started
    return outcome


def table(report: dict[str, Any]) -> str:
    rows = [(name, section["status"], f"{section.get('seconds', 0.0):.1f}",
             section.get("summary") or section.get("error") or section.get("reason", ""))
            for name, section in report["sections"].items()]
    widths = [max(len(row[i]) for row in rows + [("section", "status", "s", "")]) for i in range(3)]
    lines = [f"device check on {report['device']}" + (" (dry run)" if report["dry_run"] else ""),
             "  ".join(h.ljust(w) for h, w in zip(("section", "status", "s"), widths)) + "  result"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3].splitlines()[0][:100]
              for row in rows]
    return "\n".join(lines)


def _write(out: Path, report: dict[str, Any]) -> None:
    (out / "device_check.json").write_text(json.dumps(report, indent=2, default=str))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenmill.bench.device_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for device_check.json")
    parser.add_argument("--dry-run", action="store_true", help="the same code on the CPU with tiny shapes")
    parser.add_argument("--skip", default="", help="comma-separated sections (or kinds: kernels, latency, ...)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="stop starting sections after this")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device; use --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    report = run_check(args.out, args.dry_run, {s.strip() for s in args.skip.split(",") if s.strip()}, args.budget_s)
    print(table(report))
    return 0 if all(s["status"] in ("ok", "skipped") for s in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
