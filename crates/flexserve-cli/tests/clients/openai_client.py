"""Talks to `flexserve serve` with the real `openai` client, as its users do.

    python3 openai_client.py BASE_URL API_KEY MODEL

Prints one JSON object: what each call returned, for the Rust test to check
against `flexserve generate`.
"""

import json
import sys

import openai


def main():
    base, key, model = sys.argv[1], sys.argv[2], sys.argv[3]
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)
    out = {}

    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0,
    )
    out["chat"] = {
        "text": chat.choices[0].message.content,
        "finish_reason": chat.choices[0].finish_reason,
        "usage": chat.usage.model_dump(),
        "object": chat.object,
    }

    pieces, finish, usage = [], None, None
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    out["chat_stream"] = {"text": "".join(pieces), "finish_reason": finish, "usage": usage, "chunks": len(pieces)}

    completion = client.completions.create(model=model, prompt="The capital of France is", max_tokens=16, temperature=0)
    out["completion"] = {
        "text": completion.choices[0].text,
        "finish_reason": completion.choices[0].finish_reason,
        "usage": completion.usage.model_dump(),
    }

    pieces = []
    for chunk in client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=16, temperature=0, stream=True
    ):
        pieces.extend(c.text for c in chunk.choices if c.text)
    out["completion_stream"] = {"text": "".join(pieces)}

    out["models"] = [m.id for m in client.models.list().data]

    try:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
        out["unknown_model"] = "accepted"
    except openai.NotFoundError as e:
        out["unknown_model"] = {"status": e.status_code, "message": e.message}

    try:
        openai.OpenAI(base_url=f"{base}/v1", api_key="wrong-" + key, max_retries=0).models.list()
        out["wrong_key"] = "accepted"
    except openai.AuthenticationError as e:
        out["wrong_key"] = {"status": e.status_code}

    print(json.dumps(out))


if __name__ == "__main__":
    main()
