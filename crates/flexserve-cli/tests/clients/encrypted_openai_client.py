"""Talks to `flexserve client` (the local endpoint that forwards through encrypted sessions) with the
real `openai` package, as its users do.

    python3 encrypted_openai_client.py BASE_URL MODEL PROMPT MAX_TOKENS

Prints one JSON object: the greedy chat, whole and streamed.
"""

import json
import sys

import openai


def main():
    base, model, prompt, max_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    # The local endpoint needs no key (it listens on loopback); the daemon's key is flexserve client's.
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": prompt}]
    out = {}

    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
    out["chat"] = {
        "text": chat.choices[0].message.content,
        "finish_reason": chat.choices[0].finish_reason,
        "usage": chat.usage.model_dump(),
        "object": chat.object,
    }

    pieces, finish = [], None
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True
    )
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    out["chat_stream"] = {"text": "".join(pieces), "finish_reason": finish, "chunks": len(pieces)}
    out["models"] = [m.id for m in client.models.list().data]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
