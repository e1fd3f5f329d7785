"""Content credentials (C2PA): the finished output signed last, naming the scan it was made from.

Needs the [c2pa] extra: c2pa-python, and `cryptography` for reading certificates and keys. Both are
imported inside the functions, so this module imports without them and `c2pa_available` can say so.

Signing is the last write: re-saving a signed file with Pillow silently drops the manifest. The
station certificate must come from a CA (C2PA refuses self-signed ones) and satisfy C2PA's
certificate profile; `certificate_problem` names what is wrong in plain words before the first
delivery, so a bad certificate stops the start instead of failing every job. Nothing here reaches
the network unless a timestamp_url is configured: no OCSP, no remote manifests. The private key is
read into memory for the signer and never logged, copied or written anywhere.
"""

from __future__ import annotations

import contextlib
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .label import DIGITAL_SOURCE_TYPE  # the XMP label's term: the manifest says the same

if TYPE_CHECKING:
    from cryptography import x509

MIME_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "TIFF": "image/tiff", "WEBP": "image/webp"}
"""The formats encode.py writes, as C2PA names them."""

PARENT_ID = "scan"
"""How the c2pa.opened action points at the scan's ingredient within the manifest definition."""

SETTINGS: dict[str, Any] = {"verify": {"remote_manifest_fetch": False, "ocsp_fetch": False}}
"""c2pa settings for signing: nothing is fetched (a scan carrying its own manifest may point at a
remote one); the signed result is still verified structurally after signing (c2pa's default)."""

EKU_EMAIL_PROTECTION = "1.3.6.1.5.5.7.3.4"
EKU_TIME_STAMPING = "1.3.6.1.5.5.7.3.8"
EKU_OCSP_SIGNING = "1.3.6.1.5.5.7.3.9"
EKU_ANY = "2.5.29.37.0"
# The C2PA specification also lists documentSigning (1.3.6.1.5.5.7.3.36) and Microsoft's C2PA
# signing OID, but c2pa-python 0.38 (c2pa-rs 0.91) fails its own verification of a manifest signed
# with either alone: only these are accepted, the last two each only on its own.

SIGNATURE_ALGORITHMS = {
    "1.2.840.10045.4.3.2", "1.2.840.10045.4.3.3", "1.2.840.10045.4.3.4",  # ecdsa-with-SHA256/384/512
    "1.2.840.113549.1.1.11", "1.2.840.113549.1.1.12", "1.2.840.113549.1.1.13",  # sha256/384/512WithRSA
    "1.2.840.113549.1.1.10",  # RSASSA-PSS
    "1.3.101.112",  # Ed25519
}
"""What a certificate in the chain may be signed with (C2PA's certificate profile)."""

CURVE_ALGORITHMS = {"secp256r1": "es256", "secp384r1": "es384", "secp521r1": "es512"}
"""The EC curves C2PA accepts and the algorithm each key signs with."""

SELF_SIGNED = ("self-signed: C2PA refuses self-signed certificates; make a station certificate signed "
               "by a local CA (see README)")


class SigningError(Exception):
    """The output could not be signed; the message says why in plain words (never the key)."""


def c2pa_available() -> bool:
    """Whether c2pa-python (the [c2pa] extra) imports, native library included."""
    try:
        import c2pa  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def sign(source: Path, dest: Path, fmt: str, *, certificate: Path, private_key: Path, timestamp_url: str | None,
         ingredient: Path, ingredient_format: str, software: str, title: str, description: str | None = None,
         thumbnails: bool = True) -> None:
    """Write `source` (encoded, final) to the new file `dest` with a C2PA manifest embedded.

    The manifest names `ingredient` (the scan) as its parentOf ingredient, with the actions
    c2pa.opened (the scan) and c2pa.edited (generated faces composited in, by `software`,
    described by `description` if given). `dest` must not exist: it is created, and removed again
    if signing fails. `thumbnails` lets c2pa embed small previews of output and scan (about a
    second of CPU for a 48-megapixel output). Raises SigningError.
    """
    import c2pa

    mime = MIME_TYPES.get(fmt)
    if mime is None:
        raise ValueError(f"cannot sign {fmt} files; only {', '.join(MIME_TYPES)}")
    problem = certificate_problem(certificate, private_key)
    if problem is not None:
        raise SigningError(f"{certificate}: {problem}")
    algorithm, key_pem = signing_key(private_key)
    settings = {**SETTINGS, "builder": {"thumbnail": {"enabled": thumbnails}}}
    created = signed = False
    try:
        with c2pa.Context.from_dict(settings) as context, \
                c2pa.Builder.from_json(manifest_definition(title, software, description), context) as builder:
            with open(ingredient, "rb") as scan:
                builder.add_ingredient(ingredient_definition(ingredient.name), ingredient_format, scan)
            info = c2pa.C2paSignerInfo(algorithm, certificate.read_bytes(), key_pem, timestamp_url)
            with c2pa.Signer.from_info(info) as signer, open(source, "rb") as src, open(dest, "x+b") as out:
                created = True
                builder.sign(signer, mime, src, out)
        signed = True
    except c2pa.C2paError as exc:
        raise SigningError(f"C2PA signing failed: {exc}") from exc
    finally:
        if created and not signed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(dest)


