"""Seeds of independent random streams derived from a run's one seed."""

__all__ = ["stream_seed"]


def stream_seed(seed: int, stream: int, index: int) -> int:
    """The seed of item ``index`` of random stream ``stream`` of a run seeded ``seed``: a
    fixed hash of the three integers in [0, 2^63), so that the same three give the same seed
    on every machine and process (e.g. stream = rank and index = step for training ranks,
    stream = temperature in mK and index = batch for sampling)."""
    return (seed * 1_000_003 + stream * 7919 + index) % (2 ** 63)
