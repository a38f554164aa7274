"""Sweeps with real components: a local Ray instance (2 CPU workers), the tiny models, the synthetic benchmark, a real
``mlflow server`` on 127.0.0.1. A worker killed mid-job, an interrupted driver, a cell that always fails."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from zsadbench import sweep
from zsadbench.sweep import SpecError, parse_spec

SMALL = {"image_size": 48, "n_train": 2, "n_test_normal": 3, "n_test_anomalous": 3}
TINY_CLIP = {"preset": "smoke"}


def spec_of(datasets: dict, methods: dict, **top) -> dict:
    return {"name": "t", "datasets": datasets, "methods": methods, **top}


# ------------------------------------------------------------------------------------------- spec and grid (no Ray)

@pytest.mark.parametrize(("change", "message"), [
    ({"colour": 1}, "unknown key colour"),
    ({"methods": {"nope": {}}}, "[methods.nope]: unknown method"),
    ({"methods": {"winclip": {"train": True}}}, "[methods.winclip]: winclip has no learned parts"),
    ({"methods": {"anomalyclip": {"train": True}}}, "names no auxiliary dataset (trained_on)"),
    ({"methods": {"musc": {"shots": [1]}}}, "musc is not a few-shot method"),
    ({"datasets": {"a": {"dataset": "synthetic", "trained_on": "b"}}}, "trained_on 'b' is not a dataset"),
    ({"datasets": {"a": {"dataset": "synthetic", "options": {"colour": 1}}}}, "has no option 'colour'"),
    ({"datasets": {"m": {"dataset": "mvtec"}}}, "[datasets.m]: dataset 'mvtec' needs data_root"),
    ({"datasets": {"m": {"dataset": "mvtec", "data_root": "{data}/mvtec"}}}, "needs the data folder: pass --data-dir"),
    ({"seeds": [-1]}, "seeds: expected a non-empty list of integers"),
])
def test_bad_specs_name_the_file_and_key(change: dict, message: str, monkeypatch) -> None:
    monkeypatch.delenv("ZSADBENCH_DATA", raising=False)
    data = spec_of({"a": {"dataset": "synthetic", "options": SMALL}}, {"winclip": TINY_CLIP}) | change
    with pytest.raises(SpecError) as error:
        parse_spec(data, "grid.toml")
    assert str(error.value).startswith("grid.toml") and message in str(error.value)


def test_grid_orders_trainings_first_and_keys_cells_by_their_full_spec() -> None:
    spec = sweep.load_spec("tiny")
    cells = sweep.expand(spec)
    kinds = [c.kind for c in cells]
    assert kinds == ["training"] * 2 + ["evaluation"] * 4
    trainings = {c.key: c for c in cells if c.kind == "training"}
    dependent = [c for c in cells if c.needs]
    assert len(dependent) == 2 and {c.needs for c in dependent} == set(trainings)
    for run in dependent:  # each trained method is evaluated on a dataset its training did not see
        assert trainings[run.needs].dataset_key == spec.datasets[run.dataset_key].trained_on != run.dataset_key
    assert len({c.key for c in cells}) == len(cells)
    assert [c.key for c in sweep.expand(sweep.load_spec("tiny"))] == [c.key for c in cells]  # stable
    assert [c.key for c in sweep.expand(spec, device="cuda")] == [c.key for c in cells]  # where, not what
    spec.seeds = [1]
    assert not {c.key for c in sweep.expand(spec)} & {c.key for c in cells}
    spec.seeds = [0]
    spec.methods[0].overrides["image_size"] = "64"  # winclip's config changes its cells only
    changed = {c.key for c in sweep.expand(spec)} ^ {c.key for c in cells}
    assert len(changed) == 4 and all("winclip" in c.label for c in cells if c.key in changed)


def test_presets_expand_the_zsad_protocols(tmp_path: Path) -> None:
    spec = sweep.load_spec("zsad", data_dir=str(tmp_path))
    cells = sweep.expand(spec)
    trained = {(c.spec.method, c.spec.dataset) for c in cells if c.kind == "training"}
    assert ("anomalyclip", "visa") in trained and ("anomalyclip", "mvtec") in trained
    by_key = {c.key: c for c in cells}
    for cell in cells:
        if cell.needs:  # VisA -> MVTec AD, MVTec AD -> the rest
            assert by_key[cell.needs].spec.dataset == ("visa" if cell.spec.dataset == "mvtec" else "mvtec")
    medical = sweep.load_spec("zsad-medical", data_dir=str(tmp_path))
    assert {c.spec.dataset for c in sweep.expand(medical) if c.kind == "evaluation"}.isdisjoint({"mvtec", "visa"})


def test_credentials_never_reach_errors_or_the_grid() -> None:
    line = sweep._error_line(RuntimeError("MLflow at http://bob:s3cret@host:5000 failed\nmore"))
    assert "s3cret" not in line and "http://***@host:5000" in line


def test_cli_dry_run_and_print_spec(capsys) -> None:
    from zsadbench.cli import main

    assert main(["sweep", "--preset", "tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "6 cells" in out and out.count("to run") == 6 and "[after: train anomalyclip" in out
    assert main(["sweep", "--preset", "tiny", "--print-spec"]) == 0
    assert "[methods.anomalyclip]" in capsys.readouterr().out
    assert main(["sweep", "--preset", "nope"]) == 2
    assert "no such sweep preset" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ Ray and MLflow

@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance with 2 CPU workers for the module (a start costs seconds); yields its address."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             configure_logging=False, object_store_memory=sweep.OBJECT_STORE_BYTES)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def runs_by_name(uri: str, experiment: str) -> Counter:
    """Returns how many MLflow runs (not deleted) carry each run name, the sweep's parent run left out."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], max_results=1000)
    return Counter(r.info.run_name for r in runs if r.data.tags.get("zsadbench.kind") != "sweep")


