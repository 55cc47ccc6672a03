from __future__ import annotations

import pytest

from filter_worker.config import DEFAULT_MODEL, ConfigError, load_settings, looks_like_path


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("FILTER_"):
            monkeypatch.delenv(key)


def test_defaults_match_the_documented_ones():
    s = load_settings()
    assert s.kafka.bootstrap_servers == "localhost:9092"
    assert s.kafka.group_id == "filter-worker"
    assert s.kafka.assignment_strategy == "range"
    assert s.topics.input == ["messages"]
    assert (s.topics.allow, s.topics.quarantine, s.topics.drop, s.topics.dead_letter) == (
        "messages.allow",
        "messages.quarantine",
        "messages.drop",
        "messages.dlq",
    )
    assert s.model.name == DEFAULT_MODEL and s.model.max_length == 512 and s.model.device == "auto"
    assert s.model.trust_remote_code is False
    assert s.model.verify == "auto"
    assert s.message.format == "json" and s.message.text_field == "text"
    assert [r.action for r in s.routing.rules] == ["drop", "quarantine"]


def test_input_topics_accept_comma_and_json_lists(monkeypatch):
    monkeypatch.setenv("FILTER_TOPICS__INPUT", " a, b ,c")
    assert load_settings().topics.input == ["a", "b", "c"]
    monkeypatch.setenv("FILTER_TOPICS__INPUT", '["x", "y"]')
    assert load_settings().topics.input == ["x", "y"]


def test_env_overrides_toml_file(tmp_path, monkeypatch):
    config = tmp_path / "filter.toml"
    config.write_text('[batch]\nmax_size = 7\nmax_wait_ms = 5\n[kafka]\ngroup_id = "from-file"\n')
    monkeypatch.setenv("FILTER_BATCH__MAX_SIZE", "9")
    s = load_settings(config)
    assert s.batch.max_size == 9 and s.batch.max_wait_ms == 5 and s.kafka.group_id == "from-file"


@pytest.mark.parametrize(
    ("var", "value", "named"),
    [
        ("FILTER_BATCH__MAX_SIZE", "0", "FILTER_BATCH__MAX_SIZE"),
        ("FILTER_MODEL__DEVICE", "gpu", "FILTER_MODEL__DEVICE"),
        ("FILTER_MESSAGE__FORMAT", "xml", "FILTER_MESSAGE__FORMAT"),
        ("FILTER_MESSAGE__TEXT_FIELD", "a..b", "FILTER_MESSAGE__TEXT_FIELD"),
        ("FILTER_KAFKA__ASSIGNMENT_STRATEGY", "sticky", "FILTER_KAFKA__ASSIGNMENT_STRATEGY"),
        ("FILTER_ROUTING__RULES", '[{"action": "nuke", "labels": ["x"], "min_score": 0.5}]', "routing.rules[0].action"),
        ("FILTER_ROUTING__RULES", '[{"action": "drop", "labels": [], "min_score": 0.5}]', "routing.rules[0].labels"),
        (
            "FILTER_ROUTING__RULES",
            '[{"action": "drop", "labels": ["x"], "min_score": 1.5}]',
            "routing.rules[0].min_score",
        ),
        ("FILTER_ROUTING__RULES", '[{"action": "drop"', "FILTER_ROUTING__RULES is not valid JSON"),
        ("FILTER_TOPICS__ALLOW", "messages", "must not also be output topics"),
        ("FILTER_SHUTDOWN_TIMEOUT_S", "-1", "FILTER_SHUTDOWN_TIMEOUT_S"),
        ("FILTER_MODEL__VERIFY", "maybe", "FILTER_MODEL__VERIFY (model.verify): must be auto, true or"),
        ("FILTER_MODEL__STREAMS", "0", "FILTER_MODEL__STREAMS (model.streams): must be auto or a whole number"),
        ("FILTER_MODEL__STREAMS", "two", "FILTER_MODEL__STREAMS (model.streams): must be auto or a whole number"),
        ("FILTER_MODEL__STREAMS", "2", "FILTER_MODEL__STREAMS=2 runs on the openvino engine only"),
    ],
)
def test_bad_settings_stop_startup_naming_the_setting(monkeypatch, var, value, named):
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert named in str(err.value)


def test_unknown_setting_is_rejected(tmp_path):
    config = tmp_path / "filter.toml"
    config.write_text("[batch]\nmax_sise = 3\n")
    with pytest.raises(ConfigError, match="max_sise"):
        load_settings(config)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_settings(tmp_path / "absent.toml")


