"""The `endor` command: convert, inspect and export compressed model stores.

    endor convert SRC DST [--sparsity 0.5] [--method wanda|sparsegpt|magnitude] [--values raw|int8|int4|keep]
                          [--group-size 128] [--bytes-per-weight B] [--format endor|dense]
                          [--dtype float16|bfloat16|float32] [--calib-text FILE] [--force]
    endor inspect STORE [--json]
    endor export STORE OUT [--force]
    endor generate STORE --prompt TEXT [--prompt TEXT ...] [--max-new-tokens N] [--temperature T]
                   [--top-p P] [--seed S] [--stop S] [--chat] [--json] [--in-process] [engine, scheduler
                   and cluster options: --gpu-memory SIZE --prefetch-depth D --max-num-seqs N --address ADDR ...]

`endor generate` runs on Ray: shard servers hold the layers, a GPU worker streams them. Without
--address a local single-node Ray is started and stopped; --in-process skips Ray altogether.
    endor verify STORE --prompt TEXT [--max-new-tokens N]   (exit 0 iff identical to transformers)
    endor serve STORE [--host 127.0.0.1] [--port 8000] [--address ADDR]   (OpenAI-compatible API)

The engine, scheduler and cluster options are the same flags in every command (and in the batch
job): `endor_ray.utils.options` declares them once, named for the config fields they set.

SRC is a local Hugging Face checkpoint directory, a GGUF file or ``smollm2-135m`` (the embedded
default model, a Q4_1 GGUF). A GGUF keeps its own blocks unless --sparsity, --values or
--bytes-per-weight asks to re-compress it. STORE is a local path or a pyarrow.fs URI (file://, s3://, gs://, hdfs://). Errors caused
by input print one line and exit 1; Ctrl-C exits 130 and leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from endor_ray.compress.default_model import DEFAULT_MODEL_NAME
from endor_ray.errors import ConfigError, EndorError
from endor_ray.format.quant import DEFAULT_GROUP_SIZE
from endor_ray.format.tensor import DEFAULT_BLOCK_SIZE, DTYPES
from endor_ray.utils.units import human_bytes


def cmd_convert(args: argparse.Namespace) -> None:
    from endor_ray.compress.convert import KEEP, ConvertConfig, convert
    from endor_ray.compress.default_model import is_gguf

    values = args.values
    if values is None:  # a GGUF keeps its own blocks unless a flag asks to re-compress it
        compressing = args.sparsity is not None or args.bytes_per_weight is not None
        values = KEEP if is_gguf(args.src) and not compressing else "raw"
    config = ConvertConfig(
        sparsity=args.sparsity, method=args.method, store_format=args.format, dtype=args.dtype,
        values=values, group_size=args.group_size, bytes_per_weight=args.bytes_per_weight,
        block_size=args.block_size, calib_text=args.calib_text, calib_samples=args.calib_samples,
        calib_seq_len=args.calib_seq_len, seed=args.seed, force=args.force,
    )
    destination = convert(args.src, args.dst, config, progress=not args.quiet)
    if not args.quiet:
        print(f"wrote {destination}")
        print_summary(_open_store(str(destination)).summary(), per_layer=False)


def _open_store(location: str):
    from endor_ray.store.store import Store

    return Store(location)


def print_summary(summary: dict, per_layer: bool = True, per_tensor: bool = False) -> None:
    compression = summary["compression"]
    print(f"store   {summary['store']}")
    print(f"model   {summary['model_type']}, {len(summary['layers'])} layers, {summary['dtype']}")
    values = compression.get("values", "raw")
    mixed = compression.get("bytes_per_weight") is not None
    if compression["method"] == "gguf":
        print(f"values  {values}: the GGUF file's own blocks, kept as they are, format {compression['format']}")
    elif mixed:
        print(f"pruning {compression['method']}, mixed precision per tensor within {compression['bytes_per_weight']} "
              f"bytes per weight, format {compression['format']}, block size {compression['block_size']}")
    else:
        shown = summary["dtype"] if values == "raw" else f"{values} (groups of {compression['group_size']})"
        print(f"pruning {compression['method']} to {compression['sparsity']:.0%}, values {shown}, "
              f"format {compression['format']}, block size {compression['block_size']}")
    if per_tensor:
        print(f"{'layer':>5} {'tensor':<26} {'sparsity':>9} {'values':>9} {'bytes':>11} {'B/weight':>9}")
        for layer in summary["layers"]:
            for tensor in layer["tensors"] + [{**t, "name": f"expert 0 {t['name']}"} for t in layer.get("expert_tensors", [])]:
                print(f"{layer['layer']:>5} {tensor['name']:<26} {tensor['sparsity']:>9.1%} {tensor['values']:>9} "
                      f"{human_bytes(tensor['nbytes']):>11} {tensor['bytes_per_weight']:>9.3f}")
    elif per_layer:
        # A mixed store also shows each tensor's setting, compactly: "q 30/8" is q_proj at 30% with INT8 values.
        print(f"{'layer':>5} {'sparsity':>9} {'bytes':>12} {'dense':>12} {'ratio':>7}" + ("  settings" if mixed else ""))
        for layer in summary["layers"]:
            settings = "  " + " ".join(_short_setting(tensor) for tensor in layer["tensors"]) if mixed else ""
            if layer.get("experts"):  # an MoE layer: its bytes include its experts' files
                per_expert = sum(layer["expert_nbytes"]) / layer["experts"]
                settings += f"  {layer['experts']} experts, {human_bytes(per_expert)} each"
            print(f"{layer['layer']:>5} {layer['sparsity']:>9.2%} {human_bytes(layer['nbytes']):>12} "
                  f"{human_bytes(layer['dense_nbytes']):>12} {layer['ratio']:>7.3f}{settings}")
    print(f"layers  sparsity {summary['layers_sparsity']:.2%}, {human_bytes(summary['layers_nbytes'])} of "
          f"{human_bytes(summary['layers_dense_nbytes'])} dense (ratio {summary['layers_ratio']:.4f}, "
          f"{summary['layers_bytes_per_weight']:.3f} bytes per weight)")
    print(f"total   {human_bytes(summary['total_nbytes'])} with the dense non-layer weights "
          f"(ratio {summary['total_ratio']:.4f})")


def _short_setting(tensor: dict) -> str:
    """'q 30/8' for self_attn.q_proj.weight at 30% sparsity with INT8 values (16: the raw dtype;
    a GGUF block type by its name: 'down 0/q4_1')."""
    name = tensor["name"].removesuffix(".weight").split(".")[-1].removesuffix("_proj")
    bits = {"int8": "8", "int4": "4", "raw": "16"}.get(tensor["values"], tensor["values"])
    return f"{name} {round(tensor['sparsity'] * 100)}/{bits}"


def cmd_inspect(args: argparse.Namespace) -> int:
    store = _open_store(args.store)
    summary = store.summary()
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print_summary(summary, per_tensor=args.tensors)
    if not args.verify:
        return 0
    from endor_ray.store.audit import audit

    problems = audit(store, progress=not args.json)
    for problem in problems:
        print(f"endor inspect: error: {problem}", file=sys.stderr)
    if not args.json:
        print("verify: every file, checksum, name and shape checks out" if not problems
              else f"verify: {len(problems)} problem(s)")
    return 1 if problems else 0


def cmd_export(args: argparse.Namespace) -> None:
    from endor_ray.store.export import export_checkpoint

    out = export_checkpoint(_open_store(args.store), args.out, force=args.force, progress=not args.quiet)
    if not args.quiet:
        print(f"wrote {out}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")


def _sections(*names: str) -> dict:
    """The default configs of a command's nested settings (`endor_ray.utils.options`), by section name."""
    from endor_ray.engine.config import EngineConfig
    from endor_ray.engine.scheduler import SchedulerConfig
    from endor_ray.service.driver import ClusterConfig

    made = {"engine": EngineConfig, "scheduler": SchedulerConfig, "cluster": ClusterConfig}
    return {name: made[name]() for name in names}