def kill_when_started(folder: Path, label: str, results: Path, killed: list[int]) -> threading.Thread:
    """Kills (SIGKILL) the worker running cell ``label`` once its job's folder and MLflow run exist."""

    def watch() -> None:
        deadline = time.time() + 240
        while time.time() < deadline:
            for path in (folder / "cells").glob("*.json"):
                try:
                    record = json.loads(path.read_text())
                except (OSError, json.JSONDecodeError):
                    continue
                if record.get("label") != label or record.get("status") != "running":
                    continue
                states = list((results / "runs").glob("*/state.json"))
                if any(record["key"][:sweep.KEY_LENGTH] in s.read_text() for s in states):
                    os.kill(record["pid"], signal.SIGKILL)
                    killed.append(record["pid"])
                    return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_grid_on_ray_survives_a_killed_worker_and_reports_a_failing_cell(
        local_ray: str, mlflow_server: str, isolated_results: Path) -> None:
    """A grid with a training and the run needing its checkpoint, a worker killed mid-job, a cell that always fails,
    through a tracking URI with a password."""
    big = {**SMALL, "image_size": 64, "n_test_normal": 8, "n_test_anomalous": 8, "categories": "carpet,tile"}
    data = spec_of(
        {"syn-a": {"dataset": "synthetic", "options": big, "trained_on": "syn-b"},
         "syn-b": {"dataset": "synthetic", "options": {**SMALL, "categories": "brain"}},
         "broken": {"dataset": "synthetic", "options": SMALL, "categories": ["no-such-category"]}},
        {"winclip": TINY_CLIP,
         "anomalyclip": {**TINY_CLIP, "train": True, "datasets": ["syn-a"], "set": {"train": {"epochs": 1}}}},
        name="grid", retries=1, include_random=True, bootstrap=0)
    spec = parse_spec(data, "grid.toml")
    killed: list[int] = []
    watcher = kill_when_started(spec.folder, "winclip on syn-a, 0-shot (seed 0)", isolated_results, killed)
    with_password = mlflow_server.replace("http://", "http://sweeper:s3cret@")  # must never be written anywhere
    outcome = sweep.execute(spec, ray_address=local_ray, tracking_uri=with_password, workers=2, progress=False,
                            publish_every=1.0)
    watcher.join(timeout=1)
    grid = outcome.grid
    labels = {c.key: c.label for c in grid.cells}
    status = {labels[k]: s for k, s in grid.status.items()}
    attempts = {labels[k]: n for k, n in grid.attempts.items()}
    # the failing cell: retried once (2 attempts), then reported with its error; the rest completed
    (failed_label, error), = outcome.failed
    assert failed_label == "winclip on broken, 0-shot (seed 0)" and "no-such-category" in error
    assert attempts[failed_label] == 2
    assert Counter(status.values()) == {"done": 4, "failed": 1}
    # the killed worker's cell was retried in its own job folder and MLflow run: one run per cell
    assert killed, "the worker was never caught mid-job: the kill did not happen"
    assert attempts["winclip on syn-a, 0-shot (seed 0)"] == 2
    names = runs_by_name(mlflow_server, spec.experiment_name)
    done_names = {c.run_name for c in grid.cells if grid.status[c.key] == "done"}
    assert set(names) == done_names and set(names.values()) == {1}
    assert len(list((isolated_results / "runs").iterdir())) == 3
    assert len(list((isolated_results / "training").iterdir())) == 1
    # the training finished before the run that evaluates its checkpoint started
    records = {r["label"]: r for r in (json.loads(p.read_text()) for p in (spec.folder / "cells").glob("*.json"))}
    training = records["train anomalyclip on syn-b (seed 0)"]
    evaluation = records["anomalyclip on syn-a, trained on syn-b (seed 0)"]
    assert training["finished"] <= evaluation["started"]
    state = json.loads((Path(evaluation_folder(isolated_results, evaluation["run_id"])) / "state.json").read_text())
    assert state["spec"]["overrides"]["checkpoint"] == training["checkpoint"]
    # the parent run holds the grid; the leaderboard was written
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    parent = client.get_run(outcome.parent_run)
    artifacts = {a.path for a in client.list_artifacts(outcome.parent_run)}
    assert {"sweep_grid.json", "sweep_grid.md"} <= artifacts
    grid_file = client.download_artifacts(outcome.parent_run, "sweep_grid.json", str(isolated_results.parent))
    table = json.loads(Path(grid_file).read_text())  # the final table, one row per cell
    column = table["columns"].index("status")
    assert sorted(row[column] for row in table["data"]) == ["done"] * 4 + ["failed"]
    assert parent.data.metrics["cells_done"] == 4 and parent.data.metrics["cells_failed"] == 1
    assert outcome.leaderboard is not None and "WinCLIP" in outcome.leaderboard.read_text()
    assert "no-such-category" in (spec.folder / "grid.md").read_text()
    # the password is in no file of the results folder, and in no parameter or tag of any run
    for path in isolated_results.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".md", ".csv", ".html", ".jsonl", ".log", ".txt"):
            assert "s3cret" not in path.read_text(errors="replace"), path
    for run in client.search_runs([parent.info.experiment_id]):
        assert "s3cret" not in json.dumps([run.data.params, run.data.tags])
    assert parent.data.params["tracking_uri"] == with_password.replace("sweeper:s3cret", "***")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def evaluation_folder(results: Path, run_id: str) -> Path:
    return results / "runs" / run_id


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_recomputing(local_ray: str, mlflow_server: str, isolated_results: Path,
                                                       tmp_path: Path) -> None:
    import tomli_w

    data = spec_of({"syn-a": {"dataset": "synthetic", "options": {**SMALL, "categories": "carpet"}},
                    "syn-b": {"dataset": "synthetic", "options": {**SMALL, "categories": "brain"}}},
                   {"winclip": TINY_CLIP}, name="resume", seeds=[0, 1, 2], include_random=True, bootstrap=0)
    path = tmp_path / "resume.toml"
    path.write_text(tomli_w.dumps(data))
    spec = sweep.load_spec(str(path))
    command = [sys.executable, "-m", "zsadbench.cli", "sweep", str(path), "--ray-address", local_ray,
               "--tracking-uri", mlflow_server]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    cells = spec.folder / "cells"
    deadline = time.time() + 300
    while time.time() < deadline:  # interrupt once some cells are done and the others not
        statuses = [json.loads(p.read_text()).get("status") for p in cells.glob("*.json")] if cells.is_dir() else []
        if statuses.count("done") >= 2:
            break
        assert driver.poll() is None, driver.stdout.read() if driver.stdout else ""
        time.sleep(0.05)
    driver.send_signal(signal.SIGINT)
    output, _ = driver.communicate(timeout=120)
    assert driver.returncode == 130, output
    assert "resume with the same command" in output
    # the driver is gone, and so are the workers that ran its unfinished cells (a cell may finish meanwhile)
    running = [json.loads(p.read_text())["pid"] for p in cells.glob("*.json")
               if json.loads(p.read_text())["status"] == "running"]
    deadline = time.time() + 60
    while time.time() < deadline and any(alive(pid) for pid in running):
        time.sleep(0.2)
    assert not any(alive(pid) for pid in running), running
    before = {p.stem: json.loads(p.read_text()) for p in cells.glob("*.json")}
    done_before = {k: r for k, r in before.items() if r["status"] == "done"}
    assert 2 <= len(done_before) < 6
    assert not [r for r in before.values() if r["status"] == "failed"], before  # stopped cells are not failures
    # a job may have finished between the interrupt and its worker's end without its cell saying so
    complete_before = {name: job.run_id for (_, name), (job, status) in sweep.finished_jobs().items()
                       if status == "complete"}
    mtimes = {k: (isolated_results / "runs" / r["run_id"] / "results.json").stat().st_mtime_ns
              for k, r in done_before.items()}
    # the leaderboard of what is finished, written while the sweep is not done
    from zsadbench.cli import main

    assert main(["sweep", str(path), "--leaderboard", "--tracking-uri", mlflow_server]) == 0
    board = (spec.folder / "leaderboard" / "leaderboard.md").read_text()
    assert "WinCLIP" in board and any(run_id in board for run_id in complete_before.values())
    outcome = sweep.execute(spec, ray_address=local_ray, tracking_uri=mlflow_server, progress=False)
    grid = outcome.grid
    assert set(grid.status.values()) == {"done"} and len(grid.cells) == 6
    assert grid.skipped == {c.key for c in grid.cells if c.run_name in complete_before}  # nor submitted again
    assert set(done_before) <= grid.skipped
    for key, record in done_before.items():
        assert grid.run_ids[key] == record["run_id"]
        after = (isolated_results / "runs" / record["run_id"] / "results.json").stat().st_mtime_ns
        assert after == mtimes[key]
        assert json.loads((cells / f"{key}.json").read_text())["attempts"] == record["attempts"]
    names = runs_by_name(mlflow_server, spec.experiment_name)
    assert set(names) == {c.run_name for c in grid.cells} and set(names.values()) == {1}
    assert len(list((isolated_results / "runs").iterdir())) == 6