def test_sasl_requires_a_mechanism(monkeypatch):
    monkeypatch.setenv("FILTER_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    with pytest.raises(ConfigError, match="FILTER_KAFKA__SASL_MECHANISM is required"):
        load_settings()


def test_secrets_never_appear_in_logs_or_errors(monkeypatch):
    monkeypatch.setenv("FILTER_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("FILTER_KAFKA__SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("FILTER_KAFKA__SASL_USERNAME", "svc")
    monkeypatch.setenv("FILTER_KAFKA__SASL_PASSWORD", "hunter2-sasl")
    monkeypatch.setenv("FILTER_KAFKA__PROPERTIES", '{"ssl.key.password": "hunter2-key", "linger.ms": 7}')
    s = load_settings()
    props = s.kafka.client_properties()
    assert props["sasl.password"] == "hunter2-sasl" and props["ssl.key.password"] == "hunter2-key"
    assert props["linger.ms"] == "7"
    shown = repr(s) + str(s.kafka.redacted_properties()) + s.model_dump_json()
    assert "hunter2" not in shown
    assert s.kafka.redacted_properties()["linger.ms"] == "7"

    monkeypatch.setenv("FILTER_BATCH__MAX_SIZE", "-3")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "hunter2" not in str(err.value)


@pytest.mark.parametrize(("value", "expected"), [("auto", "auto"), ("true", True), ("FALSE", False), ("1", True)])
def test_model_verify_is_auto_true_or_false(monkeypatch, value, expected):
    monkeypatch.setenv("FILTER_MODEL__VERIFY", value)
    assert load_settings().model.verify == expected


def test_poll_interval_below_session_timeout_is_named():
    with pytest.raises(ConfigError, match="FILTER_KAFKA"):
        load_settings(kafka={"session_timeout_ms": 10_000, "max_poll_interval_ms": 5_000})


@pytest.mark.parametrize(
    ("kafka", "named"),
    [
        ({"security_protocol": "SASL_SSL"}, "FILTER_KAFKA__SASL_MECHANISM is required"),
        ({"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN"}, "FILTER_KAFKA__SASL_USERNAME and"),
        (
            {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-256", "sasl_username": "u"},
            "FILTER_KAFKA__SASL_PASSWORD is required with FILTER_KAFKA__SASL_MECHANISM=SCRAM-SHA-256",
        ),
    ],
)
def test_sasl_password_mechanisms_need_credentials(kafka, named):
    with pytest.raises(ConfigError, match=named):
        load_settings(kafka=kafka)


@pytest.mark.parametrize(
    "kafka",
    [
        {"security_protocol": "SASL_SSL", "sasl_mechanism": "GSSAPI"},
        {"security_protocol": "SASL_SSL", "sasl_mechanism": "OAUTHBEARER"},
        {"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_username": "u", "sasl_password": "p"},
        {"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "properties": {"sasl.username": "u",
                                                                                   "sasl.password": "p"}},
    ],
)  # fmt: skip
def test_sasl_mechanisms_with_their_credentials_are_accepted(kafka):
    assert load_settings(kafka=kafka).kafka.sasl_mechanism == kafka["sasl_mechanism"]


@pytest.mark.parametrize("name", ["acme/model", "model-name", "tabularisai/multilingual-sentiment-analysis"])
def test_hub_ids_are_not_paths(name):
    assert not looks_like_path(name)
    assert load_settings(model={"name": name}).model.name == name


@pytest.mark.parametrize("name", ["./nope", "../nope", "/no/such/dir", "~/model", "a/b/c", "acme/model/"])
def test_model_names_that_can_only_be_paths_must_exist(name):
    assert looks_like_path(name)
    with pytest.raises(ConfigError, match=r"FILTER_MODEL__NAME \(model.name\): .* looks like a path but there is no"):
        load_settings(model={"name": name})


def test_an_existing_relative_directory_is_a_model_name(tmp_path, monkeypatch):
    (tmp_path / "models" / "mine").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert load_settings(model={"name": "./models/mine"}).model.name == "./models/mine"


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("FILTER_TOPICS__INPUT", "in put"),
        ("FILTER_TOPICS__DEAD_LETTER", "dlq/x"),
        ("FILTER_TOPICS__ALLOW", ".."),
        ("FILTER_KAFKA__BOOTSTRAP_SERVERS", " "),
        ("FILTER_KAFKA__GROUP_ID", ""),
        ("FILTER_MODEL__REVISION", ""),
    ],
)
def test_topic_names_and_empty_values_are_refused(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match=var):
        load_settings()


def test_regex_input_subscriptions_are_accepted(monkeypatch):
    monkeypatch.setenv("FILTER_TOPICS__INPUT", "^messages\\..*,plain")
    assert load_settings().topics.input == ["^messages\\..*", "plain"]


@pytest.mark.parametrize("var", ["FILTER_ROUTING__RULES", "FILTER_KAFKA__PROPERTIES", "FILTER_KAFKA"])
def test_json_variables_that_do_not_parse_are_named(monkeypatch, var):
    monkeypatch.setenv(var, "not json")
    with pytest.raises(ConfigError, match=f"{var} is not valid JSON"):
        load_settings()


