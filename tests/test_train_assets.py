import json

from vllm_hass.assets import complete_records


def test_truncated_json_array_keeps_complete_records():
    records = [{"id": i, "conversations": [{"from": "human", "value": "x, ] {" * i}]}
               for i in range(4)]
    text = json.dumps(records, indent=1)
    assert list(complete_records(text)) == records
    cut = text[: text.index('"id": 3') + 3]  # inside the last record
    assert list(complete_records(cut)) == records[:3]
    assert list(complete_records("[]")) == []
