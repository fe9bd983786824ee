"""What an in-process engine asks a cluster for when it runs as a Ray actor (``resources:`` in a pool's model entry)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from orchestra.numbers import Amount

#: resource names Ray reserves for its own fields (``num_cpus``, ``num_gpus``, ``memory``)
_RESERVED = frozenset({"CPU", "GPU", "memory", "object_store_memory"})


#: the smallest amount of a resource Ray counts (it keeps them in ten-thousandths)
RESOURCE_UNIT = 0.0001


def _countable(amount: float, name: str) -> None:
    """Refuse an amount Ray cannot count (its error came with every call, naming no model)."""
    if 0 < amount < RESOURCE_UNIT:
        raise ValueError(f"{name}{': ' if name else ''}{amount:g} is less than Ray counts ({RESOURCE_UNIT:g}); ask "
                         f"for 0 or at least {RESOURCE_UNIT:g}")


class EngineResources(BaseModel):
    """An engine's demand on a Ray cluster: its actor is placed only where all of it is free.

    Attributes:
        num_cpus: CPU slots (logical, as Ray counts them).
        num_gpus: GPUs (fractions share one).
        memory_gb: memory reserved for the actor (None: none reserved).
        custom: custom resources by name, as the nodes declare them (``ray start --resources``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_cpus: Amount = Field(default=1.0, ge=0)
    num_gpus: Amount = Field(default=0.0, ge=0)
    memory_gb: Amount | None = Field(default=None, gt=0)
    custom: dict[str, Amount] = {}

    @field_validator("custom")
    @classmethod
    def _custom_names(cls, value: dict[str, float]) -> dict[str, float]:
        reserved = sorted(_RESERVED & set(value))
        if reserved:
            raise ValueError(f"{', '.join(reserved)} is set by num_cpus, num_gpus or memory_gb, not under custom")
        if any(amount < 0 for amount in value.values()):
            raise ValueError("custom resources are amounts of at least 0")
        for name, amount in value.items():
            _countable(amount, name)
        return value

    @field_validator("num_cpus", "num_gpus")
    @classmethod
    def _ray_counts_it(cls, value: float, info: ValidationInfo) -> float:
        _countable(value, "")
        if info.field_name == "num_gpus" and value > 1 and not float(value).is_integer():
            raise ValueError("more than 1 GPU is a whole number of them (fractions below 1 share a GPU)")
        return value

    def demand(self) -> dict[str, float]:
        """Every resource asked for, by Ray's names (``CPU``, ``GPU``, ``memory`` in bytes, custom)."""
        wanted = {"CPU": self.num_cpus, "GPU": self.num_gpus, **self.custom}
        if self.memory_gb is not None:
            wanted["memory"] = self.memory_gb * 2**30
        return {name: amount for name, amount in wanted.items() if amount > 0}

    def actor_options(self) -> dict[str, Any]:
        """The keyword arguments of a Ray actor's ``.options(...)`` that reserve these resources."""
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory_gb is not None:
            options["memory"] = int(self.memory_gb * 2**30)
        if self.custom:
            options["resources"] = dict(self.custom)
        return options


def resources_of(model: object) -> EngineResources:
    """What ``model`` asks a cluster for: its ``resources`` attribute, or one CPU."""
    return getattr(model, "resources", None) or EngineResources()