def _check_prompts(args: argparse.Namespace, store) -> tuple[list[list[int]], object]:
    """The prompts' token ids (chat-templated with --chat), checked before any engine or cluster starts
    by the engine's own check (`check_prompt`, against the context it uses), and the tokenizer that made
    them (an in-process engine reuses it: a second load costs ~0.2 s of start-up); the engine is sent
    these ids and tokenizes nothing again."""
    from endor_ray.engine.engine import load_tokenizer
    from endor_ray.engine.prompts import PromptTooLong, check_prompt, context_limit

    if not args.prompt:
        raise ConfigError("give at least one --prompt")
    if any(not prompt.strip() for prompt in args.prompt):
        raise ConfigError("every --prompt must have some text")
    if args.max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be a positive integer, got {args.max_new_tokens}")
    tokenizer = load_tokenizer(store)
    context = context_limit(store.config)
    checked = []
    for index, prompt in enumerate(_prompts(args, tokenizer)):
        try:
            checked.append(check_prompt(tokenizer, prompt, args.max_new_tokens, context))
        except PromptTooLong as exc:
            raise ConfigError(f"prompt {index} has {exc.prompt_tokens} tokens; with max_new_tokens={exc.max_new_tokens} "
                              f"it exceeds the model's context of {exc.max_context} tokens; shorten it or lower "
                              "--max-new-tokens") from None
    return checked, tokenizer


