"""The SDK against a real gRPC server on loopback (tests/sdk/scripted_server.py)."""
import asyncio
import threading
import time

import grpc
import pytest

from epserve_client import (
    AsyncClient,
    Cancelled,
    Client,
    DeadlineExceeded,
    EpserveError,
    GenerateResult,
    InvalidArgument,
    ModelInfo,
    ResourceExhausted,
    StreamChunk,
    TokenLogprobs,
    Unavailable,
    Usage,
)
from tests.sdk.scripted_server import ScriptedServer

pytestmark = pytest.mark.integration

FAST_RETRIES = dict(initial_backoff=0.01, max_backoff=0.05)


@pytest.fixture
def server():
    scripted = ScriptedServer()
    yield scripted
    scripted.stop()


@pytest.fixture
def client(server):
    with Client(server.target, timeout=10, **FAST_RETRIES) as c:
        yield c


def test_generate_returns_typed_result(client):
    result = client.generate("Hello", max_tokens=5)
    assert result == GenerateResult(
        request_id="srv-1", token_ids=[100, 101, 102, 103, 104], text="<100><101><102><103><104>",
        finish_reason="length", usage=Usage(prompt_tokens=5, completion_tokens=5),
    )
    assert result.usage.total_tokens == 10


def test_generate_with_request_id_and_stop_token(client):
    result = client.generate([7, 8], max_tokens=10, stop_token_ids=[102], request_id="mine")
    assert (result.request_id, result.token_ids, result.finish_reason) == ("mine", [100, 101, 102], "stop")


def test_stream_yields_chunks_then_exposes_result(client):
    stream = client.stream("Hi", max_tokens=5)
    first = next(stream)
    assert first == StreamChunk(request_id="srv-1", token_ids=[100, 101], text="<100><101>")
    with pytest.raises(RuntimeError, match="not finished"):
        stream.result
    rest = list(stream)
    assert [c.token_ids for c in rest] == [[102, 103], [104]]
    assert stream.request_id == "srv-1"
    assert stream.result.token_ids == first.token_ids + rest[0].token_ids + rest[1].token_ids
    assert stream.result.text == "".join(c.text for c in [first, *rest])


def test_text_and_token_id_prompts_and_sampling_reach_the_server(client, server):
    client.generate("héllo wörld", max_tokens=1)
    client.generate([5, 6, 7], max_tokens=2, temperature=0.5, top_p=0.25, top_k=4, seed=2**63 - 1,
                    stop_token_ids=[9], ignore_eos=True)
    text_req, ids_req = (c.request for c in server.servicer.calls_of("Generate"))
    assert text_req.WhichOneof("input") == "text" and text_req.text == "héllo wörld"
    assert not any(text_req.sampling.HasField(f) for f in ("temperature", "top_p", "top_k", "seed"))
    assert ids_req.WhichOneof("input") == "token_ids" and list(ids_req.token_ids.ids) == [5, 6, 7]
    s = ids_req.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed) == (2, 0.5, 0.25, 4, 2**63 - 1)
    assert (list(s.stop_token_ids), s.ignore_eos) == ([9], True)


def test_logprobs_come_per_chunk_and_in_the_result(client, server):
    stream = client.stream([1], max_tokens=3, logprobs=2)
    chunks = list(stream)
    lp = [-t / 1024 for t in range(100, 103)]                     # what the scripted server sends
    assert chunks[0].logprobs == [TokenLogprobs(100, lp[0], [(100, lp[0]), (101, lp[1])]),
                                  TokenLogprobs(101, lp[1], [(101, lp[1]), (102, lp[2])])]
    assert stream.result.logprobs == chunks[0].logprobs + chunks[1].logprobs
    assert [lp.token_id for lp in stream.result.logprobs] == stream.result.token_ids
    plain = client.generate([1], max_tokens=3)
    assert plain.logprobs is None and not server.servicer.calls[-1].request.sampling.HasField("logprobs")
    only_chosen = client.generate([1], max_tokens=1, logprobs=0).logprobs
    assert only_chosen == [TokenLogprobs(100, lp[0], [])]


