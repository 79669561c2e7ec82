"""Egress allow-lists and guest DNS, the pure parts: rule parsing, the wire fields, the ENV's
nftables table (checked by the real `nft -c`), the forwarder's configuration (checked by the
real `dnsmasq --test`), the guest's resolv.conf as the initrd writes it, and the front-ends."""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
from pathlib import Path

import pytest

from hostd.builders.egress_plan import (
    EgressPlan,
    answers_from_log,
    blocked_from_json,
    dnsmasq_conf,
    egress_table_name,
    egress_table_script,
    name_sets,
    parse_upstreams,
)
from hostd.builders.net_plan import kernel_dns_arg, resolv_conf
from hostd.builders.nft_ruleset import EnvRules, HostRules, ruleset
from hostd.images.guest_files import GUEST_DIR, guest_files
from hostd.net.dns import upstreams
from runner_executor.core import job
from ttci.model.egress import EgressRule, egress_text, merge_rules, parse_egress, parse_rule
from ttci.model.errors import BadInput
from ttci.wire.envs import EnvRequest, VMRequest

GW = ipaddress.IPv4Address("10.213.0.1")


def nft_check(script: str, tmp_path: Path) -> None:
    f = tmp_path / "egress.nft"
    f.write_text(script)
    r = subprocess.run(["nft", "-c", "-f", str(f)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr + script


@pytest.mark.parametrize(
    ("text", "rule", "shown"),
    [
        ("git.example.com", EgressRule("name", "git.example.com"), "git.example.com"),
        ("*.PyPI.org.", EgressRule("name", "*.pypi.org"), "*.pypi.org"),
        ("gitlab.example.com:443", EgressRule("name", "gitlab.example.com", 443), None),
        ("10.1.0.0/16:443", EgressRule("net", "10.1.0.0/16", 443), None),
        ("10.1.2.3", EgressRule("net", "10.1.2.3/32"), "10.1.2.3"),
        ("10.1.2.3/16", EgressRule("net", "10.1.0.0/16"), "10.1.0.0/16"),
        ("_acme.example.com", EgressRule("name", "_acme.example.com"), None),
    ],
)
def test_rules_parse_to_one_form(text: str, rule: EgressRule, shown: str | None) -> None:
    assert parse_rule(text) == rule
    assert rule.text == (shown or text)
    assert parse_rule(rule.text) == rule


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("localhost", "with a dot"),
        ("a*.example.com", "wildcard only as its first label"),
        ("*.*.example.com", "wildcard only"),
        ("*.com", "with a dot"),
        ("exa mple.com", "with a dot"),
        ("example.com:0", "port outside"),
        ("example.com:70000", "port outside"),
        ("10.1.2.300", "not a valid IPv4"),
        ("1.2.3", "not a valid IPv4"),
        ("::1", "IPv6"),
        ("[2001:db8::1]:443", "IPv6"),
        ("foo.123", "looks like an address"),
        ("a;rm -rf.com", "with a dot"),
    ],
)
def test_bad_rules_say_what_is_wrong(text: str, why: str) -> None:
    with pytest.raises(BadInput, match=re.escape(why)):
        parse_rule(text)


def test_lists_are_sorted_without_repeats_and_bounded() -> None:
    rules = parse_egress("b.example.com, a.example.com,b.example.com,\n10.0.0.0/8")
    assert egress_text(rules) == ["a.example.com", "b.example.com", "10.0.0.0/8"]
    assert parse_egress(["a.example.com,b.example.com", "10.0.0.0/8"]) == rules
    assert parse_egress(None) == parse_egress("") == ()
    merged = merge_rules(rules, parse_egress("a.example.com,c.example.com"))
    assert egress_text(merged) == ["a.example.com", "b.example.com", "c.example.com", "10.0.0.0/8"]
    with pytest.raises(BadInput, match="more than 200"):
        parse_egress([f"h{i}.example.com" for i in range(201)])
    with pytest.raises(BadInput, match="not a list"):
        parse_egress({"a": 1})


