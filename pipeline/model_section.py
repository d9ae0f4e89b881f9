"""The ``model`` section of a training config: flows' own ``FlowConfig`` dataclass, validated by
pydantic, with ``split`` as a union discriminated by ``strategy`` (one config class per strategy,
flows/strategies/) and the old flat split keys mapped to their strategy's names."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field

from flows import FlowConfig
from flows.strategies import SplitOptions, legacy_split_keys


class _SplitByStrategy:
    """pydantic hook: ``FlowConfig.split`` validated as a union discriminated by ``strategy`` (one
    config class per strategy, flows/strategies/), so a bad key or value names that strategy's field."""

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Any:
        schema = handler(source)
        tagged = handler.generate_schema(Annotated[SplitOptions, Field(discriminator="strategy")])
        fields = handler.resolve_ref_schema(schema)["schema"]["fields"]
        (split,) = [f for f in fields if f["name"] == "split"]
        if split["schema"]["type"] == "default":  # the default_factory wraps the field's schema
            split["schema"]["schema"] = tagged
        else:  # pragma: no cover - FlowConfig.split always has a default
            split["schema"] = tagged
        return schema


def _split_from_old_keys(model: Any) -> Any:
    """A ``model`` mapping whose ``split`` uses the old flat keys -> its strategy's keys
    (flows.strategies.legacy_split_keys); a knob of another strategy is an error naming it."""
    if isinstance(model, dict) and isinstance(model.get("split"), dict):
        try:  # flows' default strategy (TrainConfig's own validator has set the pipeline's before this)
            return {**model, "split": legacy_split_keys({"strategy": "static", **model["split"]})}
        except ValueError as e:
            raise ValueError(f"split.{e}") from None
    return model


# The model section: flows' FlowConfig with its split as a discriminated union and old keys mapped.
ModelSection = Annotated[FlowConfig, _SplitByStrategy(), BeforeValidator(_split_from_old_keys)]
