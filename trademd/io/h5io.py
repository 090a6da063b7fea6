"""Transitional: the names the file layer had before it was split per format, importable
from their old place until every caller imports them from their own module
(``trademd/training/targets.py`` still does). Nothing is defined here.

- :mod:`trademd.io.schema`: what every trade-md file shares;
- :mod:`trademd.io.trajectory_file`: ``trade-md simulate`` files;
- :mod:`trademd.io.samples_file`: ``trade-md sample`` files.
"""

from trademd.io.samples_file import (
    RESIDUE_DATASETS,
    SAMPLE_DATASETS,
    SamplesFile,
    TemperatureSamples,
    read_samples,
    write_samples,
)
from trademd.io.schema import (
    REPLICA_EXCHANGE_FORMAT,
    SAMPLES_FORMAT,
    TRAJECTORY_FORMAT,
    attribute_text,
    describe,
    file_format,
    open_checked,
    open_hdf5,
)
from trademd.io.trajectory_file import (
    DynamicsFile,
    Trajectory,
    create_frame_datasets,
    ensemble_temperatures,
    frame_count,
    read_trajectory,
    write_energies,
)

__all__ = [
    "open_hdf5", "file_format", "SAMPLES_FORMAT", "write_samples", "read_samples",
    "TemperatureSamples", "SamplesFile", "SAMPLE_DATASETS", "RESIDUE_DATASETS",
    "TRAJECTORY_FORMAT", "REPLICA_EXCHANGE_FORMAT", "DynamicsFile", "ensemble_temperatures",
    "frame_count", "write_energies", "Trajectory", "read_trajectory",
    "create_frame_datasets", "attribute_text", "open_checked", "describe",
]
