"""The official `openai` client against a running `worker serve`, for tests/tests/openai_client.rs.

usage: openai_client.py BASE_URL MODEL ALIAS  ->  exits 0 and prints "openai client: N checks
passed" when every check holds; otherwise an AssertionError (or the client's exception) says
which one failed.
"""
import sys

import openai

checks = 0


def check(cond, what):
    global checks
    assert cond, what
    checks += 1


def main():
    base, model, alias = sys.argv[1], sys.argv[2], sys.argv[3]
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120)

    ids = [m.id for m in client.models.list()]
    check(ids == [model, alias], f"models list {ids}")
    check(client.models.retrieve(alias).id == alias, "retrieve an alias")

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Tell me about distillation."},
    ]
    common = dict(model=model, messages=messages, max_tokens=24, temperature=0)

    # Chat, then the same request streamed: at temperature 0 the stream adds up to the answer.
    resp = client.chat.completions.create(**common)
    text = resp.choices[0].message.content
    check(resp.object == "chat.completion", resp.object)
    check(resp.choices[0].message.role == "assistant", "role")
    check(resp.choices[0].finish_reason in ("stop", "length"), resp.choices[0].finish_reason)
    check(isinstance(text, str) and len(text) > 0, f"content {text!r}")
    check(resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens, "usage")

    chunks = list(client.chat.completions.create(**common, stream=True, stream_options={"include_usage": True}))
    check(chunks[0].choices[0].delta.role == "assistant", "first chunk has the role")
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    check(streamed == text, f"stream {streamed!r} != {text!r}")
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    check(finishes == [resp.choices[0].finish_reason], f"finish reasons {finishes}")
    check(chunks[-1].choices == [] and chunks[-1].usage == resp.usage, "usage chunk")

    # An alias answers the same.
    same = client.chat.completions.create(**{**common, "model": alias})
    check(same.choices[0].message.content == text and same.model == alias, "alias")

    # Stop: a piece of the answer cuts it, streamed or not.
    stop = text[3:6]
    cut = client.chat.completions.create(**common, stop=[stop])
    before = text[: text.index(stop)]
    check(cut.choices[0].message.content == before, f"stop {cut.choices[0].message.content!r} != {before!r}")
    check(cut.choices[0].finish_reason == "stop", "stop finish reason")
    cut_stream = "".join(
        c.choices[0].delta.content or "" for c in client.chat.completions.create(**common, stop=stop, stream=True) if c.choices
    )
    check(cut_stream == before, f"streamed stop {cut_stream!r}")

    # Seeds: the same seed samples the same answer.
    sampled = dict(model=model, messages=messages, max_tokens=16, temperature=1.0, seed=1234)
    a = client.chat.completions.create(**sampled).choices[0].message.content
    b = client.chat.completions.create(**sampled).choices[0].message.content
    check(a == b, "same seed, same answer")

    # Logprobs, chat shape.
    lp = client.chat.completions.create(**common, logprobs=True, top_logprobs=2)
    content = lp.choices[0].logprobs.content
    check(len(content) > 0, "logprobs content")
    for t in content:
        check(t.logprob <= 0 and isinstance(t.token, str) and len(t.bytes) > 0, f"token logprob {t}")
        check(len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token, f"top logprobs {t.top_logprobs}")

    # Completions, plain and streamed, with legacy logprobs.
    c = client.completions.create(model=model, prompt="Once upon a time", max_tokens=10, temperature=0, logprobs=2)
    ctext = c.choices[0].text
    check(c.object == "text_completion", c.object)
    check(len(c.choices[0].logprobs.tokens) == len(c.choices[0].logprobs.token_logprobs), "legacy logprobs")
    check(all(len(d) >= 1 for d in c.choices[0].logprobs.top_logprobs), "legacy top logprobs")
    cs = "".join(
        ch.choices[0].text
        for ch in client.completions.create(model=model, prompt="Once upon a time", max_tokens=10, temperature=0, stream=True)
        if ch.choices
    )
    check(cs == ctext, f"completion stream {cs!r} != {ctext!r}")

    # Errors are the client's own exceptions.
    try:
        client.chat.completions.create(**common, n=2)
        check(False, "n=2 was accepted")
    except openai.BadRequestError as e:
        err = e.body.get("error", e.body) if isinstance(e.body, dict) else {}
        check(e.status_code == 400 and err.get("param") == "n", f"n=2: {e.body}")
    try:
        client.chat.completions.create(
            **common, tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
        )
        check(False, "tools were accepted")
    except openai.BadRequestError as e:
        check("tool" in str(e), str(e))
    try:
        client.chat.completions.create(**{**common, "model": "gpt-9"})
        check(False, "an unknown model was accepted")
    except openai.NotFoundError as e:
        check(e.status_code == 404, str(e))

    print(f"openai client: {checks} checks passed")


if __name__ == "__main__":
    main()
