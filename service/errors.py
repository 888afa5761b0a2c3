"""CloudAPI errors. Handlers and middleware raise them; `service.http` turns them into
responses with the body `{"code": ..., "message": ...}` and the full header set."""

from __future__ import annotations


class CloudApiError(Exception):
    """Base of every error sent to a client; the class sets status and code."""

    status = 500
    code = "InternalError"
    default_message = "Internal Error"

    def __init__(self, message: str | None = None, *, headers: dict[str, str] | None = None):
        self.message = message if message is not None else self.default_message
        self.headers = headers or {}
        super().__init__(self.message)


class BadRequest(CloudApiError):
    status = 400
    code = "BadRequestError"
    default_message = "Bad request"


class InvalidVersion(CloudApiError):
    status = 400
    code = "InvalidVersion"


class InvalidHeader(CloudApiError):
    status = 400
    code = "InvalidHeader"


class InvalidCredentials(CloudApiError):
    status = 401
    code = "InvalidCredentials"
    default_message = "Invalid authorization credentials supplied"


class NotAuthorized(CloudApiError):
    status = 403
    code = "NotAuthorized"


class ResourceNotFound(CloudApiError):
    status = 404
    code = "ResourceNotFound"


class MethodNotAllowed(CloudApiError):
    status = 405
    code = "MethodNotAllowedError"


class NotAcceptable(CloudApiError):
    status = 406
    code = "NotAcceptableError"


class RequestTimeout(CloudApiError):
    status = 408
    code = "RequestTimeout"


class RequestTooLarge(CloudApiError):
    status = 413
    code = "RequestTooLarge"


class UriTooLong(CloudApiError):
    status = 414
    code = "UriTooLong"


class ExpectationFailed(CloudApiError):
    status = 417
    code = "ExpectationFailed"


class RequestHeaderTooLarge(CloudApiError):
    status = 431
    code = "RequestHeaderFieldsTooLarge"


class InternalError(CloudApiError):
    """Anything unexpected; the details go to the log only."""


class ServiceUnavailable(CloudApiError):
    status = 503
    code = "ServiceUnavailable"
    default_message = "CloudAPI service is currently unavailable"


class DatabaseUnavailable(Exception):
    """Postgres could not be reached or did not answer in time; becomes a 503."""
