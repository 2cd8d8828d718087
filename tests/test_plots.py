"""plot_run: PNGs from metrics.jsonl alone, including one cut short by a crash."""

import json

import matplotlib.image
import numpy as np
import pytest

from seekling.train.plots import plot_run


def write_metrics(run_dir, n_steps=30, layers=3, experts=8, torn=False):
    run_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(1, n_steps + 1):
            row = {"step": step, "tokens": step * 1024, "loss": 8 - step * 0.1, "mtp_loss": 8.1 - step * 0.1,
                   "lr": 1e-3 * min(1, step / 5), "tok_per_s": 1500 + rng.normal() * 50, "mfu": 0.3, "elapsed": step,
                   "expert_load": rng.integers(50, 150, size=(layers, experts)).tolist()}
            if step % 10 == 0:
                row |= {"val_loss": 8 - step * 0.09, "val_bpb": 3.0 - step * 0.01}
            f.write(json.dumps(row) + "\n")
        if torn:
            f.write('{"step": 31, "loss"')


def test_plot_run_writes_all_pngs(tmp_path):
    write_metrics(tmp_path / "run", torn=True)
    paths = plot_run(tmp_path / "run")
    assert [p.name for p in paths] == ["loss.png", "lr.png", "throughput.png", "expert_load.png"]
    for p in paths:
        img = matplotlib.image.imread(p)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400
        assert img[..., :3].std() > 0.05  # something was drawn, not a blank canvas
    assert not list((tmp_path / "run").glob(".*tmp*"))  # temporary files renamed away


def test_dense_run_has_no_expert_plot(tmp_path):
    write_metrics(tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r | {"expert_load": None}) + "\n" for r in rows))
    names = [p.name for p in plot_run(tmp_path / "run")]
    assert "expert_load.png" not in names and "loss.png" in names


def test_no_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no logged steps"):
        plot_run(tmp_path)
