"""Certificate signatures: a test CA built with `cryptography` (root -> intermediate -> leaf with codeSigning), roots
trusted by the store, checks at the signing time recorded in the signature, CRLs; and model-signing's certificate mode.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from test_pkcs11 import keygen_on_token, softhsm_conf, token  # noqa: F401 (fixtures)

from sovpack.bundle.directory import read_metadata_bytes, signature_path
from sovpack.bundle.keys import key_id, load_public_key
from sovpack.bundle.metadata import parse_metadata
from sovpack.bundle.sign import statement_for
from sovpack.bundle.signature import sign_statement
from sovpack.common.hashing import sha256_bytes

NOW = datetime.now(timezone.utc)
DAY = timedelta(days=1)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "MoD"), x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def issue(
    subject: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    key=None,
    public_key=None,
    start: datetime = NOW - 30 * DAY,
    end: datetime = NOW + 365 * DAY,
    eku: list | None = None,
    digital_signature: bool = True,
):
    """A certificate (self-signed without `issuer`) and its private key (None when `public_key` is given)."""
    key = key if key is not None or public_key is not None else ec.generate_private_key(ec.SECP384R1())
    public = public_key or key.public_key()
    issuer_cert, issuer_key = issuer or (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_cert.subject if issuer_cert else _name(subject))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca and digital_signature,
                content_commitment=False,
                key_encipherment=not digital_signature,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    if not ca and eku is not False:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku or [ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
    return builder.sign(issuer_key, hashes.SHA384()), key


def pem(path: Path, *certificates: x509.Certificate) -> Path:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates))
    return path


def key_file(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    pem_bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.write_bytes(pem_bytes)
    return path


class CA:
    """root -> intermediate, and leaves they issue; files under `directory`."""

    def __init__(self, directory: Path, name: str = "Root CA"):
        directory.mkdir(exist_ok=True)
        self.dir = directory
        self.root = issue(name, None, ca=True, start=NOW - 10 * 365 * DAY, end=NOW + 10 * 365 * DAY)
        self.intermediate = issue(f"{name} Issuing", self.root, ca=True, start=NOW - 5 * 365 * DAY, end=NOW + 5 * 365 * DAY)
        self.root_pem = pem(directory / f"{name.replace(' ', '-')}.pem", self.root[0])
        self.intermediate_pem = pem(directory / f"{name.replace(' ', '-')}-issuing.pem", self.intermediate[0])

    def leaf(self, cn: str, **kwargs) -> tuple[Path, Path, x509.Certificate]:
        """KEY and CHAIN.pem (leaf, intermediate) for a signer."""
        cert, key = issue(cn, self.intermediate, **kwargs)
        chain = pem(self.dir / f"{cn}.chain.pem", cert, self.intermediate[0])
        return (key_file(self.dir / f"{cn}.key", key) if key else None), chain, cert

    def crl(self, *revoked: x509.Certificate, issued: datetime = NOW - DAY) -> Path:
        builder = x509.CertificateRevocationListBuilder().issuer_name(self.intermediate[0].subject)
        builder = builder.last_update(issued).next_update(issued + 30 * DAY)
        for cert in revoked:
            entry = x509.RevokedCertificateBuilder().serial_number(cert.serial_number).revocation_date(NOW - DAY).build()
            builder = builder.add_revoked_certificate(entry)
        path = self.dir / f"crl-{len(list(self.dir.glob('crl-*')))}.pem"
        path.write_bytes(builder.sign(self.intermediate[1], hashes.SHA384()).public_bytes(serialization.Encoding.PEM))
        return path


@pytest.fixture
def ca(tmp_path):
    return CA(tmp_path / "ca")


@pytest.fixture
def pki_store(tmp_path, cli, ca):
    root = tmp_path / "pki-store"
    assert cli("trust", "add-root", ca.root_pem, "--name", "mod-root", "--store", root).code == 0
    return root


def sign_as(bundle: Path, key_path: Path, chain_path: Path, signed_at: datetime) -> Path:
    """A certificate signature recording `signed_at` (sovpack's own `sign` records the present time)."""
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    raw = read_metadata_bytes(bundle)
    payload = statement_for(parse_metadata(raw), sha256_bytes(raw), signed_at)
    chain = x509.load_pem_x509_certificates(chain_path.read_bytes())
    target = signature_path(bundle, key_id(key.public_key()))
    target.parent.mkdir(exist_ok=True)
    target.write_bytes(sign_statement(key, payload, chain))
    return target


def unsigned(cli, tmp_path, model_dir, name: str = "bundle-c") -> Path:
    bundle = tmp_path / name
    assert cli("pack", model_dir, "--out", bundle, "--name", "tiny", "--version", "3").code == 0
    return bundle


def verify_json(cli, bundle: Path, store: Path, *extra) -> tuple[int, dict]:
    result = cli("verify", bundle, "--store", store, "--json", *extra)
    return result.code, json.loads(result.out)


def model_signing_certificate(bundle: Path, signature: Path, root: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "model_signing"
    command = [exe, "verify", "certificate", bundle, "--signature", signature, "--certificate_chain", root]
    return subprocess.run(command, capture_output=True, text=True)


def test_certificate_signature_verifies_against_a_trusted_root(cli, tmp_path, model_dir, ca, pki_store):
    key, chain, cert = ca.leaf("Officer Jones")
    bundle = unsigned(cli, tmp_path, model_dir)
    signed = cli("sign", bundle, "--key", key, "--cert", chain)
    assert signed.code == 0, signed.err
    assert "CN=Officer Jones" in signed.out
    code, report = verify_json(cli, bundle, pki_store)
    assert code == 0, report["error"]
    (signature,) = report["signatures"]
    assert signature["status"] == "valid" and signature["signer"] == "CN=Officer Jones,O=MoD"
    assert signature["certificate"] == {
        "subject": "CN=Officer Jones,O=MoD",
        "issuer": "CN=Root CA Issuing,O=MoD",
        "serial": f"{cert.serial_number:x}",
    }
    assert signature["signed_at"] is not None
    described = json.loads(cli("inspect", bundle, "--json").out)
    assert described["signatures"][0]["certificate"]["subject"] == "CN=Officer Jones,O=MoD"
    assert "Officer Jones" in cli("inspect", bundle).out


def test_model_signing_certificate_mode_accepts_and_refuses_a_tampered_bundle(cli, tmp_path, model_dir, ca):
    key, chain, _ = ca.leaf("Officer Jones")
    bundle = unsigned(cli, tmp_path, model_dir)
    assert cli("sign", bundle, "--key", key, "--cert", chain).code == 0
    (signature,) = (bundle / "signatures").glob("*.sig")
    accepted = model_signing_certificate(bundle, signature, ca.root_pem)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert "Verification succeeded" in accepted.stdout
    (bundle / "README.md").write_text("tampered")
    refused = model_signing_certificate(bundle, signature, ca.root_pem)
    assert refused.returncode != 0 and "README.md" in refused.stdout + refused.stderr


def test_a_certificate_expired_now_counts_when_it_was_valid_at_signing_time(cli, tmp_path, model_dir, ca, pki_store):
    key, chain, _ = ca.leaf("Retired Officer", start=NOW - 400 * DAY, end=NOW - 10 * DAY)
    bundle = unsigned(cli, tmp_path, model_dir)
    sign_as(bundle, key, chain, NOW - 100 * DAY)
    code, report = verify_json(cli, bundle, pki_store)
    assert code == 0, report["error"]


@pytest.mark.parametrize(
    ("validity", "signed_at", "message"),
    [
        ((NOW - 400 * DAY, NOW - 10 * DAY), NOW - 5 * DAY, "had expired at the signing time"),
        ((NOW - DAY, NOW + 365 * DAY), NOW - 20 * DAY, "was not yet valid at the signing time"),
    ],
)
def test_a_certificate_outside_its_validity_at_signing_time_is_refused(
    cli, tmp_path, model_dir, ca, pki_store, validity, signed_at, message
):
    key, chain, _ = ca.leaf("Officer Brown", start=validity[0], end=validity[1])
    bundle = unsigned(cli, tmp_path, model_dir)
    sign_as(bundle, key, chain, signed_at)
    code, report = verify_json(cli, bundle, pki_store)
    assert code == 1
    assert report["error"]["step"] == "threshold"
    assert "'CN=Officer Brown,O=MoD'" in report["error"]["message"] and message in report["error"]["message"]
    assert report["signatures"][0]["status"] == "rejected"
    text = cli("verify", bundle, "--store", pki_store)
    assert text.code == 1 and "CN=Officer Brown" in text.err and message in text.err


def test_a_revoked_certificate_is_refused_once_the_crl_is_held(cli, tmp_path, model_dir, ca, pki_store):
    key, chain, cert = ca.leaf("Officer Black")
    bundle = unsigned(cli, tmp_path, model_dir)
    assert cli("sign", bundle, "--key", key, "--cert", chain).code == 0
    assert verify_json(cli, bundle, pki_store)[0] == 0
    crl = ca.crl(cert)
    without_issuer = cli("trust", "crl", "add", crl, "--store", pki_store)
    assert without_issuer.code == 1 and "not signed by a trusted root" in without_issuer.err
    added = cli("trust", "crl", "add", crl, "--issuer", ca.intermediate_pem, "--store", pki_store)
    assert added.code == 0, added.err
    code, report = verify_json(cli, bundle, pki_store)
    assert code == 1
    assert "'CN=Officer Black,O=MoD'" in report["error"]["message"] and "is revoked" in report["error"]["message"]
    older = ca.crl(issued=NOW - 3 * DAY)
    refused = cli("trust", "crl", "add", older, "--issuer", ca.intermediate_pem, "--store", pki_store)
    assert refused.code == 1 and "is older" in refused.err


def test_a_crl_not_signed_by_the_issuer_it_names_is_refused(cli, tmp_path, ca, pki_store):
    other = CA(tmp_path / "other", "Root CA")  # same names, other keys
    forged = other.crl()
    result = cli("trust", "crl", "add", forged, "--issuer", ca.intermediate_pem, "--store", pki_store)
    assert result.code == 1 and "is not signed by" in result.err
    assert json.loads(cli("trust", "list", "--store", pki_store, "--json").out)["crls"] == []


@pytest.mark.parametrize(
    ("leaf", "message"),
    [
        ({"eku": [ExtendedKeyUsageOID.SERVER_AUTH]}, "lacks the extended key usage codeSigning (wrong usage)"),
        ({"digital_signature": False}, "key usage without digitalSignature (wrong usage)"),
    ],
)
def test_a_certificate_with_the_wrong_usage_is_refused(cli, tmp_path, model_dir, ca, pki_store, leaf, message):
    key, chain, _ = ca.leaf("Web Server", **leaf)
    bundle = unsigned(cli, tmp_path, model_dir)
    assert cli("sign", bundle, "--key", key, "--cert", chain).code == 0
    code, report = verify_json(cli, bundle, pki_store)
    assert code == 1 and "'CN=Web Server,O=MoD'" in report["error"]["message"] and message in report["error"]["message"]


def test_a_chain_to_an_untrusted_root_is_refused(cli, tmp_path, model_dir, pki_store):
    rogue = CA(tmp_path / "rogue", "Rogue CA")
    key, _, cert = rogue.leaf("Officer Evil")
    chain = pem(tmp_path / "rogue-full-chain.pem", cert, rogue.intermediate[0], rogue.root[0])
    bundle = unsigned(cli, tmp_path, model_dir)
    assert cli("sign", bundle, "--key", key, "--cert", chain).code == 0
    code, report = verify_json(cli, bundle, pki_store)
    assert code == 1
    assert "'CN=Rogue CA,O=MoD'" in report["error"]["message"] and "unknown root" in report["error"]["message"]


def test_a_missing_intermediate_is_refused(cli, tmp_path, model_dir, ca, pki_store):
    key, _, cert = ca.leaf("Officer Green")
    leaf_only = pem(tmp_path / "leaf-only.pem", cert)
    bundle = unsigned(cli, tmp_path, model_dir)
    assert cli("sign", bundle, "--key", key, "--cert", leaf_only).code == 0
    code, report = verify_json(cli, bundle, pki_store)
    assert code == 1
    message = report["error"]["message"]
    assert "'CN=Officer Green,O=MoD'" in message and "an intermediate certificate is missing" in message


def test_the_threshold_counts_signers_by_subject_not_by_key(cli, tmp_path, model_dir, ca, pki_store):
    bundle = unsigned(cli, tmp_path, model_dir)
    for _ in range(2):  # the same officer, two keys (a renewed card)
        key, chain, _ = ca.leaf("Officer Jones")
        assert cli("sign", bundle, "--key", key, "--cert", chain).code == 0
    code, report = verify_json(cli, bundle, pki_store, "--threshold", "2")
    assert code == 1 and "threshold not met: 1 of 2" in report["error"]["message"]
    key, chain, _ = ca.leaf("Officer Smith")
    assert cli("sign", bundle, "--key", key, "--cert", chain).code == 0
    code, report = verify_json(cli, bundle, pki_store, "--threshold", "2")
    assert code == 0, report["error"]


def test_the_subject_rule_and_required_usage_of_a_root(cli, tmp_path, model_dir, ca):
    store = tmp_path / "strict-store"
    added = cli(
        "trust", "add-root", ca.root_pem, "--subject", "CN=Officer *,O=MoD", "--require-eku", "codeSigning", "--store", store
    )
    assert added.code == 0, added.err
    bundle = unsigned(cli, tmp_path, model_dir)
    key, chain, _ = ca.leaf("Contractor Lee")
    assert cli("sign", bundle, "--key", key, "--cert", chain).code == 0
    code, report = verify_json(cli, bundle, store)
    assert code == 1 and "does not match the subject rule 'CN=Officer *,O=MoD'" in report["error"]["message"]
    other = unsigned(cli, tmp_path, model_dir, "bundle-d")
    key, chain, _ = ca.leaf("Officer Noeku", eku=False)
    assert cli("sign", other, "--key", key, "--cert", chain).code == 0
    code, report = verify_json(cli, other, store)
    assert code == 1 and "lacks the extended key usage codeSigning that root" in report["error"]["message"]


def test_sign_refuses_a_certificate_for_another_key_or_not_valid_now(cli, tmp_path, model_dir, ca, keys):
    bundle = unsigned(cli, tmp_path, model_dir)
    _, chain, _ = ca.leaf("Officer Jones")
    wrong = cli("sign", bundle, "--key", keys / "alice.key", "--cert", chain)
    assert wrong.code == 2 and "for another key than the signing key" in wrong.err
    key, expired, _ = ca.leaf("Officer Old", start=NOW - 400 * DAY, end=NOW - DAY)
    late = cli("sign", bundle, "--key", key, "--cert", expired)
    assert late.code == 2 and "'CN=Officer Old,O=MoD'" in late.err and "not valid now" in late.err
    assert not list((bundle / "signatures").glob("*.sig")) if (bundle / "signatures").exists() else True


def test_add_root_refuses_a_certificate_that_is_not_a_ca(cli, tmp_path, ca):
    _, _, cert = ca.leaf("Officer Jones")
    result = cli("trust", "add-root", pem(tmp_path / "leaf.pem", cert), "--store", tmp_path / "s")
    assert result.code == 1 and "is not a CA certificate" in result.err and "Officer Jones" in result.err


def test_import_and_serve_policy_accept_a_certificate_signer(cli, tmp_path, model_dir, ca, pki_store):
    key, chain, _ = ca.leaf("Officer Jones")
    bundle = unsigned(cli, tmp_path, model_dir)
    assert cli("sign", bundle, "--key", key, "--cert", chain).code == 0
    assert cli("export", bundle, "--to", tmp_path / "media").code == 0
    imported = cli("import", tmp_path / "media", "--store", pki_store)
    assert imported.code == 0, imported.err
    listed = json.loads(cli("list", "--store", pki_store, "--json").out)
    assert listed["bundles"][0]["signers"] == ["CN=Officer Jones,O=MoD"]
    assert cli("verify", "tiny", "--store", pki_store).code == 0


def test_a_token_key_signs_with_a_certificate(cli, tmp_path, model_dir, ca, pki_store, token):  # noqa: F811
    uri = f"{token};object=officer"
    assert keygen_on_token(cli, tmp_path, uri).code == 0
    cert, _ = issue("Officer Token", ca.intermediate, public_key=load_public_key(tmp_path / "pub" / "officer.pub"))
    chain = pem(tmp_path / "token-chain.pem", cert, ca.intermediate[0])
    bundle = unsigned(cli, tmp_path, model_dir)
    signed = cli("sign", bundle, "--pkcs11", uri, "--pin-file", tmp_path / "pin", "--cert", chain)
    assert signed.code == 0, signed.err
    code, report = verify_json(cli, bundle, pki_store)
    assert code == 0 and report["signatures"][0]["signer"] == "CN=Officer Token,O=MoD"
    (signature,) = (bundle / "signatures").glob("*.sig")
    assert model_signing_certificate(bundle, signature, ca.root_pem).returncode == 0


def test_the_import_record_holds_each_certificate_signer_typed(cli, tmp_path, model_dir, ca, pki_store, keys):
    from sovpack.bundle.certificates import subject_identity
    from sovpack.store.record import Signer, SignerCertificate, read_record

    assert cli("trust", "add", keys / "alice.pub", "--store", pki_store).code == 0
    key, chain, cert = ca.leaf("Officer Jones")
    bundle = unsigned(cli, tmp_path, model_dir)
    assert cli("sign", bundle, "--key", key, "--cert", chain).code == 0
    assert cli("sign", bundle, "--key", keys / "alice.key").code == 0
    assert cli("export", bundle, "--to", tmp_path / "media").code == 0
    assert cli("import", tmp_path / "media", "--store", pki_store, "--threshold", "2").code == 0
    path = pki_store / "records" / "tiny" / "3.json"
    record = read_record(path, "tiny", 3)
    officer = SignerCertificate("CN=Officer Jones,O=MoD", "CN=Root CA Issuing,O=MoD", f"{cert.serial_number:x}", "mod-root")
    (certified,) = [s for s in record.accepted_by if s.certificate]
    assert certified == Signer("CN=Officer Jones,O=MoD", subject_identity("CN=Officer Jones,O=MoD"), officer)
    assert [s.name for s in record.accepted_by if s.certificate is None] == ["alice"]
    written = json.loads(path.read_text())
    assert {"name": "CN=Officer Jones,O=MoD", "hint": certified.hint, "certificate": officer.to_json()} in written["accepted_by"]
    # a certificate signer the record names with another identity, or a certificate that is not the four fields: damaged
    for damage in ({"hint": "x509:" + "0" * 64}, {"certificate": ["CN=Officer Jones,O=MoD"]}):
        entry = {"name": "CN=Officer Jones,O=MoD", "hint": certified.hint, "certificate": officer.to_json()} | damage
        path.chmod(0o644)
        path.write_text(json.dumps(written | {"accepted_by": [entry]}))
        listed = cli("list", "--store", pki_store)
        assert listed.code == 1 and f"{path} is damaged" in listed.err and "accepted_by" in listed.err, listed.err


def test_serving_an_installed_bundle_keeps_its_certificate_signers_while_their_root_is_trusted(
    cli, tmp_path, model_dir, ca, pki_store
):
    from sovpack.errors import Refused
    from sovpack.store.store import Store

    key, chain, _ = ca.leaf("Officer Jones")
    bundle = unsigned(cli, tmp_path, model_dir)
    assert cli("sign", bundle, "--key", key, "--cert", chain).code == 0
    assert cli("export", bundle, "--to", tmp_path / "media").code == 0
    imported = cli("import", tmp_path / "media", "--store", pki_store)
    assert imported.code == 0 and "does not trust" not in imported.err, imported.err
    store = Store(pki_store)
    policy = store.policy_for(store.find("tiny"))
    assert [r.name for r in policy.roots] == ["mod-root"] and policy.keys == () and policy.threshold == 1
    other = CA(tmp_path / "other", "Other CA")
    assert cli("trust", "add-root", other.root_pem, "--name", "other-root", "--store", pki_store).code == 0
    assert [r.name for r in Store(pki_store).policy_for(store.find("tiny")).roots] == ["mod-root"]  # only its own root
    for suffix in (".pem", ".json"):  # the root it was accepted under is no longer trusted
        (pki_store / "trust" / "roots" / f"mod-root{suffix}").unlink()
    with pytest.raises(Refused, match="only 0 of those signers are still trusted and 1 are required"):
        Store(pki_store).policy_for(store.find("tiny"))
    refused = cli("verify", "tiny", "--store", pki_store)
    assert refused.code == 1 and "is neither a trusted root" in refused.err, refused.err


def test_trust_add_root_and_crl_add_are_recorded_before_they_change_the_store(cli, tmp_path, ca, pki_store):
    from helpers import audit_records, sovpack
    from test_audit import without_file_growth_beyond

    other = CA(tmp_path / "other", "Other CA")
    log_size = (pki_store / "audit.log").stat().st_size
    full = without_file_growth_beyond(log_size)
    root = sovpack("trust", "add-root", other.root_pem, "--store", pki_store, preexec_fn=full)
    assert root.returncode == 3 and b"audit.log" in root.stderr, root.stderr
    assert sorted(p.name for p in (pki_store / "trust" / "roots").iterdir()) == ["mod-root.json", "mod-root.pem"]
    crl = sovpack("trust", "crl", "add", ca.crl(), "--issuer", ca.intermediate_pem, "--store", pki_store, preexec_fn=full)
    assert crl.returncode == 3 and b"audit.log" in crl.stderr, crl.stderr
    assert not (pki_store / "trust" / "crls").exists()
    assert [r["event"] for r in audit_records(pki_store)] == ["trust-add-root"]
    assert cli("trust", "crl", "add", ca.crl(), "--issuer", ca.intermediate_pem, "--store", pki_store).code == 0
    (held,) = (pki_store / "trust" / "crls").iterdir()
    added = audit_records(pki_store)[-1]
    assert added["event"] == "trust-crl-add" and added["sha256"] == held.stem and "Root CA Issuing" in added["checked_with"]
    assert cli("audit", "verify", "--store", pki_store).code == 0


@pytest.mark.parametrize("damage", ["not a certificate", "two certificates", "a CRL that is not one"])
def test_damaged_roots_and_crls_in_the_store_are_named(cli, tmp_path, model_dir, ca, pki_store, damage):
    key, chain, cert = ca.leaf("Officer Jones")
    bundle = unsigned(cli, tmp_path, model_dir)
    assert cli("sign", bundle, "--key", key, "--cert", chain).code == 0
    root_file = pki_store / "trust" / "roots" / "mod-root.pem"
    if damage == "not a certificate":
        root_file.write_bytes(root_file.read_bytes().replace(b"MII", b"MIJ", 1))
        named = root_file
    elif damage == "two certificates":
        root_file.write_bytes(root_file.read_bytes() * 2)
        named = root_file
    else:
        assert cli("trust", "crl", "add", ca.crl(cert), "--issuer", ca.intermediate_pem, "--store", pki_store).code == 0
        (named,) = (pki_store / "trust" / "crls").iterdir()
        named.write_bytes(named.read_bytes()[:40])
    result = cli("verify", bundle, "--store", pki_store)
    assert result.code == 1 and str(named) in result.err and "is damaged" in result.err, result.err
    assert cli("trust", "list", "--store", pki_store).code == 1


def test_a_bundle_accepted_by_a_certificate_signer_is_served_and_verified_again_after_an_engine_crash(tmp_path, smollm_gguf, ca):
    """serve NAME takes its policy from the record (Store.policy_for): a root, not a key; a worker crash re-verifies under it."""
    import os
    import signal

    from test_serve import PROMPT, Env, Server, run
    from test_serve_safety import wait_for, workers

    from sovpack.store.store import Store

    env = Env(tmp_path / "serve", smollm_gguf)
    key, chain, _ = ca.leaf("Officer Jones")
    bundle = env.pack("certified", sign=False)
    assert run("sign", bundle, "--key", key, "--cert", chain) == 0
    assert run("export", bundle, "--to", tmp_path / "media") == 0
    store = tmp_path / "pki-serve-store"
    assert run("trust", "add-root", ca.root_pem, "--name", "mod-root", "--store", store) == 0
    assert run("import", tmp_path / "media", "--store", store) == 0
    server = Server(env, "smollm2", "--parallel", "1", store=store, name="certified").wait_ready()
    try:
        assert "signed by 'CN=Officer Jones,O=MoD' (certificate serial" in server.output(), server.output()
        (before,) = workers(server.proc.pid)
        os.kill(before, signal.SIGKILL)

        def restarted() -> list[dict]:
            return [r for r in Store(store).audit.records() if r["event"] == "serve-engine-restarted"]

        (record,) = wait_for(restarted, 120, "the engine to restart")
        (after,) = workers(server.proc.pid)
        assert after != before and record["workers"] == [after]
        reply = server.client().completions.create(model="smollm2", prompt=PROMPT, max_tokens=3, temperature=0)
        assert reply.choices[0].text
        assert "ready again" in server.output()
    finally:
        assert server.stop() == 0, server.output()
