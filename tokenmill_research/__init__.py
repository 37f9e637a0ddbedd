"""tokenmill_research: the research assistant built on tokenmill's serving (`tokenmill research ...`).

It talks to any OpenAI-compatible endpoint; only local_server.py imports the engine, to start one when no
--base-url is given. This module imports nothing heavy: `tokenmill --help` loads it.
"""

from tokenmill_research.cli_commands import add_research_parser

__all__ = ["add_research_parser"]
