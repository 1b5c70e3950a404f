"""The OpenAI-compatible HTTP service (stage 5, an entry point).

Owns the protocol (`openai_api`: parsing and response shapes) and the Ray Serve application
(`app`: `build_app`, `run_server`); batching is the engine's (continuous, in the GPU worker). May import every stage below it;
never jobs or the CLI. `serve run endor_ray.serve:build_app store=...` finds `build_app` here.
"""


def __getattr__(name: str):
    # Lazy: importing endor_ray.serve.openai_api must not import Ray Serve.
    if name in ("build_app", "run_server", "ServeConfig", "APP_ARGS"):
        from endor_ray.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'endor_ray.serve' has no attribute {name!r}")