def test_requests_carry_the_list_and_audit_and_refuse_contradictions() -> None:
    req = EnvRequest("ci-1", "debian-12", allow_egress=parse_egress("git.example.com"))
    d = req.to_dict()
    assert d["allow_egress"] == ["git.example.com"] and "egress_audit" not in d
    assert EnvRequest.from_dict(d) == req
    audit = EnvRequest.from_dict({**d, "allow_egress": "a.example.com,10.0.0.0/8:443",
                                  "egress_audit": True})  # fmt: skip
    assert egress_text(audit.allow_egress) == ["a.example.com", "10.0.0.0/8:443"]
    plain = EnvRequest("ci-2", "debian-12").to_dict()
    assert "allow_egress" not in plain  # older schedulers and hostds never see the fields
    with pytest.raises(BadInput, match="contradict"):
        EnvRequest.from_dict({**d, "deny_outgoing": True})
    with pytest.raises(BadInput, match="egress rule"):
        EnvRequest.from_dict({**d, "allow_egress": ["not a name"]})
    with pytest.raises(BadInput, match="true or false"):
        EnvRequest.from_dict({**d, "egress_audit": "yes"})
    vm = VMRequest("v1", "ci-1", "vm", "", "qemu:debian-12:amd64", allow_egress=req.allow_egress,
                   egress_audit=True)  # fmt: skip
    assert VMRequest.from_dict(vm.to_dict()) == vm
    with pytest.raises(BadInput, match="contradict"):
        VMRequest.from_dict({**vm.to_dict(), "deny_outgoing": True})


def _plan(rules: str, audit: bool = False, ups: tuple[str, ...] = ("10.250.0.100",)) -> EgressPlan:
    bridge = "ttbabc123def45"
    return EgressPlan("ci-1", egress_table_name("abc123", bridge), bridge, GW,
                      parse_egress(rules), audit, ups)  # fmt: skip


def test_the_env_table_enforces_names_networks_and_ports(tmp_path: Path) -> None:
    plan = _plan("git.example.com,*.pypi.org,pypi.org:443,10.1.0.0/16:443,10.2.3.4")
    assert plan.table == "ttci_abc123_def45" and plan.mode == "enforce"
    script = egress_table_script(plan)
    nft_check(script, tmp_path)
    assert "priority filter - 10" in script  # before the hostd's main table
    assert "ip daddr @names return" in script
    assert "ip daddr @names_443 meta l4proto { tcp, udp } th dport 443 return" in script
    assert "elements = { 10.2.3.4/32 }" in script and "10.1.0.0/16 . 443" in script
    assert 'counter name "denied" drop' in script and script.rstrip().endswith("drop\n  }\n}")
    assert name_sets(plan.rules) == {
        "git.example.com": ["names"],
        "pypi.org": ["names", "names_443"],
    }


def test_audit_mode_counts_but_lets_through(tmp_path: Path) -> None:
    script = egress_table_script(_plan("git.example.com", audit=True))
    nft_check(script, tmp_path)
    assert " drop" not in script
    assert 'add @seen { ip daddr . meta l4proto . th dport } counter name "denied" return' in script
    empty = _plan("", audit=True)  # audit of an empty list: everything would be blocked
    assert empty.filtered and empty.mode == "audit"
    nft_check(egress_table_script(empty), tmp_path)
    assert not _plan("").filtered and _plan("").mode == "open"


