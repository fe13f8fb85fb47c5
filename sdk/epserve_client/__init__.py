"""Python client of an epserve cluster's public gRPC API (``epserve.v1.GenerationService``).

    from epserve_client import Client

    with Client("localhost:50051", api_key="...") as client:
        print(client.generate("Hello", max_tokens=16).text)
        stream = client.stream([1, 2, 3], max_tokens=32, temperature=0)
        for chunk in stream:
            print(chunk.text, end="")
        print(stream.result.finish_reason)

:class:`AsyncClient` is the same API for asyncio. Failures raise :class:`EpserveError` subclasses.
Depends on grpcio and protobuf only.
"""
from epserve_client._wire import CLIENT_DEFAULT
from epserve_client.aio import AsyncClient, AsyncGenerateStream
from epserve_client.client import Client, GenerateStream
from epserve_client.errors import (
    Cancelled,
    DeadlineExceeded,
    EpserveError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from epserve_client.results import FinishReason, GenerateResult, ModelInfo, StreamChunk, TokenLogprobs, Usage

__version__ = "0.1.0"

__all__ = [
    "AsyncClient", "AsyncGenerateStream", "CLIENT_DEFAULT", "Cancelled", "Client", "DeadlineExceeded",
    "EpserveError", "FinishReason", "GenerateResult", "GenerateStream", "InvalidArgument", "ModelInfo",
    "NotFound", "ResourceExhausted", "StreamChunk", "TokenLogprobs", "Unavailable", "Usage", "__version__",
]
