"""`make test` of this checkout beside the suite as of a baseline commit, on this machine, in one
run: each in its own fresh clone (beside a link to ../shared, so the real-data tests run there
too) with its own `make setup`, the runs interleaved and under CI=true, as `.ci/run` runs them.

A suite's time depends on the machine more than on anything else (docs/development.md), so a
target for it is checked as the ratio printed here, not as seconds measured on another day. A
fixed Python loop is timed before each run: when its time moves, the machine's speed moved too.

`make bench-suite BASELINE=<commit> RUNS=3`; `python -m bench.suite --help`.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from bench import save
from pipeline.testkit import machine

log = logging.getLogger("bench.suite")

ROOT = Path(__file__).resolve().parents[1]
# The suite as of 2026-11-30 (205 tests): 304 s of pytest on a slow 2-core Xeon, the time that the
# edit-loop target of at most 180 s was set against.
DEFAULT_BASELINE = "aaf7970"
# pytest's last line: "=== 336 passed, 2 skipped in 110.91s (0:01:50) ===".
SUMMARY = re.compile(r"=+ (.+?) in ([\d.]+)s(?: \([\d:]+\))? =+\s*$", re.M)
# An outer make's variables would turn each clone's make into a sub-make of it.
MAKE_VARS = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")


@dataclass
class Side:
    """One checkout under test: its clone, `make setup`'s seconds, and each run's outcome."""

    role: str
    ref: str
    commit: str
    folder: Path
    setup_s: float = 0.0
    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    outcomes: list[str] = field(default_factory=list)
    failed: int = 0

    @property
    def label(self) -> str:
        return f"{self.role}: {self.commit[:7]}" + (
            f" ({self.ref})" if not self.commit.startswith(self.ref) else ""
        )


def git(*args: str, cwd: Path) -> None:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"git {' '.join(args)} failed in {cwd}: {done.stderr.strip()}")


def resolve(repo: Path, ref: str) -> str:
    """The full commit id of `ref` in `repo`, or a message that says what was expected."""
    done = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise SystemExit(
            f"{ref!r} is not a commit of {repo}: expected a commit id, tag or branch that "
            "`git log` shows there (a shallow clone may lack older ones: git fetch --unshallow)"
        )
    return done.stdout.strip()


def clone(repo: Path, side: Side) -> None:
    """A clone at the side's commit: what a fresh `git clone` of it holds, nothing uncommitted."""
    git("clone", "--quiet", "--no-checkout", str(repo), str(side.folder), cwd=repo)
    git("checkout", "--quiet", side.commit, cwd=side.folder)


def environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in MAKE_VARS} | {"CI": "true"}


def run(command: list[str], cwd: Path, out: Path) -> tuple[int, float, float]:
    """`command` in `cwd`, its output into `out`: exit status, wall and CPU seconds (its own and
    its children's)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with open(out, "w") as f:
        code = subprocess.run(
            command, cwd=cwd, env=environment(), stdout=f, stderr=subprocess.STDOUT
        ).returncode
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return code, wall, cpu


def loop_seconds() -> float:
    """A fixed piece of pure Python: its time follows the machine's speed at the moment."""
    started = time.perf_counter()
    sum(range(30_000_000))
    return time.perf_counter() - started


def measure(side: Side, command: list[str], logs: Path, index: int) -> None:
    out = logs / f"{side.role}-{index + 1}.log"
    code, wall, cpu = run(command, side.folder, out)
    text = out.read_text(errors="replace")
    found = SUMMARY.findall(text)
    # pytest's own seconds where it printed them (make's and the installs' excluded), else wall.
    outcome, seconds = found[-1] if found else ("", wall)
    side.seconds.append(float(seconds))
    side.cpu.append(cpu)
    side.outcomes.append(outcome)
    if code:
        side.failed += 1
        log.warning("%s run %d exited %d: see %s", side.label, index + 1, code, out)


def span(values: list[float], digits: int = 0) -> str:
    """low–high, or one number when both ends print the same."""
    low, high = (f"{v:.{digits}f}" for v in (min(values), max(values)))
    return low if low == high else f"{low}–{high}"


