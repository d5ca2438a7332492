"""The reader protocol every layout family implements, and the detection result it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from fp8convert.shards import Checkpoint
from fp8convert.spec import CheckpointPlan, LinearPlan, QuantizedLinear


@dataclass(frozen=True, slots=True, kw_only=True)
class Detection:
    """Why a reader claims a checkpoint: the rule that fired and the evidence seen."""

    format: str
    rule: str
    evidence: list[str] = field(default_factory=list)


class FormatReader(Protocol):
    """One per layout family (FORMATS.md numbering). Readers do no writing and know no target."""

    name: str
    description: str

    def detect(self, ckpt: Checkpoint, config: dict) -> Detection | None:
        """Return a Detection if this layout is recognised, else None. Must not raise for other layouts."""
        ...

    def plan(self, ckpt: Checkpoint, config: dict, detection: Detection) -> CheckpointPlan:
        """Classify every tensor from headers only; raise one error listing every problem found."""
        ...

    def read_linear(self, ckpt: Checkpoint, linear: LinearPlan) -> QuantizedLinear:
        """Load one linear's tensors and convert them to the canonical convention (fp32 multiplier scales)."""
        ...
