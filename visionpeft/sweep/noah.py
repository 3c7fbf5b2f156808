"""NOAH's evolutionary search (official ``evolution.py``, ``EvolutionSearcher``) over the subnets of a trained
supernet, under a parameter budget.

Generation 0 is ``population`` random subnets (the official sampling rule). Each later generation ranks every subnet
scored so far and keeps the ``select`` best as parents (``update_top_k``: a stable sort, so ties keep the earlier
one), then makes ``mutation`` mutants, ``crossover`` children and fills up to ``population`` with random subnets. A
candidate is legal when it was never scored and its exact parameter count (:func:`~visionpeft.methods.noah
.subnet_parameters`) lies within ``[min_budget, budget]`` (``is_legal``). Mutation (``get_mutation``) changes depths
only: each module, with probability ``m_prob``, draws a new depth with probability ``s_prob`` (else keeps its own);
a deeper module keeps its widths and draws widths for the new blocks, a shallower one is cut. Crossover
(``get_crossover``) takes each module's widths whole from one of two parents. Mutation and crossover give up after
ten tries per wanted candidate, as there.

Where this differs from the official code: a generation is generated first and then scored as one batch, in
parallel on the sweep executors (the official code scores each candidate as it draws it; the result is the same,
since drawing never reads a score of the same generation); the last generation is ranked too (the official loop
scores it but stops before ranking it); random sampling gives up after ``100 x`` the wanted count of draws (the
official loop never ends when the space has fewer legal subnets than the population). Scores are the validation
top-1 of the supernet's weights (``evaluate(..., mode='retrain', retrain_config=...)`` on the ``val200`` list in the
official VTAB search). Defaults: the official ``population 50``, ``select 10``, ``mutation 25``, ``crossover 25``,
``m_prob 0.2``, ``s_prob 0.4`` and the VTAB script's ``--max-epochs 15`` (evolution.py's default: 20) generations;
the budget is the official ``--param-limits`` default 0.64 M.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:  # the method module imports torch: loaded when a search starts, not for --help
    from ..methods.noah import Geometry, NOAHConfig, Subnet

Key = tuple[tuple[int, ...], ...]
#: scores a list of new candidates (one generation), returning their validation top-1 in order
Scorer = Callable[[list["Subnet"], int], list[float]]
#: random sampling gives up after this many draws per wanted candidate
DRAWS_PER_CANDIDATE = 100


@dataclass(frozen=True)
class SearchSettings:
    """The search's settings (official ``evolution.py`` arguments in brackets)."""

    budget: int = 640_000  # [--param-limits 0.64, in millions there]
    min_budget: int = 0  # [--min-param-limits]
    population: int = 50  # [--population-num]
    select: int = 10  # [--select-num]
    mutation: int = 25  # [--mutation-num]
    crossover: int = 25  # [--crossover-num]
    m_prob: float = 0.2  # [--m_prob]
    s_prob: float = 0.4  # [--s_prob]
    generations: int = 15  # [--max-epochs: 15 in the VTAB script]
    seed: int = 0  # [--seed]

    def __post_init__(self) -> None:
        for name in ("population", "select", "generations"):
            if getattr(self, name) < (0 if name == "generations" else 1):
                raise ConfigError(f"noah search {name} must be positive, got {getattr(self, name)}")
        for name in ("mutation", "crossover", "min_budget", "budget"):
            if getattr(self, name) < 0:
                raise ConfigError(f"noah search {name} must not be negative, got {getattr(self, name)}")
        for name in ("m_prob", "s_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"noah search {name} must be within [0, 1], got {getattr(self, name)}")
        if self.min_budget > self.budget:
            raise ConfigError(f"noah search min budget {self.min_budget:,} is above the budget {self.budget:,}")


def key_of(subnet: Subnet) -> Key:
    from ..methods.noah import MODULES

    return tuple(tuple(subnet[m]) for m in MODULES)


def subnet_of(key: Key) -> Subnet:
    from ..methods.noah import MODULES

    return dict(zip(MODULES, key))


def check_budget(space: NOAHConfig, geometry: Geometry, settings: SearchSettings) -> None:
    """A :class:`ConfigError` when no subnet of the space has a count within the budget (counts grow with every width
    and depth, so the smallest and the largest subnet bound them)."""
    from ..methods.noah import MODULES, subnet_parameters

    layers = geometry.layers

    def extreme(pick) -> int:
        subnet = {m: (pick(space.widths(m)),) * pick(space.depths(m)) for m in MODULES}
        return subnet_parameters({m: v + (0,) * (layers - len(v)) for m, v in subnet.items()}, geometry)

    smallest, largest = extreme(min), extreme(max)
    if smallest > settings.budget:
        raise ConfigError(
            f"no subnet of the search space fits the budget of {settings.budget:,} parameters: the smallest trains "
            f"{smallest:,}"
        )
    if largest < settings.min_budget:
        raise ConfigError(
            f"no subnet of the search space reaches the minimum of {settings.min_budget:,} parameters: the largest "
            f"trains {largest:,}"
        )


@dataclass
class Scored:
    """A scored candidate."""

    subnet: Subnet
    parameters: int
    top1: float
    generation: int

    def record(self) -> dict[str, Any]:
        return {**asdict(self), "subnet": {m: list(v) for m, v in self.subnet.items()}}


@dataclass
class SearchState:
    """What the search has done: every scored candidate, and each generation's population and parents."""

    scored: dict[Key, Scored] = field(default_factory=dict)
    generations: list[dict[str, Any]] = field(default_factory=list)

    def ranked(self, keys: list[Key]) -> list[Key]:
        return sorted(keys, key=lambda k: self.scored[k].top1, reverse=True)

    def best(self) -> Scored:
        return self.scored[self.ranked(list(self.scored))[0]]


class Evolution:
    """One search: ``space`` (the supernet's method config), the model ``geometry``, the ``settings``; ``score``
    scores each generation's new candidates; ``on_generation(state)`` runs after each one (the history file)."""

    def __init__(
        self,
        space: NOAHConfig,
        geometry: Geometry,
        settings: SearchSettings,
        score: Scorer,
        on_generation: Callable[[SearchState], None] = lambda state: None,
    ) -> None:
        check_budget(space, geometry, settings)
        self.space, self.geometry, self.settings = space, geometry, settings
        self.score, self.on_generation = score, on_generation
        self.rng = random.Random(settings.seed)
        self.state = SearchState()

    def parameters(self, subnet: Subnet) -> int:
        from ..methods.noah import subnet_parameters

        return subnet_parameters(subnet, self.geometry)

    def legal(self, subnet: Subnet, taken: set[Key]) -> bool:
        """Never scored, not yet in this generation, within the budget (official ``is_legal``)."""
        key = key_of(subnet)
        if key in self.state.scored or key in taken:
            return False
        return self.settings.min_budget <= self.parameters(subnet) <= self.settings.budget

    def _draw(self, make: Callable[..., Subnet], wanted: int, tries: int, taken: set[Key], *args: Any) -> list[Subnet]:
        found: list[Subnet] = []
        while len(found) < wanted and tries > 0:
            tries -= 1
            subnet = make(*args)
            if self.legal(subnet, taken):
                taken.add(key_of(subnet))
                found.append(subnet)
        return found

    def random_subnet(self) -> Subnet:
        from ..methods.noah import sample_subnet

        return sample_subnet(self.space, self.geometry.layers, self.rng.choice)

    def mutant(self, parents: list[Key]) -> Subnet:
        """Official ``get_mutation``'s ``random_func``: depth changes only."""
        from ..methods.noah import MODULES

        subnet = subnet_of(self.rng.choice(parents))
        for module in MODULES:
            if self.rng.random() >= self.settings.m_prob:
                continue
            widths = list(subnet[module])
            depth = next((i for i, v in enumerate(widths) if v == 0), len(widths))
            new = self.rng.choice(self.space.depths(module)) if self.rng.random() < self.settings.s_prob else depth
            if new > depth:
                grown = [self.rng.choice(self.space.widths(module)) for _ in range(new - depth)]
                widths = widths[:depth] + grown
            else:
                widths = widths[:new]
            subnet[module] = tuple(widths) + (0,) * (self.geometry.layers - len(widths))
        return subnet

    def child(self, parents: list[Key]) -> Subnet:
        """Official ``get_crossover``'s ``random_func``: each module's widths from one of two parents."""
        first, second = subnet_of(self.rng.choice(parents)), subnet_of(self.rng.choice(parents))
        return {m: self.rng.choice([first[m], second[m]]) for m in first}

    def _evaluate(self, candidates: list[Subnet], generation: int, parents: list[Key]) -> None:
        scores = self.score(candidates, generation) if candidates else []
        for subnet, top1 in zip(candidates, scores):
            self.state.scored[key_of(subnet)] = Scored(subnet, self.parameters(subnet), float(top1), generation)
        self.state.generations.append(
            {"generation": generation, "population": [key_of(s) for s in candidates], "parents": parents}
        )
        self.on_generation(self.state)

    def run(self) -> Scored:
        """Runs every generation; returns the best candidate scored."""
        s = self.settings
        taken: set[Key] = set()
        population = self._draw(self.random_subnet, s.population, s.population * DRAWS_PER_CANDIDATE, taken)
        if not population:
            raise ConfigError("the search space holds no subnet within the budget to start from")
        self._evaluate(population, 0, [])
        parents: list[Key] = []
        for generation in range(1, s.generations + 1):
            parents = self.state.ranked(parents + [key_of(c) for c in population])[: s.select]
            taken = set()
            population = self._draw(self.mutant, s.mutation, 10 * s.mutation, taken, parents)
            population += self._draw(self.child, s.crossover, 10 * s.crossover, taken, parents)
            wanted = s.population - len(population)
            population += self._draw(self.random_subnet, wanted, wanted * DRAWS_PER_CANDIDATE, taken)
            self._evaluate(population, generation, parents)
        return self.state.best()
