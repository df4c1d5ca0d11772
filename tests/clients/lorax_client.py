"""Drive the unmodified lorax-client against a server; print a JSON summary of what it did.

Run under .venv-lorax-client (see tests/clients/__init__.py), not under .venv:
`python lorax_client.py SCENARIO URL PROMPT`. Responses are the client's own types dumped as
JSON; an expected error is {"raised": "module.Class", "message": str(error)}, or
{"raised": null} when the call succeeded.
"""
import asyncio
import json
import sys

import lorax


def dump(response):
    return response.model_dump(mode="json")


def error(exc):
    return {"raised": f"{type(exc).__module__}.{type(exc).__name__}", "message": str(exc)}


def raised(call):
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - reported, the test decides
        return error(exc)
    return {"raised": None}


async def raised_async(awaitable):
    try:
        await awaitable
    except Exception as exc:  # noqa: BLE001 - reported, the test decides
        return error(exc)
    return {"raised": None}


async def async_generate(url, prompt):
    client = lorax.AsyncClient(url)
    response = await client.generate(prompt, adapter_id="me/a", max_new_tokens=3, details=True,
                                     decoder_input_details=True, return_k_alternatives=2)
    stream = [r async for r in client.generate_stream(prompt, details=True, seed=3,
                                                      do_sample=True)]
    return {"response": dump(response), "stream": [dump(r) for r in stream],
            "too_many_tokens": await raised_async(client.generate(prompt, max_new_tokens=1000))}


async def async_errors(url, prompt):
    client = lorax.AsyncClient(url)
    streamed = []

    async def stream():
        async for r in client.generate_stream(prompt):
            streamed.append(r.token.text)

    return {"generate": await raised_async(client.generate(prompt)),
            "stream": await raised_async(stream()), "streamed": streamed}


def sync_generate(url, prompt):
    client = lorax.Client(url)
    response = client.generate(prompt, details=True, best_of=2, do_sample=True)
    stream = list(client.generate_stream(prompt, details=True))
    return {"response": dump(response), "stream": [dump(r) for r in stream],
            "too_many_stops": raised(lambda: client.generate(prompt,
                                                             stop_sequences=["a", "b", "c"]))}


def chat(url, prompt):
    client = lorax.Client(url, timeout=60)
    response = client.generate(prompt, max_new_tokens=20, details=True)
    stream = client.generate_stream(prompt, max_new_tokens=20)
    return {"response": dump(response), "stream": [dump(r) for r in stream]}


def structured(url, schema):
    """`prompt` is a JSON schema here: the client's own ResponseFormat, and a watermark."""
    client = lorax.Client(url, timeout=120)
    response = client.generate("Describe a person as JSON:", max_new_tokens=120,
                               response_format={"type": "json_object",
                                                "schema": json.loads(schema)})
    watermarked = client.generate("Once upon a time", max_new_tokens=8, watermark=True,
                                  details=True)
    return {"json": dump(response), "watermarked": dump(watermarked)}


SCENARIOS = {f.__name__: f for f in (async_generate, async_errors, sync_generate, chat,
                                     structured)}

if __name__ == "__main__":
    scenario, url, prompt = sys.argv[1:]
    summary = SCENARIOS[scenario](url, prompt)
    if asyncio.iscoroutine(summary):
        summary = asyncio.run(summary)
    print(json.dumps(summary))
