"""argparse wiring for `tokenmill train` and `tokenmill distill`.

Only argparse is imported here; torch and the training code load inside the handlers, so `tokenmill --help`
and `import tokenmill` pay nothing for them. Argument `dest`s equal TrainArgs / DistillArgs field names.
"""

from __future__ import annotations

import argparse
from typing import Any

from tokenmill.config import DTYPES

_DEVICE_HELP = "auto (cuda if available), cpu, or cuda[:N]"


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", nargs="+", required=True, metavar="PATH", help="text files and/or folders")
    p.add_argument("--out", required=True, metavar="DIR", help="output checkpoint folder")
    p.add_argument("--ext", dest="extensions", nargs="+", default=[".py"], metavar="EXT",
                   help="file extensions gathered from folders (default: .py)")
    p.add_argument("--holdout-fraction", type=float, default=0.01, help="fraction of documents held out (seeded)")


def _add_model_args(p: argparse.ArgumentParser, *, draft: bool) -> None:
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", dest="num_layers", type=int, default=1 if draft else 4)
    auto = " (default: derived from the target)" if draft else ""
    p.add_argument("--heads", dest="num_heads", type=int, default=None if draft else 4, help="attention heads" + auto)
    p.add_argument("--kv-heads", dest="num_kv_heads", type=int, default=None if draft else 2,
                   help="key/value heads (GQA)" + auto)
    p.add_argument("--intermediate-size", type=int, default=None if draft else 688, help="SwiGLU width" + auto)
    p.add_argument("--context-length", type=int, default=None if draft else 512,
                   help="training sequence length" + (" (default: the target's, at most 1024)" if draft else ""))


def _add_optim_args(p: argparse.ArgumentParser, *, lr: float, warmup: int, weight_decay: float, eval_every: int) -> None:
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16, help="rows per optimizer step (per micro-batch)")
    p.add_argument("--lr", type=float, default=lr, help="peak learning rate (AdamW)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr")
    p.add_argument("--warmup-steps", type=int, default=warmup)
    p.add_argument("--weight-decay", type=float, default=weight_decay)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help=_DEVICE_HELP)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=eval_every, help="steps between held-out evaluations (0: end only)")
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--save-dtype", default="auto", choices=DTYPES,
                   help="dtype of model.safetensors (auto: bfloat16 on CUDA, float32 on CPU)")


def _add_qat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--qat", default=None, choices=["int8", "int4", "w2"],
                   help="quantization-aware training: fake-quantize the linear weights (straight-through) and also "
                   "write the quantized checkpoint to OUT/quantized")
    p.add_argument("--qat-group-size", type=int, default=None,
                   help="input columns per scale for int4/w2 (default: the largest of 128/64/32 dividing the widths)")


def _pick(ns: argparse.Namespace, fields: Any) -> dict[str, Any]:
    # Only this command's fields: the top-level parser may add its own (command, func, verbosity...).
    names = {f.name for f in fields}
    return {k: v for k, v in vars(ns).items() if k in names}


