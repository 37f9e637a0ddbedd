"""`tokenmill train`: corpus → tokenizer → packed rows → Llama pretraining → standard HF checkpoint folder."""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from tokenmill.utils.text_files import gather_files, read_corpus
from tokenmill_train import checkpoint_io as ckpt
from tokenmill_train.corpus import PackedLoader, pack_rows, split_holdout, tokenize_and_join
from tokenmill_train.model import LlamaForCausalLM, ModelConfig
from tokenmill_train.qat import enable_fake_quant, export_quantized, qat_spec
from tokenmill_train.tokenizer_train import BOS, EOS, PAD, special_ids, train_tokenizer

Log = Callable[[str], None]


@dataclass
class TrainArgs:
    data: list[str]
    out: str
    extensions: list[str] = field(default_factory=lambda: [".py"])
    holdout_fraction: float = 0.01
    vocab_size: int = 8192
    tokenizer_max_chars: int | None = 200_000_000
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 688
    context_length: int = 512
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    max_steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 20
    save_every: int = 500
    keep_checkpoints: int = 2
    resume: str | None = None
    save_dtype: str = "auto"
    compile: bool = False
    qat: str | None = None  # int8 | int4 | w2: train with fake-quantized linear weights, export quantized
    qat_group_size: int | None = None  # None: the method's default group size that divides the widths


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda[:N], got {name!r}")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(device: torch.device) -> Any:
    """bf16 autocast on CUDA (fp32 master weights); plain fp32 on CPU, which keeps runs bit-reproducible."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def lr_lambda(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warmup to 1, then cosine decay to min_ratio at `total` steps (flat afterwards)."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                   device: torch.device) -> torch.optim.AdamW:
    # Weight decay on matrices only: decaying norm gains towards zero just fights the normalization.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, fused=device.type == "cuda")


def lm_loss(model: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    logits = model(rows[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, rows: torch.Tensor, batch_size: int, max_batches: int,
             device: torch.device) -> dict[str, float] | None:
    """Token-weighted mean held-out loss and its perplexity over the first max_batches batches."""
    if len(rows) == 0:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, min(len(rows), batch_size * max_batches), batch_size):
        batch = rows[start : start + batch_size].to(device).long()
        with autocast(device):
            logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += batch[:, 1:].numel()
    model.train(was_training)
    mean = total / count
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0))}


def heldout_rows(stream: np.ndarray, seq_len: int) -> torch.Tensor:
    rows = pack_rows(stream, seq_len)
    if len(rows) == 0 and len(stream) > 1:
        # A held-out split shorter than one context still gives one (shorter) evaluation row.
        rows = torch.from_numpy(stream.astype(np.int32))[None, :]
    return rows


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    train_rows: torch.Tensor
    held_rows: torch.Tensor
    corpus_info: dict[str, Any]
    files: list[str]
    held_docs: list[str]
    held_stream: np.ndarray


def prepare_data(
    data: list[str],
    extensions: list[str],
    holdout_fraction: float,
    seed: int,
    context_length: int,
    tokenizer: Tokenizer | None,
    log: Log,
    vocab_size: int = 8192,
    tokenizer_max_chars: int | None = None,
    eos_id: int | None = None,
) -> PreparedData:
    """Gather, dedupe, split, (train the tokenizer on the train split unless given one), tokenize and pack."""
    files = gather_files(data, extensions)
    corpus = read_corpus(files)
    if not corpus.documents:
        raise ValueError(f"--data: no readable text files with extensions {extensions} under {data}")
    train_docs, held_docs = split_holdout(corpus.documents, holdout_fraction, seed)
    log(f"corpus: {len(corpus.documents)} documents ({corpus.duplicates} duplicates, {len(corpus.skipped)} skipped); "
        f"{len(train_docs)} train / {len(held_docs)} held out")
    if tokenizer is None:
        t0 = time.perf_counter()
        tokenizer = train_tokenizer((d.text for d in train_docs), vocab_size, tokenizer_max_chars)
        log(f"tokenizer: {tokenizer.get_vocab_size()} tokens trained in {time.perf_counter() - t0:.1f} s")
    eos = eos_id if eos_id is not None else special_ids(tokenizer)[EOS]
    train_stream = tokenize_and_join(tokenizer, [d.text for d in train_docs], eos)
    held_stream = tokenize_and_join(tokenizer, [d.text for d in held_docs], eos)
    info = {
        "files": len(files),
        "documents": len(corpus.documents),
        "duplicates_dropped": corpus.duplicates,
        "skipped": [{"path": p, "reason": r} for p, r in corpus.skipped],
        "train_documents": len(train_docs),
        "heldout_documents": len(held_docs),
        "train_tokens": int(len(train_stream)),
        "heldout_tokens": int(len(held_stream)),
        "fingerprint": corpus.fingerprint(),
    }
    return PreparedData(
        tokenizer=tokenizer,
        train_rows=pack_rows(train_stream, context_length),
        held_rows=heldout_rows(held_stream, context_length),
        corpus_info=info,
        files=[d.path for d in corpus.documents],
        held_docs=[d.path for d in held_docs],
        held_stream=held_stream,
    )


def model_config(args: TrainArgs, vocab_size: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        intermediate_size=args.intermediate_size,
        max_position_embeddings=args.context_length,
        rope_theta=args.rope_theta,
        tie_word_embeddings=args.tie_embeddings,
    )


# Arguments that fix the data order and shapes: a resumed run must match them to replay the same batches.
_RESUME_FIXED = ("batch_size", "grad_accum", "context_length", "seed", "holdout_fraction", "extensions")


def _check_resume_compatible(state: dict[str, Any], args: TrainArgs, fingerprint: str) -> None:
    if state["corpus_fingerprint"] != fingerprint:
        raise ValueError("--resume: the --data corpus differs from the one this checkpoint was trained on")
    saved = state["args"]
    changed = [f"--{k.replace('_', '-')} {saved[k]} -> {getattr(args, k)}" for k in _RESUME_FIXED
               if saved.get(k) != getattr(args, k)]
    if changed:
        raise ValueError(f"--resume: these must match the checkpoint's run: {', '.join(changed)}")


def train(args: TrainArgs, log: Log = lambda s: print(s, flush=True)) -> dict[str, Any]:
    """Run (or resume) a training run; write the checkpoint folder and training_summary.json; return it."""
    device = resolve_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    state: dict[str, Any] | None = None
    tokenizer: Tokenizer | None = None
    if args.resume:
        path = ckpt.resolve_resume(args.resume, out)
        state = ckpt.load_training_state(path)
        # The tokenizer travels inside the state: retraining it could give different ids.
        tokenizer = Tokenizer.from_str(state["tokenizer"])
        log(f"resuming from {path} at step {state['step']}")

    data = prepare_data(args.data, args.extensions, args.holdout_fraction, args.seed, args.context_length, tokenizer,
                        log, vocab_size=args.vocab_size, tokenizer_max_chars=args.tokenizer_max_chars)
    tokenizer = data.tokenizer
    if state is not None:
        _check_resume_compatible(state, args, data.corpus_info["fingerprint"])
    ids = special_ids(tokenizer)

    cfg = ModelConfig(**state["model_config"]) if state else model_config(args, tokenizer.get_vocab_size())
    model = LlamaForCausalLM(cfg).to(device)
    optimizer = make_optimizer(model, args.lr, args.weight_decay, (args.beta1, args.beta2), device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(args.warmup_steps, args.max_steps, args.min_lr_ratio)
    )
    loader = PackedLoader(data.train_rows, args.batch_size, args.seed)
    step, elapsed, history, evals = 0, 0.0, [], []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        loader.load_state_dict(state["loader"])
        ckpt.set_rng_state(state["rng"])
        step, elapsed = state["step"], state["elapsed_s"]
        history, evals = state["loss_history"], state["evals"]
    qat = None
    if args.qat:
        qat = qat_spec(args.qat, model, args.qat_group_size)
        log(f"quantization-aware training: {enable_fake_quant(model, qat)} linear layers fake-quantized as {qat}")
    forward = torch.compile(model) if args.compile else model
    log(f"model: {model.num_parameters() / 1e6:.2f} M parameters ({cfg.num_hidden_layers} layers, hidden "
        f"{cfg.hidden_size}, vocab {cfg.vocab_size}); {len(data.train_rows)} train rows of {cfg.max_position_embeddings}"
        f" tokens; device {device}")

    def save_state() -> None:
        ckpt.save_training_state(out, step, {
            "step": step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "loader": loader.state_dict(),
            "rng": ckpt.rng_state(),
            "elapsed_s": elapsed,
            "loss_history": history,
            "evals": evals,
            "model_config": cfg.to_dict(),
            "tokenizer": tokenizer.to_str(),
            "corpus_fingerprint": data.corpus_info["fingerprint"],
            "args": asdict(args),
        }, keep=args.keep_checkpoints)

    tokens_per_step = args.batch_size * args.grad_accum * cfg.max_position_embeddings
    model.train()
    window_start, window_tokens = time.perf_counter(), 0
    while step < args.max_steps:
        t0 = time.perf_counter()
        loss_sum = 0.0
        for _ in range(args.grad_accum):
            batch = loader.next_batch().to(device, non_blocking=True)
            with autocast(device):
                loss = lm_loss(forward, batch) / args.grad_accum
            loss.backward()
            loss_sum += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        elapsed += time.perf_counter() - t0
        window_tokens += tokens_per_step
        history.append(loss_sum)
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"step {step}: loss is {loss_sum}; lower --lr or raise --warmup-steps")
        if step % args.log_every == 0 or step == args.max_steps:
            now = time.perf_counter()
            tps = window_tokens / max(now - window_start, 1e-9)
            log(f"step {step}/{args.max_steps} | loss {loss_sum:.4f} | lr {scheduler.get_last_lr()[0]:.2e} | "
                f"grad {grad_norm.item():.2f} | {tps:,.0f} tok/s")
            window_start, window_tokens = now, 0
        if args.eval_every > 0 and step % args.eval_every == 0 and step < args.max_steps:
            ev = evaluate(model, data.held_rows, args.batch_size, args.eval_batches, device)
            if ev is not None:
                evals.append({"step": step, **ev})
                log(f"eval step {step} | held-out loss {ev['loss']:.4f} | ppl {ev['perplexity']:.2f}")
        if args.save_every > 0 and step % args.save_every == 0:
            save_state()

    final = evaluate(model, data.held_rows, args.batch_size, args.eval_batches, device)
    if final is not None:
        evals.append({"step": step, **final})
        log(f"final held-out loss {final['loss']:.4f} | ppl {final['perplexity']:.2f}")
    if args.save_every > 0 and step % args.save_every != 0:
        save_state()  # so `--resume latest --max-steps N` can extend a finished run

    save_dtype = args.save_dtype if args.save_dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    ckpt.save_hf_checkpoint(model, out, tokenizer, bos_id=ids[BOS], eos_id=ids[EOS], pad_id=ids[PAD],
                            dtype=save_dtype)
    exported = export_quantized(out, qat, log) if qat is not None else None
    summary = {
        "qat": exported,
        "corpus": data.corpus_info,
        "corpus_files": data.files[:10_000],
        "heldout_files": data.held_docs[:10_000],
        "model_config": cfg.to_dict(),
        "parameters": model.num_parameters(),
        "steps": step,
        "tokens_seen": step * tokens_per_step,
        "train_time_s": round(elapsed, 3),
        "final_train_loss": history[-1] if history else None,
        "final_heldout_loss": final["loss"] if final else None,
        "final_heldout_perplexity": final["perplexity"] if final else None,
        "evals": evals,
        "loss_history": history,
        "hardware": ckpt.hardware_summary(device),
        "save_dtype": save_dtype,
        "args": asdict(args),
    }
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2))
    log(f"wrote checkpoint folder {out} ({step} steps, {elapsed:.1f} s)")
    return summary
