"""Asks `flexserve serve` for embeddings with the real `openai` client.

    python3 openai_embeddings.py BASE_URL API_KEY MODEL TEXT...

Prints one JSON object: the vectors as the client decoded them from its
default request (base64) and from `encoding_format="float"`, the usage, and
the status of a request the server must refuse.
"""

import json
import sys

import openai


def main():
    base, key, model, texts = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)
    out = {}

    default = client.embeddings.create(model=model, input=texts)
    out["default"] = [d.embedding for d in sorted(default.data, key=lambda d: d.index)]
    out["usage"] = default.usage.model_dump()
    out["object"] = default.object

    floats = client.embeddings.create(model=model, input=texts[0], encoding_format="float")
    out["float"] = floats.data[0].embedding

    try:
        client.embeddings.create(model=model, input=texts[0], dimensions=7)
        out["bad_dimensions"] = {"status": 200}
    except openai.APIStatusError as e:
        out["bad_dimensions"] = {"status": e.status_code, "message": str(e)}

    print(json.dumps(out))


if __name__ == "__main__":
    main()