def manifest_definition(title: str, software: str, description: str | None) -> dict[str, Any]:
    """The manifest c2pa builds: who made it, and the two actions from scan to restored image."""
    agent = software_info(software)
    edited: dict[str, Any] = {"action": "c2pa.edited", "digitalSourceType": DIGITAL_SOURCE_TYPE,
                              "softwareAgent": agent}
    if description:
        edited["description"] = description
    return {
        "claim_generator_info": [agent],
        "title": title,
        "assertions": [{"label": "c2pa.actions", "data": {"actions": [
            {"action": "c2pa.opened", "parameters": {"ingredientIds": [PARENT_ID]}},
            edited,
        ]}}],
    }


def ingredient_definition(name: str) -> dict[str, Any]:
    """The scan as the parent: the asset this output was made from."""
    return {"title": name, "relationship": "parentOf", "label": PARENT_ID}


def software_info(software: str) -> dict[str, str]:
    """'codeformer-daemon 0.1.0' as C2PA's {name, version}; a name without a version stays whole."""
    name, _, version = software.rpartition(" ")
    if not name:
        return {"name": software}
    return {"name": name, "version": version}


def signing_key(private_key: Path) -> tuple[str, bytes]:
    """The algorithm this key signs with, and the key as unencrypted PKCS#8 PEM, in memory only.

    c2pa reads only PKCS#8 ("BEGIN PRIVATE KEY"); `openssl ecparam -genkey` writes SEC1 ("BEGIN EC
    PRIVATE KEY") and older tools PKCS#1, so the key is re-encoded rather than refused.
    """
    from cryptography.hazmat.primitives import serialization

    key = _load_key(private_key)
    if isinstance(key, str):
        raise SigningError(f"{private_key}: {key}")
    algorithm = key_algorithm(key)
    if algorithm is None:
        raise SigningError(f"{private_key}: {key_type_problem(key)}")
    return algorithm, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())


def key_algorithm(key: Any) -> str | None:
    """The C2PA signing algorithm for a private key: EC P-256 -> es256, RSA -> ps256, Ed25519; None if unsupported."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if isinstance(key, ec.EllipticCurvePrivateKey):
        return CURVE_ALGORITHMS.get(key.curve.name)
    if isinstance(key, rsa.RSAPrivateKey):
        return "ps256" if key.key_size >= 2048 else None
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    return None


def key_type_problem(key: Any) -> str | None:
    """Why C2PA cannot sign with this key, or None."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if key_algorithm(key) is not None:
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"the key's curve {key.curve.name} is not one C2PA accepts (use EC P-256, P-384 or P-521)"
    if isinstance(key, rsa.RSAPrivateKey):
        return f"the RSA key has {key.key_size} bits; C2PA needs at least 2048"
    return f"a {type(key).__name__.lstrip('_')} key cannot sign C2PA manifests (use EC P-256, RSA or Ed25519)"


def certificate_problem(certificate: Path, private_key: Path, *, now: datetime | None = None) -> str | None:
    """What C2PA would refuse about this certificate chain and key, in plain words; None if nothing.

    `certificate` is the PEM chain, station (end-entity) certificate first, then the CA(s) that
    signed it. Checked: both files readable PEM; the key a type C2PA signs with and the one the
    certificate is for; the certificate not self-signed, not a CA, valid now, with the
    digitalSignature key usage, an extended key usage C2PA accepts and an authorityKeyIdentifier;
    each certificate signed with an accepted algorithm by the next one in the file.
    """
    chain = _load_chain(certificate)
    if isinstance(chain, str):
        return chain
    key = _load_key(private_key)
    if isinstance(key, str):
        return key
    station = chain[0]
    checks = (
        lambda: key_type_problem(key),
        lambda: _ca_problem(station) if len(chain) > 1 else None,  # a chain upside down: not "self-signed"
        lambda: SELF_SIGNED if is_self_signed(station) else None,
        lambda: _key_match_problem(station, key),
        lambda: _ca_problem(station),
        lambda: _validity_problem(chain, now or datetime.now(timezone.utc)),
        lambda: _key_usage_problem(station),
        lambda: _eku_problem(station),
        lambda: _aki_problem(station),
        lambda: _algorithm_problem(chain),
        lambda: _order_problem(chain),
    )
    for check in checks:
        problem = check()
        if problem is not None:
            return problem
    return None


