"""From URLs: downloads through the SSRF guard (on the connected address, every hop), refused targets,
link normalisation, and tokens that never reach rows or logs."""

from __future__ import annotations

import json
import logging

import httpx
import pytest

from tests.models.conftest import admin_of, make_user, store_keys, wait_task
from tests.models.http_files import serve_files
from webapp.services.errors import InvalidInput
from webapp.services.models.ssrf import BlockedUrl, GuardedTransport, SsrfGuard
from webapp.services.models.url_import import normalise, redact_url


def _all_text(studio) -> str:
    """Every row the studio holds about models and tasks, as text (to look for leaked secrets)."""
    from sqlmodel import select

    from webapp.records import ImportTask, ModelRecord

    with studio.db.read() as s:
        rows = list(s.exec(select(ImportTask))) + list(s.exec(select(ModelRecord)))
    return "\n".join(json.dumps(r.model_dump(), default=str) for r in rows)


def test_url_list_imports_through_an_allowed_server(build_studio, tiny, caplog):
    caplog.set_level(logging.DEBUG)
    with serve_files({"style.safetensors": tiny.lora, "other.safetensors": tiny.lora2}) as files:
        studio = build_studio(url_import_allow=[f"127.0.0.1:{files.port}"])
        alice = make_user(studio)
        urls = (f"{files.base}/files/style.safetensors?token=SECRET-TOKEN-123&type=Model, "
                f"http://user:PASSWORD-456@127.0.0.1:{files.port}/plain/other.safetensors")
        task = studio.model_services.urls.start(
            actor=alice, urls=urls, declared_type="lora",
            description='{"description": "from the web", "source": "tests"}')
        done = wait_task(studio, task.id)
        assert done.status.value == "succeeded", done.items_json
        assert [r["query"] for r in files.requests][0].startswith("token=SECRET-TOKEN-123")  # the token was used
        assert files.requests[1]["headers"]["Authorization"].startswith("Basic ")
    models = {m.name: m for m in studio.models.list_models(actor=alice)}
    assert set(models) == {"style", "other"}
    assert models["style"].owner_id == alice.id and models["style"].description == "from the web"
    assert json.loads(models["style"].metadata_json)["source"] == "tests"
    assert models["style"].source_detail == f"{files.base}/files/style.safetensors?token=***&type=Model"
    for secret in ("SECRET-TOKEN-123", "PASSWORD-456"):
        assert secret not in _all_text(studio)
        assert secret not in caplog.text
    assert len(store_keys(studio)) == 2


REFUSED = [
    "http://127.0.0.1:9/x.safetensors", "http://169.254.169.254/latest/meta-data/", "http://[::1]:8080/x",
    "http://[fd00:ec2::254]/latest", "http://10.1.2.3/x", "http://[::ffff:127.0.0.1]/x", "http://0.0.0.0/x",
    "file:///etc/passwd", "ftp://example.com/x.safetensors", "gopher://example.com/",
]


def test_refused_targets_are_422_before_anything_runs(mstudio):
    for url in REFUSED:
        with pytest.raises(InvalidInput) as caught:
            mstudio.model_services.urls.start(actor=admin_of(mstudio), urls=f"https://example.com/a, {url}",
                                              declared_type="lora")
        assert caught.value.field == "urls", url
    assert mstudio.model_services.tasks.list_tasks(actor=admin_of(mstudio)) == []


def test_names_resolving_to_loopback_are_refused_at_connect(mstudio, tiny):
    with serve_files({"style.safetensors": tiny.lora}) as files:
        task = mstudio.model_services.urls.start(actor=admin_of(mstudio), declared_type="lora",
                                                 urls=f"http://localhost:{files.port}/files/style.safetensors")
        done = wait_task(mstudio, task.id)
        assert files.requests == []  # never connected
    item = json.loads(done.items_json)[0]
    assert done.status.value == "failed" and "loopback" in item["message"]
    assert mstudio.models.count_models(actor=admin_of(mstudio), status=None) == 0


def test_redirect_from_allowed_server_to_other_loopback_port_is_refused(build_studio, tiny):
    with serve_files({"style.safetensors": tiny.lora}) as target, serve_files({}) as allowed:
        studio = build_studio(url_import_allow=[f"127.0.0.1:{allowed.port}"])
        forbidden = f"{target.base}/files/style.safetensors"
        task = studio.model_services.urls.start(actor=admin_of(studio), declared_type="lora",
                                                urls=f"{allowed.base}/redirect?to={forbidden}")
        done = wait_task(studio, task.id)
        assert [r["path"] for r in allowed.requests] == ["/redirect"]
        assert target.requests == []  # the guard stopped the second hop before connecting
    item = json.loads(done.items_json)[0]
    assert done.status.value == "failed"
    assert "redirected to" in item["message"] and "loopback" in item["message"]
    assert studio.models.count_models(actor=admin_of(studio), status=None) == 0


def test_allow_list_matches_the_resolved_address_and_keeps_the_host_header(tiny):
    with serve_files({"style.safetensors": tiny.lora}) as files:
        guard = SsrfGuard([f"127.0.0.1:{files.port}"])
        with httpx.Client(transport=GuardedTransport(guard), trust_env=False) as client:
            answer = client.get(f"http://localhost:{files.port}/files/style.safetensors")
            assert answer.content == tiny.lora.read_bytes()
            assert files.requests[-1]["headers"]["Host"] == f"localhost:{files.port}"
            with pytest.raises(BlockedUrl):
                client.get(f"http://localhost:{files.port + 1 if files.port < 65535 else 1}/x")


