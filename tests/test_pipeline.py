"""`trade-md run`: every stage once, then every stage reused."""

import json

from typer.testing import CliRunner

from trademd.cli.app import app

runner = CliRunner()


def test_run_pipeline_then_reuse(tmp_path):
    out = tmp_path / "demo"
    arguments = ["run", "--system", "ala2-vacuum", "--temperature", "400", "--time", "12ps",
                 "--replicas", "4", "--steps", "4", "--n", "32", "--platform", "CPU",
                 "--out", str(out), "--quiet"]
    first = runner.invoke(app, arguments)
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert summary["temperature_k"] == 400.0 and summary["n"] == 32
    for name in ("data_600K.h5", "train/model.pt", "samples.h5", "samples_ramachandran.png",
                 "summary.json"):
        assert (out / name).is_file(), name
    stamps = {name: (out / name).stat().st_mtime_ns for name in ("data_600K.h5", "train/model.pt", "samples.h5")}

    again = runner.invoke(app, arguments)
    assert again.exit_code == 0, again.output
    assert again.output.count("reusing") == 3
    assert stamps == {name: (out / name).stat().st_mtime_ns for name in stamps}
    assert json.loads(again.stdout.strip().splitlines()[-1]) == summary

    # interrupted between the samples file and its summary: the rerun samples again
    (out / "summary.json").unlink()
    third = runner.invoke(app, arguments)
    assert third.exit_code == 0, third.output
    assert third.output.count("reusing") == 2 and "sampling" in third.output
    assert (out / "summary.json").is_file()
    assert json.loads(third.stdout.strip().splitlines()[-1])["n"] == 32



def test_published_benchmark_system_runs_every_stage(tmp_path):
    """ala2-openmmtools (no constraints): `run` settings pick its 2 fs step and force-field
    masses; MD, training and sampling run, and every bond is a flow dimension (60 internal
    coordinates, as in the published benchmarks)."""
    import h5py
    import torch

    from trademd.pipeline import RunConfig
    from trademd.sample import sample_run
    from trademd.simulate import simulate
    from trademd.systems import get_system
    from trademd.train import train_run
    from trademd.training.model_file import load_model

    settings = RunConfig(system="ala2-openmmtools", temperatures_k=(400.0,), simulation_ps=4.0,
                         replicas=4).simulation("CPU")
    assert settings.timestep_ps == 0.002 and settings.hydrogen_mass_amu is None
    data = simulate(settings, tmp_path / "data.h5", show_progress=False)
    with h5py.File(data) as h5:
        assert h5.attrs["system"] == "ala2-openmmtools" and h5.attrs["constraints"] == "None"
    small = {"steps": 4, "batch_size": 16, "trade_points": 16, "cache_samples": 100,
             "metrics_every": 2, "metrics_samples": 100, "refine_rounds": 1, "refine_steps": 2,
             "refine_samples": 200}
    model_path = train_run(tmp_path / "train", 320.0, 660.0, data=data, overrides=small,
                           device="cpu", platform="CPU", show_progress=False)
    model = load_model(model_path, platform="CPU")
    try:
        positions = torch.as_tensor(get_system("ala2-openmmtools").positions_nm()[None])
        features, _ = model.target.coordinates(positions)
        assert features.torsions.shape[1] + features.bounded.shape[1] == 60
    finally:
        model.close()
    (summary,) = sample_run(model_path, [400.0], 16, tmp_path / "samples.h5", device="cpu",
                            platform="CPU", show_progress=False)
    assert summary["n"] == 16 and summary["temperature_k"] == 400.0