def test_the_forwarder_resolves_only_listed_names_when_enforcing(tmp_path: Path) -> None:
    enforce = dnsmasq_conf(_plan("git.example.com,*.pypi.org", ups=("10.0.0.53", "10.0.0.54#5353")),
                           "/run/x.pid", "/run/x.log")  # fmt: skip
    lines = enforce.splitlines()
    assert "no-resolv" in lines and "no-hosts" in lines and f"listen-address={GW}" in lines
    assert not [x for x in lines if re.fullmatch(r"server=[0-9.#]+", x)]  # no default server
    assert "server=/git.example.com/10.0.0.54#5353" in lines
    assert "server=/*.pypi.org/10.0.0.53" in lines  # names under pypi.org, not pypi.org
    assert "nftset=/pypi.org/4#inet#ttci_abc123_def45#names" in lines
    assert "log-queries" not in lines
    audit = dnsmasq_conf(_plan("git.example.com", audit=True), "/run/x.pid", "/run/x.log")
    assert "server=10.250.0.100" in audit.splitlines() and "log-queries" in audit.splitlines()
    opened = dnsmasq_conf(_plan(""), "/run/x.pid", "/run/x.log")
    assert "server=10.250.0.100" in opened.splitlines() and "nftset" not in opened
    for i, text in enumerate((enforce, audit, opened)):
        conf = tmp_path / f"{i}.conf"
        conf.write_text(text)
        r = subprocess.run(["dnsmasq", "--test", f"--conf-file={conf}"], capture_output=True,
                           text=True)  # fmt: skip
        assert r.returncode == 0, r.stderr + text


def test_upstreams_come_from_the_flag_or_the_hosts_resolv_conf(tmp_path: Path) -> None:
    assert parse_upstreams("10.0.0.53, 10.0.0.54:5353,10.0.0.53:53") == (
        "10.0.0.53",
        "10.0.0.54#5353",
    )
    for bad in ("dns.example.com", "10.0.0.53:99999", "::1"):
        with pytest.raises(ValueError):
            parse_upstreams(bad)
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("# comment\nnameserver 192.0.2.53\nnameserver ::1\nsearch x\n")
    assert upstreams("host", resolv) == ("192.0.2.53",)
    assert upstreams("none", resolv) == ()
    assert upstreams("192.0.2.7:5300", resolv) == ("192.0.2.7#5300",)
    assert upstreams("host", tmp_path / "missing") == ()


def test_the_main_table_opens_port_53_of_the_gateway_only_to_envs_with_a_forwarder(
    tmp_path: Path,
) -> None:
    a = EnvRules("ttbr-a", ipaddress.IPv4Network("10.77.0.0/24"), dns=True)
    b = EnvRules("ttbr-b", ipaddress.IPv4Network("10.77.1.0/24"), deny_outgoing=True)
    script = ruleset(HostRules("ttci_test", (a, b)))
    nft_check(script, tmp_path)
    rule = 'iifname "ttbr-a" ip daddr 10.77.0.1 meta l4proto { tcp, udp } th dport 53 accept'
    assert rule in script and "10.77.1.1" not in script
    assert script.index(rule) < script.index("iifname @env_bridges drop")


def test_blocked_destinations_are_named_from_the_forwarders_answers() -> None:
    log = (
        "Nov 30 06:23:11 dnsmasq[1]: query[A] other.test.lan from 10.213.0.2\n"
        "Nov 30 06:23:11 dnsmasq[1]: reply other.test.lan is 10.250.0.103\n"
        "Nov 30 06:23:12 dnsmasq[1]: reply cdn.test.lan is 10.250.0.103\n"
        "Nov 30 06:23:12 dnsmasq[1]: reply x.test.lan is <CNAME>\n"
    )
    names = answers_from_log(log)
    assert names == {"10.250.0.103": {"other.test.lan", "cdn.test.lan"}}
    doc = {"nftables": [{"metainfo": {}}, {"set": {"name": "seen", "elem": [
        {"elem": {"val": {"concat": ["10.250.0.103", 6, 80]}, "expires": 86000}},
        {"concat": ["10.250.0.9", 17, 53]},
    ]}}]}  # fmt: skip
    blocked = [b.to_dict() for b in blocked_from_json(doc, names)]
    assert blocked == [
        {"addr": "10.250.0.103", "proto": "tcp", "port": 80,
         "names": ["cdn.test.lan", "other.test.lan"]},
        {"addr": "10.250.0.9", "proto": "udp", "port": 53, "names": []},
    ]  # fmt: skip


