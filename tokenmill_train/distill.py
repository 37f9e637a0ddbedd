"""`tokenmill distill`: train a 1–2 layer draft for speculative decoding by matching a target's distribution.

The draft shares the target's tokenizer and vocabulary. Its loss is the KL divergence KL(p_target || p_draft)
at a temperature, on corpus rows and, for a fraction of batches, on the target's own continuations of corpus
prefixes (what the draft will actually face while speculating). The draft is judged the way it is used: by
simulating greedy speculative decoding against the target and counting accepted tokens.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tokenmill_train import checkpoint_io as ckpt
from tokenmill_train.corpus import PackedLoader
from tokenmill_train.model import LlamaForCausalLM, ModelConfig
from tokenmill_train.qat import enable_fake_quant, export_quantized, qat_spec
from tokenmill_train.tokenizer_train import load_tokenizer
from tokenmill_train.trainer import (
    Log,
    autocast,
    lr_lambda,
    make_optimizer,
    prepare_data,
    resolve_device,
    seed_everything,
)


@dataclass
class DistillArgs:
    target: str
    data: list[str]
    out: str
    extensions: list[str] = field(default_factory=lambda: [".py"])
    holdout_fraction: float = 0.01
    hidden_size: int = 256
    num_layers: int = 1
    num_heads: int | None = None  # None: keep the target's head_dim
    num_kv_heads: int | None = None  # None: keep the target's GQA group size
    intermediate_size: int | None = None  # None: the target's MLP ratio
    context_length: int | None = None  # None: the target's, capped at 1024
    init_from_target: bool = True
    init_draft: str | None = None  # a draft checkpoint folder to continue from (same shape)
    temperature: float = 1.0
    ce_weight: float = 0.0
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
    qat: str | None = None  # int8 | int4 | w2: distill with fake-quantized linear weights, export quantized
    qat_group_size: int | None = None


def kd_loss(draft_logits: torch.Tensor, target_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean per-token KL(p_target || p_draft) at `temperature`, scaled by T² so gradients keep their size."""
    vocab = draft_logits.shape[-1]
    s = F.log_softmax(draft_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    t = F.log_softmax(target_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def draft_config(target: ModelConfig, args: DistillArgs) -> ModelConfig:
    hidden = args.hidden_size
    heads = args.num_heads
    if heads is None:
        heads = hidden // target.head_dim if hidden % target.head_dim == 0 else target.num_attention_heads
    kv = args.num_kv_heads
    if kv is None:
        group = target.num_attention_heads // target.num_key_value_heads
        kv = heads // group if heads % group == 0 else heads
    inter = args.intermediate_size
    if inter is None:
        inter = max(32, round(target.intermediate_size * hidden / target.hidden_size / 32) * 32)
    return ModelConfig(
        vocab_size=target.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=args.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=inter,
        max_position_embeddings=target.max_position_embeddings,  # the draft serves the target's full context
        rms_norm_eps=target.rms_norm_eps,
        rope_theta=target.rope_theta,
        tie_word_embeddings=target.tie_word_embeddings,
    )


@torch.no_grad()
def init_draft_from_target(draft: LlamaForCausalLM, target: LlamaForCausalLM) -> str:
    """Start the draft from the target's weights where the shapes allow; returns what was copied ("" if nothing).

    Same width: embeddings, final norm and head, so the draft reads and writes the target's token space. Same
    layer shape too: target layers spread from the first to the last (both kept, the middle skipped), so the
    draft starts as the target with layers skipped, a model whose next-token choices already mostly agree
    with the target's, and distillation only has to close the gap."""
    if draft.config.hidden_size != target.config.hidden_size:
        return ""
    draft.model.embed_tokens.weight.copy_(target.model.embed_tokens.weight)
    draft.model.norm.weight.copy_(target.model.norm.weight)
    if not draft.config.tie_word_embeddings:
        draft.lm_head.weight.copy_(target.lm_head.weight)
    picked = spread_layers(len(draft.model.layers), len(target.model.layers))
    sources = [target.model.layers[i].state_dict() for i in picked]
    if not all(_same_shapes(src, dst.state_dict()) for src, dst in zip(sources, draft.model.layers)):
        return "embeddings"
    for src, dst in zip(sources, draft.model.layers):
        dst.load_state_dict(src)
    return f"embeddings and target layers {picked}"


def _same_shapes(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)


def spread_layers(num_draft: int, num_target: int) -> list[int]:
    """num_draft target layer indices from the first to the last, evenly spaced: 1 of 8 -> [0], 2 -> [0, 7]."""
    if num_draft <= 1:
        return [0][:num_draft]
    return [round(i * (num_target - 1) / (num_draft - 1)) for i in range(num_draft)]


@torch.no_grad()
def heldout_kl(draft: LlamaForCausalLM, target: LlamaForCausalLM, rows: torch.Tensor, batch_size: int,
               max_batches: int, device: torch.device) -> float | None:
    """Token-weighted mean KL(p_target || p_draft) at temperature 1 on held-out rows."""
    if len(rows) == 0:
        return None
    was_training = draft.training
    draft.eval()
    total, count = 0.0, 0
    for start in range(0, min(len(rows), batch_size * max_batches), batch_size):
        batch = rows[start : start + batch_size, :-1].to(device).long()
        with autocast(device):
            d, t = draft(batch), target(batch)
        total += kd_loss(d, t, 1.0).item() * batch.numel()
        count += batch.numel()
    draft.train(was_training)
    return total / count


@torch.no_grad()
def speculate_greedy(
    target: LlamaForCausalLM, draft: LlamaForCausalLM, prompt: Sequence[int], k: int, max_new_tokens: int,
    max_len: int | None = None,
) -> tuple[list[int], list[int]]:
    """Greedy speculative decoding of one prompt. Returns (generated ids, accepted count per verify step).

    Invariants: the target's cache holds every token but the last; the draft's cache holds a prefix of the
    sequence (it catches up before proposing). After a verify step both caches are cropped to the accepted
    prefix, exactly as an engine rolls back rejected draft KV.
    """
    device = next(target.parameters()).device
    max_len = max_len or min(target.config.max_position_embeddings, draft.config.max_position_embeddings)
    seq = list(prompt)
    t_cache, d_cache = target.new_cache(), draft.new_cache()
    if len(seq) > 1:
        target(torch.tensor([seq[:-1]], device=device), t_cache)
    accepted: list[int] = []
    while len(seq) - len(prompt) < max_new_tokens and len(seq) + k + 1 <= max_len:
        n = len(seq)
        # Draft: catch up on the tokens it has not seen, then propose k tokens greedily.
        pending = seq[d_cache.length :]
        logits = draft(torch.tensor([pending], device=device), d_cache)[0, -1]
        proposal: list[int] = []
        for i in range(k):
            proposal.append(int(logits.argmax()))
            if i + 1 < k:
                logits = draft(torch.tensor([[proposal[-1]]], device=device), d_cache)[0, -1]
        # Target: one forward over [last token, d1..dk] scores all k proposals and the bonus position.
        verify = target(torch.tensor([[seq[-1]] + proposal], device=device), t_cache)[0]
        greedy = verify.argmax(dim=-1).tolist()
        a = 0
        while a < k and proposal[a] == greedy[a]:
            a += 1
        seq.extend(proposal[:a] + [greedy[a]])
        accepted.append(a)
        t_cache.crop(n + a)
        d_cache.crop(min(d_cache.length, n + a))
    return seq[len(prompt) :], accepted


def measure_acceptance(
    target_model: LlamaForCausalLM,
    draft_model: LlamaForCausalLM,
    sequences: Sequence[Sequence[int]],
    k: int = 4,
    max_new_tokens: int = 32,
) -> dict[str, Any]:
    """Simulate greedy speculative decoding (draft proposes k, target verifies, accept while equal) from
    each prompt in `sequences` and summarize acceptance.

    mean_accepted_tokens: E[draft tokens accepted per verify step] in [0, k]; tokens_per_verify_step adds the
    target's own token that every step yields. per_position_acceptance[i] = P(draft token i+1 accepted);
    conditional_acceptance[i] = P(token i+1 accepted | tokens 1..i accepted).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    was = target_model.training, draft_model.training
    target_model.eval()
    draft_model.eval()
    steps: list[int] = []
    generated = 0
    for prompt in sequences:
        out, acc = speculate_greedy(target_model, draft_model, [int(t) for t in prompt], k, max_new_tokens)
        steps.extend(acc)
        generated += len(out)
    target_model.train(was[0])
    draft_model.train(was[1])
    if not steps:
        raise ValueError("measure_acceptance: no verify steps ran (prompts too long for the context?)")
    acc = np.asarray(steps)
    reached = [int((acc >= i).sum()) for i in range(k)]
    passed = [int((acc > i).sum()) for i in range(k)]
    mean = float(acc.mean())
    return {
        "k": k,
        "sequences": len(sequences),
        "verify_steps": len(steps),
        "generated_tokens": generated,
        "mean_accepted_tokens": mean,
        "tokens_per_verify_step": mean + 1.0,
        "acceptance_rate": mean / k,
        "per_position_acceptance": [p / len(steps) for p in passed],
        "conditional_acceptance": [p / r if r else 0.0 for p, r in zip(passed, reached)],
    }


def acceptance_prompts(stream: np.ndarray, fallback: torch.Tensor, n: int, length: int) -> list[list[int]]:
    """Up to n prompts of `length` tokens, evenly spaced through the held-out stream (train rows if the
    held-out split is too short)."""
    if len(stream) >= length:
        starts = np.linspace(0, len(stream) - length, num=min(n, len(stream) // length)).astype(int)
        return [stream[s : s + length].tolist() for s in starts]
    return [row[:length].tolist() for row in fallback[:n]]


def distill(args: DistillArgs, log: Log = lambda s: print(s, flush=True)) -> dict[str, Any]:
    """Distill a draft from --target on --data; write the checkpoint folder and distill_summary.json."""
    if not 0.0 <= args.self_gen_fraction <= 1.0:
        raise ValueError(f"--self-gen-fraction must be in [0, 1], got {args.self_gen_fraction}")
    if args.temperature <= 0:
        raise ValueError(f"--temperature must be > 0, got {args.temperature}")
    device = resolve_device(args.device)
    seed_everything(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    target = ckpt.load_hf_model(args.target, device).eval().requires_grad_(False)
    target_hf = json.loads((Path(args.target) / "config.json").read_text())
    tokenizer = load_tokenizer(args.target)
    cfg = draft_config(target.config, args)
    ctx = args.context_length or min(target.config.max_position_embeddings, 1024)
    if ctx > target.config.max_position_embeddings:
        raise ValueError(f"--context-length {ctx} exceeds the target's max_position_embeddings "
                         f"({target.config.max_position_embeddings})")
    eos = target_hf.get("eos_token_id")
    eos_id = eos[0] if isinstance(eos, list) else eos
    if eos_id is None:
        raise ValueError(f"{args.target}/config.json: eos_token_id is needed to join documents")
    data = prepare_data(args.data, args.extensions, args.holdout_fraction, args.seed, ctx, tokenizer, log,
                        eos_id=eos_id)
    draft = LlamaForCausalLM(cfg).to(device)
    if args.init_draft:  # continue an earlier distillation
        draft.load_state_dict(ckpt.load_hf_model(args.init_draft, device).state_dict())
        start = f"continued from {args.init_draft}"
    else:
        copied = init_draft_from_target(draft, target) if args.init_from_target else ""
        start = f"{copied} copied from target" if copied else ""
    log(f"target: {target.num_parameters() / 1e6:.2f} M parameters; draft: {draft.num_parameters() / 1e6:.2f} M "
        f"({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}){f'; {start}' if start else ''}")

    qat = None
    if args.qat:  # after the draft's weights are initialised: the fake quantization wraps its final weights
        qat = qat_spec(args.qat, draft, args.qat_group_size)
        log(f"quantization-aware distillation: {enable_fake_quant(draft, qat)} linear layers fake-quantized as {qat}")
    optimizer = make_optimizer(draft, args.lr, args.weight_decay, (args.beta1, args.beta2), device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup_steps, args.max_steps,
                                                                       args.min_lr_ratio))
    loader = PackedLoader(data.train_rows, args.batch_size, args.seed)
    pick = random.Random(args.seed)  # decides which steps train on the target's own generations
    gen = torch.Generator(device=device).manual_seed(args.seed)
    prefix_len = args.gen_prefix_length or max(1, ctx // 4)
    kl0 = heldout_kl(draft, target, data.held_rows, args.batch_size, args.eval_batches, device)
    evals: list[dict[str, Any]] = [{"step": 0, "heldout_kl": kl0}]
    log(f"step 0 | held-out KL {kl0:.4f}" if kl0 is not None else "no held-out rows: KL is not evaluated")
    history: list[float] = []
    self_gen_steps = 0
    t_start = time.perf_counter()
    draft.train()
    for step in range(1, args.max_steps + 1):
        rows = loader.next_batch().to(device)
        if args.self_gen_fraction > 0 and pick.random() < args.self_gen_fraction:
            # Replace each row's continuation with the target's own, from the row's first prefix_len tokens.
            with autocast(device):
                rows = target.generate(rows[:, :prefix_len], rows.shape[1] - prefix_len, args.gen_temperature, gen)
            self_gen_steps += 1
        inputs = rows[:, :-1]
        with torch.no_grad(), autocast(device):
            t_logits = target(inputs)
        with autocast(device):
            d_logits = draft(inputs)
        loss = kd_loss(d_logits, t_logits, args.temperature)
        if args.ce_weight > 0:
            ce = F.cross_entropy(d_logits.float().reshape(-1, cfg.vocab_size), rows[:, 1:].reshape(-1))
            loss = loss + args.ce_weight * ce
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), args.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        history.append(loss.item())
        if step % args.log_every == 0 or step == args.max_steps:
            elapsed = time.perf_counter() - t_start
            log(f"step {step}/{args.max_steps} | distill loss {history[-1]:.4f} | lr {scheduler.get_last_lr()[0]:.2e}"
                f" | {step * rows.numel() / max(elapsed, 1e-9):,.0f} tok/s")
        if args.eval_every > 0 and step % args.eval_every == 0 and step < args.max_steps:
            kl = heldout_kl(draft, target, data.held_rows, args.batch_size, args.eval_batches, device)
            evals.append({"step": step, "heldout_kl": kl})
            if kl is not None:
                log(f"eval step {step} | held-out KL {kl:.4f}")
    train_time = time.perf_counter() - t_start
    kl_final = heldout_kl(draft, target, data.held_rows, args.batch_size, args.eval_batches, device)
    evals.append({"step": args.max_steps, "heldout_kl": kl_final})

    prompts = acceptance_prompts(data.held_stream, data.train_rows, args.acceptance_prompts,
                                 min(args.acceptance_prompt_length, ctx // 2))
    acceptance = measure_acceptance(target, draft, prompts, k=args.acceptance_k,
                                    max_new_tokens=args.acceptance_new_tokens)
    per_pos = ", ".join(f"{p:.2f}" for p in acceptance["per_position_acceptance"])
    log(f"held-out KL {kl0 if kl0 is None else round(kl0, 4)} -> {kl_final if kl_final is None else round(kl_final, 4)}"
        f" | acceptance (greedy, k={acceptance['k']}): {acceptance['mean_accepted_tokens']:.2f} accepted tokens per "
        f"verify step ({acceptance['tokens_per_verify_step']:.2f} tokens/step), per position [{per_pos}]")

    save_dtype = args.save_dtype if args.save_dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    pad = target_hf.get("pad_token_id")
    ckpt.save_hf_checkpoint(draft, out, tokenizer, bos_id=target_hf.get("bos_token_id"), eos_id=eos_id, pad_id=pad,
                            dtype=save_dtype, tokenizer_dir=args.target)
    exported = export_quantized(out, qat, log) if qat is not None else None
    summary = {
        "qat": exported,
        "target": str(args.target),
        "draft_config": cfg.to_dict(),
        "draft_parameters": draft.num_parameters(),
        "target_parameters": target.num_parameters(),
        "initialized_from": start or None,
        "corpus": data.corpus_info,
        "steps": args.max_steps,
        "self_gen_steps": self_gen_steps,
        "train_time_s": round(train_time, 3),
        "initial_heldout_kl": kl0,
        "final_heldout_kl": kl_final,
        "evals": evals,
        "loss_history": history,
        "acceptance": acceptance,
        "hardware": ckpt.hardware_summary(device),
        "save_dtype": save_dtype,
        "args": asdict(args),
    }
    (out / "distill_summary.json").write_text(json.dumps(summary, indent=2))
    log(f"wrote draft checkpoint folder {out}")
    return summary
