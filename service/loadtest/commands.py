"""`authsvc load` and `authsvc bench`: their options, within bounds, and what they run
(docs/performance.md). The load tools are imported only when one of them runs.
"""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

from service.failures import ConfigurationError
from service.setting_parsers import DAY, Address, Number, bounded_argument, count, duration
from service.settings import WORKERS, Settings, default_workers

# The bench's load, in-flight calls in all processes together: issue 12's "2 load
# processes x 32 concurrent calls" is 32 in each (until 2026-12-02 the bench ran 32 in
# all, 16 in each: docs/performance.md has both).
BENCH_CONCURRENCY = 64

# Bounds of the load-testing options: enough for any real run on one machine, and none
# that forks thousands of processes, never ends, or divides by nothing.
PROCESSES = count(1, 64)
CONCURRENCY = count(1, 10_000)
SEED_USERS = count(1, 10_000)  # each costs an argon2 hash to create
ROUNDS = count(1, 100)
RUN_SECONDS = duration(0.1, DAY)
RATE = Number(float, 0.1, 1_000_000.0, "requests per second")


def add_load_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`authsvc load` and `authsvc bench`, added to the command's subparsers."""
    from service.loadtest.runner import SCENARIOS

    load = commands.add_parser(
        "load", help="load-test a server (default: one started here on 127.0.0.1)"
    )
    load.add_argument(
        "--target",
        # HOST:PORT as AUTH_LISTEN spells it (an IPv6 host in brackets); argparse reads a
        # string default (AUTH_TARGET) by `type` too.
        type=bounded_argument(Address(to_call=True)),
        default=os.environ.get("AUTH_TARGET") or None,
        help="HOST:PORT of a running server (default: AUTH_TARGET, else start one); "
        "its users are seeded through the AUTH_* database configuration",
    )
    load.add_argument("--scenario", choices=SCENARIOS, default="mixed")
    load.add_argument(
        "--tokens",
        choices=("hot", "cold"),
        default="hot",
        help="validate: a hot set of 64 tokens per process, or 2000 distinct ones",
    )
    load.add_argument(
        "--concurrency",
        type=bounded_argument(CONCURRENCY),
        default=32,
        help="in-flight calls in all",
    )
    load.add_argument(
        "--processes", type=bounded_argument(PROCESSES), default=2, help="load-generating processes"
    )
    load.add_argument(
        "--duration",
        type=bounded_argument(RUN_SECONDS),
        default=10.0,
        help="seconds of measurement",
    )
    load.add_argument(
        "--rate",
        type=bounded_argument(RATE),
        default=None,
        help="open loop: requests per second in all (default: closed loop)",
    )
    load.add_argument(
        "--workers",
        type=bounded_argument(WORKERS),
        default=default_workers(),
        help="workers of the server started here",
    )
    load.add_argument(
        "--users", type=bounded_argument(SEED_USERS), default=16, help="users to seed"
    )
    load.add_argument("--json", type=Path, default=None, help="also write the results here")

    bench = commands.add_parser("bench", help="the benchmark suite (ratios to baselines)")
    bench.add_argument(
        "--duration", type=bounded_argument(RUN_SECONDS), default=6.0, help="seconds per run"
    )
    bench.add_argument(
        "--rounds",
        type=bounded_argument(ROUNDS),
        default=3,
        help="interleaved runs of health and validate (medians are reported)",
    )
    bench.add_argument(
        "--concurrency",
        type=bounded_argument(CONCURRENCY),
        default=BENCH_CONCURRENCY,
        help="in-flight calls in all processes together (64: issue 12's 2 processes x 32 each)",
    )
    bench.add_argument("--processes", type=bounded_argument(PROCESSES), default=2)
    bench.add_argument(
        "--workers",
        type=bounded_argument(WORKERS),
        default=1,
        help="workers of the servers started for the run (Refresh's target is for one)",
    )
    bench.add_argument("--output", type=Path, default=None, help="also write the report here")
    bench.add_argument(
        "--write-docs",
        type=Path,
        default=None,
        metavar="PAGE",
        help="rewrite the figures between PAGE's bench-results markers (make bench: "
        "docs/performance.md), with the command, the date and the machine",
    )


def load_command(args: argparse.Namespace) -> int:
    from service.loadtest.local import local_server, seed_users
    from service.loadtest.runner import LoadPlan, run_load
    from service.loadtest.stats import render_table, write_json

    def plan_for(target: str, settings: Settings) -> LoadPlan:
        usernames, password = seed_users(settings, args.users)
        return LoadPlan(
            target=target,
            scenario=args.scenario,
            usernames=usernames,
            password=password,
            processes=args.processes,
            concurrency=args.concurrency,
            duration=args.duration,
            rate=args.rate,
            cold_tokens=2000 if args.tokens == "cold" else 0,
        )

    if args.target:
        summary = run_load(plan_for(args.target, Settings.from_env()))
    else:
        with local_server(workers=args.workers) as (target, settings):
            summary = run_load(plan_for(target, settings))
    print(render_table([summary]))
    if args.json is not None:
        write_json(args.json, [summary])
    return 1 if summary.error_count else 0


def bench_command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run, every option spelled out (defaults resolved)."""
    words = ["authsvc", "bench"]
    for option, value in (
        ("--duration", f"{args.duration:g}"),
        ("--rounds", str(args.rounds)),
        ("--concurrency", str(args.concurrency)),
        ("--processes", str(args.processes)),
        ("--workers", str(args.workers)),
    ):
        words += [option, value]
    if args.write_docs is not None:
        words += ["--write-docs", str(args.write_docs)]
    return shlex.join(words)


def bench_command(args: argparse.Namespace) -> int:
    from service.loadtest.bench import BenchOptions, run_bench
    from service.loadtest.bench_page import MissingMarkers, check_page, write_results

    if args.write_docs is not None:
        # Checked before minutes of benchmarking, not after.
        try:
            check_page(args.write_docs.read_text(encoding="utf-8"))
        except (OSError, MissingMarkers) as problem:
            raise ConfigurationError(f"--write-docs {args.write_docs}: {problem}") from None
    report = run_bench(
        BenchOptions(
            rounds=args.rounds,
            duration=args.duration,
            processes=args.processes,
            concurrency=args.concurrency,
            workers=args.workers,
        )
    )
    print(report.markdown())
    if args.output is not None:
        args.output.write_text(report.markdown() + "\n")
    if args.write_docs is not None:
        write_results(args.write_docs, report, bench_command_line(args))
    return 0
