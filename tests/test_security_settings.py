"""TLS files and secrets as settings: checked at start-up, handed to every client, never shown.

A mistake in a TLS file or a secret file stops start-up with one sentence naming the variable (exit
2, checked through the real command line at the end); the private key's path and every password
stay out of every message. Certificates are made by ``tests/tls_certs.py``.
"""

from __future__ import annotations

import pytest

from filter_worker.config import ConfigError, KafkaSettings, load_settings
from filter_worker.kafka import clients
from filter_worker.kafka.client_check import check_clients
from filter_worker.security import redaction
from tests.test_cli import cli
from tests.tls_certs import KEY_PASSWORD, Pki, make_pki

SASL_SECRET = "hunter2-sasl-secret"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _kafka(**fields: object) -> KafkaSettings:
    return load_settings(kafka=fields).kafka


def mutual(pki: Pki, **extra: object) -> dict[str, object]:
    return {
        "security_protocol": "SSL",
        "ssl_ca_location": str(pki.ca),
        "ssl_certificate_location": str(pki.client.cert),
        "ssl_key_location": str(pki.client_encrypted_key),
        "ssl_key_password": KEY_PASSWORD,
        **extra,
    }


def test_tls_settings_reach_every_client_and_librdkafka_accepts_them(pki):
    kafka = _kafka(**mutual(pki))
    expected = {
        "security.protocol": "SSL",
        "ssl.ca.location": str(pki.ca),
        "ssl.certificate.location": str(pki.client.cert),
        "ssl.key.location": str(pki.client_encrypted_key),
        "ssl.key.password": KEY_PASSWORD,
    }
    for config in (clients.consumer_config(kafka), clients.producer_config(kafka), clients.admin_config(kafka)):
        assert expected.items() <= config.items()
    assert "ssl.endpoint.identification.algorithm" not in kafka.client_properties(), "hostname checks stay on"
    check_clients(kafka)  # librdkafka loads the files when it builds each client


def test_the_documented_pass_through_keeps_working(pki):
    kafka = _kafka(security_protocol="SSL", properties={"ssl.ca.location": str(pki.ca)})
    assert kafka.client_properties()["ssl.ca.location"] == str(pki.ca)
    check_clients(kafka)


KEY = "FILTER_KAFKA__SSL_KEY_LOCATION"
CA = "FILTER_KAFKA__SSL_CA_LOCATION"
PAIR = {"ssl_certificate_location": "{client_cert}"}
MISTAKES = {
    "missing-ca": ({"ssl_ca_location": "{dir}/missing.pem"}, rf"{CA} \(kafka.ssl_ca_location\): no such file"),
    "ca-is-a-directory": ({"ssl_ca_location": "{dir}"}, f"{CA} .*: not a file"),
    "ca-not-pem": ({"ssl_ca_location": "{not_pem}"}, f"{CA}: .*not-pem.txt holds no PEM certificate"),
    "cert-without-key": (PAIR, f"{KEY} is missing"),
    "key-without-cert": ({"ssl_key_location": "{client_key}"}, "FILTER_KAFKA__SSL_CERTIFICATE_LOCATION is missing"),
    "key-of-another": (
        {"ssl_certificate_location": "{ca}", "ssl_key_location": "{client_key}"},
        f"{KEY}: the private key does not belong to the certificate",
    ),
    "encrypted-key-no-password": (
        {**PAIR, "ssl_key_location": "{encrypted_key}"},
        rf"{KEY}: .* opens without a password \(FILTER_KAFKA__SSL_KEY_PASSWORD is not set\)",
    ),
    "wrong-password": (
        {**PAIR, "ssl_key_location": "{encrypted_key}", "ssl_key_password": "nope-wrong"},
        f"{KEY}: the file holds no PEM private key that opens with FILTER_KAFKA__SSL_KEY_PASSWORD",
    ),
    "key-not-pem": ({**PAIR, "ssl_key_location": "{not_pem}"}, f"{KEY}: the file holds no PEM private key"),
    "password-without-key": (
        {"ssl_key_password": "a-key-password"},
        f"FILTER_KAFKA__SSL_KEY_PASSWORD is set without {KEY}",
    ),
    "set-twice": (
        {"ssl_ca_location": "{ca}", "properties": {"ssl.ca.location": "{ca}"}},
        f"{CA} and 'ssl.ca.location' in FILTER_KAFKA__PROPERTIES both set it",
    ),
    "tls-files-without-tls": (
        {"ssl_ca_location": "{ca}", "security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512"},
        f"{CA} is set, but FILTER_KAFKA__SECURITY_PROTOCOL is SASL_PLAINTEXT",
    ),
}


@pytest.mark.parametrize(("fields", "message"), MISTAKES.values(), ids=MISTAKES.keys())
def test_each_tls_mistake_stops_start_up_naming_the_variable(pki, fields, message):
    (pki.ca.parent / "not-pem.txt").write_text("not a certificate, not a key\n")
    names = {
        "not_pem": str(pki.ca.parent / "not-pem.txt"),
        "dir": str(pki.ca.parent),
        "ca": str(pki.ca),
        "client_cert": str(pki.client.cert),
        "client_key": str(pki.client.key),
        "encrypted_key": str(pki.client_encrypted_key),
    }

    def filled(value: object) -> object:
        if isinstance(value, dict):
            return {k: filled(v) for k, v in value.items()}
        return value.format(**names) if isinstance(value, str) else value

    credentials = {"sasl_username": "u", "sasl_password": SASL_SECRET} if "sasl_mechanism" in fields else {}
    settings = {"security_protocol": "SSL", **credentials, **{k: filled(v) for k, v in fields.items()}}
    with pytest.raises(ConfigError, match=message) as err:
        _kafka(**settings)
    text = str(err.value)
    for secret in (names["client_key"], names["encrypted_key"], "nope-wrong", "a-key-password", SASL_SECRET):
        assert secret not in text


