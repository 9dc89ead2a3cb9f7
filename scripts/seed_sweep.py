"""Run the numerics tests over fresh seeds and report every failure with the seeds that replay it.

The test suite draws each test's data from a seed derived from the test's id (tests/conftest.py),
so CI and `pytest -q tests` see the same data on every run; this sweep is where new data is
drawn: run it before changing any bound, and derive the bound from what it finds. Each round is
one pytest run with W4AFP8_TEST_SEED=random and W4AFP8_TEST_MODULE_SEED=random (every test and
module draws its own fresh seed); failures are read back from pytest's JUnit XML.

    python scripts/seed_sweep.py --rounds 20                      # the default numerics files
    python scripts/seed_sweep.py --minutes 20 -- tests/test_moe.py -k "reference and not deepseek"
    python scripts/seed_sweep.py --rounds 5 -- -m gpu tests/test_moe.py tests/test_grouped_gemm.py

Arguments after `--` go to pytest (test files, -k, -m) and replace the default file list when
they name a path. Exit status 1 if any test failed in any round.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tests whose assertions are numerical bounds on random data (exact comparisons included).
NUMERICS_FILES = ["tests/test_moe.py", "tests/test_grouped_gemm.py", "tests/test_properties.py",
                  "tests/test_silu_mul_quantize.py", "tests/test_gather_quantize.py", "tests/test_combine.py",
                  "tests/test_edge_cases.py", "tests/test_autodiff.py", "tests/test_fp8.py"]


def run_round(pytest_args: list[str], xml_path: str) -> int:
    env = dict(os.environ, W4AFP8_TEST_SEED="random", W4AFP8_TEST_MODULE_SEED="random")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml_path}",
                             *pytest_args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    print(result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "(no output)", flush=True)
    return result.returncode


def outcomes(xml_path: str):
    """(node id, passed?, {property: value}, message) per test that ran (skips left out)."""
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        if case.find("skipped") is not None:
            continue
        module = case.get("classname", "").replace(".", "/")
        node_id = f"{module}.py::{case.get('name')}"
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        message = "" if bad is None else ((bad.get("message") or "").splitlines() or [""])[0][:200]
        yield node_id, bad is None, props, message


def replay_command(node_id: str, props: dict) -> str:
    seeds = [f"W4AFP8_TEST_SEED={props['seed']}"] if "seed" in props else []
    if "module seed" in props:
        seeds.append(f"W4AFP8_TEST_MODULE_SEED={props['module seed']}")
    return " ".join([*seeds, "pytest", "-q", f"'{node_id}'"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="pytest runs, each with fresh seeds (default 20)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="start no round after this many minutes (with a large --rounds: run for a time)")
    parser.add_argument("pytest_args", nargs="*", help="after --: pytest arguments (files, -k, -m)")
    args = parser.parse_args()
    names_a_path = any(os.path.exists(os.path.join(ROOT, a.split("::")[0])) for a in args.pytest_args)
    pytest_args = args.pytest_args if names_a_path else [*NUMERICS_FILES, *args.pytest_args]

    runs = collections.Counter()
    failures = collections.defaultdict(list)  # node id -> [(replay command, message)]
    start, rounds = time.monotonic(), 0
    with tempfile.TemporaryDirectory() as tmp:
        while rounds < args.rounds and (args.minutes is None or time.monotonic() - start < 60 * args.minutes):
            rounds += 1
            xml_path = os.path.join(tmp, f"round{rounds}.xml")
            print(f"round {rounds}: ", end="", flush=True)
            returncode = run_round(pytest_args, xml_path)
            if not os.path.exists(xml_path):
                print(f"pytest exited with {returncode} and wrote no report", file=sys.stderr)
                return 2
            for node_id, passed, props, message in outcomes(xml_path):
                runs[node_id] += 1
                if not passed:
                    failures[node_id].append((replay_command(node_id, props), message))
    total = sum(runs.values())
    print(f"\n{rounds} rounds, {len(runs)} tests, {total} test runs, "
          f"{sum(map(len, failures.values()))} failed, in {(time.monotonic() - start) / 60:.1f} min")
    for node_id, failed in sorted(failures.items()):
        print(f"\n{node_id}: failed {len(failed)} of {runs[node_id]}")
        for command, message in failed:
            print(f"  {command}\n    {message}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
