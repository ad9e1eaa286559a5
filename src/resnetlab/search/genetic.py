"""The genetic algorithm of seed 004: a population of (lr, weight decay, momentum) genomes; the
fittest half survives; children come from single-point crossover at the middle gene of two
survivors, then each of their genes is re-initialised when its random draw falls under the
mutation rate. Fitness is the validation accuracy of a short run (0 when it diverges).

Survivors keep their fitness instead of being retrained, so a trial is spent only on a new
genome: generation 0 costs `population` trials, every later one `population - keep`. Every
evaluation is an Optuna trial (enqueued values, then ask/tell) tagged with its generation, so a
rerun after a crash replays the seeded algorithm and reuses the trials already in the study.
"""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context

import numpy as np

from resnetlab.config import validate_config
from resnetlab.errors import ConfigError
from resnetlab.search.objective import run_trial
from resnetlab.search.optuna_search import StudySpec, open_study, trial_dir
from resnetlab.search.space import SearchSpace

Genome = dict[str, float]


@dataclass(frozen=True)
class GASettings:
    population: int = 10
    generations: int = 5
    mutation_rate: float = 0.3  # probability that a child's gene is re-initialised
    seed: int = 0

    def __post_init__(self):
        if self.population < 2:
            raise ConfigError(f"--population must be at least 2, got {self.population}")
        if self.generations < 1:
            raise ConfigError(f"--generations must be at least 1, got {self.generations}")
        if not 0 <= self.mutation_rate <= 1:
            raise ConfigError(f"--mutation-rate must lie in [0, 1], got {self.mutation_rate}")


# --- operators (pure, seeded by the generator passed in) -------------------------------------------
def select(population: list[Genome], fitness: list[float], keep: int) -> tuple[list[Genome], list[float]]:
    """The `keep` fittest genomes and their fitness, fittest first (ties keep population order)."""
    order = sorted(range(len(population)), key=lambda i: -fitness[i])[:keep]
    return [population[i] for i in order], [fitness[i] for i in order]


def crossover(a: Genome, b: Genome, keys: list[str]) -> Genome:
    """Single-point crossover at the middle gene: genes before it from `a`, the rest from `b`."""
    point = len(keys) // 2
    return {k: (a[k] if i < point else b[k]) for i, k in enumerate(keys)}


def mutate(genome: Genome, space: SearchSpace, rate: float, rng: np.random.Generator) -> Genome:
    """Re-initialise each gene whose uniform draw falls below `rate` (seed 004's threshold)."""
    child = dict(genome)
    for param in space.params:
        if rng.random() < rate:
            child[param.key] = param.sample(rng)
    return child


def next_generation(survivors: list[Genome], size: int, space: SearchSpace, rate: float,
                    rng: np.random.Generator) -> list[Genome]:
    """`size` children of random survivor pairs: crossover, then mutation."""
    children = []
    for _ in range(size):
        i, j = rng.choice(len(survivors), size=2, replace=len(survivors) < 2)
        children.append(mutate(crossover(survivors[i], survivors[j], space.keys), space, rate, rng))
    return children


# --- the search ---------------------------------------------------------------------------------------
def run_genetic(spec: StudySpec, settings: GASettings, max_trials: int | None = None, workers: int = 1,
                log=print):
    """Run the GA into the study of `spec` (trials tagged generation/member); stops after
    `settings.generations` generations or `max_trials` evaluations. Returns the study."""
    study = open_study(spec)
    done = _finished_trials(study)
    _fail_interrupted(study)
    rng = np.random.default_rng(settings.seed)
    keep = settings.population // 2
    population = [spec.space.sample(rng) for _ in range(settings.population)]
    survivors, survivor_fitness = [], []
    used = 0
    for generation in range(settings.generations):
        budget = None if max_trials is None else max_trials - used
        if budget is not None and budget <= 0:
            break
        population = population[:budget] if budget is not None else population
        fitness = _evaluate(spec, study, done, generation, population, workers)
        used += len(population)
        everyone, scores = survivors + population, survivor_fitness + fitness
        log(f"generation {generation}: best {max(scores):.4f}, mean of new {np.mean(fitness):.4f} "
            f"({used} trials spent)")
        survivors, survivor_fitness = select(everyone, scores, keep)
        population = next_generation(survivors, settings.population - keep, spec.space, settings.mutation_rate, rng)
    return study


def _finished_trials(study) -> dict[tuple[int, int], float]:
    """(generation, member) -> fitness of trials a previous run already finished."""
    done = {}
    for t in study.get_trials(deepcopy=False):
        if t.state.name == "COMPLETE" and "generation" in t.user_attrs:
            done[(t.user_attrs["generation"], t.user_attrs["member"])] = t.value
    return done


def _fail_interrupted(study) -> None:
    """A killed run leaves its trials RUNNING; the GA (one coordinator) marks them failed and
    evaluates those members again."""
    for t in study.get_trials(deepcopy=False):
        if t.state.name == "RUNNING" and "generation" in t.user_attrs:
            study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
            study.tell(t.number, state=_fail())


def _evaluate(spec: StudySpec, study, done: dict, generation: int, population: list[Genome],
              workers: int) -> list[float]:
    fitness: list[float | None] = [done.get((generation, m)) for m in range(len(population))]
    todo = [m for m, f in enumerate(fitness) if f is None]
    trials = {}
    for m in todo:
        study.enqueue_trial(population[m], user_attrs={"generation": generation, "member": m})
        trial = study.ask(spec.space.distributions())
        trials[m] = trial
    base = validate_config(spec.base)
    jobs = {m: (base, trials[m].params, trial_dir(spec, trials[m].number)) for m in todo}
    # Each result is told to the study as soon as it exists, so a crash loses only unfinished trials.
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(run_trial, *job): m for m, job in jobs.items()}
            for future in as_completed(futures):
                fitness[futures[future]] = _tell(study, trials[futures[future]], future.result())
    else:
        for m, job in jobs.items():
            fitness[m] = _tell(study, trials[m], run_trial(*job))
    return fitness


def _tell(study, trial, outcome) -> float:
    trial.set_user_attr("epochs", outcome.epochs)
    if outcome.accuracy is None:  # diverged: fitness 0, recorded as such (as the Optuna methods do)
        trial.set_user_attr("error", outcome.error)
        study.tell(trial, 0.0)
        return 0.0
    study.tell(trial, outcome.accuracy)
    return outcome.accuracy


def _fail():
    from optuna.trial import TrialState

    return TrialState.FAIL
