"""Joining finished ``trade-md simulate`` files of the same settings (shards run as separate
jobs or torchrun ranks) into one valid file of the same format (docs/formats.md).

Every ensemble keeps the save-major frame order of the format: at each save, the replicas of
the first file, then those of the second, ..., with replica (ladder) numbers offset so that
they stay unique; each file's frames appear unchanged. Per-save kinetic temperatures are
averaged with the files' replica counts as weights. In a replica-exchange file the exchange
attempts, acceptances and round trips are added and walker ids are offset like the ladders.
The merged file has no checkpoint (it cannot be resumed: resume the shards and merge again)
and records its sources in ``merged_from``.
"""

import json
from pathlib import Path

import h5py
import numpy as np

from trademd.errors import TradeMDError
from trademd.io.schema import TRAJECTORY_FORMAT, attribute_text, group_name, open_checked
from trademd.io.trajectory_file import (
    DYNAMICS_FORMATS,
    TRAJECTORY_DATASETS,
    create_frame_datasets,
    new_dynamics_file,
)

__all__ = ["MERGE_IGNORED_SETTINGS", "merge_dynamics_files"]

#: Settings that may differ between the files of one merge (the rest must be equal).
MERGE_IGNORED_SETTINGS = ("seed", "replicas", "ladders", "platform", "cpu_threads", "chunk_saves")


def _settings(h5: h5py.File) -> dict:
    settings = json.loads(h5.attrs["simulation_config"])
    return {k: v for k, v in settings.items() if k not in MERGE_IGNORED_SETTINGS}


def _copies(h5: h5py.File) -> int:
    return int(h5.attrs["n_replicas"])


def _check_compatible(files: list[h5py.File], paths: list[Path]) -> None:
    first = files[0]
    for h5, path in zip(files, paths):
        if h5.attrs["format"] != first.attrs["format"]:
            raise TradeMDError(f"{str(path)!r} is a {h5.attrs['format']} file, {str(paths[0])!r} a "
                               f"{first.attrs['format']} file: merge files of one kind")
        if h5.attrs["system"] != first.attrs["system"] or attribute_text(h5["topology_pdb"][()]) != attribute_text(first["topology_pdb"][()]):
            raise TradeMDError(f"{str(path)!r} holds another system ({h5.attrs['system']}) than "
                               f"{str(paths[0])!r} ({first.attrs['system']}): merge shards of one run")
        mine, theirs = _settings(h5), _settings(first)
        differing = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if differing:
            raise TradeMDError(f"{str(path)!r} was simulated with other settings than {str(paths[0])!r} "
                               f"({', '.join(differing)}): merge shards of the same settings")
        if "checkpoint" in h5:
            done = int(h5["checkpoint"].attrs["n_saves"])
            wanted = int(round(json.loads(h5.attrs["simulation_config"])["time_ps"]
                               / float(h5.attrs["save_every_ps"])))
            if done < wanted:
                raise TradeMDError(f"{str(path)!r} is unfinished ({done} of {wanted} saves): resume it "
                                   "with `trade-md simulate --resume` before merging")
        elif "merged_from" not in h5.attrs:
            raise TradeMDError(f"{str(path)!r} holds no finished chunk: finish it before merging")
    seeds = [json.loads(h5.attrs["simulation_config"])["seed"] for h5 in files if "merged_from" not in h5.attrs]
    if len(set(seeds)) < len(seeds):
        raise TradeMDError(f"two of the files were run with the same seed ({sorted(seeds)}): they are "
                           "copies, not independent shards")


