"""Metropolis exchanges between neighbouring temperatures (parallel tempering), pure NumPy.

A ladder of K temperatures T_0 < ... < T_{K-1} holds one configuration per rung; ``ladders``
independent ladders run side by side. An exchange attempt between rungs k and k+1 of a ladder
swaps their configurations with probability

    min(1, exp[(beta_k - beta_{k+1}) (U_k - U_{k+1})]),   beta = 1 / (k_B T),

which keeps every rung's Boltzmann distribution exp(-beta_k U) invariant (detailed balance of
the product ensemble). Attempts alternate between even pairs (0-1, 2-3, ...) and odd pairs
(1-2, 3-4, ...), the deterministic even-odd scheme that moves walkers along the ladder fastest.

A *walker* is one configuration's history; a round trip is a walker's journey from the lowest
rung to the highest and back.
"""

from dataclasses import dataclass
import json

import numpy as np

from trademd.units import BOLTZMANN_KJ_MOL_K

__all__ = ["log_acceptance", "ExchangeState"]


def log_acceptance(temperature_a_k: float, temperature_b_k: float, energy_a_kj_mol: float,
                   energy_b_kj_mol: float) -> float:
    """log of the Metropolis ratio for swapping the configurations of rungs a and b
    (energies of the configurations currently at a and b, kJ/mol; temperatures in K)."""
    beta_a = 1.0 / (BOLTZMANN_KJ_MOL_K * temperature_a_k)
    beta_b = 1.0 / (BOLTZMANN_KJ_MOL_K * temperature_b_k)
    return (beta_a - beta_b) * (energy_a_kj_mol - energy_b_kj_mol)


@dataclass
class ExchangeState:
    """Which walker sits where, and the exchange statistics so far.

    Attributes:
        temperatures_k: the ladder, ascending [K].
        walker_at: walker id at each rung, int [ladders, K].
        attempts: exchange attempts per neighbour pair, summed over ladders, int [K - 1].
        accepted: accepted exchanges per neighbour pair, int [K - 1].
        n_rounds: exchange rounds done (the parity of the next round picks even or odd pairs).
        round_trips: completed lowest -> highest -> lowest journeys, all walkers.
        phase: per walker 0 (not yet at the lowest rung), 1 (left the lowest rung), 2 (reached
            the highest rung since), int [walkers].
    """

    temperatures_k: np.ndarray
    walker_at: np.ndarray
    attempts: np.ndarray
    accepted: np.ndarray
    n_rounds: int
    round_trips: int
    phase: np.ndarray

    @classmethod
    def start(cls, temperatures_k, ladders: int) -> "ExchangeState":
        """Walker ``l * K + k`` starts at rung k of ladder l."""
        temperatures_k = np.asarray(temperatures_k, dtype=np.float64)
        n_rungs = len(temperatures_k)
        state = cls(
            temperatures_k=temperatures_k,
            walker_at=np.arange(ladders * n_rungs).reshape(ladders, n_rungs),
            attempts=np.zeros(n_rungs - 1, dtype=np.int64),
            accepted=np.zeros(n_rungs - 1, dtype=np.int64),
            n_rounds=0,
            round_trips=0,
            phase=np.zeros(ladders * n_rungs, dtype=np.int64),
        )
        state._track_round_trips()
        return state

    @property
    def acceptance_rates(self) -> np.ndarray:
        """Accepted fraction per neighbour pair [K - 1] (NaN before any attempt)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.accepted / self.attempts

    def exchange_round(self, energies_kj_mol: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Attempt the exchanges of one round and update the bookkeeping.

        Args:
            energies_kj_mol: potential energy of the configuration at each rung [ladders, K].
            rng: the random stream of the acceptance tests.

        Returns:
            For each rung the rung whose configuration it receives, int [ladders, K]
            (identity where nothing was swapped).
        """
        n_ladders, n_rungs = self.walker_at.shape
        source = np.tile(np.arange(n_rungs), (n_ladders, 1))
        for k in range(self.n_rounds % 2, n_rungs - 1, 2):
            log_ratio = log_acceptance(self.temperatures_k[k], self.temperatures_k[k + 1],
                                       energies_kj_mol[:, k], energies_kj_mol[:, k + 1])
            swap = np.log(rng.random(n_ladders)) < log_ratio
            self.attempts[k] += n_ladders
            self.accepted[k] += int(swap.sum())
            source[swap, k], source[swap, k + 1] = k + 1, k
        self.walker_at = np.take_along_axis(self.walker_at, source, axis=1)
        self.n_rounds += 1
        self._track_round_trips()
        return source

    def _track_round_trips(self) -> None:
        bottom, top = self.walker_at[:, 0], self.walker_at[:, -1]
        self.round_trips += int(np.sum(self.phase[bottom] == 2))
        self.phase[bottom] = 1
        self.phase[top[self.phase[top] == 1]] = 2

    def to_json(self) -> str:
        """Everything but the temperatures, for a checkpoint."""
        return json.dumps({
            "walker_at": self.walker_at.tolist(), "attempts": self.attempts.tolist(),
            "accepted": self.accepted.tolist(), "n_rounds": self.n_rounds,
            "round_trips": self.round_trips, "phase": self.phase.tolist(),
        })

    @classmethod
    def from_json(cls, text: str, temperatures_k) -> "ExchangeState":
        """The state :meth:`to_json` stored."""
        saved = json.loads(text)
        return cls(
            temperatures_k=np.asarray(temperatures_k, dtype=np.float64),
            walker_at=np.asarray(saved["walker_at"], dtype=np.int64),
            attempts=np.asarray(saved["attempts"], dtype=np.int64),
            accepted=np.asarray(saved["accepted"], dtype=np.int64),
            n_rounds=int(saved["n_rounds"]),
            round_trips=int(saved["round_trips"]),
            phase=np.asarray(saved["phase"], dtype=np.int64),
        )
