"""What a stage does with the messages that reach it: the base of the four roles."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..types import StageMessage

if TYPE_CHECKING:
    from .core import InstalledStage, StageEngine


class Role:
    """One role of an installed stage (driver, relay, last stage, tensor follower); it runs
    on the engine's MLX thread and uses the engine's caches and streams."""

    def __init__(self, engine: StageEngine, stage: InstalledStage) -> None:
        self._engine = engine
        self._stage = stage

    def on_message(self, message: StageMessage) -> None:
        raise NotImplementedError
