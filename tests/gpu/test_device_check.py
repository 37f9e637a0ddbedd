"""The prepared device check cannot rot: its dry run (the same code on the CPU, tiny shapes) runs here, in a
fresh interpreter, with what the device machine lacks left unimported; its guards hold one failing or
overlong section to itself."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tokenmill.bench import device_check

ROOT = Path(__file__).resolve().parents[2]


def test_the_dry_run_runs_every_section_and_prints_the_table_last(tmp_path: Path) -> None:
    # --skip kernels until the kernel checks (tokenmill.kernels.checks) are merged; the lead drops it then.
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "tokenmill.bench.device_check", "--out", str(tmp_path),
                             "--dry-run", "--skip", "kernels"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert time.perf_counter() - started < 60
    report = json.loads((tmp_path / "device_check.json").read_text())
    statuses = {name: section["status"] for name, section in report["sections"].items()}
    assert statuses == {name: "skipped" if name == "kernels" else "ok" for name, _, _ in device_check.SECTIONS}
    assert report["forbidden_modules_imported"] == []  # no transformers, FastAPI, pydantic, ...
    parity = report["sections"]["parity"]["runs"]
    assert parity["eager"]["equal"] and parity["graphs"]["equal"]
    latency = report["sections"]["latency llama-3-8b"]
    assert latency["tok_per_s"] > 0 and latency["ceiling_tok_per_s"] > 0 and latency["bandwidth_kind"] == "read"
    assert report["sections"]["throughput qwen3-0.6b"]["output_tokens"] > 0
    table = result.stdout.strip().splitlines()
    assert table[0] == f"device check on {report['device']} (dry run)"
    assert [line.split()[0] for line in table[2:]] == [name.split()[0] for name, _, _ in device_check.SECTIONS]


def test_an_error_or_a_timeout_stays_in_its_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(ctx: object) -> dict:
        raise ValueError("kernel exploded")

    def slow(ctx: object) -> dict:
        time.sleep(5)
        return {"summary": "never"}

    monkeypatch.setattr(device_check, "SECTIONS", [("first", broken, 10), ("second", slow, 0.3),
                                                   ("third", lambda ctx: {"summary": "fine"}, 10),
                                                   ("fourth", lambda ctx: {"ok": False, "summary": "wrong"}, 10)])
    report = device_check.run_check(tmp_path, dry_run=True, skip=set(), budget_s=60)
    sections = report["sections"]
    assert (sections["first"]["status"], sections["first"]["error"]) == ("error", "ValueError: kernel exploded")
    assert sections["second"]["status"] == "timeout" and sections["second"]["seconds"] < 2
    assert (sections["third"]["status"], sections["third"]["summary"]) == ("ok", "fine")
    assert sections["fourth"]["status"] == "failed"
    assert json.loads((tmp_path / "device_check.json").read_text())["sections"] == json.loads(json.dumps(sections))


def test_sections_past_the_budget_are_skipped_and_say_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_check, "SECTIONS", [("only", lambda ctx: {}, 10)])
    report = device_check.run_check(tmp_path, dry_run=True, skip=set(), budget_s=1)
    assert report["sections"]["only"] == {"status": "skipped", "reason": "the budget of 1 s is spent"}