def test_stop_strings_reach_the_server(client, server):
    client.generate([1], max_tokens=2, stop=["<101>", "x"])
    client.generate([1], max_tokens=2, stop="one")
    assert [list(c.request.stop) for c in server.servicer.calls_of("Generate")] == [["<101>", "x"], ["one"]]


def test_retries_unavailable_within_max_retries(server):
    server.script.fail_first = 2
    with Client(server.target, max_retries=2, **FAST_RETRIES) as c:
        assert c.generate("x", max_tokens=1).token_ids == [100]
        assert len(server.servicer.calls_of("Generate")) == 3
        server.script.fail_first = 4
        assert c.model_info().model == "tiny"
        assert c.abort("running-1") is True


def test_gives_up_after_max_retries(server):
    server.script.fail_first = 100
    with Client(server.target, max_retries=2, **FAST_RETRIES) as c:
        with pytest.raises(Unavailable) as info:
            c.generate("x", request_id="r-9")
    assert len(server.servicer.calls) == 3
    assert str(info.value) == "scripted outage 3" and info.value.request_id == "r-9"
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_no_retries_when_max_retries_is_zero(server):
    server.script.fail_first = 1
    with Client(server.target, max_retries=0) as c, pytest.raises(Unavailable):
        c.model_info()
    assert len(server.servicer.calls) == 1


def test_wait_for_ready_rides_out_a_router_that_is_down_until_it_is_back():
    """A router restarting: without wait_for_ready the call fails at once (no retries left); with it, the
    call waits and is answered once a server listens on the port again, blocking and asyncio alike."""
    gone = ScriptedServer()
    port = gone.port
    gone.stop()
    with Client(f"127.0.0.1:{port}", max_retries=0, timeout=30) as c, pytest.raises(Unavailable):
        c.model_info()
    back: list[ScriptedServer] = []
    starter = threading.Timer(1.5, lambda: back.append(ScriptedServer(port=port)))
    starter.start()
    try:
        with Client(f"127.0.0.1:{port}", max_retries=0, timeout=30, wait_for_ready=True) as c:
            assert c.generate("x", max_tokens=2).token_ids == [100, 101]
        back.pop().stop()

        async def main():
            async with AsyncClient(f"127.0.0.1:{port}", max_retries=0, timeout=30, wait_for_ready=True) as c:
                threading.Timer(1.5, lambda: back.append(ScriptedServer(port=port))).start()
                return (await c.generate("x", max_tokens=2)).token_ids

        assert asyncio.run(main()) == [100, 101]
    finally:
        starter.cancel()
        for server in back:
            server.stop()


def test_stream_that_yielded_tokens_is_never_replayed_without_resume(server):
    server.script.status_after_first_chunk = (grpc.StatusCode.UNAVAILABLE, "replica lost")
    with Client(server.target, resume_attempts=0, **FAST_RETRIES) as c:
        stream = c.stream("x", max_tokens=6)
        assert next(stream).token_ids == [100, 101]
        with pytest.raises(Unavailable, match="^replica lost$"):
            next(stream)
    assert len(server.servicer.calls) == 1


