"""``python -m aimonk.benchmark {speed,endtoend,quality,audit,report} [options]``: dispatch to one benchmark module, imported lazily."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "speed": ("aimonk.benchmark.speed", "original loop against the project's loop: throughput, latency, memory"),
    "endtoend": ("aimonk.benchmark.endtoend", "`python -m aimonk train` as a user runs it against the seed's script"),
    "quality": ("aimonk.benchmark.quality", "training recipes against baselines on the same folds"),
    "audit": ("aimonk.benchmark.audit", "the label audit: ranking of synthetic label flips, and whether cleaning helps"),
    "report": ("aimonk.benchmark.report", "the markdown tables generated from reports/benchmarks/*.json"),
}


def _usage() -> str:
    lines = ["usage: python -m aimonk.benchmark {" + ",".join(COMMANDS) + "} [options]", ""]
    lines += [f"  {name:8s} {about}" for name, (_, about) in COMMANDS.items()]
    lines += ["", "Run `python -m aimonk.benchmark COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark named by ``argv[0]`` with the remaining arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"error: unknown benchmark {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
