"""A middle stage's role: run its blocks on each step and pass the result on."""

from __future__ import annotations

import logging

from ..types import Failure, Forward, Release, StageMessage
from .role import Role
from .tensors import from_wire, to_wire

log = logging.getLogger(__name__)


class Relay(Role):
    def on_message(self, message: StageMessage) -> None:
        match message:
            case Forward():
                try:
                    self._forward(message)
                except Exception as error:
                    self.fail(message, error)
            case Release() | Failure():
                # On down the ring: a release frees every stage, a failure reaches stage 0.
                self._engine.drop(message.request_id)
                self.send(message)
            case _:
                log.warning("a middle stage got an unexpected %s", type(message).__name__)

    def _forward(self, message: Forward) -> None:
        stage = self._stage
        entry = self._engine.cache_for(message.request_id, stage, message.sampling)
        out = stage.model.forward(from_wire(message.hidden), entry.cache)
        self.send(
            Forward(
                message.request_id,
                stage.epoch,
                message.step,
                to_wire(out),
                sample=message.sample,
                sampling=message.sampling,
            )
        )

    def send(self, message: StageMessage) -> None:
        self._engine.send(self._stage, message)

    def fail(self, message: StageMessage, error: Exception) -> None:
        """This request failed here: drop it and tell stage 0 (down the ring)."""
        log.exception("request %s failed on this stage", message.request_id)
        self._engine.drop(message.request_id)
        shard = self._stage.model.shard
        self.send(
            Failure(
                message.request_id,
                self._stage.epoch,
                f"stage [{shard.start_layer}, {shard.end_layer}) failed: {error}",
            )
        )
