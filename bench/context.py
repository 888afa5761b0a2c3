"""The state shared by every part of a session: options, accounts, the data set's
visibility, the results, and the request rates measured so far (they size request files)."""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.config import Profile
from bench.dataset import Account, Visibility
from bench.report import Results


DEFAULT_FRESHNESS_LOAD = 0.5  # fraction of the service's 1-process peak


@dataclass
class Context:
    profile: Profile
    runs: int
    port: int
    worker_port: int
    accounts: list[Account]
    visible: Visibility
    results: Results
    unique_baselines: bool
    freshness_load: float = DEFAULT_FRESHNESS_LOAD  # HTTP load of the freshness part, as a fraction of the peak
    freshness_rate: float | None = None  # that load in requests/s, when given instead of the fraction
    process_counts: tuple[int, ...] = (1, 2)
    # Highest requests/s seen per (kind, processes); sizes the next request file.
    rates: dict[tuple[str, int], float] = field(default_factory=dict)
    # Median requests/s of the service per process count, from the HTTP part.
    service_peak: dict[int, float] = field(default_factory=dict)
    sequence: int = 0

    def next_seed(self) -> int:
        self.sequence += 1
        return self.sequence