def test_one_error_is_one_line():
    with pytest.raises(ConfigError) as err:
        load_settings(batch={"max_size": 0})
    assert "\n" not in str(err.value)
    assert str(err.value).startswith("invalid configuration: FILTER_BATCH__MAX_SIZE (batch.max_size): ")


def test_a_variable_that_is_no_setting_is_refused_naming_the_closest_one(monkeypatch):
    # One underscore for two: pydantic-settings would ignore it and the worker would dial localhost:9092.
    monkeypatch.setenv("FILTER_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert str(err.value) == (
        "invalid configuration: FILTER_KAFKA_BOOTSTRAP_SERVERS is not a setting (did you mean "
        "FILTER_KAFKA__BOOTSTRAP_SERVERS?); FILTER_UNKNOWN_VARIABLES=warn starts anyway"
    )


def test_a_variable_like_no_setting_points_at_the_list_of_settings(monkeypatch):
    monkeypatch.setenv("FILTER_XYZZY", "1")
    with pytest.raises(ConfigError, match=r"FILTER_XYZZY is not a setting \(docs/configuration.md lists every"):
        load_settings()


def test_unknown_variables_warn_only_when_asked(monkeypatch, capsys):
    monkeypatch.setenv("FILTER_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092")
    monkeypatch.setenv("FILTER_UNKNOWN_VARIABLES", "warn")
    assert load_settings().kafka.bootstrap_servers == "localhost:9092"
    assert capsys.readouterr().err == (
        "filter-worker: warning: FILTER_KAFKA_BOOTSTRAP_SERVERS is not a setting (did you mean "
        "FILTER_KAFKA__BOOTSTRAP_SERVERS?); ignored\n"
    )


@pytest.mark.parametrize(
    "name",
    [
        "FILTER_KAFKA__PROPERTIES__LINGER.MS",
        "FILTER_KAFKA__SASL_PASSWORD_FILE",
        "FILTER_KAFKA",
        "filter_batch__max_size",
    ],
)
def test_every_variable_a_setting_reads_is_accepted(monkeypatch, name):
    value = {"FILTER_KAFKA": "{}", "FILTER_KAFKA__SASL_PASSWORD_FILE": __file__}.get(name, "7")
    monkeypatch.setenv(name, value)
    monkeypatch.setenv("FILTER_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("FILTER_KAFKA__SASL_MECHANISM", "OAUTHBEARER")
    load_settings()


def test_the_test_suites_own_variables_are_no_typo(monkeypatch):
    monkeypatch.setenv("FILTER_TEST_BOOTSTRAP_SERVERS", "localhost:29092")
    monkeypatch.setenv("FILTER_FUZZ_PROFILE", "long")
    load_settings()


@pytest.mark.parametrize(
    ("var", "value", "expected"),
    [
        (
            "FILTER_KAFKA__BOOTSTRAP_SERVER",
            "x:9092",
            "FILTER_KAFKA__BOOTSTRAP_SERVER (kafka.bootstrap_server): not a setting "
            "(did you mean FILTER_KAFKA__BOOTSTRAP_SERVERS?)",
        ),
        (
            "FILTER_ROUTING__RULES",
            '[{"action": "drop", "lables": ["x"], "min_score": 0.5}]',
            "FILTER_ROUTING__RULES (routing.rules[0].lables): not a setting (did you mean 'labels'?)",
        ),
    ],
)
def test_a_nested_typo_is_refused_with_the_closest_name(monkeypatch, var, value, expected):
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert expected in str(err.value)


def test_a_typo_in_the_config_file_names_the_file_and_the_key(tmp_path):
    config = tmp_path / "filter.toml"
    config.write_text('shutdown_timeout = 3\n[kafka]\nbootstrap_server = "x:9092"\n"bad\\nkey" = 1\n')
    with pytest.raises(ConfigError) as err:
        load_settings(config)
    assert str(err.value) == (
        f"invalid configuration: {config}, key kafka.bootstrap_server: not a setting (did you mean "
        f'kafka.bootstrap_servers?); {config}, key kafka."bad\\nkey": not a setting; '
        f"{config}, key shutdown_timeout: not a setting (did you mean shutdown_timeout_s?)"
    )


def test_a_bad_value_in_the_config_file_names_the_file_unless_the_variable_overrides_it(tmp_path, monkeypatch):
    config = tmp_path / "filter.toml"
    config.write_text("[batch]\nmax_size = 0\n")
    with pytest.raises(ConfigError, match=f"{config}, key batch.max_size: Input should be greater than"):
        load_settings(config)
    monkeypatch.setenv("FILTER_BATCH__MAX_SIZE", "-1")
    with pytest.raises(ConfigError, match=r"FILTER_BATCH__MAX_SIZE \(batch.max_size\): Input should be greater"):
        load_settings(config)
