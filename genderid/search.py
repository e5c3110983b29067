"""The searched parameters of a sweep: one table, from which everything else is derived. Pure (no Ray).

The search space (:mod:`genderid.tune_ray`), putting a trial's values into its config, the results table's
columns, the sweep plot and the demo's summary all read :data:`PARAMS`; adding a searched parameter is one row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SearchedParam:
    """One searched value: where it lives in the config and how ``tune.<name>`` describes its range."""

    name: str  # the key under `tune.` (its range) and in the searched section (its value)
    section: str  # the config section whose `name` key a trial's value sets
    kind: str  # "loguniform": tune.<name> is [low, high]; "choice": tune.<name> is a list (empty = not searched)

    @property
    def column(self) -> str:
        """Its column in results.csv (Tune's ``config/<name>`` naming)."""
        return f"config/{self.name}"


PARAMS = (
    SearchedParam("lr", "train", "loguniform"),
    SearchedParam("unfreeze_depth", "model", "choice"),
    SearchedParam("batch_size", "train", "choice"),
    SearchedParam("weight_decay", "train", "choice"),
)
BY_NAME = {p.name: p for p in PARAMS}


def active(config) -> list[SearchedParam]:
    """The parameters a sweep of ``config`` searches (a ``choice`` with an empty list is not searched)."""
    return [p for p in PARAMS if p.kind != "choice" or list(getattr(config.tune, p.name))]


def space(config) -> dict[str, tuple[str, Any]]:
    """``{name: (kind, range)}`` of the active parameters, e.g. ``{"lr": ("loguniform", (1e-5, 1e-2))}``."""
    return {p.name: (p.kind, tuple(getattr(config.tune, p.name)) if p.kind == "loguniform"
                     else list(getattr(config.tune, p.name))) for p in active(config)}


def apply_params(values: dict, params: dict) -> dict:
    """Put searched values into a config dict (``Config.to_dict()`` form) in place; returns it."""
    for name, value in params.items():
        if name not in BY_NAME:
            raise KeyError(f"{name!r} is not a searched parameter ({', '.join(BY_NAME)})")
        values.setdefault(BY_NAME[name].section, {})[name] = value
    return values


def params_of(row_or_config: dict) -> dict:
    """The searched values in a results row (``config/<name>`` keys) or a Tune trial config (``<name>`` keys)."""
    found = {}
    for p in PARAMS:
        for key in (p.column, p.name):
            if row_or_config.get(key) is not None:
                found[p.name] = row_or_config[key]
                break
    return found


def describe(params: dict) -> str:
    """``"lr 0.00123, unfreeze_depth 3"``: searched values for a person, in the table's order."""
    return ", ".join(f"{p.name} {params[p.name]:.3g}" if isinstance(params[p.name], float)
                     else f"{p.name} {params[p.name]}" for p in PARAMS if p.name in params)
