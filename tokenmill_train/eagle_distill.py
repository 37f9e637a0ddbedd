"""`tokenmill distill --method eagle`: train an EAGLE-style draft head for a target on text files.

The target's final-norm hidden states are computed on the fly for each batch (no feature files). The head
reads, at each position, the target's hidden state of the position before and the token's embedding, and is
trained to predict the target's hidden state there: a smooth-L1 feature regression plus the KL divergence
between the target's next-token distribution and the one the target's LM head gives on the predicted
feature (over the reduced draft vocabulary when one is asked for). Held-out acceptance is measured the way
the engine drafts: greedy chains from target features up to the last token, then from the head's own.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tokenmill_train import checkpoint_io as ckpt
from tokenmill_train.corpus import PackedLoader
from tokenmill_train.distill import acceptance_prompts
from tokenmill_train.eagle_model import EagleHeadModel, draft_chain, head_config_for, save_head, shifted_hidden
from tokenmill_train.model import LlamaForCausalLM
from tokenmill_train.tokenizer_train import load_tokenizer
from tokenmill_train.trainer import Log, autocast, lr_lambda, make_optimizer, prepare_data, resolve_device, \
    seed_everything


@dataclass
class EagleDistillArgs:
    target: str
    data: list[str]
    out: str
    extensions: list[str] = field(default_factory=lambda: [".py"])
    holdout_fraction: float = 0.01
    context_length: int | None = None  # None: the target's, capped at 512
    draft_vocab_size: int | None = None  # None: draft over the target's whole vocabulary
    feature_weight: float = 1.0
    kl_weight: float = 0.1
    temperature: float = 1.0
    feature_noise: float = 0.0  # std of Gaussian noise on the input features (robustness to the head's own)
    self_gen_fraction: float = 0.0
    gen_temperature: float = 0.0
    gen_prefix_length: int | None = None  # None: a quarter of the context
    max_steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 10
    acceptance_k: int = 4
    acceptance_prompts: int = 16
    acceptance_prompt_length: int = 32
    acceptance_new_tokens: int = 32
    save_dtype: str = "auto"

    def check(self) -> None:
        if self.draft_vocab_size is not None and self.draft_vocab_size < 1:
            raise ValueError(f"--draft-vocab-size must be >= 1, got {self.draft_vocab_size}")
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")
        if self.feature_weight < 0 or self.kl_weight < 0 or self.feature_weight + self.kl_weight == 0:
            raise ValueError("--feature-weight and --kl-weight must be >= 0, and not both 0")
        if not 0.0 <= self.self_gen_fraction <= 1.0:
            raise ValueError(f"--self-gen-fraction must be in [0, 1], got {self.self_gen_fraction}")
        if self.acceptance_k < 1:
            raise ValueError(f"--acceptance-k must be >= 1, got {self.acceptance_k}")


def frequent_tokens(rows: torch.Tensor, vocab_size: int, count: int) -> torch.Tensor:
    """The `count` most frequent token ids of the training rows (ties: lower id first), ascending."""
    counts = torch.bincount(rows.reshape(-1).long(), minlength=vocab_size)[:vocab_size]
    order = sorted(range(vocab_size), key=lambda t: (-int(counts[t]), t))[:count]
    return torch.tensor(sorted(order), dtype=torch.int64)


def head_losses(head: EagleHeadModel, target: LlamaForCausalLM, rows: torch.Tensor, args: EagleDistillArgs,
                draft_vocab: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weighted total, feature smooth-L1, token KL) of the head on token rows [B, T]."""
    device = rows.device
    with torch.no_grad(), autocast(device):
        hidden = target.hidden_states(rows).float()
        embedded = target.model.embed_tokens(rows).float()
    prev = shifted_hidden(hidden)
    if args.feature_noise > 0 and head.training:
        prev = prev + torch.randn_like(prev) * args.feature_noise
    with autocast(device):
        features = head(prev, embedded).float()
    feature_loss = F.smooth_l1_loss(features, hidden)
    weight = target.lm_head.weight if draft_vocab is None else target.lm_head.weight[draft_vocab]
    weight = weight.float()
    with torch.no_grad():
        target_logp = F.log_softmax((hidden @ weight.T) / args.temperature, dim=-1)
    draft_logp = F.log_softmax((features @ weight.T) / args.temperature, dim=-1)
    kl = F.kl_div(draft_logp.flatten(0, 1), target_logp.flatten(0, 1), log_target=True, reduction="batchmean")
    return args.feature_weight * feature_loss + args.kl_weight * kl, feature_loss, kl


