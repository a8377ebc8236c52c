"""TLS, mutual TLS and bearer-token auth, with certificates the test makes itself."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mnist_client import DigitClient
from tests.conftest import ServerProcess, start_server

IMAGE = np.zeros((28, 28), np.uint8)
TOKEN = "s3cret-token-for-tests"


@dataclass(frozen=True)
class Pem:
    cert: bytes
    key: bytes


def _issue(name: str, issuer: Pem | None, *, ca: bool = False, server: bool = False) -> Pem:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    if issuer is None:
        issuer_name, signer = subject, key
    else:
        issuer_cert = x509.load_pem_x509_certificate(issuer.cert)
        issuer_name = issuer_cert.subject
        signer = serialization.load_pem_private_key(issuer.key, None)  # type: ignore[assignment]
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(signer, hashes.SHA256())
    return Pem(
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


@dataclass(frozen=True)
class Pki:
    ca: Pem
    server: Pem
    client: Pem
    rogue_ca: Pem
    rogue_client: Pem


@pytest.fixture(scope="module")
def pki() -> Pki:
    ca = _issue("test CA", None, ca=True)
    rogue_ca = _issue("rogue CA", None, ca=True)
    return Pki(
        ca,
        _issue("localhost", ca, server=True),
        _issue("client", ca),
        rogue_ca,
        _issue("client", rogue_ca),
    )


def _write(folder: Path, pki: Pki) -> dict[str, Path]:
    files = {
        "ca": pki.ca.cert,
        "cert": pki.server.cert,
        "key": pki.server.key,
        "token": (TOKEN + "\n").encode(),
    }
    out = {}
    for name, data in files.items():
        out[name] = folder / f"{name}.pem"
        out[name].write_bytes(data)
    return out


@pytest.fixture(scope="module")
def tls_server(
    trained_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, pki: Pki
) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("tls")
    f = _write(folder, pki)
    srv = start_server(
        trained_model_dir, folder / "server.log", "--tls-cert", str(f["cert"]),
        "--tls-key", str(f["key"]),
    )  # fmt: skip
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def mtls_token_server(
    trained_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, pki: Pki
) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("mtls")
    f = _write(folder, pki)
    srv = start_server(
        trained_model_dir, folder / "server.log", "--tls-cert", str(f["cert"]),
        "--tls-key", str(f["key"]), "--tls-client-ca", str(f["ca"]),
        "--auth-token-file", str(f["token"]),
    )  # fmt: skip
    yield srv
    assert srv.stop() == 0


def _code(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()  # type: ignore[attr-defined,no-any-return]


def test_tls_accepts_a_client_that_trusts_the_ca(tls_server: ServerProcess, pki: Pki) -> None:
    with DigitClient(tls_server.target, root_certificates=pki.ca.cert) as client:
        assert client.predict(IMAGE).model_version == 1
        assert client.health() == "SERVING"


def test_tls_refuses_plaintext_and_untrusting_clients(tls_server: ServerProcess, pki: Pki) -> None:
    with DigitClient(tls_server.target, timeout=3) as plain:
        assert _code(lambda: plain.predict(IMAGE)) == grpc.StatusCode.UNAVAILABLE
    with DigitClient(tls_server.target, root_certificates=pki.rogue_ca.cert, timeout=3) as rogue:
        assert _code(lambda: rogue.predict(IMAGE)) == grpc.StatusCode.UNAVAILABLE


def test_mtls_needs_a_client_certificate_from_the_ca(
    mtls_token_server: ServerProcess, pki: Pki
) -> None:
    target = mtls_token_server.target
    with DigitClient(target, root_certificates=pki.ca.cert, token=TOKEN, timeout=3) as nocert:
        assert _code(lambda: nocert.predict(IMAGE)) == grpc.StatusCode.UNAVAILABLE
    with DigitClient(
        target, root_certificates=pki.ca.cert, private_key=pki.rogue_client.key,
        certificate_chain=pki.rogue_client.cert, token=TOKEN, timeout=3,
    ) as rogue:  # fmt: skip
        assert _code(lambda: rogue.predict(IMAGE)) == grpc.StatusCode.UNAVAILABLE
    with DigitClient(
        target, root_certificates=pki.ca.cert, private_key=pki.client.key,
        certificate_chain=pki.client.cert, token=TOKEN,
    ) as good:  # fmt: skip
        assert good.predict(IMAGE).model_version == 1


def test_token_is_required_and_checked(mtls_token_server: ServerProcess, pki: Pki) -> None:
    common = {
        "root_certificates": pki.ca.cert,
        "private_key": pki.client.key,
        "certificate_chain": pki.client.cert,
    }
    with DigitClient(mtls_token_server.target, **common) as anonymous:  # type: ignore[arg-type]
        with pytest.raises(grpc.RpcError) as info:
            anonymous.predict(IMAGE)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        assert "missing 'authorization: Bearer <token>'" in info.value.details()  # type: ignore[attr-defined]
        assert _code(anonymous.model_info) == grpc.StatusCode.UNAUTHENTICATED
        assert anonymous.health() == "SERVING"  # probes need no token
    with DigitClient(mtls_token_server.target, token="wrong", **common) as wrong:  # type: ignore[arg-type]
        assert _code(lambda: wrong.predict(IMAGE)) == grpc.StatusCode.UNAUTHENTICATED
    with DigitClient(mtls_token_server.target, token=TOKEN, **common) as right:  # type: ignore[arg-type]
        assert right.batch_predict(np.zeros((3, 28, 28), np.uint8)).digits.shape == (3,)
    log = mtls_token_server.log()
    assert TOKEN not in log and "wrong" not in log
    assert (
        mtls_token_server.metric("mnist_requests_total", method="Predict", code="UNAUTHENTICATED")
        >= 2
    )
