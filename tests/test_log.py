import logging

import pytest

from ttci.infra.log import MaskingFormatter, mask


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("token=abc123secret", "abc123secret"),
        ('{"token": "s3cr3t-value"}', "s3cr3t-value"),
        ("Authorization: Bearer eyJhbGciOi", "eyJhbGciOi"),
        ("registered glrt-AbCdEf123456", "AbCdEf123456"),
        ("jitconfig=ZW5jb2RlZA==", "ZW5jb2RlZA=="),
        ("webhook secret: hunter2", "hunter2"),
    ],
)
def test_secrets_never_reach_logs(text: str, secret: str) -> None:
    assert secret not in mask(text)
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "got %s", (text,), None)
    assert secret not in MaskingFormatter("%(message)s").format(record)


def test_ordinary_text_is_left_alone() -> None:
    assert mask("VM debian-12-arm64 up in 2.1 s") == "VM debian-12-arm64 up in 2.1 s"


def test_context_and_json_lines() -> None:
    import json

    from ttci.infra.log import JsonFormatter

    record = logging.LogRecord(
        "hostd.vm.manager",
        logging.INFO,
        __file__,
        1,
        "VM %s up, token=%s",
        ("debian-12-arm64", "s3cret"),
        None,
    )
    record.vm = "ab12"
    record.env = "ci-7"
    text = MaskingFormatter("%(name)s: %(message)s").format(record)
    assert text == "hostd.vm.manager: [env=ci-7 vm=ab12] VM debian-12-arm64 up, token=***"
    obj = json.loads(JsonFormatter().format(record))
    assert obj["vm"] == "ab12" and obj["env"] == "ci-7" and obj["level"] == "info"
    assert "s3cret" not in obj["msg"]