def _run(kind: str, ns: argparse.Namespace) -> None:
    # Failures caused by the user's input become TokenmillError, which the CLI prints without a traceback.
    import dataclasses

    from tokenmill.errors import TokenmillError

    try:
        if kind == "train":
            from tokenmill_train.trainer import TrainArgs, train

            train(TrainArgs(**_pick(ns, dataclasses.fields(TrainArgs))))
        elif getattr(ns, "method", "draft") == "eagle":
            from tokenmill_train.eagle_distill import EagleDistillArgs, distill_eagle

            distill_eagle(EagleDistillArgs(**_pick(ns, dataclasses.fields(EagleDistillArgs))))
        else:
            from tokenmill_train.distill import DistillArgs, distill

            distill(DistillArgs(**_pick(ns, dataclasses.fields(DistillArgs))))
    except (ValueError, FileNotFoundError) as e:
        raise TokenmillError(str(e)) from e


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `tokenmill train` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "train",
        help="train a byte-level BPE tokenizer and a small Llama from text files",
        description="Gather text, train a tokenizer, pretrain a Llama-architecture model and write a standard "
        "Hugging Face checkpoint folder (plus training_summary.json).",
    )
    _add_data_args(p)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--tokenizer-max-chars", type=int, default=200_000_000,
                   help="characters of training text the BPE trainer reads")
    _add_model_args(p, draft=False)
    p.add_argument("--no-tie-embeddings", dest="tie_embeddings", action="store_false",
                   help="separate lm_head instead of sharing the embedding matrix")
    p.add_argument("--rope-theta", type=float, default=10000.0)
    _add_optim_args(p, lr=3e-4, warmup=100, weight_decay=0.1, eval_every=200)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--save-every", type=int, default=500, help="steps between resumable checkpoints (0: off)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="resumable checkpoints kept (newest)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="STATE",
                   help="continue from a checkpoints/step_N.pt file, or the newest under --out if no path")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA runs)")
    _add_qat_args(p)
    p.set_defaults(func=lambda ns: _run("train", ns))
    return p


def add_distill_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `tokenmill distill` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "distill",
        help="distill a small draft model (or an EAGLE draft head) from a target for speculative decoding",
        description="Train a 1-2 layer draft with the target's tokenizer by KL distillation, report its greedy "
        "acceptance rate against the target, and write a standard checkpoint folder (plus distill_summary.json). "
        "With --method eagle: train a draft head over the target's hidden states (docs/speculative_heads.md) and "
        "write its folder, for --speculative-method eagle --draft-model OUT.",
    )
    p.add_argument("--method", default="draft", choices=["draft", "eagle"],
                   help="draft: a separate small model; eagle: a head over the target's hidden states (the model "
                   "shape and QAT options do not apply to it)")
    p.add_argument("--target", required=True, metavar="PATH", help="target checkpoint folder (Llama)")
    _add_data_args(p)
    _add_model_args(p, draft=True)
    p.add_argument("--init-draft", default=None, metavar="PATH",
                   help="continue from this draft checkpoint folder (same shape) instead of starting afresh")
    p.add_argument("--no-init-from-target", dest="init_from_target", action="store_false",
                   help="do not copy embeddings / norm / head from the target when widths match")
    p.add_argument("--temperature", type=float, default=1.0, help="distillation softmax temperature")
    p.add_argument("--ce-weight", type=float, default=0.0, help="weight of next-token cross-entropy added to KL")
    p.add_argument("--self-gen-fraction", type=float, default=0.0,
                   help="fraction of batches trained on the target's own continuations of data prefixes")
    p.add_argument("--gen-temperature", type=float, default=0.0, help="target sampling temperature (0: greedy)")
    p.add_argument("--gen-prefix-length", type=int, default=None, help="data prefix before generation")
    _add_optim_args(p, lr=1e-3, warmup=50, weight_decay=0.0, eval_every=100)
    p.add_argument("--draft-vocab-size", type=int, default=None,
                   help="eagle: draft over the N most frequent training tokens only (default: the whole vocabulary)")
    p.add_argument("--feature-weight", type=float, default=1.0, help="eagle: weight of the feature regression")
    p.add_argument("--kl-weight", type=float, default=0.1, help="eagle: weight of the token KL")
    p.add_argument("--feature-noise", type=float, default=0.0, help="eagle: std of noise on the input features")
    p.add_argument("--acceptance-k", type=int, default=4, help="draft tokens per verify step in the acceptance test")
    p.add_argument("--acceptance-prompts", type=int, default=16)
    p.add_argument("--acceptance-prompt-length", type=int, default=32)
    p.add_argument("--acceptance-new-tokens", type=int, default=32)
    _add_qat_args(p)
    p.set_defaults(func=lambda ns: _run("distill", ns))
    return p
