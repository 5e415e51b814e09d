import inspect
import re
from dataclasses import fields

import pytest

from imgserve import settings
from imgserve.settings import SettingsError, hide_password, load

pytestmark = pytest.mark.unit


def test_defaults():
    config = load(env={})
    assert config.image_queue == "image_queue"
    assert config.batch_size == 32
    assert config.result_ttl == 3600
    assert config.web_host == "127.0.0.1" and config.web_port == 5000
    assert config.model_weights == "imagenet"
    assert config.job_codec == "zstd2" and config.job_quality == 90
    assert config.web_nice == 10
    assert config.flask_debug is False


def test_values_are_parsed():
    config = load(
        env={
            "BATCH_SIZE": "8",
            "BATCH_WAIT_MS": "2.5",
            "JOB_CODEC": "RAW",
            "MODEL_WEIGHTS": "None",
            "FLASK_DEBUG": "yes",
            "REDIS_URL": "rediss://:pw@example.com:6380/1",
        }
    )
    assert (config.batch_size, config.batch_wait_ms, config.model_weights) == (8, 2.5, "none")
    assert config.job_codec == "raw"
    assert config.flask_debug is True
    assert config.redis_url_safe == "rediss://:***@example.com:6380/1"


@pytest.mark.parametrize(
    "name, value",
    [
        ("BATCH_SIZE", "0"),
        ("BATCH_SIZE", "many"),
        ("BATCH_WAIT_MS", "-1"),
        ("RESULT_TTL", "1.5"),
        ("REQUEST_TIMEOUT", "0"),
        ("WEB_PORT", "70000"),
        ("REDIS_URL", "http://localhost:6379"),
        ("REDIS_URL", "redis://"),
        ("MODEL_WEIGHTS", "/no/such/file.h5"),
        ("IMAGE_QUEUE", "bad name"),
        ("IMAGE_QUEUE", "queue*"),
        ("NOTIFICATIONS", "sometimes"),
        ("JOB_CODEC", "png"),
        ("WEB_NICE", "20"),
        ("LOG_LEVEL", "loud"),
        ("FLASK_DEBUG", "maybe"),
        ("MAX_ATTEMPTS", "0"),
    ],
)
def test_invalid_values_name_the_variable(name, value):
    with pytest.raises(SettingsError, match=name):
        load(env={name: value})


def test_weights_file_path_is_accepted(tmp_path):
    weights = tmp_path / "w.h5"
    weights.write_bytes(b"x")
    assert load(env={"MODEL_WEIGHTS": str(weights)}).model_weights == str(weights)


def test_overrides_win_over_environment():
    assert load(env={"BATCH_SIZE": "4"}, batch_size="16", batch_wait_ms=None).batch_size == 16


