"""Run the small cases of one kernel set on the CPU and print the results as JSON, under TRITON_INTERPRET=1:
"layers" (tokenmill.kernels.checks) for test_kernels_interpreted.py, "lora" (tokenmill.kernels.lora_checks) for
test_lora_kernel.py. argv: the set, then dtype names (float32, bfloat16)."""

from __future__ import annotations

import json
import sys

import torch

from tokenmill.kernels.checks import kernel_cases
from tokenmill.kernels.lora_checks import lora_kernel_cases

CASE_SETS = {"layers": kernel_cases, "lora": lora_kernel_cases}


def main() -> None:
    torch.set_num_threads(1)
    results = {}
    cases = CASE_SETS[sys.argv[1]]
    for dtype_name in sys.argv[2:]:
        for case in cases(full=False, device=torch.device("cpu"), dtype=getattr(torch, dtype_name)):
            try:
                results[case.name] = case.run()
            except Exception as error:  # one broken kernel must not hide the others' results
                results[case.name] = {"name": case.name, "ok": False, "error": f"{type(error).__name__}: {error}"}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
