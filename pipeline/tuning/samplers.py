"""Samplers and pruners by name, and our scikit-optimize sampler (optuna-integration dropped its own)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.samplers import BaseSampler, RandomSampler
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from pipeline.errors import SettingError

PROPOSAL_ATTR = "skopt:proposal"


class SkoptSampler(BaseSampler):
    """Bayesian optimisation with scikit-optimize's Optimizer (ask/tell), as in the original experiment.

    The search space is the union of every parameter seen so far, so the conditional per-layer
    parameters are modelled too: a trial that did not use a parameter is told the value this
    sampler proposed for it (the objective ignored it, so any value is consistent). Parameters
    never seen yet, and every trial before the first one finishes, fall back to random sampling.
    """

    def __init__(
        self,
        base_estimator: str = "ET",
        n_initial_points: int = 10,
        acq_func: str = "EI",
        acq_func_kwargs: dict | None = None,
        consider_pruned_trials: bool = False,
        seed: int | None = None,
    ):
        if base_estimator not in {"ET", "RF", "GP", "GBRT"}:
            raise SettingError(
                f"skopt base_estimator {base_estimator!r}; expected ET, RF, GP or GBRT"
            )
        if acq_func not in {"EI", "PI", "LCB", "gp_hedge"}:
            raise SettingError(f"skopt acq_func {acq_func!r}; expected EI, PI, LCB or gp_hedge")
        self._options = {
            "base_estimator": base_estimator,
            "n_initial_points": n_initial_points,
            "acq_func": acq_func,
            "acq_func_kwargs": acq_func_kwargs or {"xi": 0.02},
        }
        self._consider_pruned = consider_pruned_trials
        self._seed = seed
        self._random = RandomSampler(seed=seed)

    def reseed_rng(self) -> None:
        self._random.reseed_rng()

    def infer_relative_search_space(
        self, study: Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        space: dict[str, BaseDistribution] = {}
        for t in study._get_trials(deepcopy=False, use_cache=True):
            for name, dist in t.distributions.items():
                if not dist.single() and space.setdefault(name, dist) != dist:
                    raise ValueError(f"parameter {name!r} changed its range within the study")
        return dict(sorted(space.items()))

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        told = self._told_trials(study)
        if not search_space or not told:
            return {}
        import skopt

        names = list(search_space)
        dims = [_dimension(search_space[n]) for n in names]
        options = self._options | {"base_estimator": _estimator(self._options["base_estimator"])}
        optimizer = skopt.Optimizer(dims, random_state=self._next_seed(study), **options)
        sign = -1.0 if study.direction == StudyDirection.MAXIMIZE else 1.0  # skopt minimises
        xs = [_point(t, names, search_space) for t, _ in told]
        ys = [sign * value for _, value in told]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # skopt warns on duplicate points; harmless
            optimizer.tell(xs, ys)
            proposal = optimizer.ask()
        params = {n: _external(search_space[n], v) for n, v in zip(names, proposal, strict=True)}
        study._storage.set_trial_system_attr(trial._trial_id, PROPOSAL_ATTR, _jsonable(params))
        return params

    def sample_independent(
        self,
        study: Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        return self._random.sample_independent(study, trial, param_name, param_distribution)

    def _told_trials(self, study: Study) -> list[tuple[FrozenTrial, float]]:
        """Finished trials and the value to tell skopt: COMPLETE, and PRUNED's last report if asked."""
        states = (TrialState.COMPLETE, TrialState.PRUNED)
        told = []
        for t in study._get_trials(deepcopy=False, states=states, use_cache=True):
            if t.state == TrialState.COMPLETE and t.value is not None:
                told.append((t, t.value))
            elif self._consider_pruned and t.intermediate_values:
                told.append((t, t.intermediate_values[max(t.intermediate_values)]))
        return told

    def _next_seed(self, study: Study) -> int | None:
        if self._seed is None:
            return None
        return (self._seed + len(study._get_trials(deepcopy=False, use_cache=True))) % 2**31


def _estimator(name: str):
    """skopt's estimator by name; GBRT rebuilt so that scikit-learn >= 1.6 sees a regressor."""
    if name != "GBRT":
        return name
    from sklearn.ensemble import GradientBoostingRegressor
    from skopt.learning import GradientBoostingQuantileRegressor

    # skopt 0.10 (archived) lists BaseEstimator before RegressorMixin, so scikit-learn's estimator
    # tags call it no regressor and Optimizer refuses it. Same settings as skopt's cook_estimator.
    class _GBRT(GradientBoostingQuantileRegressor):
        def __sklearn_tags__(self):
            tags = super().__sklearn_tags__()
            tags.estimator_type = "regressor"
            return tags

        def predict(self, X, return_std=False, return_quantiles=False):
            # skopt's own return_std path calls np.in1d, which numpy 2.4 removed.
            if not return_std or return_quantiles:
                return super().predict(X, return_std=False, return_quantiles=return_quantiles)
            low, mean, high = (
                self.regressors_[self.quantiles.index(q)].predict(X) for q in (0.16, 0.5, 0.84)
            )
            return mean, (high - low) / 2.0

    return _GBRT(base_estimator=GradientBoostingRegressor(n_estimators=30, loss="quantile"))