@torch.no_grad()
def heldout_loss(head: EagleHeadModel, target: LlamaForCausalLM, rows: torch.Tensor, args: EagleDistillArgs,
                 draft_vocab: torch.Tensor | None, device: torch.device) -> float | None:
    if len(rows) == 0:
        return None
    was = head.training
    head.eval()
    losses = []
    for start in range(0, min(len(rows), args.batch_size * args.eval_batches), args.batch_size):
        batch = rows[start : start + args.batch_size].to(device).long()
        losses.append(float(head_losses(head, target, batch, args, draft_vocab)[0]))
    head.train(was)
    return sum(losses) / len(losses)


@torch.no_grad()
def eagle_acceptance(head: EagleHeadModel, target: LlamaForCausalLM, prompts: list[list[int]], k: int,
                     new_tokens: int, draft_vocab: torch.Tensor | None, device: torch.device) -> dict[str, Any]:
    """Greedy speculative decoding simulated on the target's own greedy continuations of the prompts."""
    was = head.training
    head.eval()
    steps: list[int] = []
    generator = torch.Generator(device=device).manual_seed(0)
    for prompt in prompts:
        sequence = target.generate(torch.tensor([prompt], device=device), new_tokens, 0.0, generator)[0]
        hidden = target.hidden_states(sequence[None])[0]
        last = len(prompt)  # the first generated token: drafting starts after it
        while last < len(sequence) - 1:
            drafts = draft_chain(head, target, sequence, hidden, last, k, draft_vocab)
            truth = sequence[last + 1 : last + 1 + k].tolist()
            accepted = next((i for i, (d, t) in enumerate(zip(drafts, truth)) if d != t), len(truth))
            steps.append(accepted)
            last += accepted + 1
    head.train(was)
    if not steps:
        raise ValueError("eagle acceptance: no verify steps ran (no room for new tokens?)")
    accepted = np.asarray(steps)
    return {"k": k, "sequences": len(prompts), "verify_steps": len(steps),
            "mean_accepted_tokens": float(accepted.mean()), "mean_accepted_length": float(accepted.mean()) + 1.0,
            "per_position_acceptance": [float((accepted > i).mean()) for i in range(k)]}


