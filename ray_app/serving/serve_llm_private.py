"""The private parts of Ray Serve LLM that the vLLM app uses, in one place, pinned to one Ray.

Ray Serve LLM's public builder (``build_openai_app``) makes its own ingress app, with no place
for our API-key gate in front of it; so :mod:`ray_app.serving.vllm_app` builds the ingress from
two of its internal functions. They are imported here only. They cannot be imported without
vLLM (Ray Serve LLM's protocol models need an engine), so
``tests/test_serving.py::test_ray_serve_llms_private_functions_are_where_the_vllm_app_expects``
reads the installed Ray's source instead: a Ray upgrade that moves or renames them fails that
test here, not a deployment on a GPU cluster.
"""

from __future__ import annotations

from collections.abc import Callable

RAY_VERSION = "2.60.0"  # the Ray these were read from (requirements/lock.txt)
# module: the function the vLLM app calls
PRIVATE_FUNCTIONS = {
    "ray.llm._internal.serve.core.configs.openai_api_models": "to_model_metadata",  # model cards for /v1/models
    "ray.llm._internal.serve.core.ingress.ingress": "init",  # the FastAPI app of Serve LLM's ingress
}


def private_functions() -> tuple[Callable, Callable]:
    """``(to_model_metadata, init_ingress_app)``; raises ImportError without vLLM."""
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.llm._internal.serve.core.ingress.ingress import init

    return to_model_metadata, init