def test_dotenv_file_is_read(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("BATCH_SIZE=7\n")
    monkeypatch.setattr(settings, "PROJECT_DIR", tmp_path)
    monkeypatch.delenv("BATCH_SIZE", raising=False)
    assert load().batch_size == 7


def test_password_is_hidden_only_when_present():
    assert hide_password("redis://localhost:6379/0") == "redis://localhost:6379/0"
    assert hide_password("redis://user:secret@h:1/0") == "redis://user:***@h:1/0"


def test_entry_point_exits_2_naming_the_variable(monkeypatch, capsys):
    from imgserve.worker import cli

    monkeypatch.setenv("BATCH_SIZE", "zero")
    assert cli.main([]) == 2
    assert "BATCH_SIZE" in capsys.readouterr().err


def test_one_image_must_fit_in_the_decode_budget():
    with pytest.raises(SettingsError, match="MAX_DECODE_BYTES .* must not exceed DECODE_BUDGET_BYTES"):
        load(env={"MAX_DECODE_BYTES": "300000000", "DECODE_BUDGET_BYTES": "200000000"})
    assert load(env={"DECODE_BUDGET_BYTES": "200000000"}).decode_budget_bytes == 200_000_000


@pytest.mark.parametrize(
    "url, shown",
    [
        ("redis://:secret@h:1/0", "redis://:***@h:1/0"),
        ("redis://h:1/0?password=secret&db=2", "redis://h:1/0?password=***&db=2"),
        ("rediss://user:secret@h:1/0?PASSWORD=secret", "rediss://user:***@h:1/0?PASSWORD=***"),
        ("redis://:se/cret@h:1/0", "redis://:***@h:1/0"),  # an unencoded / confuses URL parsers
        ("redis://us/er:secret@h:1/0", "redis://***@h:1/0"),
        ("unix://:secret@/run/redis.sock", "unix://:***@/run/redis.sock"),
    ],
)
def test_every_password_in_a_url_is_masked(url, shown):
    assert hide_password(url) == shown


def test_a_settings_error_does_not_print_the_password():
    with pytest.raises(SettingsError, match="REDIS_URL") as refused:
        load(env={"REDIS_URL": "redis://:se/cret@redis-host:6379/0"})  # the / ends the host: no host name
    assert "cret" not in str(refused.value) and "***" in str(refused.value)


def test_lists_are_parsed_and_normalised():
    config = load(
        env={"ACCEPTED_FORMATS": " png,Jpeg ,png", "ALLOWED_ORIGINS": "https://App.Example.com:8443/, http://b.test"}
    )
    assert config.accepted_formats == ("PNG", "JPEG")
    assert config.allowed_origins == ("https://app.example.com:8443", "http://b.test")
    assert load(env={}).accepted_formats == ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
    assert load(env={}).allowed_origins == () and load(env={}).metrics_host == "127.0.0.1"


@pytest.mark.parametrize(
    "name, value",
    [
        ("ACCEPTED_FORMATS", "JPEG,NOPE"),
        ("ACCEPTED_FORMATS", " , "),
        ("ALLOWED_ORIGINS", "example.com"),
        ("ALLOWED_ORIGINS", "https://example.com/upload"),
        ("ALLOWED_ORIGINS", "ftp://example.com"),
        ("METRICS_HOST", " "),
    ],
)
def test_invalid_lists_name_the_variable(name, value):
    with pytest.raises(SettingsError, match=name):
        load(env={name: value})


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::", "example.com"])
def test_flask_debug_is_refused_off_loopback(host):
    with pytest.raises(SettingsError, match="FLASK_DEBUG.*WEB_HOST"):
        load(env={"FLASK_DEBUG": "true", "WEB_HOST": host})
    assert load(env={"FLASK_DEBUG": "false", "WEB_HOST": host}).web_host == host


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_flask_debug_is_allowed_on_loopback(host):
    assert load(env={"FLASK_DEBUG": "true", "WEB_HOST": host}).flask_debug is True


def test_the_test_harness_spells_every_default_as_its_variable():
    from tools.processes import server_env

    config = load(env=server_env("redis://127.0.0.1:1/0", "q"), dotenv=False)
    assert config.accepted_formats == settings.DEFAULT_ACCEPTED_FORMATS and config.allowed_origins == ()


def test_api_keys_from_the_variable_and_the_file(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# comment\n" + "f" * 16 + "\n\n" + "g" * 20 + "," + "h" * 16 + "\n")
    config = load(env={"API_KEYS": "a" * 16 + ", " + "b" * 32, "API_KEYS_FILE": str(keys)})
    assert config.accepted_api_keys == ("a" * 16, "b" * 32, "f" * 16, "g" * 20, "h" * 16)
    assert "aaaa" not in repr(config) and "ffff" not in repr(config)
    assert load(env={}).accepted_api_keys == ()


@pytest.mark.parametrize(
    "name, value",
    [("API_KEYS", "short-secret-12"), ("API_KEYS", "a" * 16 + ",with space inside1"), ("API_KEYS_FILE", "/no/file")],
)
def test_weak_or_unreadable_api_keys_name_the_variable_but_not_the_key(name, value):
    with pytest.raises(SettingsError, match=name) as raised:
        load(env={name: value})
    assert "short-secret" not in str(raised.value) and "with space" not in str(raised.value)


def test_an_api_keys_file_without_keys_is_refused(tmp_path):
    (tmp_path / "keys").write_text("# none yet\n")
    with pytest.raises(SettingsError, match="API_KEYS_FILE.*no key"):
        load(env={"API_KEYS_FILE": str(tmp_path / "keys")})


@pytest.mark.parametrize(
    "env, share",
    [({}, None), ({"API_KEYS": "k-" + "a" * 20}, 1000), ({"API_KEYS": "k-" + "a" * 20 + ",k-" + "b" * 20}, 500),
     ({"API_KEYS": "k-" + "a" * 20 + ",k-" + "b" * 20, "MAX_QUEUE_PER_KEY": "7"}, 7),
     ({"API_KEYS": "k-" + "a" * 20, "MAX_QUEUE_PER_KEY": "auto", "MAX_QUEUE": "9"}, 9)],
)  # fmt: skip
def test_max_queue_per_key_is_a_fair_share_of_max_queue_unless_set(env, share):
    assert settings.load(env=env, dotenv=False).queue_share_per_key == share


@pytest.mark.parametrize("raw", ["0", "-1", "x", "1.5"])
def test_max_queue_per_key_is_a_whole_number_or_auto(raw):
    with pytest.raises(settings.SettingsError, match="MAX_QUEUE_PER_KEY"):
        settings.load(env={"MAX_QUEUE_PER_KEY": raw}, dotenv=False)


# --- Each setting declared once: the generated documents, the defaults they show, the roles that read them ---


def test_the_readme_table_and_env_example_are_generated_from_the_declarations():
    from tools import settings_doc

    for path, text in settings_doc.generated().items():
        assert path.read_text() == text, f"{path.name} is stale: run `make settings-doc`"


def test_the_check_fails_on_a_stale_document(tmp_path, monkeypatch, capsys):
    from tools import settings_doc

    for attr in ("README", "ENV_EXAMPLE"):
        copy = tmp_path / getattr(settings_doc, attr).name
        copy.write_text(getattr(settings_doc, attr).read_text())
        monkeypatch.setattr(settings_doc, attr, copy)
    assert settings_doc.main(["--check"]) == 0
    example = tmp_path / ".env.example"
    example.write_text(example.read_text().replace("# MAX_DECODE_BYTES=150000000", "MAX_DECODE_BYTES=100000000"))
    assert settings_doc.main(["--check"]) == 1
    assert ".env.example is out of date" in capsys.readouterr().err
    (tmp_path / "README.md").write_text("# no markers\n")
    with pytest.raises(SystemExit, match="settings:begin"):
        settings_doc.generated()


def test_copying_env_example_changes_nothing():
    from dotenv import dotenv_values

    from tools.settings_doc import ENV_EXAMPLE

    assert dotenv_values(ENV_EXAMPLE) == {}  # every line commented out, secrets included
    shown = dict(re.findall(r"^# ([A-Z_]+)=(.*)$", ENV_EXAMPLE.read_text(), re.MULTILINE))
    uncommented = load(env=shown, dotenv=False)  # what a copy with every default line uncommented holds
    assert uncommented == load(env={}, dotenv=False)
    unset = {f.name.upper() for f in fields(settings.Settings) if not settings.spec(f).shown}
    assert unset >= {"API_KEYS", "API_KEYS_FILE"}  # their empty value must not be a line one may uncomment
    assert set(shown) | unset == {f.name.upper() for f in fields(settings.Settings)}


@pytest.mark.parametrize(
    "field", [f for f in fields(settings.Settings) if settings.spec(f).shown], ids=lambda f: f.name
)
def test_each_default_is_shown_as_the_variable_would_spell_it(field):
    spec = settings.spec(field)
    assert spec.parse(field.name.upper(), spec.shown) == field.default


def test_a_role_reads_only_its_settings():
    bad_weights, bad_keys_file = {"MODEL_WEIGHTS": "/no/such/file.h5"}, {"API_KEYS_FILE": "/no/such/keys"}
    assert load(env=bad_weights, dotenv=False, role=settings.WEB).model_weights == "imagenet"
    with pytest.raises(SettingsError, match="MODEL_WEIGHTS"):
        load(env=bad_weights, dotenv=False, role=settings.WORKER)
    assert load(env=bad_keys_file, dotenv=False, role=settings.WORKER).accepted_api_keys == ()
    with pytest.raises(SettingsError, match="API_KEYS_FILE"):
        load(env=bad_keys_file, dotenv=False, role=settings.WEB)
    with pytest.raises(SettingsError, match="MODEL_WEIGHTS"):
        load(env=bad_weights, dotenv=False, role=settings.ALL)
    with pytest.raises(ValueError, match="role"):
        load(env={}, dotenv=False, role="webserver")


@pytest.mark.parametrize(
    "env, refused_by, ignored_by",
    [
        ({"FLASK_DEBUG": "true", "WEB_HOST": "0.0.0.0"}, settings.WEB, settings.WORKER),
        ({"MAX_DECODE_BYTES": "3000", "DECODE_BUDGET_BYTES": "2000"}, settings.WEB, settings.LAUNCH),
        ({"WORKER_SHARDS": "3", "QUEUE_SHARDS": "2"}, settings.WORKER, settings.WEB),
    ],
)
def test_rules_between_settings_apply_where_the_role_reads_them(env, refused_by, ignored_by):
    load(env=env, dotenv=False, role=ignored_by)
    for role in (refused_by, settings.ALL):
        with pytest.raises(SettingsError, match=next(iter(env))):
            load(env=env, dotenv=False, role=role)


def _settings_read(source: str) -> set[str]:
    """The fields of Settings that `config.<name>` reads in `source`, properties followed to their fields."""
    names = {f.name for f in fields(settings.Settings)}
    read = set(re.findall(r"\bconfig\.(\w+)", source))
    properties = {n for n in read if isinstance(getattr(settings.Settings, n, None), property)}
    for name in properties:
        read |= _settings_read(inspect.getsource(getattr(settings.Settings, name).fget).replace("self.", "config."))
    return read & names


@pytest.mark.parametrize(
    "role, sources",
    [
        (settings.WEB, ["imgserve/web/*.py", "imgserve/protocol/*.py"]),
        (settings.WORKER, ["imgserve/worker/*.py", "imgserve/protocol/*.py"]),
        (settings.LAUNCH, ["imgserve/launch/stack.py", "imgserve/launch/proxy.py"]),
    ],
)
def test_each_role_declares_every_setting_its_code_reads(role, sources):
    read = set().union(
        *(_settings_read(p.read_text()) for pattern in sources for p in settings.PROJECT_DIR.glob(pattern))
    )
    assert read, "the scan found nothing: the pattern no longer matches the code"
    assert read <= settings.names_read_by(role), f"{role} reads settings not declared for it"


def test_entry_points_load_their_own_role(tmp_path, monkeypatch, capsys):
    from imgserve.web.app import create_app
    from imgserve.worker import cli

    monkeypatch.setattr(settings, "PROJECT_DIR", tmp_path)  # no .env
    # Each pair: a setting the other role reads, declared before a bad one of this role's: only the second counts.
    monkeypatch.setenv("API_KEYS_FILE", "/no/such/keys")
    monkeypatch.setenv("METRICS_PORT", "-1")
    assert cli.main([]) == 2
    assert "METRICS_PORT" in capsys.readouterr().err
    monkeypatch.setenv("MODEL_WEIGHTS", "/no/such/file.h5")
    monkeypatch.setenv("FLASK_DEBUG", "maybe")
    monkeypatch.delenv("API_KEYS_FILE")
    with pytest.raises(SettingsError, match="FLASK_DEBUG"):
        create_app()


def test_a_rule_is_skipped_where_the_role_does_not_read_one_of_its_settings(monkeypatch):
    def ports_differ(config):
        if config.metrics_port == config.web_port:
            raise SettingsError("METRICS_PORT must differ from WEB_PORT")

    # Under the worker WEB_PORT keeps its default, 5000; comparing with it would refuse a setting that is fine.
    monkeypatch.setattr(settings, "_RULES", ((frozenset({"metrics_port", "web_port"}), ports_differ),))
    assert load(env={"METRICS_PORT": "5000"}, dotenv=False, role=settings.WORKER).metrics_port == 5000
    with pytest.raises(SettingsError, match="METRICS_PORT"):
        load(env={"METRICS_PORT": "5000"}, dotenv=False, role=settings.ALL)


@pytest.mark.parametrize(
    "name, value",
    [("API_KEYS", ""), ("API_KEYS", " , "), ("API_KEYS", ","), ("API_KEYS_FILE", ""), ("API_KEYS_FILE", "  ")],
    ids=["keys-empty", "keys-comma-space", "keys-comma", "file-empty", "file-spaces"],
)
def test_api_keys_set_but_empty_are_refused_not_taken_for_an_open_api(name, value):
    with pytest.raises(SettingsError, match=f"{name} is set but"):
        load(env={name: value})


@pytest.mark.parametrize(
    "env, hosts",
    [
        ({}, ("localhost", "127.0.0.1", "[::1]")),
        ({"WEB_HOST": "::1"}, ("localhost", "127.0.0.1", "[::1]")),
        ({"WEB_HOST": "0.0.0.0"}, ()),
        (
            {"WEB_HOST": "0.0.0.0", "ALLOWED_HOSTS": "API.example.com., [2001:db8::1]:8443"},
            ("api.example.com", "[2001:db8::1]:8443"),
        ),
        ({"ALLOWED_HOSTS": "*"}, ()),
    ],
)
def test_allowed_hosts_default_to_the_loopback_names_on_a_loopback_address(env, hosts):
    assert load(env=env).accepted_hosts == hosts


@pytest.mark.parametrize("value", [" , ", "http://api.example.com", "a b", "host:port", "[::1"])
def test_allowed_hosts_that_are_not_host_names_are_refused(value):
    with pytest.raises(SettingsError, match="ALLOWED_HOSTS must list host names"):
        load(env={"ALLOWED_HOSTS": value})