def test_the_guest_gets_its_resolvers_on_the_command_line_and_no_build_machine_resolver(
    tmp_path: Path,
) -> None:
    assert kernel_dns_arg(("10.213.0.1",)) == "tt.dns=10.213.0.1" and kernel_dns_arg(()) == ""
    for profile in ("agent", "systemd"):
        mode, text = guest_files(profile)["/etc/resolv.conf"]
        assert b"nameserver" not in text and mode == 0o644
    # The initrd writes what resolv_conf() says, for both cases (run with the host's sh).
    init = (GUEST_DIR / "initrd-init").read_text()
    block = init[
        init.index("rm -f /newroot/etc/resolv.conf") : init.index('[ -x "/newroot$init" ]')
    ]
    root = tmp_path / "newroot"
    (root / "etc").mkdir(parents=True)
    (root / "etc/resolv.conf").symlink_to("/run/systemd/resolve/stub-resolv.conf")
    for dns, servers in (("10.213.0.1", ("10.213.0.1",)), ("", ())):
        script = f"dns={dns}\n" + block.replace("/newroot", str(root))
        subprocess.run(["sh", "-c", script], check=True)
        written = root / "etc/resolv.conf"
        assert not written.is_symlink() and written.read_text() == resolv_conf(servers)


def test_gitlab_jobs_ask_for_an_allow_list_with_a_variable() -> None:
    jv = {"CI_JOB_ID": "7", "TT_ALLOW_EGRESS": "gitlab.example.com, *.pypi.org"}
    req = job.env_request(jv, "qemu:debian-12:amd64", job.Size(1, 512, 0))
    assert egress_text(req.allow_egress) == ["*.pypi.org", "gitlab.example.com"]
    assert not req.egress_audit
    assert job.env_request({**jv, "TT_EGRESS_AUDIT": "true"}, "x", job.Size(1, 512, 0)).egress_audit
    assert job.env_request({"CI_JOB_ID": "7"}, "x", job.Size(1, 512, 0)).allow_egress == ()
    with pytest.raises(job.JobError, match="TT_ALLOW_EGRESS"):
        job.env_request({**jv, "TT_ALLOW_EGRESS": "nope"}, "x", job.Size(1, 512, 0))


def test_tt_job_run_and_tt_env_add_take_the_flags() -> None:
    from ttci.cli.main import make_parser

    parser = make_parser()
    add = ["env", "add", "e", "--os-prefix", "debian-12", "--allow-egress", "a.example.com"]
    args = parser.parse_args([*add, "--egress-audit"])
    assert (args.allow_egress, args.egress_audit) == ("a.example.com", True)
    run = ["job", "run", "--os", "debian-12", "--arch", "amd64"]
    args = parser.parse_args([*run, "--allow-egress", "10.0.0.0/8", "--", "true"])
    assert args.allow_egress == "10.0.0.0/8" and not args.egress_audit
    assert json.dumps(egress_text(parse_egress(args.allow_egress))) == '["10.0.0.0/8"]'


def test_github_jobs_get_the_services_list_and_their_repositorys() -> None:
    import tomllib

    from webhooks.core.egress import job_egress, parse_egress_file

    repos = parse_egress_file(
        tomllib.loads(
            '[repos."Octo/App"]\nallow = ["registry.npmjs.org", "10.1.0.0/16:443"]\naudit = true\n'
        )
    )
    service = parse_egress("github.com,*.actions.githubusercontent.com")
    allow, audit = job_egress("octo/app", service, repos)
    assert egress_text(allow) == [
        "*.actions.githubusercontent.com",
        "github.com",
        "registry.npmjs.org",
        "10.1.0.0/16:443",
    ]
    assert audit
    assert job_egress("octo/other", service, repos) == (service, False)
    assert job_egress("octo/other", (), {}) == ((), False)  # no list: reaches anything
    for bad in ('[repos."noslash"]\nallow = []', '[repos."a/b"]\naudit = "yes"', "x = 1",
                '[repos."a/b"]\nallow = ["not a host"]'):  # fmt: skip
        with pytest.raises(BadInput):
            parse_egress_file(tomllib.loads(bad))
