"""OpenAI-style errors: every failure leaves as ``{"error": {"message", "type", "param", "code"}}``.

Handlers never echo request bodies, secrets or stack traces.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error with an HTTP status and an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def unavailable(message: str, code: str = "service_unavailable") -> APIError:
    return APIError(503, message, "service_unavailable_error", None, code)


def _loc_to_param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    # Drop pydantic's union-branch tags such as "str" / "list[...]" / "function-after[...]".
    parts = [p for p in parts if "[" not in p and p not in {"str", "int", "float", "bool", "list", "dict"}]
    return ".".join(parts) or None


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return bad_request("request body is not valid JSON", None, "invalid_json")
    param = _loc_to_param(tuple(first.get("loc", ())))
    msg = str(first.get("msg", "invalid value"))
    if first.get("type") == "extra_forbidden":
        return bad_request(f"unrecognized request argument supplied: {param}", param, "unknown_parameter")
    if first.get("type") == "missing":
        return bad_request(f"missing required parameter: {param}", param, "missing_required_parameter")
    where = f"'{param}': " if param else ""
    return bad_request(f"invalid value for {where}{msg}", param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        kind = "invalid_request_error" if status < 500 else "server_error"
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).phrase
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(status)
        return APIError(status, message, kind, None, code).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return APIError(500, "internal server error", "server_error", None, "internal_error").response()
