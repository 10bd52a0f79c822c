"""What ``jitbroker exec -- true`` costs, from start to exit, against ``true`` alone.

    python benchmarks/exec_startup.py            # 15 runs of each (a few seconds)
    python benchmarks/exec_startup.py --quick    # 3 runs: a smoke run
    python benchmarks/exec_startup.py --runs 50

Each exec run starts a fresh interpreter, reads a jitbroker.toml, issues a
credential into a SQLite store, writes the token file, spawns ``true``, waits,
revokes and cleans up: the whole life of a shell job's credential. The target
is <= 300 ms. To show where the time goes, the script also times a bare
interpreter, ``import jitbroker`` and ``import jitbroker.cli`` (what every
command pays before it does anything). Figures are medians; the cases are
interleaved so drift hits them alike.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jitbroker import KeyRing

TARGET_MS = 300.0


def _home(folder: Path) -> Path:
    KeyRing.generate("EdDSA").save_dir(folder / "keys")
    config = folder / "jitbroker.toml"
    config.write_text('[broker]\nissuer = "urn:bench"\nkeys = "keys"\nstore = "leases.db"\n')
    config.chmod(0o600)
    return config


def _time(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, check=False)  # noqa: S603 - our argv
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{argv[:4]} failed: {done.stderr.decode(errors='replace')}")
    return elapsed * 1000


def main() -> None:
    """Run the comparison and print the medians."""
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    parser.add_argument("--quick", action="store_true", help="3 runs of each: a smoke run")
    parser.add_argument("--runs", type=int, default=15, help="runs of each case (default 15)")
    args = parser.parse_args()
    runs = 3 if args.quick else args.runs
    true = shutil.which("true") or "/bin/true"
    # As installed: bytecode cached (pip compiles a wheel's modules on install; an
    # interpreter told not to write bytecode would compile every module on every
    # start, which is what this machine's PYTHONDONTWRITEBYTECODE=1 did: +250 ms).
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("JITBROKER_") and k != "PYTHONDONTWRITEBYTECODE"
    }
    with tempfile.TemporaryDirectory() as folder:
        config = _home(Path(folder))
        py = sys.executable
        cases = {
            "true alone": [true],
            "python -c pass": [py, "-c", "pass"],
            "python -c 'import jitbroker'": [py, "-c", "import jitbroker"],
            "python -c 'import jitbroker.cli'": [py, "-c", "import jitbroker.cli"],
            "jitbroker exec -- true": [
                py, "-m", "jitbroker.cli", "exec", "--config", str(config),
                "--subject", "svc:bench", "--audience", "bench", "--", true,
            ],
        }  # fmt: skip
        _time(cases["jitbroker exec -- true"], env)  # creates the store: not timed
        _time(cases["python -c 'import jitbroker.cli'"], env)  # caches the bytecode
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(runs):
            for name, argv in cases.items():
                times[name].append(_time(argv, env))
    print(f"median of {runs} runs (ms)")
    for name, values in times.items():
        print(f"  {name:36} {statistics.median(values):8.1f}")
    exec_ms = statistics.median(times["jitbroker exec -- true"])
    alone = statistics.median(times["true alone"])
    verdict = "meets" if exec_ms <= TARGET_MS else "misses"
    print(
        f"exec start-up: {exec_ms:.0f} ms against {alone:.1f} ms for true alone"
        f" ({exec_ms - alone:.0f} ms added); {verdict} the {TARGET_MS:.0f} ms target"
    )


if __name__ == "__main__":
    main()
