"""Teachers as `Generator`s: an OpenAI-compatible images endpoint, and a local model folder.

Both have an `id` that names their settings and a `price_per_call`, so `CachedGenerator` caches,
retries, budgets and prices them exactly like the procedural teachers of the shapes world.

`local_pipeline` imports diffusers (seconds), so its names load on first use; importing this package
for the images endpoint (or `remote`, which the prompt writers share) stays light.
"""

from ..errors import EndpointError, RequestRefused
from .openai_images import OpenAIImageTeacher, OpenAIImageTeacherConfig
from .remote import endpoint_error, endpoint_errors

_LAZY = {"LocalPipelineTeacher", "LocalPipelineTeacherConfig", "pipeline_id"}

__all__ = [
    "EndpointError",
    "OpenAIImageTeacher",
    "OpenAIImageTeacherConfig",
    "RequestRefused",
    "endpoint_error",
    "endpoint_errors",
    *sorted(_LAZY),
]


def __getattr__(name: str):
    if name in _LAZY:
        from . import local_pipeline

        return getattr(local_pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
