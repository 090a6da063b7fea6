"""`trade-md run`: every stage once, then every stage reused."""

import json

import pytest
from typer.testing import CliRunner

from trademd.cli.app import app

#: Every stage end to end: minutes (measured 2026-12-07 on the shared 2-core machine: 440 s and
#: 30-50 s per system), outside the fast lane.
pytestmark = pytest.mark.slow

runner = CliRunner()


def test_the_default_run_is_what_it_was(monkeypatch, tmp_path):
    """`trade-md run` with no options: alanine dipeptide in implicit solvent, 16 replicas x 1 ns
    at 600 K saving every 0.1 ps after 20 ps of equilibration (its own MD preset, not
    `simulate`'s 64 replicas and 100 ps), the quick training preset, 100,000 samples at 300 K."""
    import trademd.pipeline
    from trademd.pipeline import RunConfig
    from trademd.simulate import simulation_config

    calls = []
    monkeypatch.setattr(trademd.pipeline, "run_pipeline",
                        lambda config, out, **kwargs: calls.append(config) or {"samples": []})
    result = runner.invoke(app, ["run", "--out", str(tmp_path / "r"), "--quiet"])
    assert result.exit_code == 0, result.output
    (config,) = calls
    assert config == RunConfig()
    assert (config.system, config.temperatures_k, config.data_temperature_k, config.simulation_ps,
            config.replicas, config.save_every_ps, config.preset, config.steps, config.n_samples,
            config.seed) == ("ala2-implicit", (300.0,), 600.0, 1000.0, 16, 0.1, "quick", None, 100000, 0)
    md = config.simulation("CPU")
    assert (md.temperature_k, md.time_ps, md.replicas, md.save_every_ps, md.equilibration_ps,
            md.timestep_ps, md.hydrogen_mass_amu) == (600.0, 1000.0, 16, 0.1, 20.0, 0.004, 1.5)
    plain = simulation_config(time_ps=1000.0)  # `trade-md simulate`'s defaults
    assert (plain.system_name, plain.temperature_k, plain.replicas, plain.equilibration_ps) == (
        "ala2-implicit", 600.0, 64, 100.0)


def test_run_pipeline_then_reuse(tmp_path):
    out = tmp_path / "demo"
    arguments = ["run", "--system", "ala2-vacuum", "--temperature", "400", "--time", "12ps",
                 "--replicas", "4", "--steps", "4", "--n", "32", "--platform", "CPU",
                 "--out", str(out), "--quiet"]
    first = runner.invoke(app, arguments)
    assert first.exit_code == 0, first.output
    assert "expected on this machine: MD ~" in first.output  # the estimate, before the stages
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert summary["temperature_k"] == 400.0 and summary["n"] == 32
    for name in ("data_600K.h5", "train/model.pt", "samples.h5", "samples_ramachandran.png",
                 "summary.json"):
        assert (out / name).is_file(), name
    stamps = {name: (out / name).stat().st_mtime_ns for name in ("data_600K.h5", "train/model.pt", "samples.h5")}

    again = runner.invoke(app, arguments)
    assert again.exit_code == 0, again.output
    assert again.output.count("reusing") == 3
    assert "expected on this machine" not in again.output  # nothing left to estimate
    assert stamps == {name: (out / name).stat().st_mtime_ns for name in stamps}
    assert json.loads(again.stdout.strip().splitlines()[-1]) == summary

    # interrupted between the samples file and its summary: the rerun samples again
    (out / "summary.json").unlink()
    third = runner.invoke(app, arguments)
    assert third.exit_code == 0, third.output
    assert third.output.count("reusing") == 2 and "sampling" in third.output
    assert "expected on this machine: sampling ~" in third.output  # only the stage left
    assert (out / "summary.json").is_file()
    assert json.loads(third.stdout.strip().splitlines()[-1])["n"] == 32



@pytest.mark.parametrize("name, timestep_ps, flow_dims", [
    ("ala2-openmmtools", 0.002, 60), ("ala4-implicit", 0.004, 3 * 42 - 6 - 22),
    ("ala6-implicit", 0.004, 3 * 62 - 6 - 32), ("pro2-implicit", 0.004, 3 * 26 - 6 - 14),
    ("trp2-implicit", 0.004, 3 * 36 - 6 - 17)])
