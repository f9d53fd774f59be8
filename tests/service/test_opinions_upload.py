"""`POST /v1/groups/{gid}/opinions` with a file as the body (CSV, JSONL, Parquet) and a column mapping:
10,000 items in one request, all or nothing, errors naming the row and the source column."""

from __future__ import annotations

import csv
import io
import json

import pytest
from api_helpers import fixture_items

from service.api.protocol import MAX_ITEMS_PER_REQUEST

pytestmark = [pytest.mark.service]

MAPPING = "question_column=prompt&options_column=choices&target_column=dist&id_column=qid"


def survey_rows(n: int) -> list[dict]:
    """`n` distinct questions in a survey tool's own column names."""
    base = fixture_items("opinions_group_urban.jsonl")
    rows = []
    for i in range(n):
        item = base[i % len(base)]
        rows.append({"qid": f"q{i}", "prompt": f"{item['question']} (wave {i})", "choices": item["options"],
                     "dist": item["target"]})
    return rows


def as_csv(rows: list[dict]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    for r in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    return out.getvalue().encode()


def stored(client, auth, gid: str) -> int:
    r = client.get(f"/v1/groups/{gid}/opinions?view=own", headers=auth)
    assert r.status_code == 200, r.json
    return len(r.json["items"])


def test_ten_thousand_items_in_one_upload_all_or_nothing(client, auth):
    assert client.put("/v1/groups/panel", json={"members": []}, headers=auth).status_code in (200, 201)
    rows = survey_rows(MAX_ITEMS_PER_REQUEST)
    body = as_csv(rows)
    assert len(body) > client.application.config["MAX_CONTENT_LENGTH"]  # past the JSON body limit

    bad = [dict(r) for r in rows]
    bad[-1]["dist"] = [0.9] + [0.9] * (len(bad[-1]["choices"]) - 1)  # the last row does not sum to 1
    r = client.post(f"/v1/groups/panel/opinions?{MAPPING}", data=as_csv(bad),
                    headers={**auth, "Content-Type": "text/csv"})
    assert r.status_code == 422 and r.json["error"]["field"] == f"upload[{len(rows) - 1}].dist", r.json
    assert stored(client, auth, "panel") == 0  # nothing of the 9,999 good rows was written

    r = client.post(f"/v1/groups/panel/opinions?{MAPPING}", data=body, headers={**auth, "Content-Type": "text/csv"})
    assert r.status_code == 201, r.json
    assert r.json["stored"] == len(rows) == stored(client, auth, "panel")

    too_many = as_csv(survey_rows(MAX_ITEMS_PER_REQUEST + 1))
    r = client.post(f"/v1/groups/panel/opinions?{MAPPING}", data=too_many,
                    headers={**auth, "Content-Type": "text/csv"})
    assert r.status_code == 422 and r.json["error"]["field"] == "body", r.json


def test_jsonl_and_parquet_uploads_store_the_same_items_as_json(client, auth):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = survey_rows(12)
    parquet = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    jsonl = "".join(json.dumps(r) + "\n" for r in rows).encode()
    items = [{"id": r["qid"], "question": r["prompt"], "options": r["choices"], "target": r["dist"]} for r in rows]
    uploads = {"parquet": (parquet.getvalue(), "application/vnd.apache.parquet"),
               "jsonl": (jsonl, "application/x-ndjson")}
    for gid, (data, kind) in uploads.items():
        client.put(f"/v1/groups/{gid}", json={"members": []}, headers=auth)
        r = client.post(f"/v1/groups/{gid}/opinions?{MAPPING}", data=data, headers={**auth, "Content-Type": kind})
        assert r.status_code == 201, (gid, r.json)
    client.put("/v1/groups/as-json", json={"members": []}, headers=auth)
    r = client.post("/v1/groups/as-json/opinions", json={"items": items}, headers=auth)
    assert r.status_code == 201, r.json
    hashes = {gid: client.get(f"/v1/groups/{gid}/opinions", headers=auth).json["sample_hash"]
              for gid in ("parquet", "jsonl", "as-json")}
    assert len(set(hashes.values())) == 1, hashes

    r = client.post("/v1/groups/jsonl/opinions", data=as_csv(rows), headers={**auth, "Content-Type": "text/csv"})
    assert r.status_code == 422 and r.json["error"]["field"] == "question_column", r.json
    # Named as an HTTP client maps it (the query parameter), not as the command line does (--question-column).
    assert "?question_column=" in r.json["error"]["message"] and "--" not in r.json["error"]["message"], r.json
    r = client.post("/v1/groups/jsonl/opinions?question_column=prompt&options_column=choices", data=as_csv(rows),
                    headers={**auth, "Content-Type": "text/csv"})
    assert r.status_code == 422 and r.json["error"]["field"] == "target_column", r.json
    assert "?target_column=" in r.json["error"]["message"] and "?answer_column=" in r.json["error"]["message"]
    r = client.post(f"/v1/groups/jsonl/opinions?{MAPPING}&colour=red", data=as_csv(rows),
                    headers={**auth, "Content-Type": "text/csv"})
    assert r.status_code == 422 and r.json["error"]["field"] == "colour", r.json
