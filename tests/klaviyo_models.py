#!/usr/bin/env python3
"""Checks Klaviyo request bodies against the models of Klaviyo's official Python SDK
(PyPI `klaviyo-api`, which bundles the `openapi_client` package; revision 2026-10-15).

Reads JSON lines `{"path": "/api/events", "body": {...}}` on stdin and prints one JSON
line per input line, in order: `{"ok": true}` or `{"ok": false, "error": "..."}`.

- `/api/events`                 -> EventCreateQueryV2
- `/api/event-bulk-create-jobs` -> EventsBulkCreateJob
- `/api/profile-import`         -> ProfileUpsertQuery
- `/api/profile-bulk-import-jobs` -> ProfileImportJobCreateQuery
- `/api/profile-subscription-bulk-create-jobs` -> SubscriptionCreateJobCreateQuery
- `/api/profile-subscription-bulk-delete-jobs` -> SubscriptionDeleteJobCreateQuery
- `/api/profile-suppression-bulk-create-jobs` -> SuppressionCreateJobCreateQuery
- `/api/profile-suppression-bulk-delete-jobs` -> SuppressionDeleteJobCreateQuery
- `POST /api/lists/{id}/relationships/profiles` -> ListMembersAddQuery
- `DELETE /api/lists/{id}/relationships/profiles` -> ListMembersDeleteQuery
- `/api/data-privacy-deletion-jobs` -> DataPrivacyCreateDeletionJobQuery

`Model.from_dict(body)` raises on a body of the wrong shape (missing or mistyped fields,
wrong `type` discriminators). The generated models ignore keys they do not know, so the
body is also compared with `from_dict(body).to_dict()`: a key of the body that is not in
the round trip would be dropped by the SDK (a misspelt or misplaced field) and is an error.

Used by tests/klaviyo.rs through the venv `scripts/test` creates (target/klaviyo-venv).
"""
import json
import sys

from openapi_client.models.event_create_query_v2 import EventCreateQueryV2
from openapi_client.models.events_bulk_create_job import EventsBulkCreateJob
from openapi_client.models.profile_upsert_query import ProfileUpsertQuery
from openapi_client.models.profile_import_job_create_query import ProfileImportJobCreateQuery
from openapi_client.models.subscription_create_job_create_query import (
    SubscriptionCreateJobCreateQuery,
)
from openapi_client.models.subscription_delete_job_create_query import (
    SubscriptionDeleteJobCreateQuery,
)
from openapi_client.models.suppression_create_job_create_query import (
    SuppressionCreateJobCreateQuery,
)
from openapi_client.models.suppression_delete_job_create_query import (
    SuppressionDeleteJobCreateQuery,
)
from openapi_client.models.list_members_add_query import ListMembersAddQuery
from openapi_client.models.list_members_delete_query import ListMembersDeleteQuery
from openapi_client.models.data_privacy_create_deletion_job_query import (
    DataPrivacyCreateDeletionJobQuery,
)

MODELS = {
    "/api/events": EventCreateQueryV2,
    "/api/event-bulk-create-jobs": EventsBulkCreateJob,
    "/api/profile-import": ProfileUpsertQuery,
    "/api/profile-bulk-import-jobs": ProfileImportJobCreateQuery,
    "/api/profile-subscription-bulk-create-jobs": SubscriptionCreateJobCreateQuery,
    "/api/profile-subscription-bulk-delete-jobs": SubscriptionDeleteJobCreateQuery,
    "/api/profile-suppression-bulk-create-jobs": SuppressionCreateJobCreateQuery,
    "/api/profile-suppression-bulk-delete-jobs": SuppressionDeleteJobCreateQuery,
    "POST /api/lists/{id}/relationships/profiles": ListMembersAddQuery,
    "DELETE /api/lists/{id}/relationships/profiles": ListMembersDeleteQuery,
    "/api/data-privacy-deletion-jobs": DataPrivacyCreateDeletionJobQuery,
}


def dropped(body, round_trip, where="$"):
    """Paths of keys in `body` that are missing from `round_trip`."""
    missing = []
    if isinstance(body, dict) and isinstance(round_trip, dict):
        for key, value in body.items():
            if key not in round_trip:
                # to_dict() leaves out None values; a null sent is not a dropped field.
                if value is not None:
                    missing.append("%s.%s" % (where, key))
            else:
                missing.extend(dropped(value, round_trip[key], "%s.%s" % (where, key)))
    elif isinstance(body, list) and isinstance(round_trip, list):
        if len(body) != len(round_trip):
            missing.append("%s (list of %d became %d)" % (where, len(body), len(round_trip)))
        for i, (a, b) in enumerate(zip(body, round_trip)):
            missing.extend(dropped(a, b, "%s[%d]" % (where, i)))
    return missing


def check(line):
    request = json.loads(line)
    path = request.get("path", "").rstrip("/")
    model = MODELS.get(path)
    if model is None:
        return "no model for path %r" % request.get("path")
    body = request.get("body")
    if not isinstance(body, dict):
        return "body is not a JSON object: %r" % (body,)
    parsed = model.from_dict(body)
    if parsed is None:
        return "%s.from_dict returned None" % model.__name__
    lost = dropped(body, parsed.to_dict())
    if lost:
        return "%s ignores these keys of the body: %s" % (model.__name__, ", ".join(lost))
    return None


def main():
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            error = check(line)
        except Exception as e:  # the models raise pydantic.ValidationError, KeyError, ...
            error = "%s: %s" % (type(e).__name__, e)
        answer = {"ok": True} if error is None else {"ok": False, "error": error}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