def _engine(args: argparse.Namespace, store, tokenizer):
    from endor_ray.engine.engine import Engine

    return Engine(store, args.engine, progress=not getattr(args, "json", False), scheduler=args.scheduler,
                  tokenizer=tokenizer)


def _prompts(args: argparse.Namespace, tokenizer) -> list[str]:
    if not args.chat:
        return args.prompt
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("this store's tokenizer has no chat template; drop --chat")
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in args.prompt]


def cmd_generate(args: argparse.Namespace) -> None:
    from endor_ray.engine.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed, stop=tuple(args.stop))
    if not args.prompt:  # before the (slow) start
        raise ConfigError("give at least one --prompt")
    single = len(args.prompt) == 1 and not args.json
    events = _generate_in_process(args, params) if args.in_process else _generate_on_ray(args, params)
    result, echoed = None, False
    for event in events:
        if single and not echoed:  # once generation runs: a start-up error prints alone
            print(args.prompt[0], end="\n" if args.chat else "", flush=True)
            echoed = True
        if "completions" in event:
            result = event
        elif single and "token_id" in event:  # (the other events: a sequence's completion, the result)
            print(event["text"], end="", flush=True)
    if args.json:
        for user, completion in zip(args.prompt, result["completions"]):
            completion["prompt"] = user
        print(json.dumps(result, indent=1))
        return
    if single:
        print()
    else:
        for index, (user, completion) in enumerate(zip(args.prompt, result["completions"])):
            print(f"[{index}] {user}{completion['text']}")
    print_stats(result["stats"], file=sys.stderr)


def _generate_in_process(args: argparse.Namespace, params) -> Iterator[dict]:
    """Token events, then the result dict, from an engine in this process."""
    store = _open_store(args.store)
    prompt_ids, tokenizer = _check_prompts(args, store)  # before the (slow) engine start
    with _engine(args, store, tokenizer) as engine:
        yield from engine.stream_data(prompt_ids, params)


def _generate_on_ray(args: argparse.Namespace, params) -> Iterator[dict]:
    """The same events from the Ray service (a local single-node Ray unless --address is given)."""
    from endor_ray.service.driver import connect

    prompt_ids, _ = _check_prompts(args, _open_store(args.store))  # before Ray starts
    started = time.perf_counter()
    with connect(args.store, args.engine, args.cluster, scheduler=args.scheduler) as service:
        if service.started_ray and not args.json:
            print(f"(started a local Ray for this command: {time.perf_counter() - started:.0f} s with the service; "
                  "`ray start --head --node-ip-address=127.0.0.1` keeps one running for the next commands)",
                  file=sys.stderr)
        yield from service.stream(prompt_ids, params)


def print_stats(stats: dict, file=sys.stdout) -> None:
    hits = ", ".join(f"{tier} {count}" for tier, count in stats["tier_hits"].items())
    times = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in stats["time_s"].items())
    link = f", link {stats['link_GBps']:.1f} GB/s" if stats["link_GBps"] else ""
    print(f"-- {stats['new_tokens']} tokens for {stats['sequences']} sequences in {stats['wall_s']:.2f} s: "
          f"{stats['tokens_per_s']:.2f} tokens/s, {stats['s_per_pass']:.3f} s per pass over the weights", file=file)
    print(f"-- {human_bytes(stats['bytes_to_device_per_pass'])} streamed per pass{link}; time: {times}", file=file)
    print(f"-- layer hits per tier: {hits}", file=file)


