"""The settings table: names, precedence (flag > environment > file > default), masking, errors,
and that every daemon keeps its flags, environment variables and defaults."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from hostd.cli.main import make_parser as hostd_parser
from runner_executor.cli import make_parser as executor_parser
from runner_executor.core import job
from ttci.infra.settings import (
    DAEMONS,
    SETTINGS,
    Setting,
    add_setting,
    add_settings,
    describe,
    env_text,
    resolve,
)
from ttci.model.errors import BadInput, TTError
from ttci.scheduler.web.serve import make_parser as scheduler_parser
from webhooks.cli import make_parser as webhooks_parser


def _args(
    parser: argparse.ArgumentParser,
    argv: list[str],
    env: dict[str, str] | None = None,
    etc: Path | None = None,
) -> argparse.Namespace:
    a = parser.parse_args(argv)
    resolve(a, env or {}, etc or Path("/nonexistent"))
    return a


def _sub(parser: argparse.ArgumentParser, *names: str) -> argparse.ArgumentParser:
    for name in names:
        [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser = action.choices[name]
    return parser


def _options(parser: argparse.ArgumentParser, *names: str) -> set[str]:
    return {o for a in _sub(parser, *names)._actions for o in a.option_strings}


def _help(parser: argparse.ArgumentParser, *names: str) -> str:
    return " ".join(_sub(parser, *names).format_help().split())


# The environment variables the daemons and the client read before the table drove them.
OLD_ENV = {
    "image-path": "TT_IMAGE_PATH",
    "cache-dir": "TT_CACHE_DIR",
    "state-dir": "TT_STATE_DIR",
    "mirror": "TT_MIRROR",
    "join-token": "TT_JOIN_TOKEN",
    "hostd-token": "TT_HOSTD_TOKEN",
    "admin-token": "TT_ADMIN_TOKEN",
    "config": "TT_CONFIG",
    "server": "TT_SERVER",
    "token": "TT_TOKEN",
    "gh-state-dir": "TT_GH_STATE_DIR",
    "gh-api-url": "TT_GH_API_URL",
    "gh-app-id": "TT_GH_APP_ID",
    "gh-app-key-file": "TT_GH_APP_KEY_FILE",
    "gh-app-key": "TT_GH_APP_KEY",
    "gh-webhook-secret": "TT_GH_WEBHOOK_SECRET",
    "gh-token": "TT_GH_TOKEN",
    "gh-admin-token": "TT_GH_ADMIN_TOKEN",
}


@pytest.mark.parametrize(("name", "env"), sorted(OLD_ENV.items()))
def test_the_old_environment_variables_keep_their_names(name: str, env: str) -> None:
    assert SETTINGS[name].env == env


def test_rows_are_consistent() -> None:
    envs = [s.env for s in SETTINGS.values()]
    assert len(envs) == len(set(envs)), "two rows share an environment variable"
    assert all(e.startswith("TT_") for e in envs)
    used = {e if isinstance(e, str) else e[0] for uses in DAEMONS.values() for e in uses}
    assert used <= set(SETTINGS)
    for s in SETTINGS.values():
        assert s.help
        assert not (s.secret and s.default), f"{s.name}: a secret has no default"
        if s.file:
            assert s.secret and SETTINGS[s.file].flag, s.name
        if s.default is not None:  # every default parses
            s.parse(s.default, "default")


OLD_FLAGS = {
    ("tt-scheduler",): (
        "--listen --server-set --join-token --host-timeout --hostd-token --admin-token "
        "--state-dir --verbose --version"
    ),
    ("tt-hostd", "serve"): (
        "--listen --token --host-id --image-path --state-dir --cpu-total --mem-total "
        "--disk-total --libvirt-uri --private-libvirtd --keep-vms --outgoing --vm-net-pool "
        "--port-range --public-addr --protect --join --join-token --advertise"
    ),
    ("tt-github-webhooks", "serve"): (
        "--listen --state-dir --secret-file --api-url --app-id --app-key-file --scope "
        "--runner-group-id --label --max-age --cpus --mem --disk --life-time --runner-dir "
        "--push-runner --jit-via --max-vms --max-per-owner --reconcile-interval "
        "--runner-timeout --repo --threads --admin-token-file"
    ),
    ("tt-github-webhooks", "jobs"): "--state-dir --state --json",
    ("tt-gitlab-executor",): (
        "--tt-config --runner-name --cpus --memory --disk --max-cpus --max-memory --max-disk"
    ),
}
PARSERS = {
    "tt-scheduler": scheduler_parser,
    "tt-hostd": hostd_parser,
    "tt-github-webhooks": webhooks_parser,
    "tt-gitlab-executor": executor_parser,
}


@pytest.mark.parametrize("path", sorted(OLD_FLAGS), ids=" ".join)
def test_every_flag_is_still_there(path: tuple[str, ...]) -> None:
    options = _options(PARSERS[path[0]](), *path[1:])
    assert set(OLD_FLAGS[path].split()) <= options


def test_the_defaults_are_the_old_ones() -> None:
    a = _args(scheduler_parser(), [])
    assert (a.listen, a.server_set, a.host_timeout) == ("127.0.0.1:7400", "", 15.0)
    assert (a.join_token, a.hostd_token, a.admin_token) == ("", "", "")
    assert a.state_dir == Path("/var/lib/ttci/state")
    h = _args(hostd_parser(), ["serve"])
    assert (h.listen, h.token, h.host_id, h.libvirt_uri) == (
        "127.0.0.1:7420",
        "",
        None,
        "qemu:///system",
    )
    assert (h.cpu_total, h.mem_total, h.disk_total, h.public_addr, h.join) == (None,) * 5
    assert (h.private_libvirtd, h.keep_vms, h.outgoing) == (False, False, "allow")
    assert (h.vm_net_pool, h.port_range) == ("10.213.0.0/16", "20000-29999")
    assert h.image_path == Path("/var/lib/ttci/images")
    w = _args(webhooks_parser(), ["serve"])
    assert (w.listen, w.state_dir) == ("127.0.0.1:7430", Path("/var/lib/ttci/github"))
    assert (w.api_url, w.app_id, w.app_key_file, w.scope) == (
        "https://api.github.com",
        "",
        None,
        "repo",
    )
    assert (w.runner_group_id, w.label, w.max_age, w.cpus, w.memory, w.disk) == (
        1,
        "tt",
        3600.0,
        1.0,
        1024,
        0,
    )
    assert (w.life_time, w.runner_dir, w.push_runner, w.jit_via) == (
        21600.0,  # 6h
        "/opt/actions-runner",
        None,
        "env",
    )
    # --max-vms/--max-per-owner: accepted, deprecated (TT CI's quotas); unset unless given
    assert (w.max_vms, w.max_per_owner, w.max_waiting) == (None, None, 8)
    assert (w.reconcile_interval, w.runner_timeout) == (60, 300)
    assert (w.repo, w.threads, w.gh_webhook_secret, w.gh_token) == ([], 16, "", "")


def test_the_executors_defaults_are_job_limits() -> None:
    a = _args(executor_parser(), ["config"])
    assert a.tt_config is None and a.runner_name is None
    got = job.Limits(a.cpus, a.memory, a.disk, a.max_cpus, a.max_memory, a.max_disk)
    assert got == job.Limits()


def test_a_flag_beats_the_environment_which_beats_the_file(tmp_path: Path) -> None:
    (tmp_path / "tt-scheduler.toml").write_text(
        'listen = "10.0.0.1:1"\nhost-timeout = 30\nserver_set = "a=10.0.0.2:7420"\n'
    )
    env = {"TT_SCHEDULER_LISTEN": "10.0.0.1:2", "TT_SCHEDULER_HOST_TIMEOUT": "20"}
    a = _args(scheduler_parser(), ["--host-timeout", "10"], env, tmp_path)
    assert (a.host_timeout, a.listen, a.server_set) == (10.0, "10.0.0.1:2", "a=10.0.0.2:7420")
    a = _args(scheduler_parser(), [], {}, tmp_path)
    assert (a.host_timeout, a.listen) == (30.0, "10.0.0.1:1")


def test_resolve_says_where_each_value_came_from(tmp_path: Path) -> None:
    (tmp_path / "tt-hostd.toml").write_text("keep-vms = true\n")
    a = hostd_parser().parse_args(["serve", "--listen", "0.0.0.0:1"])
    got = resolve(a, {"TT_HOSTD_TOKEN": "t0ken-value"}, tmp_path)
    sources = {r.setting.name: r.source for r in got}
    assert sources["hostd-listen"] == "flag --listen"
    assert sources["hostd-token"] == "env TT_HOSTD_TOKEN"
    assert sources["hostd-keep-vms"] == f"file {tmp_path / 'tt-hostd.toml'}"
    assert sources["hostd-outgoing"] == "default"
    assert a.keep_vms is True and a.token == "t0ken-value"
    assert resolve(a, {}, tmp_path) == []  # done once; the namespace keeps the values
    assert a.keep_vms is True


def test_booleans_and_lists_from_every_source() -> None:
    a = _args(hostd_parser(), ["serve"], {"TT_HOSTD_KEEP_VMS": "yes"})
    assert a.keep_vms is True
    a = _args(hostd_parser(), ["serve", "--no-keep-vms"], {"TT_HOSTD_KEEP_VMS": "yes"})
    assert a.keep_vms is False
    a = _args(webhooks_parser(), ["serve"], {"TT_GH_REPO": "a/b, c/d"})
    assert a.repo == ["a/b", "c/d"]
    a = _args(webhooks_parser(), ["serve", "--repo", "x/y", "--repo", "z/w"], {"TT_GH_REPO": "a/b"})
    assert a.repo == ["x/y", "z/w"]


def test_an_empty_variable_is_unset() -> None:
    a = _args(webhooks_parser(), ["serve"], {"TT_GH_STATE_DIR": ""})
    assert a.state_dir == Path("/var/lib/ttci/github")
    assert env_text("server", {"TT_SERVER": ""}) is None
    assert env_text("server", {"TT_SERVER": "h:1"}) == "h:1"


@pytest.mark.parametrize(
    ("argv", "env", "words", "hint"),
    [
        (
            ["--host-timeout", "soon"],
            {},
            "--host-timeout 'soon' is not a number",
            "--host-timeout 15",
        ),
        ([], {"TT_SCHEDULER_HOST_TIMEOUT": "x"}, "TT_SCHEDULER_HOST_TIMEOUT 'x'", "=15"),
        ([], {"TT_SCHEDULER_LISTEN": "nowhere"}, "is not ADDR:PORT", "TT_SCHEDULER_LISTEN="),
        (["--listen", "nowhere"], {}, "--listen 'nowhere' is not ADDR:PORT", "--listen 127.0"),
    ],
)
def test_bad_values_name_their_source_and_the_fix(
    argv: list[str], env: dict[str, str], words: str, hint: str
) -> None:
    with pytest.raises(BadInput) as e:
        _args(scheduler_parser(), argv, env)
    assert words in e.value.message and hint in (e.value.hint or "")


def test_a_bad_choice_lists_the_choices() -> None:
    with pytest.raises(BadInput, match="TT_HOSTD_OUTGOING 'maybe' is not one of allow, deny"):
        _args(hostd_parser(), ["serve"], {"TT_HOSTD_OUTGOING": "maybe"})


def test_the_config_file_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "tt-hostd.toml"
    path.write_text('mem-total = "lots"\n')
    with pytest.raises(BadInput, match=r"mem-total in .*tt-hostd.toml 'lots' is not a whole"):
        _args(hostd_parser(), ["serve"], {}, tmp_path)
    path.write_text('listne = "1.2.3.4:5"\n')
    with pytest.raises(BadInput, match="no setting 'listne'") as e:
        _args(hostd_parser(), ["serve"], {}, tmp_path)
    assert "listen" in (e.value.hint or "")
    path.write_text('token = "in-a-file"\n')
    with pytest.raises(BadInput, match="secrets are not read from config files") as e:
        _args(hostd_parser(), ["serve"], {}, tmp_path)
    assert "TT_HOSTD_TOKEN" in (e.value.hint or "") and "in-a-file" not in e.value.message
    path.write_text("listen = [\n")
    with pytest.raises(BadInput, match="cannot read"):
        _args(hostd_parser(), ["serve"], {}, tmp_path)


def test_the_webhook_programs_commands_share_one_file(tmp_path: Path) -> None:
    (tmp_path / "tt-github-webhooks.toml").write_text('state-dir = "/srv/gh"\nmax-vms = 3\n')
    a = _args(webhooks_parser(), ["jobs"], {}, tmp_path)  # jobs knows max-vms is serve's
    assert a.state_dir == Path("/srv/gh")
    a = _args(webhooks_parser(), ["serve"], {}, tmp_path)
    assert (a.state_dir, a.max_vms) == (Path("/srv/gh"), 3)


def test_a_secret_file_beats_its_variable(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("from-file\n")
    env = {"TT_GH_WEBHOOK_SECRET": "from-env", "TT_GH_APP_KEY": "pem"}
    a = _args(webhooks_parser(), ["serve", "--secret-file", str(tmp_path / "secret")], env)
    assert (a.gh_webhook_secret, a.gh_app_key) == ("from-file", "pem")
    a = _args(webhooks_parser(), ["serve"], env)
    assert a.gh_webhook_secret == "from-env"
    with pytest.raises(TTError, match=r"cannot read the App key from /nonexistent/k\.pem"):
        _args(webhooks_parser(), ["serve"], {"TT_GH_APP_KEY_FILE": "/nonexistent/k.pem"})


def test_secrets_are_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TT_ADMIN_TOKEN", "adm1n-s3cret")
    monkeypatch.setenv("TT_GH_TOKEN", "ghp_s3cret")
    helps = _help(scheduler_parser()) + _help(webhooks_parser(), "serve")
    assert "s3cret" not in helps
    assert "TT_ADMIN_TOKEN; secret" in helps and "TT_GH_TOKEN" in helps
    a = scheduler_parser().parse_args(["--listen", "127.0.0.1:1"])
    lines = describe(resolve(a, etc=Path("/nonexistent")))
    assert a.admin_token == "adm1n-s3cret"
    assert "admin-token = *** (env TT_ADMIN_TOKEN)" in lines
    assert "hostd-token = (unset) (default)" in lines
    assert "scheduler-listen = 127.0.0.1:1 (flag --listen)" in lines
    assert not any("s3cret" in line for line in lines)


def test_help_names_the_variable_and_the_default() -> None:
    text = _help(hostd_parser(), "serve")
    assert "(env TT_HOSTD_LISTEN, default 127.0.0.1:7420)" in text
    assert "/etc/ttci/tt-hostd.toml" in text
    assert "80 % free" in text  # a % in a row's help is not argparse's


def test_one_setting_for_a_plain_command() -> None:
    p = argparse.ArgumentParser()
    add_setting(p, "image-path")
    a = p.parse_args([])
    resolve(a, {"TT_IMAGE_PATH": "/srv/images"}, Path("/nonexistent"))
    assert a.image_path == Path("/srv/images")
    p = argparse.ArgumentParser()
    add_settings(p, "tt-github-webhooks jobs")
    assert p.epilog and "tt-github-webhooks.toml" in p.epilog


@pytest.mark.parametrize(
    ("parser", "argv", "name"),
    [
        (scheduler_parser, [], "tt-scheduler"),
        (hostd_parser, ["serve"], "tt-hostd"),
        (webhooks_parser, ["serve"], "tt-github-webhooks"),
    ],
    ids=["tt-scheduler", "tt-hostd", "tt-github-webhooks"],
)
def test_print_config_shows_the_effective_values_secrets_masked(
    parser: object, argv: list[str], name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import tomllib

    p = parser()  # type: ignore[operator]
    file = tmp_path / "mine.toml"
    file.write_text('listen = "127.0.0.1:7999"\n')
    env = {"TT_ADMIN_TOKEN": "s3cret-a", "TT_HOSTD_TOKEN": "s3cret-h", "TT_GH_TOKEN": "s3cret-g"}
    with pytest.raises(SystemExit) as e:
        _args(p, [*argv, "--config-file", str(file), "--print-config"], env)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "s3cret" not in out and str(file) in out
    assert f'listen = "127.0.0.1:7999"  # file {file}' in out
    assert 'state-dir = "/var/lib/ttci' in out  # a default
    values = tomllib.loads(out)  # it is a config file: the non-secret keys, read back
    assert values["listen"] == "127.0.0.1:7999"
    for key in values:
        assert not _setting_of(name, key).secret
    with pytest.raises(BadInput, match="does not exist"):
        _args(p, [*argv, "--config-file", str(tmp_path / "missing.toml")])


def _setting_of(program: str, key: str) -> Setting:
    for daemon, entries in DAEMONS.items():
        if daemon.split()[0] != program:
            continue
        for entry in entries:
            sname, flag = (entry, None) if isinstance(entry, str) else entry
            if (flag or SETTINGS[sname].flag or "").removeprefix("--") == key:
                return SETTINGS[sname]
    raise KeyError(key)


def test_the_client_config_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from ttci.client.config import config_path

    monkeypatch.delenv("TT_CONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    assert config_path() == tmp_path / "home/.config/tt/config.json"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert config_path() == tmp_path / "xdg/tt/config.json"
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/dir")  # not absolute: ignored (XDG spec)
    assert config_path() == tmp_path / "home/.config/tt/config.json"
    monkeypatch.setenv("TT_CONFIG", str(tmp_path / "named.json"))
    assert config_path() == tmp_path / "named.json"
