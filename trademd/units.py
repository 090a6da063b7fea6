"""Physical constants and parsing of quantities given on the command line.

Internal units are OpenMM's: nm, ps, kJ/mol, K, amu.
"""

import re

__all__ = ["BOLTZMANN_KJ_MOL_K", "parse_time_ps", "format_time_ps"]

#: Boltzmann constant times Avogadro's number, kJ/(mol K) (CODATA 2018, as in OpenMM).
BOLTZMANN_KJ_MOL_K = 0.0083144626181532395

_TIME_UNITS_PS = {"fs": 1e-3, "ps": 1.0, "ns": 1e3, "us": 1e6}
_TIME_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(fs|ps|ns|us)\s*$")


def parse_time_ps(text: str, allow_zero: bool = False) -> float:
    """Parse a duration such as ``"20ns"``, ``"1ps"`` or ``"500 fs"`` into picoseconds;
    with ``allow_zero`` a bare ``0`` (or ``0ps``...) means no time at all.

    >>> parse_time_ps("20ns")
    20000.0
    """
    from trademd.errors import TradeMDError

    if allow_zero and str(text).strip() == "0":
        return 0.0
    match = _TIME_PATTERN.match(str(text))
    if match is None:
        raise TradeMDError(
            f"cannot read the duration {text!r}: write a number and a unit, e.g. 20ns, 1ps, 500fs"
        )
    value_ps = float(match.group(1)) * _TIME_UNITS_PS[match.group(2)]
    if value_ps < 0 or (value_ps == 0 and not allow_zero):
        raise TradeMDError(f"the duration {text!r} must be positive")
    return value_ps


def format_time_ps(value_ps: float) -> str:
    """A duration in ps written as :func:`parse_time_ps` reads it: in ns from 1 ns up.

    >>> format_time_ps(1000.0), format_time_ps(100.0), format_time_ps(0.1)
    ('1ns', '100ps', '0.1ps')
    """
    if value_ps >= 1000.0:
        return f"{value_ps / 1000.0:g}ns"
    return f"{value_ps:g}ps"
