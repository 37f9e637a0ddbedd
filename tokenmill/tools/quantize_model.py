"""`tokenmill quantize`: load a checkpoint in float32, quantize its linear layers by the chosen method and
algorithm, and write a quantized checkpoint folder; print progress and a summary."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tokenmill.errors import ConfigError
from tokenmill.models.loader import load_model, resolve_dtype
from tokenmill.quant.calibration import DEFAULT_SAMPLES, DEFAULT_WINDOW, calibration_windows
from tokenmill.quant.codes import METHODS, QuantSpec
from tokenmill.quant.weight_quantizer import WeightQuantizer, default_spec
from tokenmill.tools.layer_walk import LayerWalk, quantizable_linears
from tokenmill.tools.quantize_layers import (QuantizedLayers, quantize_awq_layers, quantize_gptq_layers,
                                             quantize_without_data)
from tokenmill.tools.quantized_checkpoint import write_quantized_checkpoint

ALGOS = ("rtn", "fit", "gptq", "awq")
CALIBRATED = ("gptq", "awq")


@dataclass(frozen=True)
class QuantizeOptions:
    method: str
    algo: str | None = None  # None: the method's default (fit for w2, rtn otherwise)
    group_size: int | None = None  # None: the method's default
    zero_point: bool = False  # w2 always has one
    calibration: Sequence[str] | None = None  # text files; None: the default stdlib samples
    samples: int = DEFAULT_SAMPLES
    window: int = DEFAULT_WINDOW

    def spec(self, widths: Sequence[int] = ()) -> QuantSpec:
        """The spec for layers of these input widths (they pick the default group size)."""
        if self.method not in METHODS:
            raise ConfigError("method", f"unknown method {self.method!r} (one of {', '.join(METHODS)})")
        return default_spec(self.method, widths, self.group_size, self.zero_point)

    def resolved_algo(self) -> str:
        algo = self.algo or ("fit" if self.method == "w2" else "rtn")
        if algo not in ALGOS:
            raise ConfigError("algo", f"unknown algorithm {algo!r} (one of {', '.join(ALGOS)})")
        if self.method == "fp8" and algo not in ("rtn", "gptq"):
            raise ConfigError("algo", f"fp8 is per-channel round-to-nearest or GPTQ, got {algo!r}")
        spec = self.spec()
        if algo == "fit" and not (spec.group_size and spec.zero_point):
            raise ConfigError("algo", "the alternating fit needs group-wise codes with a zero-point "
                              "(w2, or int4 with --zero-point)")
        return algo


@dataclass
class QuantizeSummary:
    out_dir: Path
    spec: QuantSpec
    algo: str
    seconds: float
    bytes_before: int
    bytes_after: int
    loss: float | None  # calibration output error (GPTQ / AWQ); None for data-free algorithms
    rtn_loss: float | None
    windows: int
    baseline: str = "RTN"  # what the calibrated loss is compared with: the same quantizer with no calibration

    def lines(self) -> list[str]:
        out = [f"wrote {self.out_dir} ({self.spec.method}, {self.algo}, group {self.spec.group_size or 'per-channel'}"
               f"{', zero-point' if self.spec.zero_point else ''}) in {self.seconds:.1f} s",
               f"size: {self.bytes_before / 1e6:.1f} MB -> {self.bytes_after / 1e6:.1f} MB "
               f"({self.bytes_after / max(self.bytes_before, 1):.1%})"]
        if self.loss is not None:
            out.append(f"calibration ({self.windows} windows) output error summed over layers: {self.algo} "
                       f"{self.loss:.5g}, {self.baseline} on the same inputs {self.rtn_loss:.5g}")
        return out


def _size_on_disk(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def _linear_widths(model: torch.nn.Module) -> dict[str, int]:
    return {f"model.layers.{i}.{name}": module.input_size for i, layer in enumerate(model.model.layers)
            for name, module in quantizable_linears(layer).items()}


def _check_widths(widths: dict[str, int], spec: QuantSpec) -> None:
    """Refuse a group size that does not divide a layer's width before any slow work."""
    for name, width in widths.items():
        try:
            spec.groups(width)
        except ConfigError as exc:
            raise ConfigError("group-size", f"{exc.message} ({name})") from None


def quantize_checkpoint(model_path: str | Path, out_dir: str | Path, options: QuantizeOptions,
                        log: Callable[[str], None] = lambda line: print(line, flush=True)) -> QuantizeSummary:
    start = time.perf_counter()
    printer = log
    log = lambda message: printer(f"[{time.perf_counter() - start:6.1f} s] {message}")  # progress with time
    options.spec()  # bad method or group size: refused before the model loads
    if Path(out_dir).resolve() == Path(model_path).resolve():
        raise ConfigError("out", f"{out_dir} is the source checkpoint; write the quantized one elsewhere")
    algo = options.resolved_algo()
    log(f"loading {model_path}")
    model, arch = load_model(model_path, dtype=torch.float32)
    widths = _linear_widths(model)
    spec = options.spec(list(widths.values()))
    _check_widths(widths, spec)
    # With a zero-point, GPTQ and AWQ take their group parameters from the alternating fit too: it is never
    # worse than RTN's min/max per group, and lands exactly on a grid the weights already sit on (SmolLM2's
    # float32 folder is dequantized Q4_1: int4 g32 with the fit reproduces it, RTN loses 20 % perplexity).
    quantizer = WeightQuantizer(spec, fit=(algo == "fit") or (spec.zero_point and algo in CALIBRATED))
    windows: list[list[int]] = []
    if algo in CALIBRATED:
        from tokenmill.engine.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_pretrained(model_path)
        windows = calibration_windows(lambda text: tokenizer.encode(text, add_special_tokens=False),
                                      options.samples, options.window, options.calibration)
        log(f"calibrating on {len(windows)} windows of {options.window} tokens")
        walk = LayerWalk(model, windows)
        run = quantize_gptq_layers if algo == "gptq" else quantize_awq_layers
        result: QuantizedLayers = run(model, quantizer, walk, log)
    else:
        result = quantize_without_data(model, quantizer, log)
    float_dtype = resolve_dtype("auto", arch)
    out = write_quantized_checkpoint(model_path, out_dir, model, result.stored, spec, float_dtype)
    calibrated = algo in CALIBRATED
    summary = QuantizeSummary(out, spec, algo, time.perf_counter() - start, _size_on_disk(Path(model_path)),
                              _size_on_disk(out), result.loss if calibrated else None,
                              result.rtn_loss if calibrated else None, len(windows),
                              "the alternating fit" if quantizer.fit else "RTN")
    for line in summary.lines():
        printer(line)
    return summary