def test_new_builtin_systems_run_every_stage(tmp_path, name, timestep_ps, flow_dims):
    """The published benchmark system (no constraints: `run` picks 2 fs and force-field
    masses, every bond a flow dimension: 60, as in the published benchmarks) and the capped
    tetra- and hexapeptides and the ring dipeptides Ace-Pro-Nme, Ace-Trp-Nme (bonds to hydrogen
    rigid): MD, training and sampling run."""
    import numpy as np
    import torch

    from trademd.evaluate import evaluate_samples
    from trademd.io.samples_file import read_samples
    from trademd.io.trajectory_file import read_trajectory
    from trademd.pipeline import RunConfig
    from trademd.sample import sample_run
    from trademd.simulate import simulate
    from trademd.systems import get_system
    from trademd.train import train_run
    from trademd.training.model_file import load_model

    settings = RunConfig(system=name, temperatures_k=(400.0,), simulation_ps=4.0,
                         replicas=4).simulation("CPU")
    assert settings.timestep_ps == timestep_ps
    assert settings.hydrogen_mass_amu == (None if name == "ala2-openmmtools" else 1.5)
    data = simulate(settings, tmp_path / "data.h5", show_progress=False)
    assert read_trajectory(data).attrs["system"] == name
    small = {"steps": 150, "batch_size": 16, "trade_points": 16, "cache_samples": 100,
             "metrics_every": 75, "metrics_samples": 100, "refine_rounds": 1, "refine_steps": 2,
             "refine_samples": 200}
    model_path = train_run(tmp_path / "train", 320.0, 660.0, data=data, overrides=small,
                           device="cpu", platform="CPU", show_progress=False)
    model = load_model(model_path, platform="CPU")
    try:
        positions = torch.as_tensor(get_system(name).positions_nm()[None])
        features, _ = model.target.coordinates(positions)
        assert features.torsions.shape[1] + features.bounded.shape[1] == flow_dims
    finally:
        model.close()
    # with 4 training steps each C-alpha's handedness and each peptide bond's cis/trans were
    # coin flips (ala6: 1 in ~2,000 samples unflagged); after 150 steps 8 % in one run, under
    # 0.2 % in another: 4,096 samples keep some unflagged
    n = 4096
    (summary,) = sample_run(model_path, [600.0], n, tmp_path / "samples.h5", device="cpu",
                            platform="CPU", show_progress=False)
    assert summary["n"] == n and summary["temperature_k"] == 600.0 and summary["fraction_flagged"] < 1
    residues = len(get_system(name).backbone_dihedrals)
    samples = read_samples(tmp_path / "samples.h5").by_temperature[600.0]
    histograms = samples.histograms
    if residues > 1:  # every residue's angles, histograms and Ramachandran panel
        assert samples.phi_residues.shape == samples.psi_residues.shape == (n, residues)
        assert np.array_equal(samples.phi_residues[:, 0], samples.phi)
        assert histograms["phi_psi_weighted_residues"].shape == (residues, 60, 60)
        assert np.allclose(histograms["phi_psi_weighted_residues"][0], histograms["phi_psi_weighted"])
        assert len(summary["delta_f_positive_phi_kt_residues"]) == residues
    else:
        assert samples.phi_residues.size == 0
    metrics = evaluate_samples(tmp_path / "samples.h5", data, 600.0)
    if residues > 1:  # residue 1's numbers are the first-residue metrics, computed again
        assert len(metrics["js_phi_psi_weighted_residues"]) == residues
        assert metrics["js_phi_psi_weighted_residues"][0] == pytest.approx(metrics["js_phi_psi_weighted"])
        assert metrics["kl_phi_psi_weighted_residues"][0] == pytest.approx(metrics["kl_phi_psi_weighted"])
        assert metrics["reference_delta_f_positive_phi_kt_residues"][0] == pytest.approx(
            metrics["reference_delta_f_positive_phi_kt"])
