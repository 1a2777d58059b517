"""Incentive config models (PLACEHOLDER: issue #7 fills in accounts, meters, baselines, factors, keys)."""

from __future__ import annotations

from gateway.config.types import StrictModel


class IncentivesConfig(StrictModel):
    pass
