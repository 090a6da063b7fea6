"""Joining finished ``trade-md simulate`` files of the same settings (shards run as separate
jobs or torchrun ranks) into one valid file of the same format (docs/formats.md).

Every ensemble keeps the save-major frame order of the format: at each save, the replicas of
the first file, then those of the second, ..., with replica (ladder) numbers offset so that
they stay unique; each file's frames appear unchanged. Per-save kinetic temperatures are
averaged with the files' replica counts as weights. In a replica-exchange file the exchange
attempts, acceptances and round trips are added and walker ids are offset like the ladders.
The merged file has no checkpoint (it cannot be resumed: resume the shards and merge again),
records its sources in ``merged_from`` and is written in today's layout (format version 2)
whatever the layout of its sources.
"""

import json
from pathlib import Path

import numpy as np

from trademd.errors import TradeMDError
from trademd.io.schema import SCHEMA_ATTRS, TRAJECTORY_FORMAT
from trademd.io.trajectory_file import DynamicsFile, EnsembleFrames
from trademd.io.trajectory_layout import FRAME_COLUMNS

__all__ = ["MERGE_IGNORED_SETTINGS", "merge_dynamics_files"]

#: Settings that may differ between the files of one merge (the rest must be equal).
MERGE_IGNORED_SETTINGS = ("seed", "replicas", "ladders", "platform", "cpu_threads", "chunk_saves")


def _settings(file: DynamicsFile) -> dict:
    settings = json.loads(file.attrs["simulation_config"])
    return {k: v for k, v in settings.items() if k not in MERGE_IGNORED_SETTINGS}


def _copies(file: DynamicsFile) -> int:
    return int(file.attrs["n_replicas"])


def _check_compatible(files: list[DynamicsFile], paths: list[Path]) -> None:
    first = files[0]
    for file, path in zip(files, paths):
        attrs, theirs_attrs = file.attrs, first.attrs
        if attrs["format"] != theirs_attrs["format"]:
            raise TradeMDError(f"{str(path)!r} is a {attrs['format']} file, {str(paths[0])!r} a "
                               f"{theirs_attrs['format']} file: merge files of one kind")
        if attrs["system"] != theirs_attrs["system"] or file.topology_pdb != first.topology_pdb:
            raise TradeMDError(f"{str(path)!r} holds another system ({attrs['system']}) than "
                               f"{str(paths[0])!r} ({theirs_attrs['system']}): merge shards of one run")
        mine, theirs = _settings(file), _settings(first)
        differing = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if differing:
            raise TradeMDError(f"{str(path)!r} was simulated with other settings than {str(paths[0])!r} "
                               f"({', '.join(differing)}): merge shards of the same settings")
        if file.has_checkpoint:
            done = file.checkpoint_saves
            wanted = int(round(json.loads(attrs["simulation_config"])["time_ps"]
                               / float(attrs["save_every_ps"])))
            if done < wanted:
                raise TradeMDError(f"{str(path)!r} is unfinished ({done} of {wanted} saves): resume it "
                                   "with `trade-md simulate --resume` before merging")
        elif "merged_from" not in attrs:
            raise TradeMDError(f"{str(path)!r} holds no finished chunk: finish it before merging")
    seeds = [json.loads(f.attrs["simulation_config"])["seed"] for f in files if "merged_from" not in f.attrs]
    if len(set(seeds)) < len(seeds):
        raise TradeMDError(f"two of the files were run with the same seed ({sorted(seeds)}): they are "
                           "copies, not independent shards")


