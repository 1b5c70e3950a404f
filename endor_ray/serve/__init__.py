"""The OpenAI-compatible HTTP service (stage 5, an entry point).

Owns the protocol (`openai_api`: parsing and response shapes) and the Ray Serve application
(`app`: `build_app`, `run_server`); batching is the engine's (continuous, in the GPU worker). May import every stage below it;
never jobs or the CLI. `serve run endor_ray.serve:build_app store=...` finds `build_app` here, and
`ENDOR_STORE=... serve build endor_ray.serve:application` the Application `serve build` needs.
"""


def __getattr__(name: str):
    # Lazy: importing endor_ray.serve.openai_api must not import Ray Serve.
    if name in ("build_app", "run_server", "ServeConfig", "APP_ARGS"):
        from endor_ray.serve import app

        return getattr(app, name)
    if name == "application":  # for `serve build endor_ray.serve:application` (arguments from ENDOR_* variables)
        from endor_ray.serve.app import app_from_environment

        return app_from_environment()
    raise AttributeError(f"module 'endor_ray.serve' has no attribute {name!r}")
