"""Make the TLS certificates and SuperNode keys of a deployment, with the `cryptography` package.

    python scripts/certs.py --out certs/ [--host superlink.example.org --host 10.0.0.5] [--nodes 3]

writes ``ca.crt`` / ``ca.key`` (a private certificate authority), ``server.pem`` / ``server.key``
(the SuperLink's certificate, signed by the CA, valid for 127.0.0.1, localhost and every
``--host``), and ``node-N`` / ``node-N.pub`` (one ECDSA P-384 key pair per SuperNode in OpenSSH
format, what ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register``
read). Existing files are kept, so running it again only adds what is missing.

Copy ``ca.crt`` and one ``node-N`` key to each device; keep ``ca.key`` off the network.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 825  # the longest lifetime clients accept for a server certificate


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "FedGen-Edge"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(["127.0.0.1", "localhost", *hosts]):  # ordered, no duplicates
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_ca(out: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The CA key and self-signed certificate (made once, then read back)."""
    key_path, cert_path = out / "ca.key", out / "ca.crt"
    if key_path.exists() and cert_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        return key, x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name("FedGen-Edge CA"))
            .issuer_name(_name("FedGen-Edge CA")).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA384()))
    _write(key_path, _pem_key(key), private=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def make_server_cert(out: Path, hosts: list[str]) -> None:
    """The SuperLink's key and certificate, signed by the CA, for 127.0.0.1, localhost, hosts."""
    ca_key, ca_cert = make_ca(out)
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0] if hosts else "localhost"))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(_san(hosts), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    _write(out / "server.key", _pem_key(key), private=True)
    _write(out / "server.pem", cert.public_bytes(serialization.Encoding.PEM))


def make_node_key(path: Path) -> None:
    """An ECDSA P-384 key pair in OpenSSH format (``path`` private, ``path.pub`` public), as
    ``ssh-keygen -t ecdsa -b 384 -N "" -f path`` writes it (Flower needs a NIST-curve EC key)."""
    if path.exists() and path.with_suffix(".pub").exists():
        return
    key = ec.generate_private_key(ec.SECP384R1())
    _write(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                   serialization.NoEncryption()), private=True)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    path.with_suffix(".pub").write_bytes(public + f" {path.name}\n".encode())


def make_certificates(out: Path, hosts: list[str] = (), nodes: int = 0) -> Path:
    """CA, server certificate (made anew if hosts changed) and ``nodes`` node keys in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    wanted = _san(list(hosts))
    server = out / "server.pem"
    if not server.exists() or x509.load_pem_x509_certificate(server.read_bytes()).extensions \
            .get_extension_for_class(x509.SubjectAlternativeName).value != wanted:
        make_server_cert(out, list(hosts))
    for i in range(nodes):
        make_node_key(out / f"node-{i}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("certs"))
    parser.add_argument("--host", action="append", default=[],
                        help="extra DNS name or IP the SuperLink is reached at (repeatable)")
    parser.add_argument("--nodes", type=int, default=0, help="node key pairs to make")
    args = parser.parse_args(argv)
    out = make_certificates(args.out, args.host, args.nodes)
    print(f"CA, server certificate and {args.nodes} node keys in {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
