"""Stored Responses API responses, for `previous_response_id` and `GET`/`DELETE
/v1/responses/{id}`: bounded and in memory, on the node that answered (the master).

A restart, or a new master, starts empty; past `capacity` the least recently used
response is dropped, and a request continuing it gets a 400 naming the id.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

DEFAULT_CAPACITY = 1024


@dataclass(frozen=True)
class StoredResponse:
    body: dict[str, Any]  # the response object, as `GET /v1/responses/{id}` returns it
    # The conversation a continuation starts from: every input item this response saw
    # (its predecessors' included, instructions not) and then its output items, as JSON.
    items: tuple[dict[str, Any], ...]


class ResponseStore:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self._responses: OrderedDict[str, StoredResponse] = OrderedDict()

    def put(self, response: StoredResponse) -> None:
        response_id = str(response.body["id"])
        self._responses[response_id] = response
        self._responses.move_to_end(response_id)
        while len(self._responses) > self.capacity:
            self._responses.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        found = self._responses.get(response_id)
        if found is not None:
            self._responses.move_to_end(response_id)
        return found

    def delete(self, response_id: str) -> bool:
        return self._responses.pop(response_id, None) is not None
