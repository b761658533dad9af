"""The v1 API's routes, a router per resource; `app_factory.build_asgi_app` mounts them all."""

from .artifacts import router as artifacts
from .images import router as images
from .jobs import router as jobs
from .operations import router as operations
from .stories import router as stories
from .subjects import router as subjects

# In the order they are documented in the OpenAPI schema.
ROUTERS = (operations, stories, subjects, images, jobs, artifacts)