def _merge_ensemble(ensembles: list[EnsembleFrames], copies: list[int], out: EnsembleFrames) -> None:
    """Interleave the frames of one ensemble save by save; offset replica numbers."""
    saves = [e.n_frames // c for e, c in zip(ensembles, copies)]
    if len(set(saves)) != 1:
        raise TradeMDError(f"the files hold different numbers of saves ({saves}): merge shards of "
                           "equal --time")
    n_saves, offsets = saves[0], np.cumsum([0, *copies[:-1]])
    columns = [e.columns() for e in ensembles]
    merged = {}
    for name in FRAME_COLUMNS:
        parts = []
        for column, c, offset in zip(columns, copies, offsets):
            values = column[name][: n_saves * c]
            values = values.reshape(n_saves, c, *values.shape[1:])
            parts.append(values + offset if name == "replica" else values)
        merged[name] = np.concatenate(parts, axis=1).reshape(n_saves * sum(copies), *parts[0].shape[2:])
    kinetic = sum(column["kinetic_temperature_k"][:n_saves] * c for column, c in zip(columns, copies)) / sum(copies)
    out.append(merged["positions_nm"], merged["energy_kj_mol"], merged["replica"], merged["time_ps"], kinetic)


def _merge_exchange(files: list[DynamicsFile], copies: list[int], out: DynamicsFile) -> None:
    """Add the exchange statistics; offset walker ids like the ladders."""
    records = [f.read_exchange_statistics() for f in files]
    attempts = sum(r["attempts"] for r in records)
    accepted = sum(r["accepted"] for r in records)
    n_rungs = records[0]["walker_at_rung"].shape[2]
    n_saves = min(r["walker_at_rung"].shape[0] for r in records)
    offsets = np.cumsum([0, *copies[:-1]]) * n_rungs
    walkers = np.concatenate([r["walker_at_rung"][:n_saves] + o for r, o in zip(records, offsets)], axis=1)
    rates = np.where(attempts > 0, accepted / np.maximum(attempts, 1), np.nan)
    out.write_exchange_statistics(attempts, accepted, [float(r) for r in rates],
                                  int(sum(r["round_trips"] for r in records)),
                                  records[0]["exchange_rounds"], walkers.astype(np.int32))


def merge_dynamics_files(paths: list[str | Path], out: str | Path, provenance_attrs: dict,
                         overwrite: bool = False) -> Path:
    """Merge finished simulate files of equal settings (seeds, copies and platform may differ)
    into ``out``.

    Args:
        paths: two or more ``trade-md/trajectory`` files, or two or more
            ``trade-md/replica-exchange`` files.
        provenance_attrs: provenance of the merge (command, versions) for the new file.

    Raises:
        TradeMDError: fewer than two files, a missing or unfinished file, another kind,
            system or setting, equal seeds, or unequal times.
    """
    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise TradeMDError("give two or more simulate files to merge")
    out = Path(out)
    if any(p.resolve() == out.resolve() for p in paths if p.exists()):
        raise TradeMDError(f"--out {str(out)!r} is one of the files to merge: write to a new file")
    files = []
    try:
        for p in paths:
            files.append(DynamicsFile.open(p))
        _check_compatible(files, paths)
        first = files[0]
        copies = [_copies(f) for f in files]
        attrs = {k: v for k, v in first.attrs.items() if k not in provenance_attrs and k not in SCHEMA_ATTRS}
        settings = json.loads(first.attrs["simulation_config"])
        settings["ladders" if "ladders" in settings else "replicas"] = sum(copies)
        sources = [{"path": str(p.resolve()), "seed": json.loads(f.attrs["simulation_config"])["seed"],
                    "copies": c} for p, f, c in zip(paths, files, copies)]
        attrs.update({"n_replicas": sum(copies), "simulation_config": json.dumps(settings),
                      "wall_time_s": float(sum(float(f.attrs.get("wall_time_s", 0.0)) for f in files)),
                      "merged_from": json.dumps(sources), **provenance_attrs})
        with DynamicsFile.create(out, attrs, first.topology_pdb, first.ensembles[0].n_atoms,
                                 first.temperatures_k, overwrite=overwrite) as merged:
            for k, ensemble in enumerate(merged.ensembles):
                _merge_ensemble([f.ensembles[k] for f in files], copies, ensemble)
            if first.attrs["format"] != TRAJECTORY_FORMAT:
                _merge_exchange(files, copies, merged)
    finally:
        for file in files:
            file.close()
    return out
