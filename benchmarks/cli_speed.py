"""How fast the ``selfsup`` command answers ``--help`` and argument errors, relative to ``import torch``.

Each round starts, in a fresh interpreter, ``python -c "import torch"`` and then each CLI command below
(interleaved: one of each per round, so a change of the machine's load hits all alike); a command's
ratio is the median over rounds of its time divided by the same round's ``import torch``. The goal
(issue 23): every ``--help`` and every argument error within 1.2x of ``import torch``, and below 1x where
torch is not needed. ``python -c pass`` is the interpreter's own start, for scale.

    python benchmarks/cli_speed.py                           # this tree, 9 rounds
    python benchmarks/cli_speed.py --before /path/to/older   # also each command on another checkout
    python benchmarks/cli_speed.py --eval --before /path/to/older   # evaluating a tiny exported run instead

``--eval`` times what evaluation pays to start (issue 23: "import Lightning only where a command trains"):
``selfsup probe RUN`` and ``selfsup knn RUN`` on a rotation run of two steps on 16 px digits whose features
are already cached (so the time is start-up, loading the export, building the random-init twin and the
fits on 1,437 x 128 features), and ``selfsup.load_encoder(RUN)``. There is no goal for these rows; the
``--before`` rows show what the same commands cost before.

Writes ``benchmarks/results/cli_speed.json`` (every time of every round, the load average before and after,
the exact command) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL = 1.2

COMMANDS = {  # name -> (argv after `python`, expected exit status)
    "python -c pass": (["-c", "pass"], 0),
    "import torch": (["-c", "import torch"], 0),
    "selfsup --help": (["-m", "selfsup", "--help"], 0),
    "selfsup pretrain --method rotation --help": (["-m", "selfsup", "pretrain", "--method", "rotation", "--help"], 0),
    "selfsup probe --help": (["-m", "selfsup", "probe", "--help"], 0),
    "selfsup pretrain --method rotaton": (["-m", "selfsup", "pretrain", "--method", "rotaton"], 2),
    "selfsup probe --bogus": (["-m", "selfsup", "probe", "--bogus"], 2),
    "selfsup pretrain --lr -1": (["-m", "selfsup", "pretrain", "--lr", "-1"], 2),
}
REFERENCE = "import torch"
EVAL_COMMANDS = {  # name -> (argv after `python`, with {run} for the run directory)
    "import torch": (["-c", "import torch"], 0),
    "selfsup probe RUN": (["-m", "selfsup", "probe", "{run}", "--device", "cpu"], 0),
    "selfsup knn RUN": (["-m", "selfsup", "knn", "{run}", "--device", "cpu"], 0),
    "selfsup.load_encoder(RUN)": (["-c", "import selfsup; selfsup.load_encoder({run!r})"], 0),
}


def tiny_run(workdir: Path) -> Path:
    """A rotation run of 2 steps on 16 px digits under ``workdir`` (made once), its features cached by one probe."""
    run = workdir / "runs" / "tiny"
    if not (run / "export" / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "selfsup", "pretrain", "--backbone", "convnet_small", "--data", "digits",
                        "--image-size", "16", "--batch-size", "64", "--max-steps", "2", "--no-online-probe",
                        "--output", str(workdir / "runs"), "--name", "tiny"], cwd=workdir, check=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
    return run


def timed(argv: list[str], tree: Path, expected: int) -> float:
    """Seconds ``python ARGV`` takes run in ``tree`` (``-m`` puts the working directory first on sys.path); raises if
    it exits otherwise than ``expected``."""
    env = {**os.environ, "PYTHONPATH": str(tree), "COLUMNS": "100"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *argv], cwd=tree, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    if done.returncode != expected:
        raise SystemExit(f"python {' '.join(argv)} (PYTHONPATH={tree}) exited {done.returncode}, expected "
                         f"{expected}: {done.stderr.strip()[-500:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9, help="interleaved rounds (default: 9)")
    ap.add_argument("--before", type=Path, help="another checkout (e.g. the main branch) whose CLI is timed too")
    ap.add_argument("--eval", action="store_true", help="time evaluating a tiny exported run instead (see above)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/selfsup-cli-speed"), help="where --eval's run goes")
    ap.add_argument("--out", type=Path, help="JSON to write (default: benchmarks/results/cli_speed.json, "
                    "cli_speed_eval.json with --eval)")
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    args.out = args.out or ROOT / "benchmarks" / "results" / ("cli_speed_eval.json" if args.eval else "cli_speed.json")
    trees = {"": ROOT, **({"before: ": args.before.resolve()} if args.before else {})}
    commands = COMMANDS
    if args.eval:
        args.workdir.mkdir(parents=True, exist_ok=True)
        run = str(tiny_run(args.workdir.resolve()))
        commands = {name: ([a.format(run=run) for a in cmd], expected) for name, (cmd, expected) in EVAL_COMMANDS.items()}
    cases = {}  # label -> (argv, tree, expected)
    for name, (cmd, expected) in commands.items():
        for prefix, tree in trees.items():
            if prefix and not name.startswith("selfsup"):
                continue
            cases[prefix + name] = (cmd, tree, expected)
    load_before = os.getloadavg()
    for cmd, tree, expected in cases.values():  # warm-up: the file cache and .pyc files
        timed(cmd, tree, expected)
    times: dict[str, list[float]] = {label: [] for label in cases}
    for _ in range(args.rounds):
        for label, (cmd, tree, expected) in cases.items():
            times[label].append(timed(cmd, tree, expected))
    load_after = os.getloadavg()
    rows = []
    for label, ts in times.items():
        ratios = [t / r for t, r in zip(ts, times[REFERENCE], strict=True)]
        ratio = statistics.median(ratios)
        rows.append({"command": label, "median_s": statistics.median(ts), "ratio_to_import_torch": ratio,
                     "within_goal": None if args.eval or not label.startswith("selfsup") else ratio <= GOAL,
                     "seconds": ts, "ratios": ratios})

    from rich.console import Console
    from rich.table import Table

    what = "evaluating a tiny exported run" if args.eval else "selfsup CLI start-up"
    table = Table(title=f"{what}, {args.rounds} interleaved rounds; load average "
                        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after")
    for col in ("command", "median s", "x import torch", f"<= {GOAL}x"):
        table.add_column(col, justify="left" if col == "command" else "right")
    for r in rows:
        ok = "" if r["within_goal"] is None else ("yes" if r["within_goal"] else "NO")
        table.add_row(r["command"], f"{r['median_s']:.2f}", f"{r['ratio_to_import_torch']:.2f}", ok)
    Console().print(table)
    result = {
        "command": shlex.join(["python", "benchmarks/cli_speed.py", *argv]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "torch": metadata.version("torch"),
                    "loadavg_before": load_before, "loadavg_after": load_after},
        "rounds": args.rounds, "goal": GOAL, "trees": {k or "this": str(v) for k, v in trees.items()}, "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(r["within_goal"] is not False for r in rows if not r["command"].startswith("before")) else 1


if __name__ == "__main__":
    sys.exit(main())
