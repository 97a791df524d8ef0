"""The client and the container write and read the same job index (two copies of one contract)."""

from datetime import datetime, timezone

import pytest

from client import jobs as client_index
from serve import jobs_index as container_index


@pytest.mark.parametrize("status", ["created", "inprogress", "succeed", "failed", "cancelled"])
def test_both_sides_agree_on_keys(status):
    created = datetime(2026, 11, 23, 17, 5, 9, 123000, tzinfo=timezone.utc)
    record = {"id": "3f2b6c1e-0000-4000-8000-000000000001", "task": "txt2img", "status": status,
              "created": "2026-11-23T17:05:09.123Z"}
    key = container_index.index_key(record)
    assert key == client_index.index_key(created, "txt2img", status, record["id"])
    theirs, ours = container_index.parse_index_key(key), client_index.parse_index_key(key)
    assert (theirs.job_id, theirs.status, theirs.task) == (ours.job_id, ours.status, ours.task)
    assert container_index.display_name(theirs) == ours.name == f"20261123170509-txt2img-{status}-{record['id']}"
