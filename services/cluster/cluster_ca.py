"""A throwaway certificate authority for one ``epserve up`` cluster: a CA and one certificate per kind.

``write_cluster_certificates(directory, kinds)`` makes a CA (ECDSA P-256, valid ``VALID_DAYS``) and, per
kind, a key and a certificate naming ``cluster_tls.identity(kind)`` for both server and client use, and
writes them as PEM files (mode 0600) into ``directory`` (a private one: its owner's alone). The CA's
key is never written: nothing can sign another certificate once the cluster's are made.
"""
from __future__ import annotations

import datetime
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from epserve.services.cluster.cluster_tls import identity
from epserve.services.cluster.private_file import write_private

VALID_DAYS = 90


def write_cluster_certificates(directory: str, kinds: tuple[str, ...]) -> dict[str, tuple[str, str, str]]:
    """kind -> (CA certificate, certificate, key) paths of its PEM files in ``directory``."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "epserve up cluster CA")])
    ca_cert = (_builder(ca_name, ca_name, ca_key.public_key())
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(_key_usage(cert_sign=True), critical=True)
               .sign(ca_key, hashes.SHA256()))
    ca_path = os.path.join(directory, "ca.crt")
    write_private(ca_path, ca_cert.public_bytes(serialization.Encoding.PEM).decode())
    paths = {}
    for kind in kinds:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity(kind))])
        cert = (_builder(name, ca_name, key.public_key())
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(_key_usage(cert_sign=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(identity(kind))]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        cert_path, key_path = os.path.join(directory, f"{kind}.crt"), os.path.join(directory, f"{kind}.key")
        write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM).decode())
        write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()).decode())
        paths[kind] = (ca_path, cert_path, key_path)
    return paths


def _builder(subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))          # clocks a little apart
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS)))


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign,
                         encipher_only=False, decipher_only=False)