def _merge_ensemble(groups: list[h5py.Group], copies: list[int], out: h5py.Group) -> None:
    """Interleave the frames of one ensemble save by save; offset replica numbers."""
    saves = [g["positions_nm"].shape[0] // c for g, c in zip(groups, copies)]
    if len(set(saves)) != 1:
        raise TradeMDError(f"the files hold different numbers of saves ({saves}): merge shards of "
                           "equal --time")
    n_saves, offsets = saves[0], np.cumsum([0, *copies[:-1]])
    for name in TRAJECTORY_DATASETS:
        parts = []
        for group, c, offset in zip(groups, copies, offsets):
            values = group[name][: n_saves * c]
            values = values.reshape(n_saves, c, *values.shape[1:])
            parts.append(values + offset if name == "replica" else values)
        merged = np.concatenate(parts, axis=1).reshape(n_saves * sum(copies), *parts[0].shape[2:])
        out[name].resize(len(merged), axis=0)
        out[name][:] = merged
    kinetic = sum(g["kinetic_temperature_k"][:n_saves] * c for g, c in zip(groups, copies)) / sum(copies)
    out["kinetic_temperature_k"].resize(n_saves, axis=0)
    out["kinetic_temperature_k"][:] = kinetic


def _merge_exchange(files: list[h5py.File], copies: list[int], out: h5py.File) -> None:
    groups = [h5["exchange"] for h5 in files]
    attempts = sum(g["attempts"][()] for g in groups)
    accepted = sum(g["accepted"][()] for g in groups)
    exchange = out["exchange"]
    exchange.create_dataset("attempts", data=attempts)
    exchange.create_dataset("accepted", data=accepted)
    n_rungs = groups[0]["walker_at_rung"].shape[2]
    n_saves = min(g["walker_at_rung"].shape[0] for g in groups)
    offsets = np.cumsum([0, *copies[:-1]]) * n_rungs
    walkers = np.concatenate([g["walker_at_rung"][:n_saves] + o for g, o in zip(groups, offsets)], axis=1)
    dataset = exchange.create_dataset("walker_at_rung", data=walkers.astype(np.int32),
                                      maxshape=(None, *walkers.shape[1:]))
    dataset.attrs["description"] = groups[0]["walker_at_rung"].attrs["description"]
    rates = np.where(attempts > 0, accepted / np.maximum(attempts, 1), np.nan)
    exchange.attrs["acceptance_rate"] = json.dumps([None if np.isnan(r) else float(r) for r in rates])
    exchange.attrs["round_trips"] = int(sum(int(g.attrs["round_trips"]) for g in groups))
    exchange.attrs["exchange_rounds"] = int(groups[0].attrs["exchange_rounds"])


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
    files = [open_checked(p, DYNAMICS_FORMATS) for p in paths]
    try:
        _check_compatible(files, paths)
        first = files[0]
        copies = [_copies(h5) for h5 in files]
        attrs = {k: v for k, v in first.attrs.items() if k not in provenance_attrs}
        settings = json.loads(first.attrs["simulation_config"])
        settings["ladders" if "ladders" in settings else "replicas"] = sum(copies)
        sources = [{"path": str(p.resolve()), "seed": json.loads(h5.attrs["simulation_config"])["seed"],
                    "copies": c} for p, h5, c in zip(paths, files, copies)]
        attrs.update({"n_replicas": sum(copies), "simulation_config": json.dumps(settings),
                      "wall_time_s": float(sum(float(h5.attrs.get("wall_time_s", 0.0)) for h5 in files)),
                      "merged_from": json.dumps(sources), **provenance_attrs})
        h5 = new_dynamics_file(out, first.attrs["format"], {}, attribute_text(first["topology_pdb"][()]), overwrite)
        try:
            for key, value in attrs.items():
                h5.attrs[key] = value
            if first.attrs["format"] == TRAJECTORY_FORMAT:
                create_frame_datasets(h5, first["positions_nm"].shape[1])
                _merge_ensemble(files, copies, h5)
            else:
                for temperature_k in json.loads(first.attrs["temperatures_k"]):
                    name = group_name(temperature_k)
                    group = h5.create_group(name)
                    group.attrs["temperature_k"] = float(temperature_k)
                    create_frame_datasets(group, files[0][name]["positions_nm"].shape[1])
                    _merge_ensemble([f[name] for f in files], copies, group)
                h5.create_group("exchange")
                _merge_exchange(files, copies, h5)
        finally:
            h5.close()
    finally:
        for h5 in files:
            h5.close()
    return out