@pytest.mark.parametrize("breaks", [1, 2])
def test_a_broken_stream_resumes_after_the_tokens_received_on_the_next_router(breaks):
    """The first router's stream breaks after a chunk (and the second's too, with breaks=2): the client calls
    the next router of its list with the server's request id and resume_from, and gets every token once."""
    first, second = ScriptedServer(), ScriptedServer()
    try:
        for server in (first, second):
            server.script.status_after_first_chunk = (grpc.StatusCode.UNAVAILABLE, "router gone")
        first.script.broken_streams, second.script.broken_streams = 1, breaks - 1
        with Client([first.target, second.target], **FAST_RETRIES) as c:
            stream = c.stream("x", max_tokens=6)
            received = [token for chunk in stream for token in chunk.token_ids]
        assert received == stream.result.token_ids == [100, 101, 102, 103, 104, 105] and stream.request_id == "srv-1"
        assert [c.request.resume_from for c in second.servicer.calls] == [2]          # the next router
        resumed = sorted((c.request.request_id, c.request.resume_from) for c in first.servicer.calls + second.servicer.calls)
        assert resumed == [("", 0), ("srv-1", 2), ("srv-1", 4)][:breaks + 1]
    finally:
        first.stop()
        second.stop()


def test_async_stream_resumes_and_gives_up_after_resume_attempts(server):
    server.script.status_after_first_chunk = (grpc.StatusCode.UNAVAILABLE, "router gone")

    async def main():
        async with AsyncClient(server.target, **FAST_RETRIES) as c:
            result = await c.generate("x", max_tokens=4, request_id="r-1")
            assert result.token_ids == [100, 101, 102, 103]
        server.script.broken_streams = 100
        async with AsyncClient(server.target, resume_attempts=2, **FAST_RETRIES) as c:
            with pytest.raises(Unavailable, match="^router gone$"):
                await c.generate("x", max_tokens=8, request_id="r-2")

    asyncio.run(main())
    assert [(c.request.request_id, c.request.resume_from) for c in server.servicer.calls] == [
        ("r-1", 0), ("r-1", 2), ("r-2", 0), ("r-2", 2), ("r-2", 4)]                 # 2 resumes, then it gives up


def test_deadline_raises_deadline_exceeded(server):
    server.script.delay = 5
    with Client(server.target, timeout=0.3) as c:
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded) as info:
            c.model_info()  # the client's default timeout
        with pytest.raises(DeadlineExceeded):
            c.generate("x", timeout=0.2, request_id="slow")  # a per-call timeout
    assert time.monotonic() - start < 3
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_invalid_argument_keeps_the_server_message(client):
    with pytest.raises(InvalidArgument) as info:
        client.generate("x", top_p=1.5, request_id="bad")
    error = info.value
    assert isinstance(error, EpserveError) and error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.message == str(error) == "sampling.top_p must be in (0, 1], got 1.5"
    assert error.request_id == "bad"


def test_in_stream_error_raises_typed_error(client, server):
    server.script.stream_error = (grpc.StatusCode.RESOURCE_EXHAUSTED, "KV cache full: 0 of 64 blocks free")
    chunks = []
    with pytest.raises(ResourceExhausted) as info:
        for chunk in client.stream("x", max_tokens=8):
            chunks.append(chunk)
    assert [c.token_ids for c in chunks] == [[100, 101]]
    assert str(info.value) == "KV cache full: 0 of 64 blocks free" and info.value.request_id == "srv-1"


def test_cancelled_stream_raises_cancelled(client, server):
    server.script.delay = 5
    stream = client.stream("x")
    stream.cancel()
    with pytest.raises(Cancelled):
        next(stream)


def test_leaving_a_stream_early_cancels_it_on_the_server(client, server):
    server.script.chunk_delay = 0.2  # 50 chunks: 10 s if left to run
    with client.stream("x", max_tokens=100) as stream:
        assert next(stream).token_ids == [100, 101]
    assert server.servicer.calls[0].ended.wait(timeout=2)


def test_api_key_is_sent_as_bearer_metadata_on_every_call(server):
    with Client(server.target, api_key="sk-test") as c:
        c.generate("x", max_tokens=1)
        c.model_info()
        c.abort("nope")
    with Client(server.target) as c:
        c.model_info()
    keyed, unkeyed = server.servicer.calls[:3], server.servicer.calls[3]
    assert [call.metadata.get("authorization") for call in keyed] == ["Bearer sk-test"] * 3
    assert "authorization" not in unkeyed.metadata


