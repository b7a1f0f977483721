"""qlm-plugin: SLO-aware queue management for LLM serving."""

from qlm_plugin.domain.request import (
    SLO,
    ModelSpec,
    Request,
    RequestValidationError,
    SLOClass,
    make_request,
    validate_request,
)

__version__ = "0.1.0"

__all__ = [
    "SLO",
    "ModelSpec",
    "Request",
    "RequestValidationError",
    "SLOClass",
    "__version__",
    "make_request",
    "validate_request",
]
