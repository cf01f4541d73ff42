"""A tensor member of rank > 0: run each of rank 0's passes on this member's slice."""

from __future__ import annotations

import logging

import mlx.core as mx

from ..types import Failure, Forward, Release, StageMessage
from .role import Role
from .tensor_parallel import CollectiveError
from .tensors import from_wire

log = logging.getLogger(__name__)


class TensorFollower(Role):
    def on_message(self, message: StageMessage) -> None:
        match message:
            case Forward():
                self._pass(message)
            case Release():
                self._engine.release(self._stage, message)
            case Failure():
                self._engine.drop(message.request_id)
            case _:
                log.warning("a tensor member got an unexpected %s", type(message).__name__)

    def _pass(self, message: Forward) -> None:
        stage = self._stage
        collective = stage.collective
        assert collective is not None
        try:
            if message.rows:
                self._rows_pass(message)
                return
            if message.step != 1:
                entry = self._engine.cache_for(message.request_id)
                if entry is None:
                    raise RuntimeError("this member holds no state for the request")
            else:
                # A request's first pass. A member that lost the prefix cache entry rank 0
                # chose cannot contribute and fails the collective below; members keep
                # what rank 0 keeps and evict what it evicts, so only a broken placement
                # gets there.
                entry = self._engine.open_cache(
                    message.request_id,
                    stage,
                    None,
                    reuse_entry=message.reuse_entry,
                    reuse_tokens=message.reuse_tokens,
                )
            collective.begin(message.request_id, message.step)
            out = stage.model.forward(from_wire(message.hidden), entry.cache)
            mx.eval(out, stage.model.cache_state(entry.cache))
        except CollectiveError as error:
            # The placement is broken; rank 0 fails the requests and the master re-places.
            log.warning("request %s stopped: %s", message.request_id, error)
            self._engine.drop_all()
        except Exception as error:
            log.exception("request %s failed on this member", message.request_id)
            collective.fail_peers(f"tensor member {stage.tensor_rank} failed: {error}")
            self._engine.drop_all()

    def _rows_pass(self, message: Forward) -> None:
        """A batched decode pass of requests that all started here."""
        stage = self._stage
        assert stage.collective is not None
        entries = []
        for request_id in message.rows:
            entry = self._engine.cache_for(request_id)
            if entry is None:
                raise RuntimeError(f"this member holds no state for request {request_id}")
            entries.append(entry)
        caches = [entry.cache for entry in entries]
        stage.collective.begin(message.request_id, message.step)
        out = stage.model.forward_rows(from_wire(message.hidden), caches)
        mx.eval(out, [stage.model.cache_state(cache) for cache in caches])
