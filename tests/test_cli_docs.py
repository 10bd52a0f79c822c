"""The README quickstart, the demo and the benchmark script keep working as shipped."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from jitbroker.cli import Demo, main

ROOT = Path(__file__).resolve().parent.parent


def test_readme_quickstart_runs_as_pasted(capsys: pytest.CaptureFixture[str]) -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks, "README has no python quickstart"
    exec(compile(blocks[0], "README.md", "exec"), {})  # noqa: S102 - our own README
    out = capsys.readouterr().out
    assert "ok: svc:ci-deploy orders:read" in out
    assert "rejected: task-ended" in out


def test_demo_walks_through_and_never_prints_a_token() -> None:
    lines: list[str] = []
    demo = Demo(out=lines.append)
    demo.run()
    text = "\n".join(lines)
    for expected in (
        "TokenRevoked",
        "task-ended",
        "InsufficientScope",
        "swept:",
        "TokenExpired",
        "denied: ci requires an owner",
        "offboarding alice: revoked 1",
    ):
        assert expected in text
    assert "Traceback" not in text
    assert "eyJ" not in text  # no JWS (base64 of '{"') anywhere
    assert list(demo.broker.leases()) == []


def test_demo_command_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo"]) == 0
    assert "nothing outlived its task" in capsys.readouterr().out


def test_benchmark_script_smoke() -> None:
    """Not a timing test: the script must run; its figures are read by people."""
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "run.py"),
            "--quick",
            "--only",
            "issue",
            "--only",
            "verify",
            "--only",
            "opaque",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "verify online EdDSA / jwt.decode" in run.stdout


DOC_BLOCKS = [
    pytest.param(doc, i, code, id=f"{doc}#{i}")
    for doc in ("docs/concepts.md", "docs/security.md", "docs/stores.md", "docs/governance.md")
    for i, code in enumerate(re.findall(r"```python\n(.*?)```", (ROOT / doc).read_text(), re.S))
]


@pytest.mark.parametrize(("doc", "index", "code"), DOC_BLOCKS)
def test_doc_examples_run(
    doc: str, index: int, code: str, pytester: pytest.Pytester, capsys: pytest.CaptureFixture[str]
) -> None:
    if "def test_" in code:
        # A pytest example: run it as a test file, with the plugin loaded from
        # its pytest11 entry point exactly as a user's project would.
        pytester.makepyfile(code)
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
        result.assert_outcomes(passed=code.count("def test_"))
        return
    exec(compile(code, f"{doc}#{index}", "exec"), {"__name__": "__main__"})  # noqa: S102


def test_the_example_policy_file_loads_and_allows_its_sample_request() -> None:
    from jitbroker import Policy

    path = ROOT / "docs" / "examples" / "policy.toml"
    assert len(Policy.from_toml(path).rules) == 2
    sample = re.search(
        r"policy check (docs/examples/policy.toml.*?)\n```",
        (ROOT / "docs" / "governance.md").read_text(),
        re.S,
    )
    assert sample is not None
    argv = ["policy", "check", *shlex.split(sample.group(1).replace("\\\n", " "))]
    argv[2] = str(ROOT / argv[2])
    assert main(argv) == 0


def _operations_commands() -> list[str]:
    text = (ROOT / "docs" / "operations.md").read_text()
    lines = [
        line
        for block in re.findall(r"```sh\n(.*?)```", text, re.S)
        for line in block.replace("\\\n", " ").splitlines()
        if line.startswith("jitbroker ")
    ]
    inline = re.findall(r"`(jitbroker [^`|]+)`", text.replace("\n", " "))
    return lines + [re.sub(r"\s+", " ", line) for line in inline]


@pytest.mark.parametrize("line", _operations_commands())
def test_every_command_in_the_operations_runbooks_parses(line: str) -> None:
    from jitbroker.cli import build_parser

    argv = shlex.split(line)[1:]
    build_parser().parse_args(argv)  # a usage error raises SystemExit: the runbook is wrong


def test_the_hooks_example_prints_no_traceback(tmp_path: Path) -> None:
    """Pasted into a file and run, the failing-hook example of governance.md is quiet."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "governance.md").read_text(), re.S)
    (hooks,) = [code for code in blocks if "hook_retries" in code]
    script = tmp_path / "hooks.py"
    script.write_text(hooks)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr


def test_the_revocation_cache_snippet_pastes(tmp_path: Path) -> None:
    """stores.md's revocation-cache setup runs as a file of its own (DOC_BLOCKS runs it too)."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "stores.md").read_text(), re.S)
    (snippet,) = [code for code in blocks if "revocations(" in code]
    script = tmp_path / "cache.py"
    script.write_text(snippet)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


@pytest.mark.parametrize("spelling", ["rule", "rules"])
def test_policy_files_take_rule_or_rules(tmp_path: Path, spelling: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(
        f'[[{spelling}]]\nsubjects = ["svc:*"]\naudiences = ["api"]\nscopes = ["read"]\n'
    )
    assert main(["policy", "check", str(path)]) == 0
