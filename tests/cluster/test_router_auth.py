"""API keys on the public API, checked by the router's interceptor on a real gRPC server."""
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epserve.services.cluster.grpc_server import start_aio_grpc_server
from epserve.services.proto import generation_pb2, generation_pb2_grpc
from epserve.services.router.auth import ApiKeyInterceptor, read_api_keys

pytestmark = pytest.mark.integration


class Echo(generation_pb2_grpc.GenerationServiceServicer):
    async def GetModelInfo(self, request, context):
        return generation_pb2.ModelInfo(request_id=request.request_id, model="echo")

    async def Generate(self, request, context):
        yield generation_pb2.GenerateResponse(request_id="r", chunk=generation_pb2.Chunk(token_ids=[1]))


@pytest.fixture
def server(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# comment\nkey-one\n\nkey-two\n")
    started = start_aio_grpc_server(lambda s: generation_pb2_grpc.add_GenerationServiceServicer_to_server(Echo(), s),
                                    ["epserve.v1.GenerationService"],
                                    interceptors=[ApiKeyInterceptor(read_api_keys(keys))])
    yield started
    started.stop(None)


def test_valid_key_passes_and_missing_or_wrong_key_is_unauthenticated(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        assert stub.GetModelInfo(generation_pb2.GetModelInfoRequest(), metadata=[("authorization", "Bearer key-two")]).model == "echo"
        for metadata in ([], [("authorization", "Bearer nope")], [("authorization", "key-one")]):
            with pytest.raises(grpc.RpcError) as err:
                stub.GetModelInfo(generation_pb2.GetModelInfoRequest(), metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "authorization" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(generation_pb2.GenerateRequest(text="x")))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert len(list(stub.Generate(generation_pb2.GenerateRequest(text="x"), metadata=[("authorization", "Bearer key-one")]))) == 1


def test_health_checks_need_no_key(server):
    with grpc.insecure_channel(server.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_empty_key_file_is_refused(tmp_path):
    (tmp_path / "keys").write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="api-keys-file"):
        read_api_keys(tmp_path / "keys")