def report(sides: list[Side], command: str, loops: list[float], logs: Path) -> str:
    baseline, current = sides
    lines = [
        f"# `{command}` beside the suite as of {baseline.commit[:7]}, "
        f"{time.strftime('%Y-%m-%d %H:%M')}, {machine()}",
        "",
        "| suite as of | tests | seconds, each run | CPU seconds | `make setup`, s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for side in sides:
        tests = "; ".join(sorted(set(side.outcomes))) or "-"
        times = ", ".join(f"{s:.1f}" for s in side.seconds)
        lines.append(
            f"| {side.label} | {tests} | {times} | {span(side.cpu)} | {side.setup_s:.0f} |"
        )
    ratios = [c / b for b, c in zip(baseline.seconds, current.seconds, strict=True)]
    ratio = statistics.median(current.seconds) / statistics.median(baseline.seconds)
    lines += [
        "",
        f"Ratio of the medians, current / baseline: {ratio:.2f} (run by run {span(ratios, 2)}). "
        f"A fixed loop took {span(loops, 2)} s before the runs (steady when close). "
        "Seconds are pytest's own where it printed them. Each run under CI=true, in a fresh "
        "clone with its own environment; runs interleaved.",
    ]
    failed = sum(side.failed for side in sides)
    if failed:
        lines.append(f"{failed} run(s) exited with an error: their logs are kept in {logs}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repo", type=Path, default=ROOT, help="the repository (this checkout)")
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="the commit to compare with")
    parser.add_argument("--current", default="HEAD", help="the commit measured (committed work)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each, interleaved")
    parser.add_argument("--command", default="make test", help="what is timed in each clone")
    parser.add_argument("--setup", default="make setup", help="run once in each clone first")
    parser.add_argument("--keep", action="store_true", help="keep the clones and their logs")
    parser.add_argument("--no-save", action="store_true", help="print only (tests)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error(f"--runs {args.runs}: expected 1 or more")
    args.repo = args.repo.resolve()  # git clone runs in it: a relative path would not hold
    if not (args.repo / ".git").exists():
        parser.error(f"--repo {args.repo}: expected a git repository (a folder with .git)")
    commits = resolve(args.repo, args.baseline), resolve(args.repo, args.current)
    work = Path(tempfile.mkdtemp(prefix="faceopt-suite-"))
    shared = args.repo.parent / "shared"
    if shared.is_dir():  # the clones' ../shared, as beside this checkout
        (work / "shared").symlink_to(shared)
    logs = work / "logs"
    logs.mkdir()
    sides = [
        Side(role, ref, commit, work / role)
        for role, ref, commit in zip(
            ("baseline", "current"), (args.baseline, args.current), commits, strict=True
        )
    ]
    finished = False
    try:
        for side in sides:
            clone(args.repo, side)
            out = logs / f"setup-{side.role}.log"
            code, side.setup_s, _ = run(shlex.split(args.setup), side.folder, out)
            if code:
                raise SystemExit(f"{args.setup!r} failed in {side.folder}: see {out}")
        loops = []
        command = shlex.split(args.command)
        with tqdm(total=2 * args.runs, desc="suite runs", file=sys.stderr) as bar:
            for index in range(args.runs):
                # Alternate who goes first, so neither always meets the machine warmer.
                for side in sides if index % 2 == 0 else sides[::-1]:
                    loops.append(loop_seconds())
                    bar.set_postfix_str(side.label)
                    measure(side, command, logs, index)
                    bar.update()
        text = report(sides, args.command, loops, logs)
        finished = not any(side.failed for side in sides)
    finally:
        # The clones (an environment each, over a GB) go; the logs stay where something failed.
        if args.keep:
            log.info("clones and logs kept in %s", work)
        elif not finished:
            for side in sides:
                shutil.rmtree(side.folder, ignore_errors=True)
            log.info("logs kept in %s", logs)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(text)
    if not args.no_save:
        save("suite", text)
    if any(side.failed for side in sides):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