def test_secrets_come_from_files_less_one_trailing_newline(pki, tmp_path, monkeypatch):
    (tmp_path / "sasl").write_text(SASL_SECRET + "\n")
    (tmp_path / "key-password").write_text(KEY_PASSWORD)
    monkeypatch.setenv("FILTER_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("FILTER_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("FILTER_KAFKA__SASL_USERNAME", "filter-worker")
    monkeypatch.setenv("FILTER_KAFKA__SASL_PASSWORD_FILE", str(tmp_path / "sasl"))
    monkeypatch.setenv("FILTER_KAFKA__SSL_CERTIFICATE_LOCATION", str(pki.client.cert))
    monkeypatch.setenv("FILTER_KAFKA__SSL_KEY_LOCATION", str(pki.client_encrypted_key))
    monkeypatch.setenv("FILTER_KAFKA__SSL_KEY_PASSWORD_FILE", str(tmp_path / "key-password"))
    kafka = load_settings().kafka
    properties = kafka.client_properties()
    assert properties["sasl.password"] == SASL_SECRET and properties["ssl.key.password"] == KEY_PASSWORD
    check_clients(kafka)


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "the file does not exist"), ("", "the file is empty"), ("\n", "the file is empty"),
     (b"\xff\xfe", "the file is not UTF-8 text")],
    ids=["missing", "empty", "only-a-newline", "not-utf8"],
)  # fmt: skip
def test_a_secret_file_that_cannot_serve_names_its_variable_not_its_path(tmp_path, content, message):
    path = tmp_path / "mounted-secret"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as err:
        _kafka(security_protocol="SASL_SSL", sasl_mechanism="PLAIN", sasl_username="u", sasl_password_file=str(path))
    assert f"FILTER_KAFKA__SASL_PASSWORD_FILE (kafka.sasl_password_file): {message}" in str(err.value)
    assert str(path) not in str(err.value)


def test_a_secret_and_its_file_together_are_refused(tmp_path):
    (tmp_path / "pw").write_text("from-the-file")
    with pytest.raises(
        ConfigError, match="set FILTER_KAFKA__SASL_PASSWORD or FILTER_KAFKA__SASL_PASSWORD_FILE, not both"
    ):
        _kafka(sasl_password=SASL_SECRET, sasl_password_file=str(tmp_path / "pw"))


def test_secret_values_are_hidden_in_logged_properties_and_masked_in_any_text(pki):
    sasl = {"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_username": "u"}
    secret_property = {"sasl.oauthbearer.client.secret": "oauth-secret"}
    kafka = _kafka(**mutual(pki, **sasl, sasl_password=SASL_SECRET, properties=secret_property))
    shown = kafka.redacted_properties()
    assert shown["ssl.key.location"] == shown["ssl.key.password"] == shown["sasl.password"] == "***"
    assert shown["ssl.ca.location"] == str(pki.ca), "where the CA lies is no secret"
    assert set(kafka.secret_values()) == {str(pki.client_encrypted_key), KEY_PASSWORD, SASL_SECRET, "oauth-secret"}
    line = f"ssl.key.location failed: {pki.client_encrypted_key}: bad decrypt (password {KEY_PASSWORD})"
    assert redaction.redact(line) == "ssl.key.location failed: ***: bad decrypt (password ***)"


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"])
@pytest.mark.parametrize("protocol", ["SASL_PLAINTEXT", "SASL_SSL"])
def test_every_sasl_mechanism_builds_its_clients_at_start_up(pki, protocol, mechanism):
    fields: dict[str, object] = {"security_protocol": protocol, "sasl_mechanism": mechanism}
    if mechanism != "OAUTHBEARER":
        fields |= {"sasl_username": "filter-worker", "sasl_password": SASL_SECRET}
    if protocol == "SASL_SSL":
        fields["ssl_ca_location"] = str(pki.ca)
    kafka = _kafka(**fields)
    assert kafka.client_properties()["sasl.mechanism"] == mechanism
    check_clients(kafka)


def test_gssapi_is_refused_at_start_up_naming_the_mechanism_when_librdkafka_lacks_it():
    # The PyPI wheels' librdkafka is built without Cyrus SASL, so without Kerberos.
    with pytest.raises(ConfigError, match=r"FILTER_KAFKA__SASL_MECHANISM=GSSAPI: librdkafka refuses it .*GSSAPI"):
        check_clients(_kafka(security_protocol="SASL_SSL", sasl_mechanism="GSSAPI"))


def test_run_stops_with_exit_2_and_one_line_on_a_bad_key_file(pki, tmp_path):
    hidden = tmp_path / "hidden-dir" / "client.key"
    result = cli(
        "run",
        FILTER_KAFKA__SECURITY_PROTOCOL="SSL",
        FILTER_KAFKA__SSL_CERTIFICATE_LOCATION=str(pki.client.cert),
        FILTER_KAFKA__SSL_KEY_LOCATION=str(hidden),
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("filter-worker:")]
    assert "FILTER_KAFKA__SSL_KEY_LOCATION (kafka.ssl_key_location): no such file" in line
    assert "hidden-dir" not in result.stderr
