"""An OpenAI client against `endor serve`: a chat answer streamed token by token, then several
completions sent at once (they share passes over the weights).

    endor serve stores/smollm2-135m-q4_1 &           # in one terminal, or in the background
    python examples/openai_client.py [--base-url http://127.0.0.1:8000/v1] [--wait 120]

--wait waits that many seconds for the server to come up (Ray and Serve take 10-30 s to start).
"""

import argparse
import concurrent.futures
import json
import sys
import time
import urllib.error
import urllib.request

from openai import OpenAI


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--wait", type=float, default=0, help="seconds to wait for the server to answer")
    args = parser.parse_args()
    health_url = args.base_url.rsplit("/v1", 1)[0] + "/health"
    deadline = time.monotonic() + args.wait
    while True:
        try:
            urllib.request.urlopen(health_url, timeout=10).close()
            break
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            if time.monotonic() >= deadline:
                print(f"no endor server answers at {health_url} ({exc}); start one with `endor serve STORE`",
                      file=sys.stderr)
                return 1
            time.sleep(1)
    client = OpenAI(base_url=args.base_url, api_key="not-needed", timeout=300, max_retries=0)
    model = client.models.list().data[0].id
    print(f"model: {model}\n")

    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=40, temperature=0, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print("\n")

    prompts = ["The sea is", "Once upon a time", "The best way to learn is", "In the morning I"]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        answers = pool.map(lambda p: client.completions.create(model=model, prompt=p, max_tokens=16, temperature=0),
                           prompts)
        for prompt, answer in zip(prompts, answers):
            print(f"{prompt}{answer.choices[0].text!r}  ({answer.usage.completion_tokens} tokens)")

    with urllib.request.urlopen(health_url, timeout=30) as response:
        print("\nbatching:", json.dumps(json.load(response)["batching"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
