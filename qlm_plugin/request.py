"""Compatibility: the request types now live in :mod:`qlm_plugin.domain.request` (adapters written
against earlier releases import them from here)."""

from qlm_plugin.domain.request import (
    DEFAULT_CLASSES,
    SLO,
    ModelSpec,
    Request,
    RequestValidationError,
    SLOClass,
    make_request,
    validate_request,
)

__all__ = [
    "DEFAULT_CLASSES",
    "SLO",
    "ModelSpec",
    "Request",
    "RequestValidationError",
    "SLOClass",
    "make_request",
    "validate_request",
]
