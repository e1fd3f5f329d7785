"""Content credentials: a test CA issues a station certificate, outputs are signed and read back with
c2pa.Reader, and certificate_problem names what C2PA would refuse (each bad case is also tried on
c2pa itself, so the checks follow the library rather than a guess about it).

What "verifies" means here, for a chain from this file's own CA (no trust list configured): the
Reader's validation_state is "Valid", its successes include claimSignature.validated and
assertion.dataHash.match, and its only failure is signingCredential.untrusted (the test CA is on
no trust list). Informational codes (signingCredential.ocsp.skipped, and for TIFF
assertion.dataHash.additionalExclusionsPresent) are allowed. With the test CA given to the Reader
as a trust anchor, the state is "Trusted" with no failure at all.
"""

from __future__ import annotations

import datetime
import http.server
import io
import json
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from daemon.output.credentials import (DIGITAL_SOURCE_TYPE, SETTINGS, SigningError, c2pa_available,
                                       certificate_problem, eku_problem, sign, software_info)

if not c2pa_available():
    pytest.skip("c2pa-python (the [c2pa] extra) is not installed", allow_module_level=True)

import c2pa  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402
from PIL import Image  # noqa: E402

SOFTWARE = "codeformer-daemon 0.1.0"
MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "TIFF": "image/tiff", "WEBP": "image/webp"}
EMAIL = ExtendedKeyUsageOID.EMAIL_PROTECTION
NOW = datetime.datetime.now(datetime.timezone.utc)
DAY = datetime.timedelta(days=1)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test Archive")])


def _key_usage(*, signature: bool = False, cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=signature, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign,
                         encipher_only=False, decipher_only=False)


