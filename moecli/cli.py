"""The `moecli` console entry. Subcommands parse their own arguments; `train` hands its overrides to Hydra.

Importing this module must stay cheap (no torch, no Hydra) so that `moecli --help` answers at once.
"""

from __future__ import annotations

import argparse
import sys

SUBCOMMANDS = {
    "train": "train one run, or a sweep with -m (Hydra overrides: task=… combiner=… trainer.max_epochs=…)",
    "compare": "table of mean ± std of final metrics over run folders, grouped by overrides except the seed",
    "list": "the config groups and their options (tasks, combiners, trainers, loggers, experiments)",
    "bench": "benchmarks (moecli bench moe-layer)",
    "sample": "generate text from a saved toylm run (moecli sample <run dir> --prompt …)",
}


def _usage() -> str:
    lines = ["usage: moecli <command> [args]", "", "commands:"]
    lines += [f"  {name:<9}{text}" for name, text in SUBCOMMANDS.items()]
    lines += ["", "Run `moecli <command> --help` for the options of a command."]
    return "\n".join(lines)


def fail(message: str, code: int = 2) -> int:
    """Print a one-line error for the user and return the exit code."""
    print(f"error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from moecli import __version__

        print(__version__)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        return fail(f"unknown command {command!r}; choose one of: {', '.join(SUBCOMMANDS)}")
    if command == "train":
        from moecli.train_cli import train_command

        return train_command(rest)
    if command == "compare":
        from moecli.report.compare import compare_command

        return compare_command(rest)
    if command == "list":
        return list_command(rest)
    if command == "bench":
        from moecli.bench import bench_command

        return bench_command(rest)
    from moecli.sample import sample_command

    return sample_command(rest)


def list_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="moecli list", description=SUBCOMMANDS["list"])
    parser.add_argument("group", nargs="?", help="only this group (task, combiner, trainer, logger, experiment)")
    parser.add_argument("--matrix", action="store_true",
                        help="which combiner can serve each task's slots (sets up every task)")
    args = parser.parse_args(argv)
    from moecli.registry import GROUPS, conf_dir, group_options

    if args.matrix:
        from moecli.registry import print_matrix

        print_matrix()
        return 0

    if args.group is not None and args.group not in GROUPS:
        return fail(f"group={args.group} is not a config group; choose one of: {', '.join(GROUPS)}")
    for group in [args.group] if args.group else GROUPS:
        print(f"{group}:")
        for name in group_options(group):
            first = (conf_dir() / group / f"{name}.yaml").read_text().splitlines()[:2]
            about = next((line.lstrip("# ").strip() for line in first if line.startswith("# ") and
                          not line.startswith("# @package")), "")
            print(f"  {name:<18}{about[:100]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