def distill_eagle(args: EagleDistillArgs, log: Log = lambda s: print(s, flush=True)) -> dict[str, Any]:
    """Train a head for --target on --data; write the head folder (config.json, model.safetensors) and
    distill_summary.json into --out."""
    args.check()
    device = resolve_device(args.device)
    seed_everything(args.seed)
    out = Path(args.out)
    target = ckpt.load_hf_model(args.target, device).eval().requires_grad_(False)
    target_hf = json.loads((Path(args.target) / "config.json").read_text())
    if args.draft_vocab_size is not None and args.draft_vocab_size > target.config.vocab_size:
        raise ValueError(f"--draft-vocab-size {args.draft_vocab_size} exceeds the target's vocabulary "
                         f"({target.config.vocab_size})")
    ctx = args.context_length or min(target.config.max_position_embeddings, 512)
    if ctx > target.config.max_position_embeddings:
        raise ValueError(f"--context-length {ctx} exceeds the target's max_position_embeddings "
                         f"({target.config.max_position_embeddings})")
    eos = target_hf.get("eos_token_id")
    eos_id = eos[0] if isinstance(eos, list) else eos
    if eos_id is None:
        raise ValueError(f"{args.target}/config.json: eos_token_id is needed to join documents")
    data = prepare_data(args.data, args.extensions, args.holdout_fraction, args.seed, ctx, load_tokenizer(args.target),
                        log, eos_id=eos_id)
    if len(data.train_rows) == 0:
        raise ValueError(f"--data: fewer training tokens than one context ({ctx}); give more text or a shorter "
                         f"--context-length")
    draft_vocab = None
    if args.draft_vocab_size is not None:
        draft_vocab = frequent_tokens(data.train_rows, target.config.vocab_size, args.draft_vocab_size).to(device)
    head = EagleHeadModel(head_config_for(target.config, args.draft_vocab_size)).to(device)
    log(f"target: {target.num_parameters() / 1e6:.2f} M parameters; head: "
        f"{sum(p.numel() for p in head.parameters()) / 1e6:.2f} M; draft vocabulary: "
        f"{args.draft_vocab_size or target.config.vocab_size} tokens")
    optimizer = make_optimizer(head, args.lr, args.weight_decay, (args.beta1, args.beta2), device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup_steps, args.max_steps,
                                                                       args.min_lr_ratio))
    loader = PackedLoader(data.train_rows, args.batch_size, args.seed)
    pick = random.Random(args.seed)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    prefix_len = args.gen_prefix_length or max(1, ctx // 4)
    loss0 = heldout_loss(head, target, data.held_rows, args, draft_vocab, device)
    evals: list[dict[str, Any]] = [{"step": 0, "heldout_loss": loss0}]
    log(f"step 0 | held-out loss {loss0:.4f}" if loss0 is not None else "no held-out rows: loss is not evaluated")
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    head.train()
    for step in range(1, args.max_steps + 1):
        rows = loader.next_batch().to(device).long()
        if args.self_gen_fraction > 0 and pick.random() < args.self_gen_fraction:
            with torch.no_grad(), autocast(device):  # the target's own continuation of each row's prefix
                rows = target.generate(rows[:, :prefix_len], rows.shape[1] - prefix_len, args.gen_temperature, gen)
        loss, feature_loss, kl = head_losses(head, target, rows, args, draft_vocab)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), args.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({"loss": loss.item(), "feature": feature_loss.item(), "kl": kl.item()})
        if step % args.log_every == 0 or step == args.max_steps:
            elapsed = time.perf_counter() - started
            log(f"step {step}/{args.max_steps} | loss {loss.item():.4f} (feature {feature_loss.item():.4f}, "
                f"KL {kl.item():.4f}) | lr {scheduler.get_last_lr()[0]:.2e} | "
                f"{step * rows.numel() / max(elapsed, 1e-9):,.0f} tok/s")
        if args.eval_every > 0 and step % args.eval_every == 0 and step < args.max_steps:
            held = heldout_loss(head, target, data.held_rows, args, draft_vocab, device)
            evals.append({"step": step, "heldout_loss": held})
            if held is not None:
                log(f"eval step {step} | held-out loss {held:.4f}")
    train_time = time.perf_counter() - started
    loss_final = heldout_loss(head, target, data.held_rows, args, draft_vocab, device)
    evals.append({"step": args.max_steps, "heldout_loss": loss_final})
    prompts = acceptance_prompts(data.held_stream, data.train_rows, args.acceptance_prompts,
                                 min(args.acceptance_prompt_length, ctx // 2))
    new_tokens = min(args.acceptance_new_tokens, target.config.max_position_embeddings - len(max(prompts, key=len)))
    acceptance = eagle_acceptance(head, target, prompts, args.acceptance_k, new_tokens, draft_vocab, device)
    per_position = ", ".join(f"{p:.2f}" for p in acceptance["per_position_acceptance"])
    log(f"held-out loss {_rounded(loss0)} -> {_rounded(loss_final)} | held-out acceptance (greedy chain, "
        f"k={args.acceptance_k}): mean accepted length {acceptance['mean_accepted_length']:.2f}, per position "
        f"[{per_position}]")
    save_dtype = args.save_dtype if args.save_dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    save_head(head, out, None if draft_vocab is None else draft_vocab.cpu(), getattr(torch, save_dtype))
    summary = {
        "method": "eagle", "target": str(args.target), "head_config": asdict(head.config),
        "head_parameters": sum(p.numel() for p in head.parameters()), "corpus": data.corpus_info,
        "heldout_files": data.held_docs,
        "steps": args.max_steps, "train_tokens_seen": args.max_steps * args.batch_size * ctx,
        "train_time_s": round(train_time, 3), "initial_heldout_loss": loss0, "final_heldout_loss": loss_final,
        "evals": evals, "loss_history": history, "acceptance": acceptance,
        "hardware": ckpt.hardware_summary(device), "save_dtype": save_dtype, "args": asdict(args),
    }
    (out / "distill_summary.json").write_text(json.dumps(summary, indent=2))
    log(f"wrote EAGLE head folder {out}")
    return summary


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
