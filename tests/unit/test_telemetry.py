"""Request records, the access line, metrics exposition and the dashboard's JSON."""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from exo_tools.api.dashboard import dashboard_body
from exo_tools.api.telemetry import Telemetry, access_line
from exo_tools.serving.telemetry import RequestRecord, current_record, recording


def _record(route: str = "/v1/chat/completions", api: str = "chat.completions") -> RequestRecord:
    return RequestRecord(request_id="req-1", method="POST", route=route, api=api)


def test_a_record_times_its_tokens() -> None:
    record = _record()
    for _ in range(4):
        record.token()
    assert record.completion_tokens == 4
    assert record.first_token_s is not None and record.first_token_s >= 0
    assert len(record.token_gaps) == 3  # one gap between each two tokens
    assert record.decode_s >= sum(record.token_gaps) - 1e-9


def test_the_current_record_follows_the_block() -> None:
    record = _record()
    assert current_record() is None
    with recording(record):
        assert current_record() is record
    assert current_record() is None


def test_access_lines_say_what_each_request_did() -> None:
    record = _record()
    record.model, record.prompt_tokens, record.cached_tokens = "m", 12, 8
    record.token()
    record.finish_reason = "stop"
    record.finish(200)
    line = access_line(record)
    assert line.startswith("POST /v1/chat/completions 200 id=req-1 duration=")
    assert "prompt_tokens=12 cached_tokens=8 completion_tokens=1" in line and "finish=stop" in line
    relayed = _record()
    relayed.forwarded_to = "http://10.0.0.2:52415"
    relayed.finish(503)
    assert access_line(relayed).endswith("forwarded_to=http://10.0.0.2:52415")
    assert "prompt_tokens" not in access_line(relayed)


def _samples(telemetry: Telemetry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = telemetry.exposition().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_count_requests_and_read_the_engine_at_scrape_time() -> None:
    health: dict[str, Any] = {
        "node_id": "n1",
        "ready": True,
        "scheduler": {"running": 2, "queued": 1, "batch_rows": {"1": 3, "4": 2}},
        "prefix_cache": {"prompt_tokens": 100, "cached_prompt_tokens": 60},
    }
    telemetry = Telemetry(lambda: health, lambda: None)
    record = _record()
    telemetry.begin(record)
    for _ in range(3):
        record.token()
    record.finish(200)
    telemetry.end(record, log_level=logging.DEBUG)
    samples = _samples(telemetry)
    labels = (("method", "POST"), ("route", "/v1/chat/completions"), ("status", "200"))
    assert samples[("exo_tools_requests_total", labels)] == 1
    api = (("api", "chat.completions"),)
    assert samples[("exo_tools_completion_tokens_total", api)] == 3
    assert samples[("exo_tools_inter_token_latency_seconds_count", api)] == 2
    assert samples[("exo_tools_requests_queued", ())] == 1
    assert samples[("exo_tools_prefix_cache_hit_tokens_total", ())] == 60
    # Batch sizes: exact counts become cumulative buckets (3 of 1 row, 2 of 4 rows).
    assert samples[("exo_tools_decode_batch_rows_bucket", (("le", "2.0"),))] == 3
    assert samples[("exo_tools_decode_batch_rows_bucket", (("le", "4.0"),))] == 5
    assert samples[("exo_tools_decode_batch_rows_sum", ())] == 11
    assert telemetry.recent[0]["completion_tokens"] == 3 and not telemetry.in_flight


def test_warnings_are_kept_for_the_page() -> None:
    telemetry = Telemetry(dict, lambda: None)
    logger = logging.getLogger("exo_tools.test_telemetry")
    logger.addHandler(telemetry.warnings)
    try:
        logger.info("not kept")
        logger.warning("refused peer %s", "x")
    finally:
        logger.removeHandler(telemetry.warnings)
    assert [entry["message"] for entry in telemetry.warnings.entries] == ["refused peer x"]


def test_a_member_that_does_not_answer_is_shown_unreachable() -> None:
    view = {
        "cluster": "c",
        "nodes": [
            {"id": "a", "addresses": ["10.0.0.1"], "api_port": 1, "healthy": True},
            {
                "id": "b",
                "addresses": ["10.0.0.2"],
                "api_port": 2,
                "healthy": True,
                "capabilities": {"memory_total": 8, "memory_available": 4},
            },
        ],
        "links": [],
        "placement": None,
    }
    local = {"node_id": "a", "master": "a", "system_memory": {"total": 16, "available": 9}}
    body = dashboard_body(
        local=local, view=view, member_statuses={"b": "timed out"}, recent=[], running=[]
    )
    first, second = body["nodes"]
    assert first["master"] and first["memory"]["available"] == 9
    assert second["unreachable"] == "timed out" and second["memory"] == {"total": 8, "available": 4}
