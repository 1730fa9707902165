"""A detector in which some machines were refitted after their maintenance.

After ``signalcraft maintenance ASSET``, `detect` collects the machine's next
``detect.calibration_segments`` segments and fits a detector of ``detect.scorer.kind``
on them alone; the other machines keep their models. ``RecalibratedDetector`` holds the
detector they keep (``base``) and, per refitted machine, its new one, and routes each
source to its own. It is saved like any detector (kind ``recalibrated``), with each
part under its own kind.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Optional

from .model import DetectorError

KIND = "recalibrated"


def _registry() -> dict[str, type]:
    from .scorers import SCORERS

    return SCORERS


def _part_to_data(detector) -> dict[str, Any]:
    return {"kind": detector.kind, **detector.to_data()}


def _part_from_data(data: dict[str, Any]):
    registry = _registry()
    kind = data.get("kind")
    if kind not in registry:
        raise DetectorError(f"a recalibrated part of kind {kind!r}, which this signalcraft does not know")
    return registry[kind].from_data(data)


@dataclasses.dataclass
class RecalibratedDetector:
    """``base`` for every source, except those in ``replaced``, which have their own."""

    kind: typing.ClassVar[str] = KIND

    base: Any
    replaced: dict[str, Any]  # source -> detector fitted on that source after its maintenance

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*self.base.sources, *self.replaced)))

    @property
    def features(self) -> dict:
        return self.base.features

    @property
    def trained_on(self) -> dict:
        return {"base": self.base.trained_on,
                "recalibrated": {s: d.trained_on for s, d in self.replaced.items()}}

    @property
    def learns_online(self) -> bool:
        return any(getattr(d, "learns_online", False) for d in (self.base, *self.replaced.values()))

    def part(self, source: str):
        """The detector that scores ``source``."""
        return self.replaced.get(source, self.base)

    def score(self, source: str, tensors, state: Optional[dict] = None):
        part = self.part(source)
        if getattr(part, "learns_online", False):
            return part.score(source, tensors, state=state)
        return part.score(source, tensors)

    def scoring_module(self, source: str):
        """The scoring module of the part that scores ``source`` (DetectorError when it has none)."""
        module = getattr(self.part(source), "scoring_module", None)
        if module is None:
            raise DetectorError(f"the {self.part(source).kind} model of {source!r} has no scoring module "
                                "(it is not a network)")
        return module(source)

    def learn(self, source: str, tensors, state: Optional[dict] = None) -> Optional[dict]:
        part = self.part(source)
        return part.learn(source, tensors, state=state) if getattr(part, "learns_online", False) else state

    def to_data(self) -> dict[str, Any]:
        return {"features": dict(self.features), "base": _part_to_data(self.base),
                "replaced": {s: _part_to_data(d) for s, d in self.replaced.items()}}

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> "RecalibratedDetector":
        base = _part_from_data(data["base"])
        replaced = {str(s): _part_from_data(d) for s, d in data["replaced"].items()}
        for source, part in replaced.items():
            if source not in part.sources:
                raise ValueError(f"the recalibrated model of {source!r} has no model for it")
            if part.features != base.features:
                raise ValueError(f"the recalibrated model of {source!r} was fitted on other feature settings")
        return cls(base=base, replaced=replaced)


def with_source(detector, source: str, refitted) -> RecalibratedDetector:
    """``detector`` with ``source`` scored by ``refitted`` (a detector fitted on it alone)."""
    if isinstance(detector, RecalibratedDetector):
        return RecalibratedDetector(base=detector.base, replaced={**detector.replaced, source: refitted})
    return RecalibratedDetector(base=detector, replaced={source: refitted})
