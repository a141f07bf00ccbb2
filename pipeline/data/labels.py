"""Label sets of the three heads: age brackets (configurable edges), ethnicity, gender."""

from __future__ import annotations

import numpy as np

ETHNICITIES = ("White", "Black", "Asian", "Indian", "Other")
GENDERS = ("male", "female")
HEADS = ("age", "ethnicity", "gender")
MAX_AGE = 116


def bracket_names(edges: tuple[int, ...]) -> tuple[str, ...]:
    """Names for brackets (e0, e1], (e1, e2], ...; the first starts at 0, the last is open."""
    names = [f"0-{edges[1]}"]
    names += [f"{lo + 1}-{hi}" for lo, hi in zip(edges[1:-2], edges[2:-1], strict=True)]
    names.append(f"{edges[-2] + 1}+")
    return tuple(names)


def age_bracket(age: np.ndarray, edges: tuple[int, ...]) -> np.ndarray:
    """Bracket index of each age: 0..3 -> 0, 4..18 -> 1, ... for the default edges."""
    # searchsorted(left) on the inner edges puts an age equal to an edge in the lower bracket.
    return np.searchsorted(np.asarray(edges[1:-1]), np.asarray(age), side="left").astype(np.int64)


def class_names(edges: tuple[int, ...]) -> dict[str, tuple[str, ...]]:
    """Class names per head, in output order."""
    return {"age": bracket_names(edges), "ethnicity": ETHNICITIES, "gender": GENDERS}


def num_classes(edges: tuple[int, ...]) -> dict[str, int]:
    return {head: len(names) for head, names in class_names(edges).items()}


def targets(
    age: np.ndarray, ethnicity: np.ndarray, gender: np.ndarray, edges: tuple[int, ...]
) -> dict[str, np.ndarray]:
    """The class index of each head, age as its bracket."""
    return {
        "age": age_bracket(age, edges),
        "ethnicity": np.asarray(ethnicity).astype(np.int64),
        "gender": np.asarray(gender).astype(np.int64),
    }
