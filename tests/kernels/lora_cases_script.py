"""Run the small LoRA kernel cases (tokenmill.kernels.lora_checks) on the CPU and print the results as JSON: run
under TRITON_INTERPRET=1 by test_lora_kernel.py. argv: dtype names (float32, bfloat16)."""

from __future__ import annotations

import json
import sys

import torch

from tokenmill.kernels.lora_checks import lora_kernel_cases


def main() -> None:
    torch.set_num_threads(1)
    results = {}
    for dtype_name in sys.argv[1:]:
        for case in lora_kernel_cases(full=False, device=torch.device("cpu"), dtype=getattr(torch, dtype_name)):
            try:
                results[case.name] = case.run()
            except Exception as error:  # one broken case must not hide the others' results
                results[case.name] = {"name": case.name, "ok": False, "error": f"{type(error).__name__}: {error}"}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
