"""The client side (no torch): the Python client of the feature service, sync (`Client`)
and async (`AsyncClient`); `wire` reads answers and problems, `tensors` safetensors.

Features travel as safetensors (raw values, no base64) and come back as numpy arrays in a
`Features` dict that also says which model version made them. Problems (problem+json)
become typed exceptions. 429 and 503 are retried honouring Retry-After, and dropped or
refused connections with exponential back-off, a bounded number of times (every call is
safe to repeat: nothing the service does has side effects): `retries` times at least,
and beyond that while the next try starts within `retry_budget_s` of the first (60 s by
default), so a call rides through a worker restart (about 15 s under `serve`, 503 with
Retry-After meanwhile). Right after `cleandift serve`, `wait_ready()` waits for the model
to load.

    with Client("http://localhost:8000") as client:
        client.wait_ready()
        feats = client.features("examples/cat.jpg", layers=["us6"])  # feats["us6"]: [C, h, w]
        descriptors = client.features("examples/cat.jpg", points=[(120, 80)])["us6"]  # [1, C]
        many = client.features_many(paths, concurrency=8)           # in order
        body = client.correspond("examples/cat.jpg", targets=["examples/coffee.jpg"],
                                 points=[(10, 20)])
"""

from .session import (
    ERRORS,
    ApiError,
    AsyncClient,
    BadImage,
    Client,
    DeadlineExceeded,
    Features,
    InvalidParameters,
    NotReady,
    Overloaded,
    TooLarge,
    Unauthorized,
    UnsupportedMediaType,
)

__all__ = ["ERRORS", "ApiError", "AsyncClient", "BadImage", "Client", "DeadlineExceeded",
           "Features", "InvalidParameters", "NotReady", "Overloaded", "TooLarge",
           "Unauthorized", "UnsupportedMediaType"]