def test_model_info_and_abort(client):
    assert client.model_info() == ModelInfo(
        request_id="", model="tiny", vocab_size=512, max_context=256, kv_cache_bytes_per_token=2304,
        attention_replicas=2, expert_shards=4, placement_version=3, eos_token_ids=[1, 2],
    )
    assert client.abort("running-1") is True
    assert client.abort("unknown") is False


def test_async_client_essentials(server):
    async def main():
        async with AsyncClient(server.target, api_key="sk-async", timeout=10, max_retries=2, **FAST_RETRIES) as c:
            result = await c.generate([1, 2, 3], max_tokens=3, request_id="a-1")
            assert (result.request_id, result.token_ids, result.finish_reason) == ("a-1", [100, 101, 102], "length")
            assert result.usage == Usage(prompt_tokens=3, completion_tokens=3)

            stream = c.stream("Hi", max_tokens=3)
            chunks = [chunk async for chunk in stream]
            assert [ch.token_ids for ch in chunks] == [[100, 101], [102]]
            assert stream.result.text == "<100><101><102>" and stream.request_id == "srv-2"
            result = await c.generate([1], max_tokens=1, logprobs=1, stop=["<9>"])
            assert result.logprobs == [TokenLogprobs(100, -100 / 1024, [(100, -100 / 1024)])]
            assert list(server.servicer.calls[-1].request.stop) == ["<9>"]

            assert (await c.model_info()).expert_shards == 4
            assert await c.abort("running-1") is True

            with pytest.raises(InvalidArgument, match=r"^sampling\.top_p must be in \(0, 1\], got 1\.5$"):
                await c.generate("x", top_p=1.5)

            server.script.fail_first = len(server.servicer.calls) + 2
            assert (await c.generate("x", max_tokens=1)).token_ids == [100]

            server.script.stream_error = (grpc.StatusCode.NOT_FOUND, "gone")
            with pytest.raises(EpserveError, match="^gone$") as info:
                await c.generate("x", max_tokens=4)
            assert info.value.code == grpc.StatusCode.NOT_FOUND

            server.script.delay = 5
            with pytest.raises(DeadlineExceeded):
                await c.generate("x", timeout=0.2)
            with pytest.raises(Cancelled):
                async with c.stream("x") as stream:
                    stream.cancel()
                    await stream.__anext__()

            server.script.delay, server.script.chunk_delay, server.script.stream_error = 0, 0.2, None
            async with c.stream("x", max_tokens=100) as stream:
                async for chunk in stream:
                    break
            assert await asyncio.to_thread(server.servicer.calls[-1].ended.wait, 2)

    asyncio.run(main())
    assert {call.metadata.get("authorization") for call in server.servicer.calls} == {"Bearer sk-async"}


def _self_signed_cert() -> tuple[bytes, bytes]:
    """A PEM (key, certificate) for localhost / 127.0.0.1, signed by itself."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(san, critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def test_tls_with_self_signed_certificate():
    pytest.importorskip("cryptography", reason="TLS test needs `cryptography` to make a certificate")
    key_pem, cert_pem = _self_signed_cert()
    _, other_cert_pem = _self_signed_cert()
    server = ScriptedServer(credentials=grpc.ssl_server_credentials([(key_pem, cert_pem)]))
    try:
        target = f"localhost:{server.port}"
        with Client(target, tls=True, root_certificates=cert_pem, api_key="k") as c:
            assert c.generate("x", max_tokens=2).token_ids == [100, 101]
        with Client(target, tls=True, root_certificates=other_cert_pem, max_retries=0, timeout=5) as c:
            with pytest.raises(Unavailable):
                c.model_info()
        with Client(target, max_retries=0, timeout=5) as c, pytest.raises(Unavailable):
            c.model_info()  # plaintext against a TLS port
        assert [call.metadata.get("authorization") for call in server.servicer.calls] == ["Bearer k"]
    finally:
        server.stop()