def cmd_verify(args: argparse.Namespace) -> int:
    from endor_ray.engine.reference import reference_greedy
    from endor_ray.engine.sampling import SamplingParams

    store = _open_store(args.store)
    prompt_ids, tokenizer = _check_prompts(args, store)  # before the (slow) engine start
    with _engine(args, store, tokenizer) as engine:
        completions, _ = engine.generate(prompt_ids, SamplingParams(max_new_tokens=args.max_new_tokens))
        # transformers tokenizes the text itself: the reference shares nothing with the engine's path
        expected = reference_greedy(engine, _prompts(args, engine.tokenizer), args.max_new_tokens)
    identical = True
    for index, (completion, reference_ids) in enumerate(zip(completions, expected)):
        if completion.token_ids == reference_ids:
            print(f"[{index}] identical: {len(reference_ids)} tokens")
        else:
            identical = False
            print(f"[{index}] DIFFERENT\n  engine:       {completion.token_ids}\n  transformers: {reference_ids}")
    print("verify: token ids identical to transformers" if identical else "verify: MISMATCH")
    return 0 if identical else 1


def cmd_serve(args: argparse.Namespace) -> None:
    from endor_ray.serve.app import ServeConfig, run_server

    _open_store(args.store)  # a bad store fails here, before Ray and Serve start
    config = ServeConfig(store=args.store, model_name=args.model_name, api_key=args.api_key,
                         protect_health=args.protect_health, tool_call_syntax=args.tool_call_syntax,
                         engine=args.engine, scheduler=args.scheduler, cluster=args.cluster)
    run_server(config, args.host, args.port, allow_unauthenticated_cluster=args.allow_unauthenticated_cluster,
               header_timeout_s=args.header_timeout_s)


def _add_generation_arguments(parser: argparse.ArgumentParser, sections: dict) -> None:
    """The arguments of `generate` and `verify`: store, prompts, and the nested settings' flags."""
    parser.add_argument("store", help="store path or URI")
    parser.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    _add_sections(parser, sections)


def _add_sections(parser: argparse.ArgumentParser, sections: dict) -> None:
    from endor_ray.utils.options import add_options

    add_options(parser, sections)
    parser.set_defaults(sections=sections)  # main() maps the flags given onto these (args.engine, ...)


