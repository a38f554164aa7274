"""The sweep's overhead per job against the same jobs run one after another, and its speed-up with 2 workers.

    python benchmarks/bench_sweep.py [--jobs 4] [--image-size 64] [--images 4]

Starts one ``mlflow server`` on 127.0.0.1 (both sides log to it), then times, in one session:

- sequential: ``--jobs`` WinCLIP jobs (tiny random-weight model, synthetic benchmark, one seed each) run one after
  another through :func:`zsadbench.jobs.run`, the function ``zsadbench run`` calls, in this warm process (the CLI's
  own process start, ~10-20 s of imports per command, is left out: a stricter baseline);
- one-cell sweeps, alternating with the sequential jobs (other seeds, same work) on a local Ray instance with one CPU
  slot, after a one-cell warm-up sweep (Ray's start and the worker's imports are the sweep's fixed cost, reported
  apart): the median difference is the per-job overhead with every driver-side cost of a sweep command
  (fingerprints, preflight, parent run, grid publishing, task dispatch, cell records, run tags) charged to one job,
  an upper bound;
- a sweep of ``--jobs`` cells on 1 worker (per-job overhead = (wall - jobs x median sequential job) / jobs) and on
  2 workers (each job one thread; the sequential jobs and the 1-worker sweeps get all cores): the speed-up.

The jobs here last seconds; the target (< 5 % on jobs of a minute) is extrapolated from the per-job overhead in
seconds, which does not grow with the job's length: overhead / 60 s. Medians are printed with the load average; the
machine is shared, so read them as such.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    """Runs the benchmark and prints medians and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=4, help="normal and anomalous test images per category")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-sweep-")
    os.environ["ZSADBENCH_RESULTS"] = str(Path(tmp) / "results")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

    import ray

    from zsadbench import sweep
    from zsadbench.evaluation import EvalOptions
    from zsadbench.jobs import RunSpec, run

    options = {"image_size": args.image_size, "n_train": 2, "n_test_normal": args.images,
               "n_test_anomalous": args.images, "categories": "carpet,brain"}

    def spec_for(name: str, seeds: list[int]) -> sweep.SweepSpec:
        return sweep.parse_spec({"name": name, "seeds": seeds, "include_random": True, "bootstrap": 0,
                                 "datasets": {"syn": {"dataset": "synthetic", "options": options}},
                                 "methods": {"winclip": {"preset": "smoke"}}}, "bench")

    def timed_sweep(name: str, seeds: list[int], workers: int, uri: str) -> float:
        start = time.perf_counter()
        outcome = sweep.execute(spec_for(name, seeds), ray_address=None, tracking_uri=uri,
                                workers=workers, progress=False, write_leaderboard=False)
        assert not outcome.failed, outcome.failed
        return time.perf_counter() - start

    cores = len(os.sched_getaffinity(0))

    def start_ray(workers: int) -> float:
        began = time.perf_counter()
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
                 configure_logging=False, object_store_memory=sweep.OBJECT_STORE_BYTES)
        return time.perf_counter() - began

    with sweep.owned_tracking_server(Path(tmp) / "server.log") as uri:
        os.environ["MLFLOW_TRACKING_URI"] = uri
        import torch

        torch.set_num_threads(cores)
        cell = sweep.expand(spec_for("sequential", [0]))[0]
        run(cell.spec, progress=False)  # warm-up: imports, the synthetic data, the hash cache

        def sequential_job(seed: int) -> float:
            began = time.perf_counter()
            run(RunSpec(**{**cell.spec.to_json(), "seed": seed, "run_name": f"seq-{seed}",
                           "eval": EvalOptions(**cell.spec.to_json()["eval"])}), progress=False)
            return time.perf_counter() - began

        fixed = {1: start_ray(1)}
        warm = {1: timed_sweep("warm-1", [1000], 1, uri)}
        sequential, single = [], []
        for r in range(args.jobs):  # alternating, so that load from other processes hits both alike
            sequential.append(sequential_job(10 + r))
            single.append(timed_sweep(f"single-{r}", [100 + r], 1, uri))
        batch = {1: timed_sweep("batch-1", list(range(200, 200 + args.jobs)), 1, uri)}
        ray.shutdown()
        fixed[2] = start_ray(2)
        warm[2] = timed_sweep("warm-2", [2000, 2001], 2, uri)
        batch[2] = timed_sweep("batch-2", list(range(300, 300 + args.jobs)), 2, uri)
        ray.shutdown()
    per_job = statistics.median(sequential)
    single_overhead = statistics.median(b - a for a, b in zip(sequential, single))
    batch_overhead = (batch[1] - args.jobs * per_job) / args.jobs
    load = os.getloadavg()
    print(f"bench_sweep: WinCLIP jobs (tiny model, synthetic {args.image_size} px, {4 * args.images} test images), "
          f"{cores} cores, load {load[0]:.1f} {load[1]:.1f}")
    print(f"  sequential (jobs.run, warm process, {cores} threads): median {per_job:.2f} s per job "
          f"({', '.join(f'{v:.1f}' for v in sequential)})")
    print(f"  sweep of one cell, 1 worker ({cores} threads), alternating with them: "
          f"median {statistics.median(single):.2f} s "
          f"({', '.join(f'{v:.1f}' for v in single)})")
    print(f"  per-job overhead, one-cell sweeps (every sweep's driver cost on one job): "
          f"median {single_overhead:+.2f} s "
          f"= {100 * single_overhead / per_job:+.1f} % of these jobs; on jobs of 60 s: "
          f"{100 * single_overhead / 60:+.2f} % (target < 5 %)")
    print(f"  sweep of {args.jobs} cells, 1 worker: {batch[1]:.1f} s ({batch[1] / args.jobs:.2f} s per job); per-job "
          f"overhead {batch_overhead:+.2f} s = {100 * batch_overhead / per_job:+.1f} %; on jobs of 60 s: "
          f"{100 * batch_overhead / 60:+.2f} %")
    print(f"  sweep of {args.jobs} cells, 2 workers (1 thread each): {batch[2]:.1f} s; speed-up against 1 worker: "
          f"{batch[1] / batch[2]:.2f}x, against the sequential jobs: {args.jobs * per_job / batch[2]:.2f}x")
    print(f"  fixed costs (once per sweep command, not per job): Ray start {fixed[1]:.1f} s / {fixed[2]:.1f} s, "
          f"first sweep with cold workers {warm[1]:.1f} s (1 cell) / {warm[2]:.1f} s (2 cells); the mlflow server's "
          "start is not timed here")


if __name__ == "__main__":
    sys.exit(main())
