"""An OpenAI client against `endor serve`: a chat answer streamed token by token, then several
completions sent at once (they share passes over the weights).

    endor serve stores/smollm2-135m-wanda50 --gpu-memory 10      # in one terminal
    python examples/openai_client.py [--base-url http://127.0.0.1:8000/v1]
"""

import argparse
import concurrent.futures
import json
import sys
import urllib.request

from openai import OpenAI


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    args = parser.parse_args()
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

    health_url = args.base_url.rsplit("/v1", 1)[0] + "/health"
    with urllib.request.urlopen(health_url, timeout=30) as response:
        print("\nbatching:", json.dumps(json.load(response)["batching"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
