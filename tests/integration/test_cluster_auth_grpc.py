"""Auth over real gRPC, in one process: refused calls, replays, the integrator's hook path."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
import pytest

from exo_tools.cluster import ClusterAuth, ClusterConfig, ClusterNode
from exo_tools.cluster.auth import new_nonce
from exo_tools.cluster.tls import CHANNEL_TLS_OPTIONS, ClusterTLS
from exo_tools.proto import node_pb2, node_pb2_grpc

HB = "/exo_tools.v1.Membership/Heartbeat"


def _config(node_id: str, secret: bytes, peers: list[str] | None = None) -> ClusterConfig:
    return ClusterConfig(
        node_id=node_id,
        secret=secret,
        grpc_host="127.0.0.1",
        api_port=1,
        interfaces=["127.0.0.1"],
        static_peers=peers or [],
        discovery=False,
        version="t",
    )


def _run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), 30))


class _Worker(node_pb2_grpc.WorkerServicer):
    async def LoadShard(self, request: Any, context: Any) -> AsyncIterator[Any]:
        yield node_pb2.LoadShardProgress(epoch=request.epoch, finished=True)


async def _heartbeat(
    stub: node_pb2_grpc.MembershipStub, md: list[tuple[str, str]] | None
) -> node_pb2.HeartbeatResponse:
    return await stub.Heartbeat(
        node_pb2.HeartbeatRequest(nonce=new_nonce()), metadata=md, timeout=2
    )


def test_unsigned_wrong_secret_and_replayed_calls_are_refused() -> None:
    async def body() -> None:
        node = ClusterNode(_config("srv", b"right"))
        await node.start()
        try:
            target = f"127.0.0.1:{node.grpc_port}"
            # Plain text, or TLS from another secret: no connection at all.
            for channel in (
                grpc.aio.insecure_channel(target),
                grpc.aio.secure_channel(
                    target,
                    ClusterTLS("x", [b"wrong"], "default").channel_credentials(),
                    options=CHANNEL_TLS_OPTIONS,
                ),
            ):
                async with channel:
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await _heartbeat(node_pb2_grpc.MembershipStub(channel), None)
                    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            # TLS from the right secret: the per-call HMAC is the second, independent check.
            tls = ClusterTLS("x", [b"right"], "default")
            async with grpc.aio.secure_channel(
                target, tls.channel_credentials(), options=CHANNEL_TLS_OPTIONS
            ) as ch:
                stub = node_pb2_grpc.MembershipStub(ch)
                for md in (None, ClusterAuth(b"wrong", "default").sign_call("x", HB)):
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await _heartbeat(stub, md)
                    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                good = ClusterAuth(b"right", "default")
                md = good.sign_call("x", HB)
                resp = await _heartbeat(stub, md)
                assert resp.info.node_id == "srv"
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await _heartbeat(stub, md)  # same metadata again: a replay
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                # Admission with a proof from the wrong secret.
                cn = new_nonce()
                hello = await stub.Hello(
                    node_pb2.HelloRequest(node_id="x", cluster_name="default", nonce=cn), timeout=2
                )
                bad = ClusterAuth(b"wrong", "default").admit_proof(cn, hello.nonce, "x", "srv")
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.Admit(
                        node_pb2.AdmitRequest(
                            node_id="x", client_nonce=cn, server_nonce=hello.nonce, proof=bad
                        ),
                        timeout=2,
                    )
                assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
                # The server proved itself to the right secret only.
                assert good.check(good.hello_proof(cn, hello.nonce, "x", "srv"), hello.proof)
            assert node.snapshot().nodes[0].id == "srv"  # still serving, nothing admitted
            assert len(node.snapshot().nodes) == 1
        finally:
            await node.stop()

    _run(body)


def test_servicer_hook_and_authenticated_peer_channel() -> None:
    async def body() -> None:
        a = ClusterNode(_config("a", b"s"))
        a.add_servicer_hook(
            lambda server: node_pb2_grpc.add_WorkerServicer_to_server(_Worker(), server)
        )
        await a.start()
        b = ClusterNode(_config("b", b"s", peers=[f"127.0.0.1:{a.grpc_port}"]))
        await b.start()
        try:
            for _ in range(100):
                if b.channel("a") is not None and a.channel("b") is not None:
                    break
                await asyncio.sleep(0.05)
            ch = b.channel("a")
            assert ch is not None, "b never admitted a"
            assert a.master_id == b.master_id == "a"  # a started first
            assert b.master_api_url() == "http://127.0.0.1:1" and a.master_api_url() is None
            worker = node_pb2_grpc.WorkerStub(ch)
            call: Any = worker.LoadShard(node_pb2.LoadShardRequest(epoch=5), timeout=2)
            progress = [message async for message in call]
            assert [(message.epoch, message.finished) for message in progress] == [(5, True)]
            # Declared but unserved calls answer UNIMPLEMENTED (b registered no Worker).
            back = a.channel("b")
            assert back is not None
            with pytest.raises(grpc.aio.AioRpcError) as e:
                unserved: Any = node_pb2_grpc.WorkerStub(back).LoadShard(
                    node_pb2.LoadShardRequest(epoch=5), timeout=2
                )
                _ = [message async for message in unserved]
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        finally:
            await b.stop()
            await a.stop()

    _run(body)


@pytest.mark.parametrize(
    ("server", "client", "connects"),
    [
        ([b"old"], [b"new", b"old"], True),  # mid-rotation node calls one not yet rotated
        ([b"new", b"old"], [b"old"], True),
        ([b"new"], [b"new", b"old"], True),  # and one already done
        ([b"new", b"old"], [b"new"], True),
        ([b"new"], [b"old"], False),  # after the rotation, the old secret alone is refused
        ([b"old"], [b"new"], False),
        ([b"other"], [b"new", b"old"], False),
    ],
)
def test_tls_during_a_rotation(server: list[bytes], client: list[bytes], connects: bool) -> None:
    class _Membership(node_pb2_grpc.MembershipServicer):
        async def Heartbeat(self, request: Any, context: Any) -> node_pb2.HeartbeatResponse:
            return node_pb2.HeartbeatResponse(proof=b"ok")

    async def body() -> None:
        grpc_server = grpc.aio.server()
        node_pb2_grpc.add_MembershipServicer_to_server(_Membership(), grpc_server)
        tls = ClusterTLS("server", server, "default")
        port = grpc_server.add_secure_port("127.0.0.1:0", tls.server_credentials())
        await grpc_server.start()
        credentials = ClusterTLS("client", client, "default").channel_credentials()
        try:
            async with grpc.aio.secure_channel(
                f"127.0.0.1:{port}", credentials, options=CHANNEL_TLS_OPTIONS
            ) as channel:
                try:
                    await _heartbeat(node_pb2_grpc.MembershipStub(channel), None)
                    connected = True
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.UNAVAILABLE
                    connected = False
            assert connected == connects
        finally:
            await grpc_server.stop(0)

    _run(body)