def build_parser() -> argparse.ArgumentParser:
    from endor_ray._version import __version__

    parser = argparse.ArgumentParser(prog="endor", description="Offloaded LLM inference with Endor sparse weights.")
    parser.add_argument("--version", action="version", version=f"endor-ray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.subcommands = sub.choices  # name -> its parser, for errors in the subcommand's words

    convert = sub.add_parser("convert", help="prune a checkpoint and write a compressed store")
    convert.add_argument("src", help=f"local HF checkpoint directory, GGUF file, or {DEFAULT_MODEL_NAME!r} (embedded)")
    convert.add_argument("dst", help="store directory to create")
    convert.add_argument("--sparsity", type=float, default=None,
                         help="fraction of each row pruned, in [0, 1) (default 0.5; a GGUF: 0, its blocks kept)")
    convert.add_argument("--method", default="wanda", help="wanda (default), sparsegpt (prunes and quantizes "
                         "jointly, altering kept weights) or magnitude")
    convert.add_argument("--values", default=None, help="kept values of Linear weights: raw (the stored dtype, "
                         "default), int8 or int4 (with one scale per --group-size kept values), or keep (a GGUF's "
                         "own blocks as they are: the default for a GGUF when --sparsity and --bytes-per-weight "
                         "are not given)")
    convert.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE, help="kept values per scale (128)")
    convert.add_argument("--bytes-per-weight", type=float, default=None,
                         help="mixed precision: choose each tensor's sparsity and values to fit this many bytes "
                              "per weight in every layer, with the least measured error (overrides --sparsity, "
                              "--values)")
    convert.add_argument("--format", default="endor", help="endor (bitmap-sparse, default) or dense (baseline)")
    convert.add_argument("--dtype", default=None, help=f"stored dtype: {', '.join(DTYPES)} (default: the checkpoint's)")
    convert.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="format block size")
    convert.add_argument("--calib-text", type=Path, default=None,
                         help="text file for Wanda calibration (default: text the model writes itself)")
    convert.add_argument("--calib-samples", type=int, default=None,
                         help="calibration sequences (default 16; 64 for sparsegpt)")
    convert.add_argument("--calib-seq-len", type=int, default=128, help="tokens per calibration sequence")
    convert.add_argument("--seed", type=int, default=0)
    convert.add_argument("--force", action="store_true", help="replace DST if it exists")
    convert.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    convert.set_defaults(func=cmd_convert)

    inspect = sub.add_parser("inspect", help="per-layer sparsity, bytes and compression ratio of a store")
    inspect.add_argument("store", help="store path or URI")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.add_argument("--tensors", action="store_true",
                         help="one row per tensor: sparsity, values and bytes")
    inspect.add_argument("--verify", action="store_true",
                         help="read every byte: checksums, block offsets, tokenizer, names and shapes (exit 1 on a problem)")
    inspect.set_defaults(func=cmd_inspect)

    export = sub.add_parser("export", help="write a store's dense pruned weights as an HF checkpoint")
    export.add_argument("store", help="store path or URI")
    export.add_argument("out", help="checkpoint directory to create")
    export.add_argument("--force", action="store_true", help="replace OUT if it exists")
    export.add_argument("--quiet", action="store_true", help="no progress bar")
    export.set_defaults(func=cmd_export)

    generate = sub.add_parser("generate", help="generate with layers streamed from a store")
    _add_generation_arguments(generate, _sections("engine", "scheduler", "cluster"))
    generate.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    generate.add_argument("--json", action="store_true", help="print one JSON object with completions and stats")
    generate.add_argument("--in-process", action="store_true",
                          help="run the engine in this process, without Ray (the cluster options do not apply)")
    generate.set_defaults(func=cmd_generate)

    verify = sub.add_parser("verify", help="check greedy tokens against plain transformers on the same weights")
    _add_generation_arguments(verify, _sections("engine", "scheduler"))
    verify.set_defaults(func=cmd_verify)

    serve = sub.add_parser("serve", help="serve an OpenAI-compatible API with Ray Serve")
    serve.add_argument("store", help="store path or URI (readable from every node)")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--header-timeout-s", type=float, default=None,
                       help="seconds a request's headers may take to arrive after connecting, else 408 and the "
                            "connection closes (default: endor_ray.serve.limits.HEADER_TIMEOUT_S, 10)")
    serve.add_argument("--model-name", default=None, help="model id clients use (default: the store's folder name)")
    serve.add_argument("--api-key", default=None,
                       help="clients must send 'Authorization: Bearer KEY' (default: $ENDOR_API_KEY, else open)")
    serve.add_argument("--protect-health", action="store_true", help="with an API key, /health and /metrics need it too")
    serve.add_argument("--tool-call-syntax", default="auto", choices=("auto", "hermes", "llama3_json"),
                       help="how the model writes tool calls (default: from its chat template)")
    serve.add_argument("--allow-unauthenticated-cluster", action="store_true",
                       help="serve on a cluster whose nodes listen beyond loopback although Ray's token auth is off "
                            "(anyone who reaches them can run code: only on a network nobody else can reach)")
    _add_sections(serve, _serve_sections())
    serve.set_defaults(func=cmd_serve)
    return parser


def _serve_sections() -> dict:
    """`endor serve`'s defaults are the Serve app's (ServeConfig: 32 sequences per pass, 1,024 waiting)."""
    from endor_ray.serve.config import ServeConfig
    from endor_ray.utils.options import sections_of

    return sections_of(ServeConfig)


WRITES_FILES = ("convert", "export")  # commands whose Ctrl-C message says nothing was half written


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the subcommand, with its usage (argparse would show the top-level one)
        parser.subcommands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        if hasattr(args, "sections"):
            from endor_ray.utils.options import configs_from

            vars(args).update(configs_from(vars(args), args.sections))  # args.engine, args.scheduler, args.cluster
        if hasattr(args, "cluster") and not getattr(args, "in_process", False):
            from endor_ray.service.ray_session import use_loopback_ray, use_token_if_present

            if args.cluster.address is None:
                use_loopback_ray()  # the local Ray this command starts stays on 127.0.0.1
            else:
                use_token_if_present()  # a cluster started with Ray's defaults wants a token
        code = args.func(args)
    except EndorError as exc:
        print(f"endor {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        written = " (stores and checkpoints are written whole or not at all)" if args.command in WRITES_FILES else ""
        print(f"endor {args.command}: interrupted{written}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `endor inspect STORE | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
