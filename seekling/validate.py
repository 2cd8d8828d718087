"""The one validator every config dataclass uses: a ValueError that names `Owner.field` and the fix."""

from collections.abc import Callable


def require(ok: bool, owner: str, field: str, fix: str) -> None:
    """Raise ValueError("Owner.field: fix") unless ok."""
    if not ok:
        raise ValueError(f"{owner}.{field}: {fix}")


def checker(owner: str) -> Callable[[bool, str, str], None]:
    """require() bound to one owner: `need = checker("TrainConfig"); need(lr > 0, "lr", "must be positive")`."""
    return lambda ok, field, fix: require(ok, owner, field, fix)
