"""Configuration layering (file -> environment -> flags) and the errors an operator sees for a broken one."""

from pathlib import Path

import pytest

from spotguard.config import load
from spotguard.errors import ConfigError


def test_environment_beats_file_and_flags_beat_environment(tmp_path: Path) -> None:
    path = tmp_path / "spotguard.toml"
    path.write_text('[agent]\npoll_interval = 3.0\ncloud = "gcp"\n[drain]\nsafety_margin = 7\n')
    config = load(path, environ={"SPOTGUARD_AGENT_POLL_INTERVAL": "2", "SPOTGUARD_DRAIN_SAFETY_MARGIN": "4"},
                  overrides={"drain": {"safety_margin": 5.0}})
    assert config.agent.poll_interval == 2.0
    assert config.agent.cloud == "gcp"
    assert config.drain.safety_margin == 5.0


def test_tooling_variables_under_the_prefix_are_not_configuration() -> None:
    # The Makefile exports SPOTGUARD_CACHE; a daemon started from that shell must not refuse to run.
    environ = {"SPOTGUARD_CACHE": "/tmp/cache", "SPOTGUARD_LLAMA_SERVER": "/bin/true"}
    assert load(None, environ=environ).agent.cloud == "auto"


def test_a_missing_config_file_named_anywhere_is_an_error_that_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=f"{missing}.*SPOTGUARD_CONFIG.*does not exist"):
        load(None, environ={"SPOTGUARD_CONFIG": str(missing)})
    with pytest.raises(ConfigError, match=f"{missing}.*--config.*does not exist"):
        load(missing, environ={})


@pytest.mark.parametrize(("section", "values", "message"), [
    ("shutdown", {"budget": 5.0}, r"\[shutdown\] budget 5s is not more than \[drain\] safety_margin 5s"),
    ("drain", {"manual_deadline": 3.0}, r"manual_deadline 3s is not more than"),
    ("drain", {"snapshot_budget": -1.0}, r"snapshot_budget must be >= 0"),
    ("gate", {"allow_paths": ["/slots/../x"]}, r"allow_paths: '/slots/../x'"),
    ("gate", {"head_timeout": 0}, r"\[gate\] head_timeout must be > 0 seconds"),
    ("gate", {"max_headers": 0}, r"\[gate\] max_headers must be at least 1"),
    ("gate", {"max_body": 100, "body_memory": 99}, r"\[gate\] body_memory \(99\) must be at least \[gate\] max_body"),
])
def test_budgets_and_gate_paths_that_cannot_work_are_errors(section: str, values: dict[str, object],
                                                            message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(None, environ={}, overrides={section: values})


@pytest.mark.parametrize("values", [{"upstream": "http://user:hunter2@127.0.0.1:8000"},
                                    {"peers": ["https://10.0.0.2:8080", "https://ops:hunter2@10.0.0.3:8080"]}])
def test_credentials_in_a_gate_url_are_refused_without_being_echoed(values: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=r"\[gate\] (upstream|peers): a URL with credentials") as refused:
        load(None, environ={}, overrides={"gate": values})
    assert "hunter2" not in str(refused.value)


def test_a_shutdown_budget_within_the_margin_is_fine_when_sigterm_does_not_drain() -> None:
    assert load(None, environ={}, overrides={"shutdown": {"enabled": False, "budget": 1.0}}).shutdown.budget == 1.0


@pytest.mark.parametrize(("environ", "names"), [
    ({"SPOTGUARD_AGNT_POLL_INTERVAL": "1"}, "SPOTGUARD_AGNT_POLL_INTERVAL"),
    ({"SPOTGUARD_AGENT_POLL_INTERVL": "1"}, "poll_intervl"),
    ({"SPOTGUARD_AGENT_POLL_INTERVAL": "soon"}, "poll_interval"),
    ({"SPOTGUARD_AGENT_CLOUD": "oracle"}, "oracle"),
])
def test_a_typo_in_the_environment_is_an_error_that_names_it(environ: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        load(None, environ=environ)


@pytest.mark.parametrize(("text", "names"), [
    ("[agnet]\ncloud = 'aws'\n", "agnet"),
    ("[agent]\ncloud = \n", "not valid TOML"),
    ("[control]\nmode = 'rw'\n", "mode"),
    ("[azure]\ndrain_event_types = ['Preempt', 'Evict']\n",
     r"\[azure\] drain_event_types: 'Evict' is not an Azure scheduled event type \(Freeze, Reboot"),
])
def test_a_broken_file_is_an_error_that_names_the_file_and_the_key(tmp_path: Path, text: str, names: str) -> None:
    path = tmp_path / "spotguard.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=names):
        load(path, environ={})


def test_an_explicit_file_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "missing.toml", environ={})


def test_azure_event_types_are_accepted_in_any_case(tmp_path: Path) -> None:
    path = tmp_path / "spotguard.toml"
    path.write_text("[azure]\ndrain_event_types = ['preempt', 'TERMINATE', 'Redeploy']\n")
    assert load(path, environ={}).azure.drain_event_types == ("preempt", "TERMINATE", "Redeploy")
