"""Drives a cvm-agent's OpenAI-compatible API with the official `openai` client, unchanged:
only its base URL and the cluster's CA are configured. Prints one JSON object with what each
call returned; the Rust test compares it with the plain engine.

usage: openai_client.py BASE_URL CA_PEM MODEL CHAT_MESSAGE MAX_TOKENS COMPLETION_PROMPT API_KEY
"""

import json
import ssl
import sys

import openai


def main() -> None:
    base_url, ca, model, prompt, max_tokens, completion_prompt, api_key = sys.argv[1:8]
    max_tokens = int(max_tokens)
    client = openai.OpenAI(
        base_url=base_url,
        api_key=api_key,
        http_client=openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=ca)),
        max_retries=0,
        timeout=600,
    )
    out = {"models": [m.id for m in client.models.list().data]}
    messages = [{"role": "user", "content": prompt}]

    chat = client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0
    )
    out["chat"] = {
        "text": chat.choices[0].message.content,
        "finish_reason": chat.choices[0].finish_reason,
        "usage": chat.usage.model_dump(),
    }

    pieces, finish, usage = [], None, None
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    out["chat_stream"] = {"text": "".join(pieces), "chunks": len(pieces), "finish_reason": finish, "usage": usage}

    comp = client.completions.create(
        model=model, prompt=completion_prompt, max_tokens=max_tokens, temperature=0
    )
    out["completion"] = {"text": comp.choices[0].text, "finish_reason": comp.choices[0].finish_reason}
    pieces = [
        c.choices[0].text
        for c in client.completions.create(
            model=model, prompt=completion_prompt, max_tokens=max_tokens, temperature=0, stream=True
        )
        if c.choices
    ]
    out["completion_stream"] = {"text": "".join(pieces)}

    try:
        client.completions.create(model="no-such-model", prompt=prompt, max_tokens=1)
        out["wrong_model"] = None
    except openai.NotFoundError as e:
        out["wrong_model"] = {"status": e.status_code, "code": e.code}
    # Bad requests that carry a secret where a value is malformed: each is refused in the OpenAI
    # shape, and the Rust test checks that the secret reaches no log.
    bad = {}
    auth = {"Authorization": f"Bearer {api_key}"}
    with openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=ca)) as http:
        url = base_url + "/chat/completions"
        # Without a key, or with a wrong one: 401 in OpenAI's shape, before the body is read.
        for name, headers in [("no_key", {}), ("wrong_key", {"Authorization": "Bearer tk-hunter2-wrong"})]:
            r = http.post(url, json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
                          headers=headers)
            bad[name] = {"status": r.status_code, "code": r.json()["error"]["code"]}
        for name, body in [
            ("role", {"model": model, "messages": [{"role": "hunter2-SECRET-role", "content": "hi"}]}),
            ("json", {"model": model, "messages": [{"role": "user", "content": "hi"}],
                      "max_tokens": "hunter2-SECRET-json"}),
            ("model", {"model": "hunter2-SECRET-model", "messages": [{"role": "user", "content": "hi"}]}),
            ("part", {"model": model, "messages": [{"role": "user", "content": [
                {"type": "hunter2-SECRET-part", "text": "x"}]}]}),
        ]:
            r = http.post(url, json=body, headers=auth)
            bad[name] = {"status": r.status_code, "code": r.json()["error"]["code"]}
    out["bad"] = bad
    # The agent's Prometheus metrics, served beside the API (same certificate).
    metrics_url = base_url.rsplit("/v1", 1)[0] + "/metrics"
    with openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=ca)) as http:
        out["metrics"] = http.get(metrics_url).text
    print(json.dumps(out))


if __name__ == "__main__":
    main()