def test_tls_connections_keep_sni_and_verify_the_name(tmp_path):
    """Connecting to the checked IP must not change what TLS verifies: SNI and certificate stay the host's."""
    import datetime
    import ssl
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    names: list[str | None] = []
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server_ctx.sni_callback = lambda sock, server_name, ctx: names.append(server_name)

    class Hello(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            return

        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"hello")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    server.socket = server_ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        trust = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
        guard = SsrfGuard([f"127.0.0.1:{port}"])
        with httpx.Client(transport=GuardedTransport(guard, verify=trust), trust_env=False) as client:
            assert client.get(f"https://localhost:{port}/").text == "hello"
            assert names[-1] == "localhost"
            with pytest.raises(httpx.ConnectError):  # the literal IP is not the certificate's name
                client.get(f"https://127.0.0.1:{port}/")
    finally:
        server.shutdown()
        server.server_close()


def test_http_errors_and_missing_files_fail_the_item(build_studio, tiny):
    with serve_files({"style.safetensors": tiny.lora}) as files:
        studio = build_studio(url_import_allow=[f"127.0.0.1:{files.port}"])
        task = studio.model_services.urls.start(actor=admin_of(studio), declared_type="lora", urls=[
            f"{files.base}/status/403", f"{files.base}/files/missing.safetensors",
            f"{files.base}/files/style.safetensors"])
        done = wait_task(studio, task.id)
    items = json.loads(done.items_json)
    assert done.status.value == "partial"
    assert [i["state"] for i in items] == ["failed", "failed", "done"]
    assert "HTTP 403" in items[0]["message"] and "access token" in items[0]["message"]
    assert "HTTP 404" in items[1]["message"]


def test_link_normalisation_and_redaction():
    assert normalise("runwayml/stable-diffusion-v1-5/v1-5-pruned.safetensors") == \
        "https://huggingface.co/runwayml/stable-diffusion-v1-5/resolve/main/v1-5-pruned.safetensors"
    assert normalise("https://huggingface.co/o/r/blob/main/sub/x.safetensors") == \
        "https://huggingface.co/o/r/resolve/main/sub/x.safetensors"
    assert normalise("https://civitai.com/models/4201/realistic?modelVersionId=130072") == \
        "https://civitai.com/api/download/models/130072"
    assert normalise("https://civitai.com/api/download/models/130072") == "https://civitai.com/api/download/models/130072"
    with pytest.raises(InvalidInput):
        normalise("https://civitai.com/models/4201/realistic")
    assert redact_url("https://u:p@h.example/x?token=abc&format=SafeTensor&X-Amz-Signature=zz") == \
        "https://***@h.example/x?token=***&format=SafeTensor&X-Amz-Signature=***"


def test_configured_tokens_go_only_to_their_hosts(mstudio):
    from pydantic import SecretStr

    from webapp.services.models.url_import import UrlImports

    urls = UrlImports.__new__(UrlImports)
    urls._civitai, urls._hf = SecretStr("civ-secret"), SecretStr("hf-secret")
    assert urls._headers(httpx.URL("https://civitai.com/api/download/models/1")) == \
        {"Authorization": "Bearer civ-secret"}
    assert urls._headers(httpx.URL("https://huggingface.co/o/r/resolve/main/x")) == \
        {"Authorization": "Bearer hf-secret"}
    assert urls._headers(httpx.URL("https://cdn.example-cdn.net/signed/x")) == {}  # redirect targets get nothing
    assert urls._headers(httpx.URL("https://evil-civitai.com/x")) == {}


def test_guard_address_rules():
    import ipaddress

    guard = SsrfGuard(["10.9.0.0/16", "mirror.internal:8080"])
    for blocked in ("127.0.0.1", "169.254.169.254", "fd00:ec2::254", "::1", "192.168.1.1", "100.64.0.1",
                    "::ffff:10.0.0.1", "224.0.0.1", "0.0.0.0",
                    # IPv6 forms that carry a loopback or metadata IPv4 to a gateway that delivers it
                    "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "2002:7f00:1::", "2002:a9fe:a9fe::", "::127.0.0.1",
                    "2001:0:4136:e378:8000:63bf:80ff:fffe"):  # Teredo to client 127.0.0.1
        with pytest.raises(BlockedUrl):
            guard.check_address("h", ipaddress.ip_address(blocked), 80)
    guard.check_address("h", ipaddress.ip_address("93.184.216.34"), 443)
    guard.check_address("h", ipaddress.ip_address("64:ff9b::5db8:d822"), 443)  # NAT64 to a public address
    guard.check_address("h", ipaddress.ip_address("2606:4700::6810:84e5"), 443)
    guard.check_address("h", ipaddress.ip_address("10.9.3.4"), 80)  # allow-listed CIDR
    guard.check_address("mirror.internal", ipaddress.ip_address("10.1.1.1"), 8080)  # allow-listed host:port
    with pytest.raises(BlockedUrl):
        guard.check_address("mirror.internal", ipaddress.ip_address("10.1.1.1"), 8081)