def _dimension(dist: BaseDistribution):
    from skopt.space import Categorical, Integer, Real

    if isinstance(dist, CategoricalDistribution):
        return Categorical(list(range(len(dist.choices))))  # by index: choices may be any type
    prior = "log-uniform" if dist.log else "uniform"
    if isinstance(dist, IntDistribution):
        return Integer(dist.low, dist.high, prior=prior)
    if isinstance(dist, FloatDistribution):
        return Real(dist.low, dist.high, prior=prior)
    raise TypeError(f"SkoptSampler cannot handle {type(dist).__name__}")


def _point(trial: FrozenTrial, names: Sequence[str], space: dict[str, BaseDistribution]) -> list:
    """A past trial as a skopt point: its params, else what we proposed, else the range's low end."""
    proposal = trial.system_attrs.get(PROPOSAL_ATTR, {})
    point = []
    for name in names:
        dist = space[name]
        value = trial.params.get(name, proposal.get(name))
        if isinstance(dist, CategoricalDistribution):
            point.append(dist.choices.index(value) if value in dist.choices else 0)
        elif value is None:
            point.append(dist.low)
        else:
            point.append(type(dist.low)(np.clip(value, dist.low, dist.high)))
    return point


def _external(dist: BaseDistribution, value: Any) -> Any:
    if isinstance(dist, CategoricalDistribution):
        return dist.choices[int(value)]
    if isinstance(dist, IntDistribution):
        steps = round((int(value) - dist.low) / dist.step)
        return int(min(dist.high, dist.low + steps * dist.step))
    value = float(np.clip(value, dist.low, dist.high))
    if dist.step is not None:
        value = dist.low + round((value - dist.low) / dist.step) * dist.step
    return value


def _jsonable(params: dict) -> dict:
    """System attrs are stored as JSON; numpy scalars are not."""
    return {k: v.item() if isinstance(v, np.generic) else v for k, v in params.items()}


# Each factory takes the seed and the sampler's own arguments. The names are config.SamplerName's
# (a test holds them equal), so settings are checked before anything is built.
SAMPLERS: dict[str, Callable[..., BaseSampler]] = {
    # constant_liar keeps parallel workers from proposing the same point.
    "tpe": lambda seed, **kw: optuna.samplers.TPESampler(seed=seed, constant_liar=True, **kw),
    "random": lambda seed, **kw: optuna.samplers.RandomSampler(seed=seed, **kw),
    "skopt": lambda seed, **kw: SkoptSampler(seed=seed, **kw),
    # The per-layer params are conditional: GP samples them independently, by design.
    "gp": lambda seed, **kw: optuna.samplers.GPSampler(
        seed=seed, warn_independent_sampling=False, **kw
    ),
    "cmaes": lambda seed, **kw: optuna.samplers.CmaEsSampler(
        seed=seed, warn_independent_sampling=False, **kw
    ),
    "qmc": lambda seed, **kw: optuna.samplers.QMCSampler(
        seed=seed, warn_independent_sampling=False, **kw
    ),
}
# Each factory takes the trial's epochs; the names are config.PrunerName's.
PRUNERS: dict[str, Callable[[int], optuna.pruners.BasePruner]] = {
    # Let a few trials finish and every trial train two epochs before judging it.
    "median": lambda epochs: optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2),
    "hyperband": lambda epochs: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs),
    "successive-halving": lambda epochs: optuna.pruners.SuccessiveHalvingPruner(),
    "percentile": lambda epochs: optuna.pruners.PercentilePruner(
        25.0, n_startup_trials=5, n_warmup_steps=2
    ),
    "none": lambda epochs: optuna.pruners.NopPruner(),
}


def make_sampler(name: str, seed: int | None, **kwargs: Any) -> BaseSampler:
    """A sampler by name (SAMPLERS); kwargs go to its constructor."""
    if name not in SAMPLERS:
        raise SettingError(f"unknown sampler {name!r}; expected one of {sorted(SAMPLERS)}")
    try:
        return SAMPLERS[name](seed, **kwargs)
    except TypeError as e:
        raise SettingError(f"bad sampler arguments for {name!r}: {kwargs} ({e})") from e


def make_pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    """A pruner by name (PRUNERS)."""
    if name not in PRUNERS:
        raise SettingError(f"unknown pruner {name!r}; expected one of {sorted(PRUNERS)}")
    return PRUNERS[name](epochs)
