"""Built-in molecular systems of trade-md (installed as ``trademd.systems``)."""

from .molecule import SOLVENTS, MolecularSystem
from .registry import (
                       BUILTIN_SYSTEMS,
                       get_system,
                       list_systems,
                       record_attrs,
                       system_from_attrs,
                       system_from_record,
                       user_system,
)

__all__ = ["MolecularSystem", "SOLVENTS", "BUILTIN_SYSTEMS", "get_system", "list_systems", "user_system",
           "record_attrs", "system_from_attrs", "system_from_record"]
