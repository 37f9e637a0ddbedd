"""Training tools: `tokenmill train` (tokenizer + Llama pretraining) and `tokenmill distill` (draft models).

A top-level package beside the engine: it imports `tokenmill` freely, while the engine imports it only
from its CLI, to register these two commands. Importing this package loads only argparse; torch and the
training code load when a command runs. The CLI registers the commands with `add_train_parser(sub)` and
`add_distill_parser(sub)`.
"""

from tokenmill_train.cli_commands import add_distill_parser, add_train_parser

__all__ = ["add_train_parser", "add_distill_parser"]
