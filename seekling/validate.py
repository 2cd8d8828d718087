"""The one validator every config dataclass uses: a ValueError that names `Owner.field` and the fix;
and the one reader of a config from its JSON dict."""

import dataclasses
from collections.abc import Callable


def require(ok: bool, owner: str, field: str, fix: str) -> None:
    """Raise ValueError("Owner.field: fix") unless ok."""
    if not ok:
        raise ValueError(f"{owner}.{field}: {fix}")


def checker(owner: str) -> Callable[[bool, str, str], None]:
    """require() bound to one owner: `need = checker("TrainConfig"); need(lr > 0, "lr", "must be positive")`."""
    return lambda ok, field, fix: require(ok, owner, field, fix)


def config_from_dict(cls, d: dict, source: str, what: str):
    """cls(**d) for a run's JSON config, naming the file in every error; `what` names the settings
    ("training", "SFT") in the error for a key this version does not know."""
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"{source}: unknown {what} settings {unknown}; was it written by a newer seekling?")
    try:
        return cls(**d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from None