@dataclass(frozen=True)
class LocalCA:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def make_ca(common_name: str = "Test Archive CA") -> LocalCA:
    """A self-signed CA: basicConstraints CA=true, keyCertSign, as `openssl req -x509` with v3_ca makes one."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - DAY).not_valid_after(NOW + 365 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return LocalCA(key, cert)


def station_chain(ca: LocalCA, *, key: Any = None, self_signed: bool = False, ca_flag: bool = False,
                  signature: bool = True, cert_sign: bool = False, ekus: tuple = (EMAIL,), aki: bool = True,
                  digest: hashes.HashAlgorithm = hashes.SHA256(),
                  valid_from: datetime.timedelta = -DAY,
                  valid_until: datetime.timedelta = 30 * DAY) -> tuple[bytes, Any]:
    """A station (end-entity) certificate as PEM chain bytes (station first, then the CA) and its key.

    The defaults are what the README asks for: EC P-256, digitalSignature, emailProtection, O=Test Archive.
    """
    key = key or ec.generate_private_key(ec.SECP256R1())
    issuer_key = key if self_signed else ca.key
    builder = (x509.CertificateBuilder().subject_name(_name("Station 1"))
               .issuer_name(_name("Station 1") if self_signed else ca.cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(NOW + valid_from).not_valid_after(NOW + valid_until)
               .add_extension(x509.BasicConstraints(ca=ca_flag, path_length=None), critical=True)
               .add_extension(_key_usage(signature=signature, cert_sign=cert_sign), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if ekus:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(ekus)), critical=False)
    if aki:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    cert = builder.sign(issuer_key, None if isinstance(issuer_key, ed25519.Ed25519PrivateKey) else digest)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    return (pem if self_signed else pem + ca.pem()), key


def pkcs8(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_pair(folder: Path, chain: bytes, key: Any, key_bytes: bytes | None = None) -> tuple[Path, Path]:
    cert_path, key_path = folder / "station.pem", folder / "station.key"
    cert_path.write_bytes(chain)
    key_path.write_bytes(key_bytes if key_bytes is not None else pkcs8(key))
    return cert_path, key_path


@pytest.fixture(scope="module")
def ca() -> LocalCA:
    return make_ca()


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("scan") / "grandmother-1952.jpg"
    Image.new("RGB", (64, 48), (120, 90, 60)).save(path, "JPEG", quality=90)
    return path


@pytest.fixture
def station(tmp_path: Path, ca: LocalCA) -> tuple[Path, Path]:
    return write_pair(tmp_path, *station_chain(ca))


def encoded(folder: Path, fmt: str) -> Path:
    """An output as encode.py would leave it: written once by Pillow, not yet signed."""
    path = folder / f"restored.{fmt.lower()}"
    image = Image.new("RGB", (128, 96), (130, 95, 62))
    image.paste((200, 160, 140), (40, 30, 88, 66))  # the "restored face"
    image.save(path, fmt)
    return path


def sign_output(source: Path, dest: Path, fmt: str, station: tuple[Path, Path], scan: Path, **extra: Any) -> None:
    sign(source, dest, fmt, certificate=station[0], private_key=station[1], timestamp_url=None,
         ingredient=scan, ingredient_format="image/jpeg", software=SOFTWARE, title="grandmother-1952.jpg", **extra)


def read_store(path: Path, mime: str, trust_anchors: bytes | None = None) -> dict:
    """The manifest store as c2pa.Reader reports it, with nothing fetched from the network."""
    settings = dict(SETTINGS)
    if trust_anchors is not None:
        settings["trust"] = {"trust_anchors": trust_anchors.decode()}
    with c2pa.Context.from_dict(settings) as context, open(path, "rb") as f, \
            c2pa.Reader(mime, f, context=context) as reader:
        return json.loads(reader.json())


def codes(store: dict, kind: str) -> set[str]:
    return {item["code"] for item in store["validation_results"]["activeManifest"][kind]}


def actions(manifest: dict) -> dict[str, dict]:
    [assertion] = [a for a in manifest["assertions"] if a["label"].startswith("c2pa.actions")]
    return {action["action"]: action for action in assertion["data"]["actions"]}


# --- signing and reading back -------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF", "WEBP"])
def test_signed_output_names_the_scan_as_parent_and_verifies(tmp_path: Path, station: tuple[Path, Path], scan: Path,
                                                            fmt: str) -> None:
    source, dest = encoded(tmp_path, fmt), tmp_path / "signed"
    sign_output(source, dest, fmt, station, scan, description="faces restored by codeformer-image-restoration")
    store = read_store(dest, MIME[fmt])
    manifest = store["manifests"][store["active_manifest"]]

    assert manifest["title"] == "grandmother-1952.jpg"
    assert manifest["claim_generator_info"][0]["name"] == "codeformer-daemon"
    assert manifest["claim_generator_info"][0]["version"] == "0.1.0"
    [parent] = manifest["ingredients"]
    assert (parent["title"], parent["format"], parent["relationship"]) == ("grandmother-1952.jpg", "image/jpeg",
                                                                           "parentOf")
    done = actions(manifest)
    assert list(done) == ["c2pa.opened", "c2pa.edited"]
    [opened_ingredient] = done["c2pa.opened"]["parameters"]["ingredients"]
    assert opened_ingredient["url"].endswith(parent["label"])  # opened names the scan's ingredient assertion
    edited = done["c2pa.edited"]
    assert edited["digitalSourceType"] == DIGITAL_SOURCE_TYPE
    assert edited["softwareAgent"] == {"name": "codeformer-daemon", "version": "0.1.0"}
    assert edited["description"] == "faces restored by codeformer-image-restoration"
    assert manifest["signature_info"]["issuer"] == "Test Archive"  # the station's Organization, shown to viewers

    assert store["validation_state"] == "Valid"
    assert {"claimSignature.validated", "assertion.dataHash.match"} <= codes(store, "success")
    assert codes(store, "failure") == {"signingCredential.untrusted"}  # only: the test CA is on no trust list


def test_with_the_test_ca_as_trust_anchor_the_output_is_trusted(tmp_path: Path, ca: LocalCA,
                                                                 station: tuple[Path, Path], scan: Path) -> None:
    dest = tmp_path / "signed.jpg"
    sign_output(encoded(tmp_path, "JPEG"), dest, "JPEG", station, scan)
    store = read_store(dest, "image/jpeg", trust_anchors=ca.pem())
    assert store["validation_state"] == "Trusted"
    assert codes(store, "failure") == set()


def test_signing_keeps_the_pixels_and_changes_nothing_else(tmp_path: Path, station: tuple[Path, Path],
                                                            scan: Path) -> None:
    source, dest = encoded(tmp_path, "PNG"), tmp_path / "signed.png"
    before = source.read_bytes()
    sign_output(source, dest, "PNG", station, scan)
    assert source.read_bytes() == before
    with Image.open(source) as a, Image.open(dest) as b:
        assert a.tobytes() == b.tobytes() and a.size == b.size


def test_resaving_a_signed_file_with_pillow_drops_the_manifest(tmp_path: Path, station: tuple[Path, Path],
                                                                scan: Path) -> None:
    """Why signing is the last write: any Pillow save after it silently loses the credentials."""
    dest = tmp_path / "signed.jpg"
    sign_output(encoded(tmp_path, "JPEG"), dest, "JPEG", station, scan)
    assert read_store(dest, "image/jpeg")["active_manifest"]
    resaved = tmp_path / "resaved.jpg"
    with Image.open(dest) as image:
        image.save(resaved, "JPEG", quality=95)
    with open(resaved, "rb") as f:
        assert c2pa.Reader.try_create("image/jpeg", f) is None


@pytest.mark.parametrize("kind, algorithm", [
    ("ec-p256", "Es256"), ("ec-p384", "Es384"), ("rsa-2048", "Ps256"), ("ed25519", "Ed25519"),
])
def test_the_algorithm_follows_the_key(tmp_path: Path, ca: LocalCA, scan: Path, kind: str, algorithm: str) -> None:
    key = {"ec-p256": lambda: ec.generate_private_key(ec.SECP256R1()),
           "ec-p384": lambda: ec.generate_private_key(ec.SECP384R1()),
           "rsa-2048": lambda: rsa.generate_private_key(65537, 2048),
           "ed25519": ed25519.Ed25519PrivateKey.generate}[kind]()
    pair = write_pair(tmp_path, *station_chain(ca, key=key))
    dest = tmp_path / "signed.jpg"
    sign_output(encoded(tmp_path, "JPEG"), dest, "JPEG", pair, scan)
    store = read_store(dest, "image/jpeg")
    assert store["manifests"][store["active_manifest"]]["signature_info"]["alg"] == algorithm
    assert store["validation_state"] == "Valid"


def test_a_key_in_openssl_ecparam_form_is_used_as_it_is(tmp_path: Path, ca: LocalCA, scan: Path) -> None:
    """`openssl ecparam -genkey` writes SEC1 (BEGIN EC PRIVATE KEY), which c2pa itself rejects."""
    chain, key = station_chain(ca)
    sec1 = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())
    assert sec1.startswith(b"-----BEGIN EC PRIVATE KEY-----")
    pair = write_pair(tmp_path, chain, key, sec1)
    dest = tmp_path / "signed.jpg"
    sign_output(encoded(tmp_path, "JPEG"), dest, "JPEG", pair, scan)
    assert read_store(dest, "image/jpeg")["validation_state"] == "Valid"
    assert pair[1].read_bytes() == sec1  # the key file is read, never rewritten


def test_a_refused_certificate_fails_in_words_and_leaves_no_file(tmp_path: Path, ca: LocalCA, scan: Path) -> None:
    chain, key = station_chain(ca, valid_from=-30 * DAY, valid_until=-DAY)
    pair = write_pair(tmp_path, chain, key)
    dest = tmp_path / "signed.jpg"
    with pytest.raises(SigningError, match="expired"):
        sign_output(encoded(tmp_path, "JPEG"), dest, "JPEG", pair, scan)
    assert not dest.exists()


def test_a_failure_inside_c2pa_leaves_no_file(tmp_path: Path, station: tuple[Path, Path], scan: Path) -> None:
    source, dest = tmp_path / "broken.jpg", tmp_path / "signed.jpg"
    source.write_bytes(b"\xff\xd8 not really a JPEG")
    with pytest.raises(SigningError, match="C2PA signing failed"):
        sign_output(source, dest, "JPEG", station, scan)
    assert not dest.exists()


def test_a_scan_pointing_at_remote_credentials_makes_no_request(tmp_path: Path, ca: LocalCA,
                                                                 station: tuple[Path, Path]) -> None:
    """Nothing leaves the machine: a scan whose own manifest lives at a URL is not fetched while signing."""
    requests: list[str] = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
            requests.append(self.path)
            self.send_error(404)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        scan = tmp_path / "scan-with-remote-credentials.jpg"
        plain = tmp_path / "plain.jpg"
        Image.new("RGB", (64, 48), (120, 90, 60)).save(plain, "JPEG")
        chain, key = station_chain(ca)
        manifest = {"claim_generator_info": [{"name": "scanner", "version": "1"}], "title": "scan",
                    "assertions": [{"label": "c2pa.actions", "data": {"actions": [
                        {"action": "c2pa.created", "digitalSourceType": DIGITAL_SOURCE_TYPE}]}}]}
        with c2pa.Builder.from_json(manifest) as builder, \
                c2pa.Signer.from_info(c2pa.C2paSignerInfo("es256", chain, pkcs8(key), None)) as signer, \
                open(plain, "rb") as src, open(scan, "w+b") as out:
            builder.set_no_embed()
            builder.set_remote_url(f"http://127.0.0.1:{server.server_port}/scan.c2pa")
            builder.sign(signer, "image/jpeg", src, out)
        sign_output(encoded(tmp_path, "JPEG"), tmp_path / "signed.jpg", "JPEG", station, scan)
    finally:
        server.shutdown()
        server.server_close()
    assert requests == []


def test_signing_never_overwrites(tmp_path: Path, station: tuple[Path, Path], scan: Path) -> None:
    dest = tmp_path / "signed.jpg"
    dest.write_bytes(b"someone else's file")
    with pytest.raises(FileExistsError):
        sign_output(encoded(tmp_path, "JPEG"), dest, "JPEG", station, scan)
    assert dest.read_bytes() == b"someone else's file"


def test_the_module_imports_and_answers_without_the_extra() -> None:
    """Without c2pa-python, `c2pa_available` says so instead of the import failing."""
    code = ("import sys; sys.modules['c2pa'] = None\n"
            "from daemon.output.credentials import c2pa_available\n"
            "print(c2pa_available())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parent.parent, check=True)
    assert result.stdout.strip() == "False"
    assert c2pa_available() is True


# --- certificate_problem: each case checked against c2pa itself --------------------------------------

def c2pa_signs(chain: bytes, key: Any) -> bool:
    """Whether c2pa itself signs (and verifies after signing) with this chain and key."""
    algorithm = {"secp256r1": "es256", "secp384r1": "es384"}.get(getattr(getattr(key, "curve", None), "name", ""))
    algorithm = algorithm or ("ps256" if isinstance(key, rsa.RSAPrivateKey) else "es256")
    manifest = {"claim_generator_info": [{"name": "test", "version": "1"}], "title": "t",
                "assertions": [{"label": "c2pa.actions", "data": {"actions": [
                    {"action": "c2pa.created", "digitalSourceType": DIGITAL_SOURCE_TYPE}]}}]}
    image = io.BytesIO()
    Image.new("RGB", (16, 16)).save(image, "JPEG")
    image.seek(0)
    try:
        with c2pa.Context.from_dict(SETTINGS) as context, c2pa.Builder.from_json(manifest, context) as builder, \
                c2pa.Signer.from_info(c2pa.C2paSignerInfo(algorithm, chain, pkcs8(key), None)) as signer:
            builder.sign(signer, "image/jpeg", image, io.BytesIO())
    except c2pa.C2paError:
        return False
    return True


def station_only(chain_and_key: tuple[bytes, Any]) -> tuple[bytes, Any]:
    station = x509.load_pem_x509_certificates(chain_and_key[0])[0]
    return station.public_bytes(serialization.Encoding.PEM), chain_and_key[1]


def other_key(chain_and_key: tuple[bytes, Any]) -> tuple[bytes, Any]:
    return chain_and_key[0], ec.generate_private_key(ec.SECP256R1())


def reversed_chain(chain_and_key: tuple[bytes, Any]) -> tuple[bytes, Any]:
    certs = x509.load_pem_x509_certificates(chain_and_key[0])
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in reversed(certs)), chain_and_key[1]


def foreign_ca(chain_and_key: tuple[bytes, Any]) -> tuple[bytes, Any]:
    station = x509.load_pem_x509_certificates(chain_and_key[0])[0]
    return station.public_bytes(serialization.Encoding.PEM) + make_ca("Another CA").pem(), chain_and_key[1]


# (case, how to make it, words the problem must contain or None, whether c2pa itself refuses it)
CASES = [
    ("good chain", lambda ca: station_chain(ca), None, False),
    ("station only, no CA in the file", lambda ca: station_only(station_chain(ca)), None, False),
    ("self-signed, as openssl req -x509 makes it", lambda ca: station_chain(ca, self_signed=True, ca_flag=True),
     "self-signed: C2PA refuses", True),
    ("self-signed leaf", lambda ca: station_chain(ca, self_signed=True), "self-signed: C2PA refuses", False),
    ("expired", lambda ca: station_chain(ca, valid_from=-30 * DAY, valid_until=-DAY), "expired on", True),
    ("not yet valid", lambda ca: station_chain(ca, valid_from=DAY), "not yet valid", True),
    ("no digitalSignature", lambda ca: station_chain(ca, signature=False), "digitalSignature", True),
    ("keyCertSign on the station", lambda ca: station_chain(ca, cert_sign=True), "keyCertSign", True),
    ("no EKU", lambda ca: station_chain(ca, ekus=()), "extended key usage", True),
    ("serverAuth EKU", lambda ca: station_chain(ca, ekus=(ExtendedKeyUsageOID.SERVER_AUTH,)),
     "extended key usage", True),
    ("anyExtendedKeyUsage", lambda ca: station_chain(ca, ekus=(EMAIL, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE)),
     "anyExtendedKeyUsage", True),
    ("no authorityKeyIdentifier", lambda ca: station_chain(ca, aki=False), "authorityKeyIdentifier", True),
    ("station marked as a CA", lambda ca: station_chain(ca, ca_flag=True), "CA certificate", True),
    ("a CA certificate alone", lambda ca: station_only(station_chain(ca, ca_flag=True)), "CA certificate", True),
    ("key of another certificate", lambda ca: other_key(station_chain(ca)), "does not belong", True),
    ("RSA key under 2048 bits", lambda ca: station_chain(ca, key=rsa.generate_private_key(65537, 1024)),
     "2048", True),
    ("curve C2PA does not know", lambda ca: station_chain(ca, key=ec.generate_private_key(ec.SECP256K1())),
     "curve secp256k1", True),
    ("signed with SHA-224", lambda ca: station_chain(ca, digest=hashes.SHA224()), "SHA-256 or stronger", True),
    ("chain upside down", lambda ca: reversed_chain(station_chain(ca)), "CA certificate", None),
    ("CA that did not issue it", lambda ca: foreign_ca(station_chain(ca)), "did not issue", None),
]


@pytest.mark.parametrize("case, make, words, c2pa_refuses", CASES, ids=[case[0] for case in CASES])
def test_certificate_problem(tmp_path: Path, ca: LocalCA, case: str, make: Any, words: str | None,
                             c2pa_refuses: bool | None) -> None:
    chain, key = make(ca)
    problem = certificate_problem(*write_pair(tmp_path, chain, key))
    if words is None:
        assert problem is None
    else:
        assert problem is not None and words in problem
        assert b"PRIVATE KEY" not in problem.encode() and pkcs8(key).split(b"\n")[1].decode() not in problem
    if c2pa_refuses is not None:  # None: c2pa signs anyway (it checks no chain order); we refuse for validators
        assert c2pa_signs(chain, key) is not c2pa_refuses


@pytest.mark.parametrize("content, words", [
    (None, "cannot read the certificate file"),
    (b"not a certificate\n", "not a PEM certificate file"),
])
def test_certificate_file_problems(tmp_path: Path, ca: LocalCA, content: bytes | None, words: str) -> None:
    cert_path, key_path = write_pair(tmp_path, *station_chain(ca))
    if content is None:
        cert_path.unlink()
    else:
        cert_path.write_bytes(content)
    assert words in (certificate_problem(cert_path, key_path) or "")


@pytest.mark.parametrize("content, words", [
    (None, "cannot read the private key file"),
    (b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n", "is not a PEM private key"),
    ("encrypted", "is encrypted"),
])
def test_key_file_problems(tmp_path: Path, ca: LocalCA, content: Any, words: str) -> None:
    chain, key = station_chain(ca)
    cert_path, key_path = write_pair(tmp_path, chain, key)
    if content is None:
        key_path.unlink()
    elif content == "encrypted":
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.BestAvailableEncryption(b"passphrase")))
    else:
        key_path.write_bytes(content)
    problem = certificate_problem(cert_path, key_path) or ""
    assert words in problem and "bm90IGEga2V5" not in problem


def test_validity_is_judged_at_the_given_moment(tmp_path: Path, ca: LocalCA) -> None:
    pair = write_pair(tmp_path, *station_chain(ca, valid_until=30 * DAY))
    assert certificate_problem(*pair, now=NOW) is None
    assert "expired on" in (certificate_problem(*pair, now=NOW + 31 * DAY) or "")


# --- the extended key usages C2PA accepts, checked against c2pa itself -----------------------------

DOCUMENT_SIGNING = x509.ObjectIdentifier("1.3.6.1.5.5.7.3.36")
EKU_CASES = [
    ((EMAIL,), True),
    ((EMAIL, ExtendedKeyUsageOID.CLIENT_AUTH), True),
    ((EMAIL, DOCUMENT_SIGNING), True),
    ((ExtendedKeyUsageOID.TIME_STAMPING,), True),
    ((ExtendedKeyUsageOID.OCSP_SIGNING,), True),
    ((ExtendedKeyUsageOID.TIME_STAMPING, EMAIL), False),
    ((DOCUMENT_SIGNING,), False),  # in the C2PA list, but c2pa-python 0.38 fails its own verification of it
    ((ExtendedKeyUsageOID.CODE_SIGNING,), False),
    ((EMAIL, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE), False),
]


@pytest.mark.parametrize("ekus, accepted", EKU_CASES, ids=["+".join(o.dotted_string for o in e) for e, _ in EKU_CASES])
def test_eku_verdict_matches_c2pa(ca: LocalCA, ekus: tuple, accepted: bool) -> None:
    assert (eku_problem({o.dotted_string for o in ekus}) is None) is accepted
    assert c2pa_signs(*station_chain(ca, ekus=ekus)) is accepted


def test_software_info() -> None:
    assert software_info("codeformer-daemon 0.1.0") == {"name": "codeformer-daemon", "version": "0.1.0"}
    assert software_info("codeformer-daemon") == {"name": "codeformer-daemon"}
