"""The master's side of placement: choose stages, have members load them, re-place on change.

Runs on every node; only the master acts. It places once the membership has been stable for
a moment, re-places when a stage's node is lost or a pipeline stream breaks (after the
liveness bound, so the dead node is out of the view), and spreads wider when nodes join
while the placement has fewer stages than --min-nodes. A node whose placements keep
breaking is left out for a while (placement.quarantine).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio

from ..cluster import capabilities
from ..cluster.node import ClusterNode
from ..cluster.wire import load_order_to_proto, progress_from_proto
from ..proto import node_pb2_grpc
from ..types import LoadOrder, LoadProgress, ModelLayout, Parallelism
from .plan import NodeResources, Placement, PlacementError, plan_placement
from .quarantine import LeftOut, Quarantine
from .views import CoordinatorState, PlacementState, PlacementView, StageState
from .worker import Worker

log = logging.getLogger(__name__)

TICK_S = 0.1
STABLE_S = 1.0  # membership unchanged this long before placing
BREAK_SETTLE_S = 3.0  # after a stream broke: longer than liveness needs to drop a dead node
RETRY_S = 3.0
LOAD_TIMEOUT_S = 600.0


class Coordinator:
    def __init__(
        self,
        *,
        node_id: str,
        cluster: ClusterNode | None,
        worker: Worker,
        layout: Callable[[], ModelLayout],
        memory_available: Callable[[], int],
        parallelism: Parallelism = Parallelism.AUTO,
        min_nodes: int = 1,
        dtype: str = "auto",
    ) -> None:
        self.node_id = node_id
        self.cluster = cluster
        self.worker = worker
        self._layout_fn = layout
        self._layout: ModelLayout | None = None
        self._memory_available = memory_available
        self.parallelism = parallelism
        self.min_nodes = min_nodes
        self.dtype = dtype
        self.state = CoordinatorState.WAITING
        self.error: str | None = None
        self.placement: Placement | None = None
        self.view: PlacementView | None = None
        self._epoch = 0
        self._placed_once = False
        # Placements made while master, and those that replaced a lost or broken one.
        self.placements_made = 0
        self.re_placements = 0
        self._members: frozenset[str] = frozenset()
        self._changed_at = time.monotonic()
        self._broken_at: float | None = None
        self._retry_at = 0.0
        self._task: asyncio.Task[None] | None = None
        self.quarantine = Quarantine(node_id)
        worker.broken_listeners.append(self._on_stream_broken)

    @property
    def ready(self) -> bool:
        return self.state == CoordinatorState.READY and self.is_master

    @property
    def is_master(self) -> bool:
        return self.cluster is None or self.cluster.is_master

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="placement")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def describe(self) -> dict[str, Any] | None:
        if self.view is None:
            return None
        return self.view.model_dump()

    # ---------------------------------------------------------------- membership

    def left_out(self) -> list[LeftOut]:
        """The nodes left out of placements now (their placements kept breaking)."""
        return self.quarantine.left_out() if self.is_master else []

    def _resources(self) -> dict[str, NodeResources]:
        nodes = {
            self.node_id: NodeResources(
                self.node_id, self._memory_available(), capabilities.matmul_gflops()
            )
        }
        if self.cluster is not None:
            for node in self.cluster.snapshot().nodes:
                if node.healthy and node.id != self.node_id:
                    caps = node.capabilities
                    nodes[node.id] = NodeResources(
                        node.id, caps.memory_available, caps.matmul_gflops
                    )
        return nodes

    def _on_stream_broken(self, reason: str, peer: str) -> None:
        """A stream of this node's current placement broke, with `peer` at its other end."""
        if not self.is_master:
            if self.cluster is not None:
                self.cluster.report_broken_ring(self.worker.epoch, reason, peer)
            return
        self._count_break((self.node_id, peer), reason)
        self._on_broken(reason)

    def _count_break(self, ends: tuple[str, str], reason: str) -> None:
        if self.placement is None:
            return
        for node_id in self.quarantine.broke(self._epoch, ends, reason):
            left = next(out for out in self.quarantine.left_out() if out.node_id == node_id)
            log.warning(
                "leaving node %s out of placements for %.0f s: the placements it is in keep "
                "breaking (last: %s)",
                node_id,
                left.seconds_left,
                reason,
            )

    def _on_broken(self, reason: str) -> None:
        if self.placement is None:
            return
        if self._broken_at is None:
            self._broken_at = time.monotonic()
        self.error = reason
        if self.state == CoordinatorState.READY:
            self.state = CoordinatorState.LOADING  # not serving until re-placed
            if self.view is not None:
                self.view.state = PlacementState.BROKEN
                self.view.error = reason

    def _broken_elsewhere(self) -> str | None:
        """Why the placement's ring broke at another of its nodes, if one says so (a hop
        between two members: the master's own streams may still be whole)."""
        if self.cluster is None or self.placement is None:
            return None
        for node in self.cluster.snapshot().nodes:
            if node.broken_epoch == self._epoch and node.id in self.placement.node_ids:
                reason = f"node {node.id}: {node.broken_reason}"
                self._count_break((node.id, node.broken_peer), reason)
                return reason
        return None

    def _lost(self, members: frozenset[str]) -> list[str]:
        if self.placement is None:
            return []
        return [node for node in self.placement.node_ids if node not in members]

    # ---------------------------------------------------------------- the loop

    async def _run(self) -> None:
        while True:
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # keep coordinating whatever one attempt did
                log.exception("placement failed")
                self.state, self.error = CoordinatorState.FAILED, str(error)
                self._retry_at = time.monotonic() + RETRY_S
            await asyncio.sleep(TICK_S)

    async def _tick(self) -> None:
        if not self.is_master:
            if self.placement is not None:
                log.info("no longer master: dropping placement of epoch %d", self._epoch)
                self.worker.engine.fail_parked("this node is no longer the master")
            self.placement, self.view, self.state = None, None, CoordinatorState.STANDBY
            return
        every = self._resources()
        out = {left.node_id for left in self.quarantine.left_out()}
        resources = {node_id: node for node_id, node in every.items() if node_id not in out}
        members = frozenset(resources)
        now = time.monotonic()
        if members != self._members:
            self._members, self._changed_at = members, now
        lost = self._lost(members)
        if lost and self.state == CoordinatorState.READY:
            # Fail in-flight requests now; re-placing waits for the view to settle.
            reason = f"node(s) {', '.join(lost)} of the placement left the cluster"
            # A node that keeps leaving and rejoining (a lossy link) is a broken one too.
            for node_id in lost:
                self._count_break((node_id, ""), f"node {node_id} left the cluster")
            self._on_broken(reason)
            self.worker.engine.fail_all(f"{reason}; re-placing the model")
        elif self.state == CoordinatorState.READY and (broken := self._broken_elsewhere()):
            self._on_broken(broken)
            self.worker.engine.fail_all(f"{broken}; re-placing the model")
        if now - self._changed_at < STABLE_S or now < self._retry_at:
            return
        if self._broken_at is not None and now - self._broken_at < BREAK_SETTLE_S:
            return
        if not self._needs_placement(members):
            return
        # --min-nodes holds back the cluster's first placement only: a master taking over
        # from a lost one (its own stage came from that one) re-places on what is left.
        first = not self._placed_once and self.worker.epoch == 0
        if first and len(members) < self.min_nodes:
            self.state = CoordinatorState.WAITING
            self.error = f"waiting for {self.min_nodes} nodes (--min-nodes); {len(members)} healthy"
            return
        await self._place(resources, every)

    def _plan(self, resources: dict[str, NodeResources], epoch: int) -> Placement:
        assert self._layout is not None
        return plan_placement(
            self._layout,
            list(resources.values()),
            master_id=self.node_id,
            epoch=epoch,
            parallelism=self.parallelism,
            min_nodes=min(self.min_nodes, len(resources)),
        )

    def _needs_placement(self, members: frozenset[str]) -> bool:
        if (
            self.placement is None
            or self._broken_at is not None
            or self.state == CoordinatorState.FAILED
        ):
            return True
        if self._lost(members):
            return True
        stages = len(self.placement.stages)
        # Spread wider when nodes joined and the placement is below --min-nodes.
        return stages < self.min_nodes and len(members) > stages

    async def _place(
        self, resources: dict[str, NodeResources], every: dict[str, NodeResources]
    ) -> None:
        """Place on `resources`; on `every` healthy node (those left out too) when the
        model does not fit without them."""
        if self._layout is None:
            self.state = CoordinatorState.LOADING
            self._layout = await asyncio.to_thread(self._layout_fn)
        # Epochs grow across masters too: a new master starts above any older placement.
        epoch = max(self._epoch + 1, time.time_ns() // 1_000_000)
        try:
            try:
                placement = self._plan(resources, epoch)
            except PlacementError as error:
                if len(every) == len(resources):
                    raise
                log.warning("placing on the nodes left out too: without them, %s", error)
                placement = self._plan(every, epoch)
        except PlacementError as error:
            self.state, self.error = CoordinatorState.FAILED, str(error)
            self.placement, self.view = None, None
            self._retry_at = time.monotonic() + RETRY_S
            log.error("cannot place the model: %s", error)
            self.worker.engine.fail_parked(f"cannot place the model on the nodes left: {error}")
            return
        self._epoch = epoch
        self.placements_made += 1
        if self._placed_once:
            self.re_placements += 1
        self.placement, self._broken_at, self.error = placement, None, None
        self.view = PlacementView.of(placement, PlacementState.LOADING)
        self.state = CoordinatorState.LOADING
        log.info(
            "placing %s (%s), epoch %d: %s",
            placement.model_id,
            placement.parallelism,
            epoch,
            "; ".join(f"{stage.node_id} {stage.shard.describe()}" for stage in placement.stages),
        )
        results = await asyncio.gather(
            *(self._load_stage(placement, index) for index in range(len(placement.stages))),
            return_exceptions=True,
        )
        if self.placement is not placement:
            return  # superseded meanwhile
        # An exception without a message (a timeout, a cancel) still says what it was.
        errors = [
            str(result) or f"{type(result).__name__} while loading a stage"
            for result in results
            if isinstance(result, BaseException)
        ]
        if errors:
            self.state, self.error = CoordinatorState.FAILED, "; ".join(errors)
            self.view.state, self.view.error = PlacementState.FAILED, self.error
            self._retry_at = time.monotonic() + RETRY_S
            log.error("placement of epoch %d failed: %s", epoch, self.error)
            self.worker.engine.fail_parked(f"the new placement failed: {self.error}")
            return
        self._placed_once = True
        if self._broken_at is None:
            self.state = CoordinatorState.READY
            self.view.state = PlacementState.READY
            self.worker.engine.resume_parked()
            log.info("placement of epoch %d is ready (%d stages)", epoch, len(placement.stages))

    async def _load_stage(self, placement: Placement, index: int) -> None:
        stage = placement.stages[index]
        assert self.view is not None
        view = self.view.stages[index]
        view.state = StageState.LOADING
        tensor = stage.tensor is not None
        # Tensor members each compute the whole depth: one stage each.
        pipeline_stages = 1 if tensor else len(placement.stages)
        order = LoadOrder(
            epoch=placement.epoch,
            shard=stage.shard,
            dtype=self.dtype,
            stage_index=index,
            n_stages=pipeline_stages,
            next_node_id=placement.next_node(index) if pipeline_stages > 1 else "",
            previous_node_id=placement.previous_node(index) if pipeline_stages > 1 else "",
            tensor_members=placement.node_ids if tensor else (),
            placement_json=self.view.model_dump_json(),
        )

        def report(progress: LoadProgress) -> None:
            if progress.total:
                view.layers_loaded = progress.done
            if progress.weight_bytes:
                view.weight_bytes = progress.weight_bytes
                view.rss = progress.rss
                view.mlx_active = progress.mlx_active

        if stage.node_id == self.node_id:
            final = await self.worker.load(order, report)
        else:
            final = await self._load_remote(stage.node_id, order, report)
        report(final)
        if final.current_epoch > self._epoch:
            self._epoch = final.current_epoch  # a member saw a newer master's epoch
        if final.error:
            view.state, view.error = StageState.FAILED, final.error
            raise RuntimeError(f"node {stage.node_id}: {final.error}")
        view.state = StageState.READY

    async def _load_remote(
        self,
        node_id: str,
        order: LoadOrder,
        report: Callable[[LoadProgress], None],
    ) -> LoadProgress:
        channel = self.cluster.channel(node_id) if self.cluster is not None else None
        if channel is None:
            raise RuntimeError(f"node {node_id} is not a healthy member")
        final: LoadProgress | None = None
        stub = node_pb2_grpc.WorkerStub(channel)
        try:
            call: Any = stub.LoadShard(load_order_to_proto(order), timeout=LOAD_TIMEOUT_S)
            async for message in call:
                progress = progress_from_proto(message)
                if progress.finished:
                    final = progress
                else:
                    report(progress)
        except grpc.aio.AioRpcError as error:
            raise RuntimeError(
                f"node {node_id} did not load its shard: {error.code().name}: {error.details()}"
            ) from error
        if final is None:
            raise RuntimeError(f"node {node_id} ended LoadShard without a result")
        return final
