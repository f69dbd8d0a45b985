"""The vLLM engine (GPU clusters): Ray Serve LLM's OpenAI app behind the same API-key check.

`ray.serve.llm` brings continuous batching, paged attention and its own OpenAI router; we
give it the pinned model (read from the store: vLLM loads ``s3://`` sources itself) and wrap
its FastAPI app with the ApiGate the transformers engine uses (API keys, the same body
checks and limits, model-version headers), so clients see one API whichever engine runs.
"""

from __future__ import annotations

from ray import serve
from ray.serve import Application

from ray_app.serving.config import ServeArgs, ServeConfigError, ServedModel
from ray_app.serving.gate import ApiGate
from ray_app.serving.metrics import RequestMetrics
from ray_app.settings import Settings


def build_vllm_app(args: ServeArgs, served: ServedModel, key_hashes: list[str], settings: Settings) -> Application:
    """Ray Serve LLM deployments for ``served`` with the API-key check in front."""
    try:
        from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
        from ray.llm._internal.serve.core.ingress.ingress import init as init_ingress_app
        from ray.serve.llm import LLMConfig, build_llm_deployment
        from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress
    except ImportError as exc:
        raise ServeConfigError(
            f"engine 'vllm' needs vLLM on the Serve nodes (pip install 'ray[llm]', CUDA GPUs): {exc}"
        ) from exc
    from ray_app.models import resolve_model

    # Local and default models are read by path; store and hub sources are handed to vLLM as they are.
    source = served.source if served.source.startswith("s3://") else str(resolve_model(served.source, settings))
    engine_kwargs = {"dtype": "bfloat16", **args.vllm_engine_kwargs}
    if args.max_context:
        engine_kwargs.setdefault("max_model_len", args.max_context)
    llm_config = LLMConfig(
        model_loading_config={"model_id": served.name, "model_source": source},
        # S3 credentials come from the nodes' environment (Secret/.env), never from the app config,
        # which the dashboard shows.
        engine_kwargs=engine_kwargs,
        deployment_config=args.vllm_deployment_config,
        **({"accelerator_type": args.vllm_accelerator_type} if args.vllm_accelerator_type else {}),
    )
    app = init_ingress_app()
    # The same front door as the transformers engine: keys, body checks and limits, error shape.
    app.add_middleware(
        ApiGate,
        key_hashes=key_hashes,
        version_headers=served.version_headers,
        limits=args.limits(),
        on_response=RequestMetrics(served.label, served.alias),
    )
    ingress_cls = make_fastapi_ingress(OpenAiIngress, app=app)
    options = OpenAiIngress.get_deployment_options([llm_config])
    return serve.deployment(ingress_cls, **options).bind(
        llm_deployments={served.name: build_llm_deployment(llm_config)},
        model_cards={served.name: to_model_metadata(served.name, llm_config)},
        lora_paths={},
    )
