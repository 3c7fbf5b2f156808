"""The ``--slurm.*`` / ``--ray.*`` options of the commands that run jobs on the sweep executors (``visionpeft sweep``,
``visionpeft noah``): one declaration, so both commands take the same names."""

from __future__ import annotations

import argparse
from typing import Any

from .common import positive_int


def add_executor_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the settings of the Slurm (submitit) and Ray executors to ``parser``."""
    slurm = parser.add_argument_group("slurm executor (submitit)")
    slurm.add_argument("--slurm.partition", dest="slurm_partition")
    slurm.add_argument("--slurm.gpus_per_job", dest="slurm_gpus_per_job", type=int, default=1)
    slurm.add_argument("--slurm.cpus_per_job", dest="slurm_cpus_per_job", type=positive_int, default=8)
    slurm.add_argument("--slurm.mem_gb", dest="slurm_mem_gb", type=positive_int)
    slurm.add_argument("--slurm.timeout_min", dest="slurm_timeout_min", type=positive_int, default=24 * 60)
    slurm.add_argument(
        "--slurm.cluster",
        dest="slurm_cluster",
        choices=["slurm", "local", "debug"],
        help="submitit's cluster (default: detect Slurm; local / debug run on this machine)",
    )
    ray = parser.add_argument_group("ray executor")
    ray.add_argument("--ray.address", dest="ray_address", help="a running cluster (auto); default: start a local one")
    ray.add_argument("--ray.gpus_per_run", dest="ray_gpus_per_run", type=float, default=0)
    ray.add_argument("--ray.cpus_per_run", dest="ray_cpus_per_run", type=float, default=1)


def executor_options(args: argparse.Namespace) -> dict[str, Any]:
    """The chosen executor's settings from parsed arguments (none for the local pool)."""
    if args.executor == "slurm":
        return {
            "partition": args.slurm_partition,
            "gpus_per_job": args.slurm_gpus_per_job,
            "cpus_per_job": args.slurm_cpus_per_job,
            "mem_gb": args.slurm_mem_gb,
            "timeout_min": args.slurm_timeout_min,
            "cluster": args.slurm_cluster,
        }
    if args.executor == "ray":
        return {
            "address": args.ray_address,
            "gpus_per_run": args.ray_gpus_per_run,
            "cpus_per_run": args.ray_cpus_per_run,
        }
    return {}
