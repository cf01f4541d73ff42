"""API requests a member relays to the master, over the cluster's gRPC channel.

That channel is mutually authenticated and encrypted (cluster.tls), so a member's clients'
prompts, answers and API keys never cross the network as plain HTTP. The master answers a
relayed request by calling its own API on this machine, so the request meets the same
routes, API key check and telemetry as one sent to it directly.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp
import grpc
import grpc.aio

from ..proto import node_pb2, node_pb2_grpc
from ..types import RelayedResponse, RelayError

log = logging.getLogger(__name__)

# Headers of the master's answer a member passes on to its client.
RELAYED_RESPONSE_HEADERS = ("Content-Type", "Retry-After")


class ApiRelayService(node_pb2_grpc.ApiServicer):
    """The master's side: each relayed request becomes a call to its own API."""

    def __init__(self, local_api_url: Callable[[], str]) -> None:
        self._local_api_url = local_api_url
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            # The API may serve HTTPS with a certificate for other names; this is a call
            # to our own listener on this machine, nothing to verify.
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
                connector=aiohttp.TCPConnector(ssl=False),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def Relay(
        self, request: node_pb2.RelayRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[node_pb2.RelayChunk]:
        url = f"{self._local_api_url()}{request.path}"
        try:
            async with self._client().request(
                request.method, url, data=request.body, headers=dict(request.headers)
            ) as upstream:
                headers = {
                    name: upstream.headers[name]
                    for name in RELAYED_RESPONSE_HEADERS
                    if name in upstream.headers
                }
                yield node_pb2.RelayChunk(status=upstream.status, headers=headers)
                async for piece in upstream.content.iter_any():
                    yield node_pb2.RelayChunk(data=piece)
        except aiohttp.ClientError as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the master's own API: {error}")


def _relay_error(error: grpc.aio.AioRpcError) -> RelayError:
    return RelayError(f"{error.code().name}: {error.details()}")


async def relay(
    channel: grpc.aio.Channel,
    method: str,
    path: str,
    headers: Mapping[str, str],
    body: bytes,
) -> RelayedResponse:
    """Send an API request to the master on `channel`; its answer streams back."""
    call: Any = node_pb2_grpc.ApiStub(channel).Relay(
        node_pb2.RelayRequest(method=method, path=path, headers=dict(headers), body=body)
    )
    iterator = call.__aiter__()
    try:
        first: node_pb2.RelayChunk = await iterator.__anext__()
    except StopAsyncIteration:
        raise RelayError("the master ended the relay without an answer") from None
    except grpc.aio.AioRpcError as error:
        raise _relay_error(error) from error

    async def body_pieces() -> AsyncIterator[bytes]:
        try:
            if first.data:
                yield first.data
            async for chunk in iterator:
                yield chunk.data
        except grpc.aio.AioRpcError as error:
            raise _relay_error(error) from error
        finally:
            call.cancel()  # a client gone mid-answer cancels the master's work too

    return RelayedResponse(status=first.status, headers=dict(first.headers), body=body_pieces())