def is_self_signed(cert: x509.Certificate) -> bool:
    """Issued by itself: issuer equals subject and its own key verifies its signature."""
    if cert.issuer != cert.subject:
        return False
    from cryptography.exceptions import InvalidSignature

    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _load_chain(certificate: Path) -> list[x509.Certificate] | str:
    from cryptography import x509

    try:
        data = certificate.read_bytes()
    except OSError as exc:
        return f"cannot read the certificate file: {exc.strerror or exc}"
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        return "not a PEM certificate file (expected -----BEGIN CERTIFICATE-----, station certificate first)"


def _load_key(private_key: Path) -> Any:
    """The private key, or a problem in words; the key's bytes never appear in a message."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    try:
        data = private_key.read_bytes()
    except OSError as exc:
        return f"cannot read the private key file {private_key}: {exc.strerror or exc}"
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        return (f"the private key {private_key} is encrypted; give it unencrypted (protect the file, or "
                "pass it as the systemd credential c2pa_private_key)")
    except (ValueError, UnsupportedAlgorithm):
        return f"{private_key} is not a PEM private key"


def _key_match_problem(cert: x509.Certificate, key: Any) -> str | None:
    from cryptography.hazmat.primitives import serialization

    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        return f"the private key does not belong to the certificate ({_name(cert)})"
    return None


def _ca_problem(cert: x509.Certificate) -> str | None:
    from cryptography import x509

    with contextlib.suppress(x509.ExtensionNotFound):
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return (f"the first certificate ({_name(cert)}) is a CA certificate; the file must start with the "
                    "station certificate the CA issued, then the CA")
    return None


def _validity_problem(chain: list[x509.Certificate], now: datetime) -> str | None:
    for position, cert in enumerate(chain):
        which = "the certificate" if position == 0 else f"certificate {position + 1} in the chain"
        if cert.not_valid_after_utc < now:
            return f"{which} ({_name(cert)}) expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
        if cert.not_valid_before_utc > now:
            return f"{which} ({_name(cert)}) is not yet valid: from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
    return None


def _key_usage_problem(cert: x509.Certificate) -> str | None:
    from cryptography import x509

    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is None or not usage.digital_signature:
        return "missing the digitalSignature key usage, which C2PA requires (keyUsage = critical, digitalSignature)"
    if usage.key_cert_sign:
        return "the key usage keyCertSign belongs to a CA; a station certificate may not have it"
    return None


def _eku_problem(cert: x509.Certificate) -> str | None:
    from cryptography import x509

    try:
        oids = {oid.dotted_string for oid in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value}
    except x509.ExtensionNotFound:
        oids = set()
    return eku_problem(oids)


def eku_problem(oids: set[str]) -> str | None:
    """Whether c2pa accepts these extended key usages (dotted OIDs) on a signing certificate."""
    advice = "use extendedKeyUsage = emailProtection"
    if not oids:
        return f"no extended key usage; C2PA requires one ({advice})"
    if EKU_ANY in oids:
        return f"the extended key usage anyExtendedKeyUsage is not allowed by C2PA ({advice})"
    alone = oids & {EKU_TIME_STAMPING, EKU_OCSP_SIGNING}
    if alone and len(oids) > 1:
        return f"timeStamping and OCSPSigning may not be combined with other extended key usages ({advice})"
    if EKU_EMAIL_PROTECTION in oids or alone:
        return None
    return f"no extended key usage C2PA accepts ({', '.join(sorted(oids))}); {advice}"


def _aki_problem(cert: x509.Certificate) -> str | None:
    from cryptography import x509

    try:
        cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    except x509.ExtensionNotFound:
        return ("missing the authorityKeyIdentifier extension, which C2PA requires "
                "(authorityKeyIdentifier = keyid,issuer)")
    return None


def _algorithm_problem(chain: list[x509.Certificate]) -> str | None:
    for cert in chain:
        if cert.signature_algorithm_oid.dotted_string not in SIGNATURE_ALGORITHMS:
            return (f"{_name(cert)} is signed with algorithm {cert.signature_algorithm_oid.dotted_string}, which "
                    "C2PA does not accept (sign with SHA-256 or stronger: ECDSA, RSA or Ed25519)")
    return None


def _order_problem(chain: list[x509.Certificate]) -> str | None:
    from cryptography.exceptions import InvalidSignature

    for position, (cert, issuer) in enumerate(zip(chain, chain[1:]), start=1):
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):  # names differ, unusable key, bad signature
            return (f"certificate {position + 1} in the file ({_name(issuer)}) did not issue certificate "
                    f"{position} ({_name(cert)}); put the station certificate first, then the CA that signed it")
    return None


def _name(cert: x509.Certificate) -> str:
    """The certificate's common name, else its whole subject: enough to tell which file is meant."""
    from cryptography.x509.oid import NameOID

    common = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return f"CN={common[0].value}" if common else (cert.subject.rfc4514_string() or "no subject")
